"""Token elimination: time to first token and whole-generation time next to the unmodified model.

Model: random weights with SmolLM2-135M's shape (``benchmarks/runtime.py``'s ``smollm2_like``: 30 layers,
d=576, 9 heads, 3 KV heads, MLP 1536), so nothing is downloaded; speed does not depend on the weights
(the set of eliminated tokens does, but not their number, which the schedule fixes). Prompts are random
ids without padding; every run generates exactly ``--new`` tokens (no EOS).

Rows per (prompt length, batch size), measured side by side in one run, best of ``--repeat``:

* ``hf``                -- ``model.generate(do_sample=False)``, the baseline;
* ``lat s=1``           -- :func:`calibrate.lat.generate` at speed-up 1 (nothing removed: its overhead);
* ``lat s=x``           -- the knob at predicted prefill speed-up ``x``.

Columns: ``TTFT`` = time to first token (``max_new_tokens=1``) of Hugging Face over ours (higher =
faster); ``whole`` = the same for ``--new`` tokens; ``TTFT/s=1`` = time to first token of our own loop
without elimination over this knob's (the elimination alone); ``predicted`` = the cost model's prefill
speed-up of the vectors processed (:class:`calibrate.lat.KeepSchedule`); ``ach/pred`` = ``TTFT`` over
``predicted`` (target >= 0.8 for prompts of 512 tokens and more, marked), ``(s=1)`` = ``TTFT/s=1`` over
``predicted``. All calls of one table cell group run in turn, ``--repeat`` rounds, best of each. The
``hf`` row says that ``lat s=1`` emitted the tokens of ``model.generate`` (asserted).

Run: ``python benchmarks/lat.py [--prompts 256 1024 2048] [--batch 1 8] [--speedups 1.5 2 3] [--new 16]
[--repeat 1] [--threads 2] [--device cpu]``.
"""

from __future__ import annotations

import argparse

import torch
from runtime import smollm2_like
from timing import device_arg, positive_int, side_by_side

from calibrate import lat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=positive_int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--new", type=positive_int, default=16)
    parser.add_argument("--repeat", type=positive_int, default=1)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", type=device_arg, default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = smollm2_like(args.device)
    device = torch.device(args.device)
    print(f"token elimination, SmolLM2-135M shape (random weights), {args.device}, {torch.get_num_threads()} threads")
    print(
        f"{'prompt':>6} {'batch':>5}  {'run':<10} {'TTFT':>6} {'whole':>6} {'TTFT/s=1':>9} {'predicted':>9} "
        f"{'ach/pred':>8} {'(s=1)':>8}"
    )
    for prompt in args.prompts:
        for batch in args.batch:
            ids = torch.randint(2, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
            ids = ids.to(device)

            def hf(n, ids=ids):
                return lambda: model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)

            def ours(s, n, ids=ids):
                return lambda: lat.generate(model, ids, speedup=s, max_new_tokens=n)

            knobs = (1.0, *args.speedups)
            first, _ = side_by_side({"hf": hf(1), **{s: ours(s, 1) for s in knobs}}, args.repeat)
            whole, out = side_by_side({"hf": hf(args.new), **{s: ours(s, args.new) for s in knobs}}, args.repeat)
            assert torch.equal(out["hf"], out[1.0].sequences), "lat s=1 differs from HF generate"
            print(f"{prompt:>6} {batch:>5}  {'hf':<10} {1.0:>5.2f}x {1.0:>5.2f}x   (lat s=1 emits the tokens of hf)")
            for s in knobs:
                predicted = out[s].predicted_speedup
                vs_hf, vs_full = first["hf"] / first[s], first[1.0] / first[s]
                target = "  (target >= 0.8)" if prompt >= 512 and s > 1 else ""
                print(
                    f"{prompt:>6} {batch:>5}  {f'lat s={s:g}':<10} {vs_hf:>5.2f}x {whole['hf'] / whole[s]:>5.2f}x "
                    f"{vs_full:>8.2f}x {predicted:>8.2f}x {vs_hf / predicted:>8.2f} {vs_full / predicted:>8.2f}"
                    f"{target}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
