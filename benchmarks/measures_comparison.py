"""Every confidence measure through the same certificate, next to the oracle's average layers.

One cache (``calibrate.synthetic_cache`` by default, or a saved cache via ``--cache``) is split by sequence,
with a seed, into train / calibration / test parts. Each measure -- softmax gap, state saturation, the learned
exit classifier and the three Depth-Adaptive Transformer halting heads -- gets its confidences on the same
calibration and test sequences (the learned ones are trained on the train part only, disjoint from both),
the same threshold grid, the same ``delta``/``epsilon`` and the same loss. Per measure it prints

* ``lambda_hat`` -- the certified threshold (``full`` = only the full model is certified),
* ``cal risk`` / ``test risk`` -- the empirical risk at ``lambda_hat`` on the calibration and held-out
  sequences (0 for the full model),
* ``test layers`` and ``saved`` -- the held-out token-averaged exit layer at ``lambda_hat`` and the fraction
  of layers skipped,
* ``train s`` -- seconds to train the measure (learned ones) or read it.

Below, the oracle on the held-out sequences: the zero-drift lower bound (every token exits at its first
agreeing layer, the halting heads' default training target), the same with the "stable" rule (the earliest
layer after which the prediction never changes again), and the bound at empirical risk ``delta`` (in-sample,
so below anything certifiable).

Certificates are computed with the public pieces, ``calibrate.proxy_losses`` and ``calibrate.certify``, on
one split shared by every measure (``calibrate.fit`` would draw each learned measure's train split itself),
and audited on the test part the same way.

Run: ``python benchmarks/measures_comparison.py [--cache DIR] [--sequences 2000] [--delta 0.1]
[--epsilon 0.05] [--consistency token] [--seed 0]``. On a machine shared with other jobs, set
``OPENBLAS_NUM_THREADS=1``: oversubscribed BLAS threads make the training times meaningless (up to 100x).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from timing import positive_int

import calibrate
from calibrate.exits import default_lambdas
from measures.confidence import confidence
from measures.halting import HALTING_MEASURES
from measures.learned import LEARNED_MEASURES, train_measure
from measures.oracles import consistency_oracle, oracle_average_layers

#: Measures compared, in print order.
MEASURES = ("softmax_gap", "state_saturation", "classifier", *HALTING_MEASURES)
#: Train / calibration / test shares of the sequences.
FRACTIONS = (0.3, 0.35, 0.35)


@dataclass(frozen=True)
class Row:
    """One measure's certificate and its held-out check."""

    measure: str
    lambda_hat: float | None
    cal_risk: float
    test_risk: float
    test_layers: float
    n_layers: int
    train_seconds: float

    def cells(self) -> list[str]:
        lam = "full" if self.lambda_hat is None else f"{self.lambda_hat:.4f}"
        saved = 1.0 - self.test_layers / self.n_layers
        return [
            self.measure,
            lam,
            f"{self.cal_risk:.4f}",
            f"{self.test_risk:.4f}",
            f"{self.test_layers:.2f}",
            f"{saved:.1%}",
            f"{self.train_seconds:.2f}",
        ]


def _confidences(measure: str, train, parts, seed: int) -> tuple[list[np.ndarray], float]:
    """The measure's (n_tokens, n_layers) confidences on each cache of ``parts``, and the training time."""
    start = time.perf_counter()
    if measure not in LEARNED_MEASURES:
        return [confidence(part, measure) for part in parts], time.perf_counter() - start
    model = train_measure(measure, train, seed=seed)
    seconds = time.perf_counter() - start
    return [model.predict_confidence(part) for part in parts], seconds


def compare(
    cache,
    *,
    delta: float = 0.1,
    epsilon: float = 0.05,
    consistency: str = "token",
    seed: int = 0,
    measures: tuple[str, ...] = MEASURES,
    decode=None,
) -> tuple[list[Row], dict[str, float]]:
    """Certify every measure on the same split; return one row per measure and the oracle's average layers.

    Measures that need hidden states are skipped (with a note on stdout) when the cache has none.
    """
    train, cal, test = cache.split(list(FRACTIONS), seed=seed)
    lambdas = default_lambdas()
    rows = []
    for measure in measures:
        if not cache.has("hidden") and (
            measure in HALTING_MEASURES or measure == "state_saturation" and not cache.has(measure)
        ):
            print(f"skipped {measure}: the cache has no hidden states")
            continue
        (conf_cal, conf_test), seconds = _confidences(measure, train, (cal, test), seed)
        cal_table = calibrate.proxy_losses(cal, conf_cal, lambdas, consistency=consistency, decode=decode)
        cert = calibrate.certify(cal_table, delta=delta, epsilon=epsilon)
        test_table = calibrate.proxy_losses(test, conf_test, lambdas, consistency=consistency, decode=decode)
        if cert.index is None:
            cal_risk, test_risk, layers = 0.0, 0.0, float(test.n_layers)
        else:
            cal_risk = float(cal_table.risks[cert.index])
            test_risk = float(test_table.risks[cert.index])
            layers = float(test_table.avg_layers[cert.index])
        rows.append(Row(measure, cert.lambda_hat, cal_risk, test_risk, layers, test.n_layers, seconds))
    oracle = {
        "oracle, zero drift (first agreeing layer)": oracle_average_layers(test),
        "oracle, zero drift, stable rule (no later flip)": float(consistency_oracle(test, rule="stable").mean()),
    }
    if consistency in ("token", "sequence"):
        oracle[f"oracle, empirical risk <= {delta:g} (in-sample bound)"] = oracle_average_layers(
            test, delta=delta, consistency=consistency
        )
    return rows, oracle


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="a saved cache directory (default: a synthetic cache)")
    parser.add_argument("--sequences", type=positive_int, default=2000, help="synthetic cache size")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--consistency", default="token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="textual consistencies of a saved cache: decode with the tokenizer in DIR"
    )
    args = parser.parse_args(argv)
    decode = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        decode = calibrate.tokenizer_decode(AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True))

    cache = (
        calibrate.open_cache(args.cache) if args.cache else calibrate.synthetic_cache(args.sequences, seed=args.seed)
    )
    print(
        f"cache: {cache.n_sequences} sequences, {cache.n_tokens} tokens, {cache.n_layers} layers "
        f"({'synthetic' if args.cache is None else args.cache}); split {FRACTIONS} train/cal/test, seed {args.seed}; "
        f"delta={args.delta:g}, epsilon={args.epsilon:g}, consistency={args.consistency}"
    )
    rows, oracle = compare(
        cache, delta=args.delta, epsilon=args.epsilon, consistency=args.consistency, seed=args.seed, decode=decode
    )
    header = ["measure", "lambda_hat", "cal risk", "test risk", "test layers", "saved", "train s"]
    print(_table(header, [row.cells() for row in rows]))
    print()
    n_layers = cache.n_layers
    print(
        _table(
            ["oracle (test sequences)", "avg layers", "saved"],
            [[name, f"{value:.2f}", f"{1.0 - value / n_layers:.1%}"] for name, value in oracle.items()],
        )
    )


if __name__ == "__main__":
    main()
