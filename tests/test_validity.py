"""Monte-Carlo validity of the risk control: the guarantee, checked on losses with a known risk curve.

A *violation* is a trial whose certified fastest hypothesis has true risk > delta. Certifying nothing is
not a violation (that is power, not validity). The violation count over the trials is checked with a
one-sided binomial test against the level epsilon; naive rules are shown to fail the same check, so the
check can fail. Replications are vectorised: trial ``t``'s hypotheses are columns ``t*K .. t*K+K-1`` of
one loss matrix, which :func:`calibrate.bounds.p_values` treats independently.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from calibrate import bounds, fwer
from calibrate.crc import conformal_risk_control

pytestmark = pytest.mark.slow

DELTA = 0.1
EPSILON = 0.1
# the first unsafe hypothesis sits just above delta, where an anti-conservative bound shows
RISKS = np.r_[np.linspace(0.0, 0.08, 9), 0.102, 0.12, 0.15, 0.2]
SAFE = RISKS <= DELTA


def _exceeds(violations: int, trials: int, level: float) -> float:
    """One-sided p-value of 'violation rate > level'."""
    return stats.binomtest(violations, trials, level, alternative="greater").pvalue


def _coupled_losses(rng, trials, n, risks, kind):
    """(n, trials * K) losses, nondecreasing along each trial's K columns, column k of mean risks[k]."""
    k = risks.size
    if kind == "bernoulli":
        u = rng.random((n, trials, 1))
        losses = (u < risks).astype(float)
    else:  # "partial": 1[U < 2 risk_k] * V, V ~ U(0, 1): many zeros, the rest partial (risk <= 1/2)
        u = rng.random((n, trials, 1))
        v = rng.random((n, trials, 1))
        losses = (u < 2.0 * risks) * v
    return losses.reshape(n, trials * k)


def _fixed_sequence_last(p: np.ndarray) -> np.ndarray:
    """Per trial (rows of p, shape (trials, K)): index of the fastest certified hypothesis, -1 if none."""
    out = np.empty(p.shape[0], dtype=int)
    for t, row in enumerate(p):
        rejected = fwer.fixed_sequence(row, EPSILON)
        out[t] = np.flatnonzero(rejected)[-1] if rejected.any() else -1
    return out


@pytest.mark.parametrize(
    "kind, names",
    [
        ("bernoulli", ("binomial", "hoeffding_bentkus", "bentkus", "hoeffding_kl", "hoeffding", "wsr")),
        ("partial", ("hoeffding_bentkus", "bentkus", "hoeffding_kl", "hoeffding", "wsr")),
    ],
)
def test_fixed_sequence_violation_rate_at_most_epsilon(kind, names):
    rng = np.random.default_rng(20240611 if kind == "bernoulli" else 20240612)
    trials, n, k = 4000, 300, RISKS.size
    losses = _coupled_losses(rng, trials, n, RISKS, kind)

    # naive rule: the largest k whose empirical risk is <= delta (no confidence at all)
    emp = losses.mean(axis=0).reshape(trials, k)
    ok = emp <= DELTA
    naive_last = np.where(ok.any(axis=1), k - 1 - np.argmax(ok[:, ::-1], axis=1), -1)
    naive_viol = int(np.sum((naive_last >= 0) & ~SAFE[np.maximum(naive_last, 0)]))
    assert naive_viol / trials > 2 * EPSILON  # about 50% here
    assert _exceeds(naive_viol, trials, EPSILON) < 1e-6

    for name in names:
        p = bounds.p_values(losses, DELTA, bound=name, epsilon=EPSILON).reshape(trials, k)
        last = _fixed_sequence_last(p)
        certified = last >= 0
        violations = int(np.sum(certified & ~SAFE[np.maximum(last, 0)]))
        assert _exceeds(violations, trials, EPSILON) > 1e-3, (name, violations / trials)
        # not vacuous: the safest hypotheses (risk 0, 0.01, ...) are certified in nearly every trial
        assert certified.mean() > 0.95, (name, certified.mean())
        if name == "binomial":
            # the exact test is nearly tight: the violation rate is close to (below) epsilon
            assert 0.3 * EPSILON < violations / trials


def test_fwer_procedures_with_many_unsafe_hypotheses():
    # independent columns, non-monotone risk curve: 12 hypotheses just above delta, 4 safe ones spread out
    rng = np.random.default_rng(77)
    risks = np.array([0.0, 0.102, 0.102, 0.102, 0.02, 0.102, 0.102, 0.102, 0.01, 0.102, 0.102, 0.102,
                      0.0, 0.102, 0.102, 0.102])
    safe = risks <= DELTA
    trials, n, k = 2000, 300, risks.size
    losses = (rng.random((n, trials * k)) < np.tile(risks, trials)).astype(float)
    p = bounds.p_values(losses, DELTA, bound="binomial").reshape(trials, k)

    # uncorrected per-hypothesis testing: the family-wise error is far above epsilon
    uncorrected = np.any((p <= EPSILON) & ~safe, axis=1).sum()
    assert _exceeds(int(uncorrected), trials, EPSILON) < 1e-6

    procedures = {
        "bonferroni": fwer.Bonferroni(),
        "holm": fwer.Holm(),
        "fixed_sequence": fwer.FixedSequence(),
        "multistart": fwer.MultiStart([0, 4, 8, 12]),
    }
    for name, proc in procedures.items():
        rejected = np.array([fwer.control_fwer(row, EPSILON, method=proc) for row in p])
        violations = int(np.any(rejected & ~safe, axis=1).sum())
        assert _exceeds(violations, trials, EPSILON) > 1e-3, (name, violations / trials)
        # power: each procedure certifies the risk-0 hypothesis at index 0 in most trials
        assert rejected[:, 0].mean() > 0.9, name
    # multistart reaches the safe hypotheses behind the unsafe ones; fixed sequence cannot
    ms = np.array([fwer.multistart(row, EPSILON, starts=[0, 4, 8, 12]) for row in p])
    assert ms[:, [4, 8, 12]].mean() > 0.5


def test_crc_bounds_the_expected_risk_only():
    # n = 20 coupled 0/1 losses, risk grid of step 0.005: the CRC choice sits at the 4th order statistic
    # of 20 uniforms (E = 4/21 = 0.190 <= 0.2); the naive rule at the 5th (E = 5/21 = 0.238 > 0.2)
    rng = np.random.default_rng(5)
    delta, n, trials = 0.2, 20, 10000
    risks = np.linspace(0.0, 0.5, 101)
    true_crc = np.empty(trials)
    true_naive = np.empty(trials)
    for t in range(trials):
        losses = (rng.random((n, 1)) < risks).astype(float)
        idx = conformal_risk_control(losses, delta)
        true_crc[t] = 0.0 if idx is None else risks[idx]  # None = full model, loss 0
        ok = losses.mean(axis=0) <= delta
        true_naive[t] = risks[np.flatnonzero(ok)[-1]]
    se = true_crc.std(ddof=1) / np.sqrt(trials)
    assert true_crc.mean() <= delta + 3 * se
    assert true_naive.mean() > delta + 3 * true_naive.std(ddof=1) / np.sqrt(trials)
    # tight in expectation, so *not* a high-probability guarantee: many single draws exceed delta
    assert true_crc.mean() > delta - 0.02
    assert np.mean(true_crc > delta) > 0.25
