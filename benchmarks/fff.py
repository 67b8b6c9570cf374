"""Fast feedforward inference vs dense feed-forward blocks: speed ratios measured side by side in one run.

d = 768, tree depth 11 (4095 neurons, 12 per token, UltraFastBERT-1x11), float32, inputs of 1 to 4096
tokens. Each row times, in turn and best of ``--repeat``:

- **fast**: :func:`calibrate.fff.fff_forward` with the compiled CPU kernel (numba; on a GPU the gather path);
- (a) a dense FFN of the tree's training width (768 -> 4095 -> 768, GELU);
- (b) BERT-base's dense FFN (768 -> 3072 -> 768);
- (c) a dense FFN of the same evaluated width (768 -> 12 -> 768): the honest baseline the papers omit;
- (d) a plain per-level PyTorch loop (``backend="torch"``: one gather of each token's node weights per level;
  CPU only: on a GPU it is the fast path);
- (e) the ``fastfeedforward`` package's ``eval_forward`` (depth 11, leaf width 1), when installed.

Each column is ``time(baseline) / time(fast)`` (> 1: the fast path is faster); "ideal (a)" is the
multiply-add ratio 4095 / 12; "max diff" is the largest difference of the fast path's output from
:func:`calibrate.fff.fff_reference` (the plain per-input loop of the definition) on the row's first 64
inputs (asserted below 1e-3). Target: (a) >= 10x at 1024 tokens. Published anchors: UltraFastBERT's kernel
78x (CPU, kernel only), an independent C++ extension 19x (CPU) vs a dense FFN.

Run: ``python benchmarks/fff.py [--threads 2] [--repeat 5] [--tokens 1 16 128 1024 4096] [--device cpu]``.
"""

from __future__ import annotations

import argparse

import torch
from timing import device_arg, positive_int, side_by_side
from torch import nn

from calibrate.fff import FFF, fff_forward, fff_reference

CHECKED = 64  # inputs of each row compared with the plain per-input loop of the definition


def dense(width: int, d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d)).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeat", type=positive_int, default=5)
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 16, 128, 1024, 4096])
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--depth", type=positive_int, default=11)
    parser.add_argument("--width", type=positive_int, default=768)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    device, d, depth = torch.device(args.device), args.width, args.depth
    torch.manual_seed(0)
    layer = FFF(d, d, depth).to(device).eval()
    nodes = layer.n_nodes
    fast_backend = "numba" if device.type == "cpu" else "torch"
    candidates = {
        "fast": lambda x: fff_forward(layer, x, backend=fast_backend),
        f"(a) dense {nodes}": dense(nodes, d).to(device),
        "(b) dense 3072": dense(3072, d).to(device),
        f"(c) dense {depth + 1}": dense(depth + 1, d).to(device),
    }
    if device.type == "cpu":  # on a GPU the fast path is this loop
        candidates["(d) per-level loop"] = lambda x: fff_forward(layer, x, backend="torch")
    try:
        from fastfeedforward import FFF as PackageFFF

        package = PackageFFF(d, 1, d, depth, activation=nn.GELU()).to(device).eval()
        candidates["(e) fastfeedforward"] = package.eval_forward
    except ImportError:
        print("(e) skipped: the fastfeedforward package is not installed (pip install fastfeedforward==0.2.1)")

    print(
        f"FFF d={d}, depth {depth} ({depth + 1} of {nodes} neurons per token), {device}, {args.threads} threads, "
        f"best of {args.repeat}; columns: time(baseline) / time(fast)"
    )
    names = [n for n in candidates if n != "fast"]
    print("| tokens | " + " | ".join(names) + " | ideal (a) | max diff |")
    print("| --- " * (len(names) + 3) + "|")
    speedup_1024 = None
    with torch.no_grad():
        for n in args.tokens:
            x = torch.randn(n, d, device=device)
            best, out = side_by_side({name: lambda fn=fn, x=x: fn(x) for name, fn in candidates.items()}, args.repeat)
            diff = float((out["fast"][:CHECKED] - fff_reference(layer, x[:CHECKED])).abs().max())
            assert diff < 1e-3, f"the fast path differs from the plain loop of the definition by {diff:g}"
            ratios = " | ".join(f"{best[name] / best['fast']:.1f}x" for name in names)
            print(f"| {n} | {ratios} | {nodes / (depth + 1):.0f}x | {diff:.1e} |")
            if device.type == "cuda":
                print(f"  fast path: {1e3 * best['fast']:.3f} ms")
            if n == 1024:
                speedup_1024 = best[f"(a) dense {nodes}"] / best["fast"]
    if speedup_1024 is not None:
        met = "met" if speedup_1024 >= 10 else "NOT met"
        print(f"target (a) >= 10x at 1024 tokens: {met} ({speedup_1024:.1f}x)")


if __name__ == "__main__":
    main()
