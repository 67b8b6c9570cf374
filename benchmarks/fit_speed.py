"""How fast is ``calibrate.fit`` with token consistency, next to one plain pass over the confidences?

Synthetic cache of 10,000 sequences x 128 tokens x 32 layers, 201 thresholds (the default grid).
Prints, measured side by side in one run:

* ``fit / np.max`` -- the whole ``fit`` (measure lookup, agreement, exit simulation over all thresholds,
  per-sequence losses, p-values, fixed-sequence test) relative to ``np.max`` over the confidence array;
* ``naive / fit`` -- a per-threshold Python loop (vectorised over tokens inside each iteration) relative
  to ``fit``, with the same losses; the two run in turn, best of ``--naive-repeat``.

Run: ``python benchmarks/fit_speed.py [--sequences 10000] [--tokens 128] [--layers 32]``.
"""

from __future__ import annotations

import argparse

import numba
import numpy as np
from timing import positive_int, side_by_side

import calibrate
from calibrate.exits import default_lambdas


def naive_token_losses(cache, conf, lambdas) -> np.ndarray:
    """One Python iteration per threshold: running max, first crossing, disagreement, per-sequence mean."""
    top1 = cache.arrays["topk_ids"][:, :, 0]
    full = cache.arrays["full_tokens"]
    running = np.maximum.accumulate(conf[:, :-1], axis=1)
    seq = cache.sequence_index
    out = np.empty((cache.n_sequences, lambdas.size))
    for k, lam in enumerate(lambdas):
        hit = running >= lam
        layer = np.where(hit.any(axis=1), hit.argmax(axis=1), conf.shape[1] - 1)
        wrong = top1[np.arange(top1.shape[0]), layer] != full
        out[:, k] = np.bincount(seq, weights=wrong, minlength=cache.n_sequences) / cache.lengths
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=positive_int, default=10_000)
    parser.add_argument("--tokens", type=positive_int, default=128)
    parser.add_argument("--layers", type=positive_int, default=32)
    parser.add_argument("--repeat", type=positive_int, default=7)
    parser.add_argument("--naive-repeat", type=positive_int, default=2)
    args = parser.parse_args(argv)

    cache = calibrate.synthetic_cache(
        args.sequences,
        n_layers=args.layers,
        max_tokens=args.tokens,
        min_tokens=args.tokens,
        top_k=2,
        store_hidden=False,
        references=False,
        seed=0,
    )
    conf = cache.arrays["softmax_gap"]
    lambdas = default_lambdas()
    print(
        f"cache: {cache.n_sequences} sequences x {args.tokens} tokens x {cache.n_layers} layers "
        f"({conf.nbytes / 2**20:.0f} MiB of float32 confidences), {lambdas.size} thresholds; "
        f"fit's exit sweep runs on {numba.get_num_threads()} threads, np.max on one"
    )

    def fit():
        return calibrate.fit(cache, delta=0.1, epsilon=0.05, measure="softmax_gap")

    def naive():
        return naive_token_losses(cache, conf, lambdas)

    best, _ = side_by_side({"np.max": lambda: np.max(conf), "fit": fit}, args.repeat)
    paired, out = side_by_side({"fit": fit, "naive": naive}, args.naive_repeat, warmup=False)
    table = calibrate.proxy_losses(cache, conf, lambdas, consistency="token")
    assert np.allclose(table.losses, out["naive"]), "fit's losses differ from the naive loop's"
    t_max, t_fit = best["np.max"], best["fit"]
    print(f"np.max pass      {t_max * 1e3:9.1f} ms")
    print(f"calibrate.fit    {t_fit * 1e3:9.1f} ms   fit / np.max   = {t_fit / t_max:6.1f}x  (target <= 5x)")
    print(
        f"naive loop       {paired['naive'] * 1e3:9.1f} ms   naive / fit    = {paired['naive'] / paired['fit']:6.1f}x"
    )
    print(f"same losses as the naive loop (asserted); lambda_hat = {out['fit'].lambda_hat}")


if __name__ == "__main__":
    main()
