"""ROUGE-L consistency losses over the threshold grid: the fast path against a plain rouge-score loop.

500 synthetic sequences with decoded text (64 tokens each), 201 thresholds. The fast path is
``calibrate.proxy_losses(..., consistency="rouge_l")``: it scores each distinct (early, full) pair once,
tokenises each distinct text once and computes the LCS on integer ids with rapidfuzz. The plain loop
calls ``rouge_score.RougeScorer(["rougeL"]).score(full, early)`` for every (sequence, threshold).
Prints the speed ratio (the fast path warmed up, best of 3; the loop once) and checks that both give the
same losses and the same certified threshold.

Run: ``python benchmarks/rouge_speed.py [--sequences 500] [--tokens 64]``.
"""

from __future__ import annotations

import argparse

import numpy as np
from rouge_score import rouge_scorer
from timing import positive_int, side_by_side

import calibrate
from calibrate.exits import default_lambdas, early_tokens, exit_layers


def naive_rouge_losses(cache, conf, lambdas) -> np.ndarray:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    top1 = cache.arrays["topk_ids"][:, :, 0]
    full = cache.arrays["full_tokens"]
    early = early_tokens(top1, exit_layers(conf, lambdas), full)
    out = np.empty((cache.n_sequences, lambdas.size))
    for s in range(cache.n_sequences):
        lo, hi = cache.offsets[s], cache.offsets[s + 1]
        full_text = cache.decode(full[lo:hi].tolist())
        for k in range(lambdas.size):
            text = cache.decode(early[lo:hi, k].tolist())
            # identical outputs cost nothing (rouge-score gives 0 for two texts without tokens)
            out[s, k] = 0.0 if text == full_text else 1.0 - scorer.score(full_text, text)["rougeL"].fmeasure
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=positive_int, default=500)
    parser.add_argument("--tokens", type=positive_int, default=64)
    parser.add_argument("--layers", type=positive_int, default=24)
    args = parser.parse_args()

    cache = calibrate.synthetic_cache(
        args.sequences, n_layers=args.layers, max_tokens=args.tokens, min_tokens=args.tokens, seed=0
    )
    conf = cache.arrays["softmax_gap"]
    lambdas = default_lambdas()
    print(f"{cache.n_sequences} sequences x {args.tokens} tokens x {cache.n_layers} layers, {lambdas.size} thresholds")

    # the fast path warmed up, best of 3; the loop, a minute long, once
    fast_time, fast_out = side_by_side(
        {"fast": lambda: calibrate.proxy_losses(cache, conf, lambdas, consistency="rouge_l")}, 3
    )
    loop_time, loop_out = side_by_side({"loop": lambda: naive_rouge_losses(cache, conf, lambdas)}, 1, warmup=False)
    fast, naive, t_fast, t_naive = fast_out["fast"], loop_out["loop"], fast_time["fast"], loop_time["loop"]

    cert_fast = calibrate.certify(fast, delta=0.1, epsilon=0.05)
    cert_naive = calibrate.certify(naive, lambdas, delta=0.1, epsilon=0.05)
    print(f"fast path        {t_fast:8.2f} s")
    print(f"rouge-score loop {t_naive:8.2f} s   loop / fast = {t_naive / t_fast:6.1f}x  (target >= 100x)")
    diff = np.abs(fast.losses - naive).max()
    assert diff < 1e-12 and cert_fast.lambda_hat == cert_naive.lambda_hat, "the fast path differs from the loop"
    print(f"max |loss difference| = {diff:.2e}; same lambda_hat (asserted): {cert_fast.lambda_hat}")


if __name__ == "__main__":
    main()
