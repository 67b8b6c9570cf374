"""Conformal risk control: hand cases, the formula re-derived, MAPIE 1.6, warnings and validation.

MAPIE notes (mapie.risk_control.methods): ``get_r_hat_plus(..., method="crc")`` returns the adjusted risk
``n/(n+1) R_hat + 1/(n+1)`` (B = 1 only); ours agrees. ``find_best_predict_param`` keeps a lambda when
the adjusted risk is *strictly* below alpha, whereas the CRC paper (and ours) use ``<= alpha``; and when no
lambda qualifies it returns the first lambda with a warning, where we return ``None`` (the full model).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import calibrate
from calibrate.crc import conformal_risk_control


def _monotone_bernoulli(rng, n, risks):
    """0/1 losses nondecreasing along the columns: loss_ik = 1[U_i < risks_k]."""
    return (rng.random((n, 1)) < np.asarray(risks)[None, :]).astype(float)


def _reference_crc(losses, delta, max_loss=1.0):
    n = losses.shape[0]
    best = None
    for k in range(losses.shape[1]):
        if n / (n + 1) * losses[:, k].mean() + max_loss / (n + 1) <= delta:
            best = k
        else:
            break
    return best


def test_hand_case():
    # n = 9: adjusted = 0.9 * mean + 0.1
    losses = np.zeros((9, 4))
    losses[:1, 1:] = 1  # means 0, 1/9, 1/9 ...
    losses[:3, 2:] = 1  # ... 3/9
    losses[:, 3] = 1  # 1
    # adjusted: 0.1, 0.2, 0.4, 1.0
    assert conformal_risk_control(losses, 0.1) == 0
    assert conformal_risk_control(losses, 0.2) == 1
    assert conformal_risk_control(losses, 0.39) == 1
    assert conformal_risk_control(losses, 0.4) == 2
    assert conformal_risk_control(losses, 0.099) is None
    assert conformal_risk_control(losses[:, :3], 0.5) == 2  # every column passes


def test_too_few_examples_gives_none():
    # 1/(n+1) > delta: nothing passes even with zero loss
    assert conformal_risk_control(np.zeros((9, 3)), 0.0999) is None
    assert conformal_risk_control(np.zeros((10, 3)), 0.0999) == 2


def test_matches_inline_formula_on_random_monotone_losses():
    rng = np.random.default_rng(8)
    for _ in range(200):
        n = int(rng.integers(1, 200))
        k = int(rng.integers(1, 15))
        losses = np.sort(rng.random((n, k)) ** rng.uniform(0.5, 6), axis=1)  # rows nondecreasing
        delta = float(rng.uniform(0.02, 0.9))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert conformal_risk_control(losses, delta) == _reference_crc(losses, delta)


def test_prefix_rule_stops_at_first_failure():
    # the last column is cheaper than the middle one (non-monotone: warns); the prefix rule stops at 1
    losses = np.array([[0.0, 0.5, 0.2]] * 50)
    with pytest.warns(UserWarning, match="needs monotone losses"):
        got = conformal_risk_control(losses, 0.3)
    assert got == 0  # the third column passes but the second does not


def test_max_loss_scaling():
    rng = np.random.default_rng(9)
    losses = np.sort(rng.random((100, 8)) * 0.6, axis=1)
    for delta in (0.05, 0.2, 0.35):
        base = conformal_risk_control(losses, delta)
        assert conformal_risk_control(losses * 3.0, delta * 3.0, max_loss=3.0) == base
        assert base == _reference_crc(losses, delta)
    # a larger B is more conservative
    assert conformal_risk_control(losses, 0.2, max_loss=5.0) <= conformal_risk_control(losses, 0.2)


def test_adjusted_risk_matches_mapie_and_index_where_no_ties():
    from mapie.risk_control.methods import find_best_predict_param, get_r_hat_plus

    rng = np.random.default_rng(10)
    n_compared = n_ties = 0
    for n in (20, 99, 500):
        losses = _monotone_bernoulli(rng, n, np.linspace(0.0, 0.6, 25))
        lambdas = np.arange(25.0)
        _, r_hat_plus = get_r_hat_plus(losses, lambdas, "crc", None, None, None)
        np.testing.assert_allclose(r_hat_plus, n / (n + 1) * losses.mean(axis=0) + 1 / (n + 1), rtol=1e-14)
        for alpha in (0.08, 0.15, 0.3):
            ours = conformal_risk_control(losses, alpha)
            if ours is None:
                continue  # MAPIE returns lambdas[0] with a warning there
            theirs = int(np.ravel(find_best_predict_param(lambdas, r_hat_plus, np.array([alpha])))[0])
            n_compared += 1
            if r_hat_plus[ours] == alpha:  # exactly equal in floating point
                # a tie (n = 99, alpha = 0.15: 0.99 * 14/99 + 0.01 = 0.15): MAPIE's strict "<" drops it
                assert theirs == ours - 1
                n_ties += 1
            else:
                assert theirs == ours
    assert n_compared >= 8 and n_ties >= 1


def test_the_order_of_the_rows_never_decides():
    """Adjusted risk (4 + 1) / 100 = 0.05 exactly: a float mean's last bit, which depends on the order of the rows,
    certified the column in some orders and not in others."""
    column = np.zeros(99)
    column[:7] = [11 / 14, 19 / 56, 2 / 15, 2 / 3, 3 / 4, 5 / 8, 7 / 10]  # token disagreement rates summing to 4
    losses = np.column_stack([np.zeros(99), column, np.ones(99)])
    rng = np.random.default_rng(0)
    found = {conformal_risk_control(losses[rng.permutation(99)], 0.05) for _ in range(300)}
    assert found == {1}


def test_the_rule_on_exactly_rounded_sums_whatever_the_summation():
    """Compiled sums decide the columns far from the threshold, math.fsum those near it: the rule of
    math.fsum sums everywhere, on tables whose delta is exactly some column's adjusted risk."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        n, k = int(rng.integers(1, 80)), int(rng.integers(1, 7))
        losses = np.sort(rng.choice([0.0, 0.1, 1 / 3, 0.7, 1.0], size=(n, k)), axis=1)
        sums = np.array([math.fsum(column) for column in losses.T])
        delta = float(np.clip(rng.choice((sums + 1) / (n + 1)), 1e-3, 1 - 1e-3))
        ok = sums + 1 <= delta * (n + 1)
        expected = None if not ok[0] else (k - 1 if ok.all() else int(np.argmin(ok)) - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-monotone columns are warned of; the rule is the same
            assert conformal_risk_control(losses, delta) == expected


def test_tie_is_accepted_as_in_the_paper():
    # n = 4, means 0 and 1/4 -> adjusted 1/5 and 2/5; delta = 0.4 exactly passes the second
    losses = np.array([[0, 1], [0, 0], [0, 0], [0, 0]], dtype=float)
    assert conformal_risk_control(losses, 0.4) == 1


def test_monotone_losses_do_not_warn_and_non_monotone_do():
    rng = np.random.default_rng(1)
    losses = _monotone_bernoulli(rng, 50, [0.0, 0.1, 0.2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conformal_risk_control(losses, 0.3)
    bad = losses.copy()
    bad[0] = [1.0, 0.0, 1.0]
    with pytest.warns(UserWarning, match=r"E\[risk\] <= delta needs monotone losses.*1 of 50 examples"):
        conformal_risk_control(bad, 0.3)
    with pytest.warns(UserWarning, match="1 of 50 examples") as caught:
        cert = calibrate.certify(bad, [0.9, 0.5, 0.1], delta=0.3, method="crc")
    assert len(caught) == 1 and caught[0].filename == __file__  # once, at the caller's line
    assert "needs monotone losses" in cert.reason and "1 of 50 examples" in cert.reason  # the certificate says so


def test_fit_warns_at_its_callers_line():
    cache = calibrate.synthetic_cache(300, seed=0)  # token losses: not monotone in every sequence
    with pytest.warns(UserWarning, match="needs monotone losses") as caught:
        calibrate.fit(cache, method="crc")
    assert len(caught) == 1 and caught[0].filename == __file__  # was calibrate/fit.py


def test_validity_warns_once_for_the_whole_study():
    cache = calibrate.synthetic_cache(300, seed=0)  # token losses: not monotone in every sequence
    with pytest.warns(UserWarning) as caught:
        calibrate.validity(cache, trials=5, method="crc", progress=False)
    assert len(caught) == 1 and str(caught[0].message).startswith("5 warnings over 5 trials, the first: conformal")


def test_validation():
    ok = np.zeros((5, 2))
    with pytest.raises(ValueError, match="NaN"):
        conformal_risk_control(np.array([[0.0, np.nan]]), 0.1)
    with pytest.raises(ValueError, match=r"losses must lie in \[0, max_loss=1\]"):
        conformal_risk_control(np.array([[0.0, 1.5]]), 0.1)
    with pytest.raises(ValueError, match=r"losses must have shape \(n, K\)"):
        conformal_risk_control(np.zeros(5), 0.1)
    with pytest.raises(ValueError, match=r"losses must be non-empty with shape \(n, K\)"):
        conformal_risk_control(np.zeros((0, 2)), 0.1)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"delta must lie in the open interval \(0, max_loss=1\)"):
            conformal_risk_control(ok, bad)
    with pytest.raises(TypeError, match="delta"):
        conformal_risk_control(ok, "0.1")
    with pytest.raises(ValueError, match="max_loss must be a finite number > 0"):
        conformal_risk_control(ok, 0.1, max_loss=0.0)
    with pytest.raises(ValueError, match="max_loss"):
        conformal_risk_control(ok, 0.1, max_loss=np.inf)
    # losses up to max_loss are accepted
    assert conformal_risk_control(np.full((100, 1), 2.0), 2.5, max_loss=3.0) == 0
