"""p-values of calibrate.bounds against independent computations and MAPIE 1.6.

MAPIE comparisons (mapie.risk_control.methods):

* ``compute_hoeffding_bentkus_p_value`` -- agrees with :func:`hoeffding_bentkus` wherever
  ``n * r_hat`` is not a float just above an integer. MAPIE takes ``ceil(n_obs * r_hat)`` with no guard,
  so ``r_hat = 0.07, n = 100`` gives ``ceil(7.000000000000001) = 8``: conservative (a larger p-value),
  not invalid, but not the Bentkus p-value of the observed count 7 (with a = 0.15 MAPIE returns 0.0483
  instead of 0.0331, i.e. a certificate lost at epsilon = 0.04). With ``binary=True`` it is our :func:`binomial`
  (the Chernoff bound is never below the exact binomial CDF, so the minimum is the binomial term).
* RCPS ``get_r_hat_plus(..., bound="hoeffding")`` -- an upper confidence bound; ``ucb <= a`` iff our
  :func:`hoeffding` p-value is ``<= delta``: checked.
* RCPS ``get_r_hat_plus(..., bound="wsr")`` -- same bets as our :func:`wsr` but (1) it splits the losses
  into two halves ``range(n // 2)`` and ``range(n - n // 2, n)``: for odd ``n`` the middle example is
  never bet on, and (2) it adds the two halves' maximal log-capitals, which is at least the maximal
  log-capital of the whole path (anti-conservative), and adds machine epsilon inside the log. Ours uses
  one path. Both effects are shown below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from calibrate import bounds

MEAN_BOUNDS = ("hoeffding", "hoeffding_kl", "bentkus", "hoeffding_bentkus", "binomial")
NS = (1, 2, 7, 30, 100, 257, 1000)
TOLERANCES = (0.01, 0.05, 0.1, 0.15, 0.3, 0.5, 0.9)


# ---------------------------------------------------------------------------------------------------
# independent references (closed forms, scipy)
# ---------------------------------------------------------------------------------------------------


def _reference_hoeffding(mean, n, a):
    return math.exp(-2 * n * max(a - mean, 0.0) ** 2)


def _reference_hoeffding_kl(mean, n, a):
    x = min(mean, a)
    h = (x * math.log(x / a) if x > 0 else 0.0) + (1 - x) * math.log((1 - x) / (1 - a))
    return math.exp(-n * h)


def _reference_bentkus(count, n, a):
    """``count`` = the integer ceil of the sum of losses."""
    return min(1.0, math.e * stats.binom.cdf(count, n, a))


def _reference_binomial(count, n, a):
    # an independent route through scipy: the one-sided exact binomial test
    return stats.binomtest(count, n, a, alternative="less").pvalue


def _grid():
    """(count, n, a) with mean = count / n, plus non-integer sums (count - 0.4) / n."""
    for n in NS:
        counts = np.unique(np.linspace(0, n, min(n + 1, 23)).round().astype(int))
        for a in TOLERANCES:
            for c in counts:
                yield int(c), n, a


# ---------------------------------------------------------------------------------------------------
# each bound against its reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("a", TOLERANCES)
def test_hoeffding_and_kl_closed_forms(n, a):
    means = np.linspace(0.0, 1.0, 41)
    got_h = bounds.hoeffding(means, n, a)
    got_kl = bounds.hoeffding_kl(means, n, a)
    want_h = [_reference_hoeffding(m, n, a) for m in means]
    want_kl = [_reference_hoeffding_kl(m, n, a) for m in means]
    np.testing.assert_allclose(got_h, want_h, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(got_kl, want_kl, rtol=1e-10, atol=1e-300)
    # Pinsker: the KL form is never looser
    assert np.all(got_kl <= got_h * (1 + 1e-12))


def test_bentkus_and_binomial_against_scipy_on_integer_counts():
    counts, ns, tols = map(np.array, zip(*_grid()))
    for c, n, a in zip(counts, ns, tols):
        mean = c / n
        assert bounds.bentkus(mean, int(n), float(a)) == pytest.approx(_reference_bentkus(c, n, a), rel=1e-12)
        assert bounds.binomial(mean, int(n), float(a)) == pytest.approx(_reference_binomial(c, n, a), rel=1e-10)


def test_bentkus_takes_ceiling_of_fractional_sums():
    for n in (3, 10, 101):
        for a in (0.1, 0.4):
            for c in range(1, n + 1):
                mean = (c - 0.4) / n  # sum c - 0.4 -> ceil = c
                assert bounds.bentkus(mean, n, a) == pytest.approx(_reference_bentkus(c, n, a), rel=1e-12)


def test_bentkus_never_rounds_a_small_fractional_sum_down():
    """A sum just above an integer (5e-10 over 100 losses, 10000 + 5e-5 over 20000) is a fraction: its ceiling
    counts one more failure; only the float error of a NumPy mean (18 + log2(n) ulps) is forgiven."""
    losses = np.zeros(100)
    losses[0] = 5e-10
    assert bounds.bentkus(losses.mean(), 100, 0.1) == pytest.approx(_reference_bentkus(1, 100, 0.1), rel=1e-12)
    assert bounds.bentkus((10_000 + 5e-5) / 20_000, 20_000, 0.6) == pytest.approx(
        _reference_bentkus(10_001, 20_000, 0.6), rel=1e-12
    )
    assert bounds.bentkus(np.full(100, 0.07).mean(), 100, 0.1) == pytest.approx(
        _reference_bentkus(7, 100, 0.1), rel=1e-12
    )


@pytest.mark.parametrize("fn", [bounds.bentkus, bounds.hoeffding_bentkus])
def test_the_float_slack_never_drops_a_whole_failure_at_large_n(fn):
    """n = 1e8: a slack of (n + 2) eps of the count is 2 failures; it turned 1e8 losses of 1 into a p-value of 0.013."""
    n, a = 10**8, 1 - 1e-9
    assert fn(1.0, n, a) == 1.0
    want = min(1.0, math.e * stats.binom.cdf(n - 1, n, a))  # 1e8 - 1 failures
    if fn is bounds.hoeffding_bentkus:
        want = min(want, bounds.hoeffding_kl(1 - 1e-8, n, a))
    assert fn(1 - 1e-8, n, a) == pytest.approx(want, rel=1e-9)
    assert bounds.bentkus(0.5, n, 0.50005) == pytest.approx(math.e * stats.binom.cdf(n // 2, n, 0.50005), rel=1e-12)
    # an exact integer sum of losses of 1 and 0 gives an exact count whatever n; a fraction above it counts one more
    assert bounds.bentkus(90_000_000.99 / n, n, 0.90005) == pytest.approx(
        math.e * stats.binom.cdf(90_000_001, n, 0.90005), rel=1e-12
    )


@pytest.mark.parametrize("fn", [bounds.bentkus, bounds.hoeffding_bentkus, bounds.binomial])
def test_a_mean_that_cannot_give_the_count_is_refused(fn):
    """n = 2**50 losses of 1: the float slack dropped 17 whole failures and certified a risk of 1 (p 3e-15)."""
    with pytest.raises(ValueError, match="float64 mean_loss of n=1125899906842624 losses cannot give the count"):
        fn(1.0, 2**50, 1 - 2**-50)
    with pytest.raises(ValueError, match="float32 mean_loss of n=10000000"):
        fn(np.float32(0.5), 10**7, 0.6)
    assert fn(1.0, 2**40, 1 - 2**-40) == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "torch", "torch_bfloat16"])
def test_a_mean_of_lower_precision_counts_in_its_precision(dtype):
    """The float32 mean of 7 losses of 1 among 100 is 0.07000000029802322: binomial refused it ("needs 0/1
    losses"), bentkus counted 8 failures (p 0.075 for 0.033)."""
    losses = np.array([1.0] * 7 + [0.0] * 93)
    if dtype == "torch_bfloat16":  # a bfloat16 tensor's mean: accumulated in float32, rounded once
        torch = pytest.importorskip("torch")
        mean = torch.tensor(losses, dtype=torch.bfloat16).mean()
    else:
        mean = torch_float32_mean(losses) if dtype == "torch" else dtype(losses.mean())
    assert float(mean) != 0.07
    assert bounds.binomial(mean, 100, 0.15) == pytest.approx(stats.binom.cdf(7, 100, 0.15), rel=1e-12)
    assert bounds.bentkus(mean, 100, 0.15) == pytest.approx(_reference_bentkus(7, 100, 0.15), rel=1e-12)
    with pytest.raises(ValueError, match="integer count"):
        bounds.binomial(dtype(0.075) if isinstance(dtype, type) else torch_float32_mean([0.075]), 100, 0.15)
    with pytest.raises(ValueError, match=r"a float32 value read as float64 \(a tensor's .item\(\)\?\)"):
        bounds.binomial(float(np.float32(losses.mean())), 100, 0.15)


def test_a_subnormal_half_precision_mean_counts_with_its_absolute_rounding():
    """One failure in 500,000 as a float16 mean is 2.03e-06, a subnormal (n * mean = 1.0133): binomial refused it
    as 'no 0/1 losses'; a subnormal mean that cannot give the count (1 in 2**25 rounds to 0) is refused."""
    losses = np.zeros(500_000, dtype=np.float16)
    losses[0] = 1
    assert bounds.binomial(losses.mean(), 500_000, 0.1) == stats.binom.cdf(1, 500_000, 0.1)
    assert bounds.bentkus(losses.mean(), 500_000, 0.1) == pytest.approx(_reference_bentkus(1, 500_000, 0.1))
    with pytest.raises(ValueError, match="a float16 mean_loss of n=33554432 losses cannot give the count"):
        bounds.bentkus(np.float16(1 / 2**25), 2**25, 0.1)


def torch_float32_mean(values):
    torch = pytest.importorskip("torch")
    return torch.tensor(values, dtype=torch.float32).mean()


def test_p_values_count_the_exact_sum_of_the_losses():
    """The table's column sums are compensated, so the slack for float error no longer grows with n: a sum a
    hair above an integer keeps its ceiling (a naive sum's n-ulp slack rounded both of these down)."""
    tiny = np.zeros((10, 1))
    tiny[0] = 1e-15
    assert bounds.p_values(tiny, 0.3, bound="bentkus")[0] == pytest.approx(_reference_bentkus(1, 10, 0.3), rel=1e-12)
    n = 10**6
    big = np.zeros((n, 2))
    big[: n // 10] = 1.0
    big[n // 10, 1] = 1e-6  # column 1: one more loss of 1e-6, below the old slack (n + 2) eps * sum = 2.2e-5
    p = bounds.p_values(big, 0.1005, bound="bentkus")
    assert math.fsum(big[:, 1]) > n // 10
    np.testing.assert_allclose(p, [_reference_bentkus(n // 10, n, 0.1005), _reference_bentkus(n // 10 + 1, n, 0.1005)],
                               rtol=1e-12)  # fmt: skip
    np.testing.assert_array_equal(bounds._column_sums(big), [math.fsum(big[:, 0]), math.fsum(big[:, 1])])


def test_binomial_accepts_float_error_only():
    assert bounds.binomial(0.07, 100, 0.15) == pytest.approx(stats.binom.cdf(7, 100, 0.15), rel=1e-12)
    with pytest.raises(ValueError, match="integer count"):  # was accepted (relative 1e-9) and rounded down
        bounds.binomial((1_234_567 + 0.001) / 10**7, 10**7, 0.1234)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("a", TOLERANCES)
def test_hoeffding_bentkus_is_min_of_kl_and_bentkus(n, a):
    means = np.concatenate([np.arange(n + 1) / n, np.linspace(0, 1, 37)])
    hb = bounds.hoeffding_bentkus(means, n, a)
    np.testing.assert_array_equal(hb, np.minimum(bounds.hoeffding_kl(means, n, a), bounds.bentkus(means, n, a)))


def test_computed_hb_p_value_matches_manual_calculation():
    # re-derived inline: n = 100, 7 failures, a = 0.15
    n, k, a = 100, 7, 0.15
    r = k / n
    kl = math.exp(-n * (r * math.log(r / a) + (1 - r) * math.log((1 - r) / (1 - a))))
    bk = math.e * sum(math.comb(n, j) * a**j * (1 - a) ** (n - j) for j in range(k + 1))
    assert bounds.hoeffding_bentkus(0.07, n, a) == pytest.approx(min(kl, bk), rel=1e-12)
    assert bk < kl  # here the Bentkus term is the smaller: 0.0331 vs 0.0483
    assert bounds.hoeffding_bentkus(0.07, n, a) == pytest.approx(0.033068, abs=1e-6)


def test_float_guard_on_the_count():
    # 100 * 0.07 == 7.000000000000001 in binary floating point: the count is 7, not 8
    assert 100 * 0.07 > 7
    want = math.e * stats.binom.cdf(7, 100, 0.15)
    assert bounds.bentkus(0.07, 100, 0.15) == pytest.approx(want, rel=1e-12)
    assert bounds.binomial(0.07, 100, 0.15) == pytest.approx(stats.binom.cdf(7, 100, 0.15), rel=1e-12)
    # through the loss table: 70 losses of 0.1 sum to 7.000000000000001 as well
    losses = np.zeros((100, 1))
    losses[:70] = 0.1
    assert losses.sum() != 7.0
    assert bounds.p_values(losses, 0.15, bound="bentkus")[0] == pytest.approx(want, rel=1e-12)
    # a genuinely fractional excess is still rounded up
    assert bounds.bentkus(7.001 / 100, 100, 0.15) == pytest.approx(math.e * stats.binom.cdf(8, 100, 0.15))


@pytest.mark.parametrize("name", MEAN_BOUNDS)
def test_monotone_in_mean_and_one_above_tolerance(name):
    fn = bounds.P_VALUES[name]
    for n in (5, 40, 400):
        means = np.arange(n + 1) / n
        for a in (0.05, 0.2, 0.6):
            p = fn(means, n, a)
            assert p.shape == means.shape
            assert np.all((p >= 0) & (p <= 1))
            assert np.all(np.diff(p) >= -1e-15), "p-value must not decrease as the empirical risk grows"
            if name != "binomial":  # the exact test is not 1 just above a; the others are
                np.testing.assert_array_equal(p[means >= a], 1.0)
            assert p[0] < 1.0 or n * a < 1.5  # zero loss is evidence unless n is tiny


def test_ordering_of_the_bounds():
    # binomial (exact, 0/1) <= hoeffding_kl <= hoeffding; binomial <= bentkus / e
    for n in (10, 100, 1000):
        means = np.arange(n + 1) / n
        for a in (0.05, 0.1, 0.3):
            b = bounds.binomial(means, n, a)
            kl = bounds.hoeffding_kl(means, n, a)
            assert np.all(b <= kl * (1 + 1e-9))
            assert np.all(kl <= bounds.hoeffding(means, n, a) * (1 + 1e-12))
            bk = bounds.bentkus(means, n, a)
            assert np.all(np.minimum(math.e * b, 1.0) == pytest.approx(bk, rel=1e-12))


def test_scalar_in_scalar_out_and_shapes():
    p = bounds.hoeffding_bentkus(0.05, 100, 0.1)
    assert np.ndim(p) == 0 and isinstance(p, np.floating)
    p = bounds.hoeffding_bentkus(np.full((2, 3), 0.05), 100, 0.1)
    assert p.shape == (2, 3)


def test_zero_loss_closed_forms():
    # hoeffding_kl at 0 observed loss = (1 - a)^n; exact binomial = (1 - a)^n too
    assert bounds.hoeffding_kl(0.0, 50, 0.1) == pytest.approx(0.9**50, rel=1e-12)
    assert bounds.binomial(0.0, 50, 0.1) == pytest.approx(0.9**50, rel=1e-12)
    assert bounds.bentkus(0.0, 50, 0.1) == pytest.approx(math.e * 0.9**50, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# MAPIE 1.6
# ---------------------------------------------------------------------------------------------------


def _reference_mapie_hb(r_hat, n, a, binary=False):
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    return compute_hoeffding_bentkus_p_value(np.asarray(r_hat, dtype=float), n, a, binary=binary)[:, 0]


@pytest.mark.parametrize("n", (10, 37, 100, 500))
@pytest.mark.parametrize("a", (0.05, 0.1, 0.25))
def test_hoeffding_bentkus_matches_mapie_off_integer_counts(n, a):
    # sums (k + 0.5): no float-ceiling ambiguity, MAPIE is right and the two must agree
    r_hat = (np.arange(n) + 0.5) / n
    np.testing.assert_allclose(bounds.hoeffding_bentkus(r_hat, n, a), _reference_mapie_hb(r_hat, n, a), rtol=1e-12)


@pytest.mark.parametrize("n", (10, 37, 100, 500))
@pytest.mark.parametrize("a", (0.05, 0.1, 0.25))
def test_hoeffding_bentkus_vs_mapie_on_integer_counts(n, a):
    r_hat = np.arange(n + 1) / n
    ours = bounds.hoeffding_bentkus(r_hat, n, a)
    theirs = _reference_mapie_hb(r_hat, n, a)
    # MAPIE rounds n * r_hat up with no guard: equal where the float product is exact, else larger
    exact = np.ceil(n * r_hat) == np.arange(n + 1)
    np.testing.assert_allclose(ours[exact], theirs[exact], rtol=1e-12)
    assert np.all(theirs >= ours * (1 - 1e-12))
    # ours at the off cells is the p-value of the true count (checked against scipy)
    for k in np.flatnonzero(~exact):
        want = min(_reference_hoeffding_kl(k / n, n, a), _reference_bentkus(k, n, a))
        assert ours[k] == pytest.approx(want, rel=1e-10)


def test_mapie_discrepancy_at_seven_percent():
    # documented case: MAPIE's Bentkus term is that of 8 failures out of 100, so its minimum is the
    # Hoeffding-KL term 0.0483 instead of the Bentkus term of 7 failures, 0.0331
    theirs = _reference_mapie_hb([0.07], 100, 0.15)[0]
    want = min(bounds.hoeffding_kl(0.07, 100, 0.15), bounds.bentkus(0.08, 100, 0.15))
    assert theirs == pytest.approx(want, rel=1e-12)
    assert bounds.hoeffding_bentkus(0.07, 100, 0.15) < 0.04 < theirs


@pytest.mark.parametrize("n", (10, 100, 333))
@pytest.mark.parametrize("a", (0.05, 0.2))
def test_binomial_matches_mapie_binary(n, a):
    r_hat = np.arange(n + 1) / n
    exact = np.ceil(n * r_hat) == np.arange(n + 1)
    np.testing.assert_allclose(
        bounds.binomial(r_hat, n, a)[exact], _reference_mapie_hb(r_hat, n, a, binary=True)[exact], rtol=1e-12
    )


def test_hoeffding_decision_matches_mapie_rcps_ucb():
    from mapie.risk_control.methods import get_r_hat_plus

    rng = np.random.default_rng(3)
    losses = rng.uniform(0, 1, size=(400, 12)) ** np.linspace(8, 1, 12)
    lambdas = np.arange(12.0)
    for eps in (0.01, 0.1):
        r_hat, ucb = get_r_hat_plus(losses, lambdas, "rcps", "hoeffding", eps, None)
        for a in np.linspace(0.02, 0.6, 30):
            if np.any(np.abs(ucb - a) < 1e-9):
                continue
            p = bounds.p_values(losses, a, bound="hoeffding")
            np.testing.assert_array_equal(p <= eps, ucb <= a)


# ---------------------------------------------------------------------------------------------------
# WSR
# ---------------------------------------------------------------------------------------------------


def _reference_wsr(x, a, eps):
    """Scalar loop over the RCPS/LTT formulas for one column."""
    n = len(x)
    s2_prev = 0.25  # sigma2_0 (mu_hat_0 = 0.5 enters through mu_t below)
    total, total_sq = 0.0, 0.0
    log_k, best = 0.0, 0.0
    for t, xt in enumerate(x, start=1):
        nu = min(1.0, math.sqrt(2 * math.log(1 / eps) / (n * s2_prev)))
        log_k += math.log(1 - nu * (xt - a))
        best = max(best, log_k)
        total += xt
        mu_t = (0.5 + total) / (t + 1)
        total_sq += (xt - mu_t) ** 2
        s2_prev = (0.25 + total_sq) / (t + 1)
    return min(1.0, math.exp(-best))


@pytest.mark.parametrize("seed", range(4))
def test_wsr_matches_inline_derivation(seed):
    rng = np.random.default_rng(seed)
    n = (5, 60, 300, 1001)[seed]
    losses = np.column_stack([rng.uniform(0, 0.3, n), rng.random(n) < 0.1, rng.beta(1, 6, n), np.zeros(n)])
    for a in (0.05, 0.1, 0.2):
        for eps in (0.01, 0.1):
            got = bounds.wsr(losses, a, epsilon=eps)
            want = [_reference_wsr(losses[:, j], a, eps) for j in range(losses.shape[1])]
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-300)
            assert bounds.wsr(losses[:, 0], a, epsilon=eps) == pytest.approx(want[0], rel=1e-9, abs=1e-300)


def test_wsr_is_one_sided():
    rng = np.random.default_rng(7)
    high = rng.uniform(0.3, 0.5, size=2000)  # risk 0.4, far ABOVE the tolerance 0.1
    # a two-sided test would reject (tiny p); the one-sided null "risk > 0.1" is true: p stays ~ 1
    assert bounds.wsr(high, 0.1) == 1.0
    low = rng.uniform(0.0, 0.04, size=2000)  # far below: strong evidence
    assert bounds.wsr(low, 0.1) < 1e-20
    assert bounds.wsr(np.ones(50), 0.5) == 1.0


def test_wsr_zero_losses_closed_form():
    # all-zero losses: sigma2_t = (1/4 + sum_{i<=t} mu_i^2)/(t+1), mu_i = 1/(2(i+1)); capital grows each step
    n, a, eps = 40, 0.2, 0.05
    x = np.zeros(n)
    p = bounds.wsr(x, a, epsilon=eps)
    assert p == pytest.approx(_reference_wsr(x, a, eps), rel=1e-12)
    # every factor is 1 + nu_t a <= 1 + a, so p >= (1 + a)^-n
    assert (1 + a) ** -n <= p < 1e-2


def test_wsr_depends_on_order_not_only_on_mean():
    x = np.r_[np.zeros(50), np.full(50, 0.3)]
    assert bounds.wsr(x, 0.2) != pytest.approx(bounds.wsr(x[::-1], 0.2))


def _wsr_ucb(x, eps, grid):
    ok = np.array([bounds.wsr(x, r, epsilon=eps) <= eps for r in grid])
    return grid[np.argmax(ok)]


def test_wsr_vs_mapie_rcps():
    from mapie.risk_control.methods import get_r_hat_plus

    # the R grid is MAPIE's lambdas (it tests every column at every R: n x K x K work), kept short
    grid = np.round(np.linspace(0.05, 0.25, 201), 3)
    rng = np.random.default_rng(1)
    eps = 0.1
    # even n, typical data: the same UCB up to a few grid steps, MAPIE's never above ours
    for n in (200, 1000):
        x = rng.uniform(0, 0.2, size=n)
        _, ucb = get_r_hat_plus(np.repeat(x[:, None], grid.size, axis=1), grid, "rcps", "wsr", eps, 0.25)
        ours = _wsr_ucb(x, eps, grid)
        assert ucb[0] <= ours + 1e-12
        assert ours - ucb[0] <= 0.0025
    # odd n: MAPIE never bets on the middle example (index n // 2); ours does
    n = 201
    x = rng.uniform(0, 0.2, size=n)
    theirs, ours = [], []
    for middle in (0.0, 1.0):
        y = x.copy()
        y[n // 2] = middle
        _, ucb = get_r_hat_plus(np.repeat(y[:, None], grid.size, axis=1), grid, "rcps", "wsr", eps, 0.25)
        theirs.append(ucb[0])
        ours.append(_wsr_ucb(y, eps, grid))
    assert theirs[0] == theirs[1]  # MAPIE: a loss of 1 in the middle changes nothing
    assert ours[1] > ours[0] + 0.005


# ---------------------------------------------------------------------------------------------------
# p_values dispatch and validation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(bounds.P_VALUES))
def test_p_values_dispatch(name):
    rng = np.random.default_rng(5)
    losses = (rng.random((300, 6)) < np.linspace(0.0, 0.3, 6)).astype(float)
    p = bounds.p_values(losses, 0.1, bound=name)
    assert p.shape == (6,) and p.dtype == np.float64
    if name == "wsr":  # in a fixed pseudo-random row order
        np.testing.assert_array_equal(p, bounds.wsr(losses[np.random.default_rng(0).permutation(300)], 0.1))
    else:
        np.testing.assert_allclose(p, bounds.P_VALUES[name](losses.mean(axis=0), 300, 0.1), rtol=1e-13)
    assert p[0] < 0.01 and p[-1] > 0.5


def test_wsr_p_values_stay_valid_for_rows_stored_sorted_by_their_losses():
    """WSR depends on the order of the examples: a calibration set stored sorted (prompts by length for batching,
    shards by source) puts the low losses first, and the capital's early peak rejected a true null every time.
    p_values reads the rows in a fixed pseudo-random order: the rate of p <= epsilon stays within epsilon."""
    rng = np.random.default_rng(0)
    trials, eps = 400, 0.1
    samples = (rng.random((trials, 200)) < 0.1 + 1e-9).astype(float)  # risk just above the tolerance 0.1: null true
    sorted_rate = np.mean([bounds.p_values(np.sort(x)[:, None], 0.1, bound="wsr", epsilon=eps)[0] <= eps
                           for x in samples])  # fmt: skip
    assert np.mean([bounds.wsr(np.sort(x), 0.1, epsilon=eps) <= eps for x in samples]) > 0.9  # the raw bound, as given
    assert sorted_rate <= eps + 3 * np.sqrt(eps * (1 - eps) / trials)


def test_p_values_default_is_hoeffding_bentkus():
    losses = np.random.default_rng(0).uniform(0, 0.2, size=(100, 3))
    default = bounds.p_values(losses, 0.15)
    np.testing.assert_array_equal(default, bounds.p_values(losses, 0.15, bound="hoeffding_bentkus"))


def test_registry_names():
    assert set(bounds.P_VALUES) == {"hoeffding", "hoeffding_kl", "bentkus", "hoeffding_bentkus", "binomial", "wsr"}


@pytest.mark.parametrize(
    "losses, match",
    [
        (np.array([[0.1, np.nan]]), "NaN"),
        (np.array([[0.1, 1.2]]), r"\[0, 1\]"),
        (np.array([[-0.1, 0.2]]), r"\[0, 1\]"),
        (np.array([0.1, 0.2]), r"shape \(n, K\)"),
        (np.zeros((0, 3)), "non-empty"),
    ],
)
def test_p_values_rejects_bad_losses(losses, match):
    with pytest.raises(ValueError, match=match):
        bounds.p_values(losses, 0.1)


def test_p_values_rejects_bad_bound_and_tolerance():
    losses = np.zeros((10, 2))
    with pytest.raises(ValueError, match="bound must be one of"):
        bounds.p_values(losses, 0.1, bound="chernoff")
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="tolerance must lie in the open interval"):
            bounds.p_values(losses, bad)
    with pytest.raises(TypeError, match="tolerance"):
        bounds.p_values(losses, "0.1")
    for big, shown in [(10**400, "1" + "0" * 39), (10**5000, "an int of 16610 bits"), (1.5, "1.5")]:
        with pytest.raises(ValueError, match=rf"tolerance must lie in the open interval \(0, 1\), got {shown}$"):
            bounds.p_values(losses, big)  # an int beyond the float range was reported as "got inf"
    with pytest.raises(TypeError, match="does not support item assignment"):  # a certificate names its bound,
        bounds.P_VALUES["mine"] = bounds.hoeffding  # which another process could not recompute
    for bound in ("hoeffding", "wsr"):  # epsilon is checked whatever the bound (only wsr reads it)
        with pytest.raises(ValueError, match="epsilon must lie in the open interval"):
            bounds.p_values(losses, 0.1, bound=bound, epsilon=1.5)


def test_binomial_refuses_fractional_losses():
    losses = np.full((20, 2), 0.5)
    with pytest.raises(ValueError, match="0/1 losses"):
        bounds.p_values(losses, 0.1, bound="binomial")
    with pytest.raises(ValueError, match="0/1 losses"):
        bounds.binomial(0.55 / 10, 10, 0.1)
    # booleans are 0/1 losses
    assert bounds.p_values(np.zeros((20, 1), dtype=bool), 0.1, bound="binomial")[0] == pytest.approx(0.9**20)


@pytest.mark.parametrize("name", MEAN_BOUNDS)
def test_mean_bounds_validate(name):
    fn = bounds.P_VALUES[name]
    with pytest.raises(ValueError, match="mean_loss"):
        fn(np.nan, 10, 0.1)
    with pytest.raises(ValueError, match="mean_loss must lie in"):
        fn(1.5, 10, 0.1)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 2\*\*53\]"):
        fn(0.0, 0, 0.1)
    with pytest.raises(ValueError, match="float64 counts are exact up to 2"):  # was NaN (binomial) or a TypeError
        fn(0.0, 10**20, 0.1)
    assert 0.0 <= fn(0.0, 2**53, 0.1) <= 1.0
    with pytest.raises(TypeError, match="n must be an integer >= 1"):
        fn(0.0, 10.0, 0.1)
    with pytest.raises(TypeError, match="n must be an integer"):
        fn(0.0, True, 0.1)
    with pytest.raises(ValueError, match="tolerance"):
        fn(0.0, 10, 1.0)
    assert fn(0.0, np.int64(10), np.float32(0.5)) <= 1.0


def test_wsr_tiny_tolerance_has_no_warning():
    """Below 2**-53 the factor 1 - nu (L - a) rounds to 0: wealth 0 and p = 1, without a divide-by-zero warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bounds.wsr(np.ones(5), 1e-17) == 1.0


def test_wsr_validates():
    with pytest.raises(ValueError, match="epsilon must lie"):
        bounds.wsr(np.zeros(5), 0.1, epsilon=1.0)
    with pytest.raises(ValueError, match="losses"):
        bounds.wsr(np.zeros((2, 2, 2)), 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bounds.wsr(np.array([0.2, 2.0]), 0.1)


def test_p_values_of_a_many_column_table_use_exact_column_sums():
    """NumPy sums the columns of an (n, K > 1) table row by row: 1 + 1000 * 1e-16 stays 1.0, which would put the
    Bentkus count at 1 instead of 2 and the p-value at 0.0013 instead of 0.0072 (too small: anti-conservative).
    A single column is summed pairwise, so one-column tables cannot tell."""
    n = 1001
    losses = np.zeros((n, 2))
    losses[0], losses[1:] = 1.0, 1e-16  # exact sum 1 + 1e-13 per column
    want = math.e * stats.binom.cdf(2, n, 0.01)
    np.testing.assert_allclose(bounds.p_values(losses, 0.01, bound="bentkus"), [want, want], rtol=1e-12)
    hb = min(want, float(bounds.hoeffding_kl(math.fsum(losses[:, 0]) / n, n, 0.01)))
    np.testing.assert_allclose(bounds.p_values(losses, 0.01), [hb, hb], rtol=1e-12)
