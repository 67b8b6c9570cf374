"""Valid p-values for the null hypothesis that a risk exceeds a tolerance.

For one tested hypothesis (a threshold ``lambda``) with losses ``L_1, ..., L_n`` in ``[0, 1]``, i.i.d.
with mean ``mu = risk(lambda)``, every function here returns a p-value for

    H0: mu > tolerance        (the threshold is *not* safe)

so that ``P(p <= u) <= u`` for every ``u`` under ``H0``. A small p-value certifies the threshold. The
family-wise step (:mod:`calibrate.fwer`) turns a vector of them into a certified set.

Letters: CALM writes ``delta`` for the tolerance on the risk and ``epsilon`` for the failure probability;
Learn-then-Test (LTT) and MAPIE write ``alpha`` for the tolerance and ``delta`` for the failure
probability. Here the tolerance is called ``tolerance``.

Functions on the empirical mean, ``(mean_loss, n, tolerance)``, vectorised over ``mean_loss``:

* :func:`hoeffding` -- ``exp(-2 n (a - R)_+^2)``;
* :func:`hoeffding_kl` -- ``exp(-n h(min(R, a), a))``, the Chernoff form with the Bernoulli KL ``h``;
* :func:`bentkus` -- ``e * BinomCDF(ceil(n R); n, a)``;
* :func:`hoeffding_bentkus` -- ``min(hoeffding_kl, bentkus)``, the default;
* :func:`binomial` -- ``BinomCDF(n R; n, a)``, exact but only for 0/1 losses.

On raw losses: :func:`wsr`, the one-sided Waudby-Smith--Ramdas betting test. :func:`p_values` takes a
loss table ``(n, K)`` and dispatches by name through :data:`P_VALUES`.
"""

from __future__ import annotations

import numbers
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from calibrate._threads import njit
from calibrate._validation import bounded_array, open_interval
from measures._arrays import as_numpy

__all__ = [
    "DEFAULT_BOUND",
    "P_VALUES",
    "bentkus",
    "binomial",
    "hoeffding",
    "hoeffding_bentkus",
    "hoeffding_kl",
    "p_values",
    "wsr",
]

#: Float64's machine epsilon, ``2**-52``.
_EPS = float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------


def _tolerance_iv(tolerance) -> float:
    return open_interval(tolerance, "tolerance")


def _n_iv(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an integer >= 1 (the number of calibration examples), got {type(n).__name__}")
    n = int(n)
    if not 1 <= n <= 2**53:
        raise ValueError(
            f"n must be an integer in [1, 2**53] (the number of calibration examples; float64 counts are exact up "
            f"to 2**53), got {n}"
        )
    return n


def _mean_bound_iv(mean_loss, n, tolerance) -> tuple[np.ndarray, int, float]:
    """Shared validation of the ``(mean_loss, n, tolerance)`` functions."""
    mean = as_numpy(mean_loss)  # a tensor too (bfloat16, requiring grad), as p_values takes losses
    if mean.dtype == object or not (np.issubdtype(mean.dtype, np.number) or mean.dtype == bool):
        raise TypeError(f"mean_loss must be a real number or array of them, got dtype {mean.dtype}")
    if np.iscomplexobj(mean):
        raise TypeError("mean_loss must be real, got a complex array")
    mean = mean.astype(np.float64)
    if np.isnan(mean).any():
        raise ValueError("mean_loss contains NaN; it must be the empirical mean of losses in [0, 1]")
    if mean.size and (mean.min() < 0.0 or mean.max() > 1.0):
        raise ValueError(
            f"mean_loss must lie in [0, 1] (mean of losses in [0, 1]), got range [{mean.min():g}, {mean.max():g}]"
        )
    return mean, _n_iv(n), _tolerance_iv(tolerance)


def _precision(mean_loss) -> tuple[str, float, float]:
    """Precision of ``mean_loss`` as passed: its type's name, eps and smallest subnormal step (a bfloat16 tensor's
    ``2**-7`` and ``2**-133``); float64's eps and step for float64 and exact types (integers, bools)."""
    if str(getattr(mean_loss, "dtype", "")) == "torch.bfloat16":
        return "bfloat16", 2.0**-7, 2.0**-133
    dtype = as_numpy(mean_loss).dtype
    info = np.finfo(dtype if dtype.kind == "f" and dtype.itemsize < 8 else np.float64)
    return str(dtype), float(info.eps), float(info.smallest_subnormal)


def _count_iv(mean_loss, n, tolerance, *, binary: bool) -> tuple[np.ndarray, np.ndarray, int, float, np.ndarray]:
    """Validation of the functions that count failures, ``n * mean_loss`` (:func:`bentkus`,
    :func:`hoeffding_bentkus`, :func:`binomial`): ``(mean, total, n, tolerance, slack)``, ``slack`` the bound
    on the float error of ``total`` (:func:`_sum_error`, in the precision of ``mean_loss`` as passed).

    Raises
    ------
    ValueError
        Where that error reaches half a failure (a float32 mean of 10**6 losses, a float64 mean of 2**45):
        no count can be read from the mean. For ``binary``, where ``total`` is no integer up to ``slack``.
    """
    mean, n, tolerance = _mean_bound_iv(mean_loss, n, tolerance)
    total, (dtype, eps, tiny) = mean * n, _precision(mean_loss)
    # A float64 mean of 0/1 losses is the count up to rounding the mean and the product, a few eps (the slack of
    # a compensated sum; 100 * 0.07 is 7.000000000000001); a float64 mean of fractions or a float32 mean is within
    # the error of a mean computed as NumPy does (_mean_terms) in its precision; a half-precision mean (float16,
    # bfloat16) is one rounding of a mean accumulated in float32, as NumPy and torch compute it (2 eps).
    half = eps >= float(np.finfo(np.float16).eps)
    terms = 0 if half else _COMPENSATED if binary and eps == _EPS else _mean_terms(n)
    slack = _sum_error(total, terms, eps) + n * tiny / 2  # a subnormal mean's rounding is absolute
    if slack.size and slack.max() >= 0.5:
        raise ValueError(
            f"a {dtype} mean_loss of n={n} losses cannot give the count of failures the bound takes (its rounding "
            f"error reaches {slack.max():.3g} failures): pass the losses themselves to p_values (summed exactly)"
            + (", a float64 mean" if eps != _EPS else "")
            + ", or use 'hoeffding_kl'"
        )
    if binary and (off := np.abs(total - np.rint(total)) > slack).any():
        bad = float(mean[off].flat[0]) if mean.ndim else float(mean)
        single = float(np.float32(bad)) == bad and abs(bad * n - round(bad * n)) <= _sum_error(
            bad * n, _mean_terms(n), float(np.finfo(np.float32).eps)
        )
        raise ValueError(
            "binomial needs 0/1 losses, so n * mean_loss must be an integer count of failures; "
            f"got mean_loss={bad!r} ({dtype}) with n={n} (n * mean_loss = {bad * n!r}). "
            + (
                "It is a float32 value read as float64 (a tensor's .item()?): pass the float32 tensor or np.float32 "
                "itself, or a float64 mean."
                if single and eps == _EPS
                else "For losses in [0, 1] use 'bentkus' or 'hoeffding_bentkus'."
            )
        )
    return mean, total, n, tolerance, slack


def _out(p: np.ndarray):
    """Clip to ``[0, 1]``; a 0-d result becomes a NumPy scalar."""
    p = np.clip(p, 0.0, 1.0)
    return p[()] if p.ndim == 0 else p


def _sum_error(total: np.ndarray, terms: int, eps: float | None = None) -> np.ndarray:
    """Bound on the float error of a sum ``total`` whose terms each went through at most ``terms`` roundings (``n``
    terms added one by one: ``n``; a compensated sum: :data:`_COMPENSATED`; ``n`` times a NumPy mean:
    :func:`_mean_terms`) of relative error ``eps`` (default float64's): ``(terms + 2)`` units of
    ``eps * max(1, total)``."""
    return (terms + 2) * (_EPS if eps is None else eps) * np.maximum(1.0, total)


def _count_ceil(total: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """``ceil`` of a float sum of losses that is within ``slack`` (:func:`_sum_error`, below one half) of the exact
    one: a sum that is an integer up to that error counts as the integer, so float error never adds one.

    Only a sum that exceeds an integer by less than that error is rounded down (which would make the
    p-value too small): :func:`p_values` passes compensated sums (``terms=_COMPENSATED``), where that takes
    an excess below ``4 eps`` of the sum.
    """
    total = np.asarray(total, dtype=np.float64)
    return np.ceil(total - slack)


#: ``terms`` of :func:`_sum_error` that bound the error of :func:`_column_sums` (2 eps of the sum).
_COMPENSATED = 2


def _mean_terms(n: int) -> int:
    """``terms`` of :func:`_sum_error` for ``n`` times a mean that NumPy computed (pairwise summation, 8
    accumulators over blocks of 128: fewer than ``16 + log2(n)`` roundings on any term's path). Not ``n``:
    ``(n + 2) eps`` of a count of 1e8 is more than 2, so that slack would drop whole failures."""
    return 16 + int(n).bit_length()


@njit(nogil=True)
def _column_sums(losses):  # pragma: no cover (compiled)
    """Column sums of a 2-D float64 array, compensated (Neumaier): within 2 eps of the exact sum of the floats
    plus a term of order ``n eps**2``, where a naive sum can be ``n eps`` off."""
    n, k = losses.shape
    total = np.zeros(k)
    carry = np.zeros(k)
    for i in range(n):
        for j in range(k):
            s, x = total[j], losses[i, j]
            t = s + x
            big, small = (s, x) if abs(s) >= abs(x) else (x, s)
            carry[j] += (big - t) + small  # what t lost of the smaller term
            total[j] = t
    return total + carry


# ---------------------------------------------------------------------------------------------------
# p-values from the empirical mean (private cores: Hoeffding's take the mean, Bentkus's the float sum of losses)
# ---------------------------------------------------------------------------------------------------


def _hoeffding_core(mean: np.ndarray, n: int, a: float) -> np.ndarray:
    gap = np.maximum(a - mean, 0.0)
    return np.exp(-2.0 * n * gap**2)


def _kl_bernoulli(x: np.ndarray, a: float) -> np.ndarray:
    # h(x, a) = x log(x / a) + (1 - x) log((1 - x) / (1 - a)), with 0 log 0 = 0
    return special.rel_entr(x, a) + special.rel_entr(1.0 - x, 1.0 - a)


def _hoeffding_kl_core(mean: np.ndarray, n: int, a: float) -> np.ndarray:
    return np.exp(-n * _kl_bernoulli(np.minimum(mean, a), a))


def _hoeffding_bentkus_core(mean: np.ndarray, total: np.ndarray, n: int, a: float, slack: np.ndarray):
    """The smaller of the two p-values: Hoeffding's (KL form) of ``mean``, Bentkus's of ``total``."""
    return np.minimum(_hoeffding_kl_core(mean, n, a), _bentkus_core(total, n, a, slack))


def _bentkus_core(total: np.ndarray, n: int, a: float, slack: np.ndarray) -> np.ndarray:
    """``e * BinomCDF(ceil(total))``; ``total`` is within ``slack`` (:func:`_sum_error`) of the exact sum."""
    return np.e * stats.binom.cdf(_count_ceil(total, slack), n, a)


def hoeffding(mean_loss: ArrayLike, n: int, tolerance: float) -> float | np.ndarray:
    """Hoeffding p-value for ``H0: risk > tolerance``.

    Parameters
    ----------
    mean_loss : float or array_like
        Empirical risk: the mean of ``n`` losses in ``[0, 1]``. Any shape; the result has the same shape.
    n : int
        Number of losses averaged (calibration examples), ``>= 1``.
    tolerance : float
        Tolerance ``a`` on the risk, in (0, 1) (``delta`` in CALM, ``alpha`` in LTT/MAPIE).

    Returns
    -------
    float or ndarray
        ``exp(-2 n (a - mean_loss)_+^2)``, in ``[0, 1]`` (values below about 1e-308 underflow to 0).

    Raises
    ------
    ValueError
        If ``mean_loss`` is NaN or outside ``[0, 1]``, ``n < 1`` or ``tolerance`` outside (0, 1).
    TypeError
        If ``n`` is not an integer or ``tolerance`` not a real number.

    Notes
    -----
    Hoeffding's inequality gives ``P(R_n <= mu - t) <= exp(-2 n t^2)`` for the mean ``R_n`` of ``n``
    i.i.d. losses in ``[0, 1]`` with mean ``mu``; under ``H0`` (``mu > a``) this makes the function a
    valid (super-uniform) p-value. It is looser than :func:`hoeffding_kl` everywhere.

    References
    ----------
    .. [1] W. Hoeffding, "Probability inequalities for sums of bounded random variables", JASA, 1963.

    Examples
    --------
    >>> from calibrate import bounds
    >>> round(float(bounds.hoeffding(0.05, 100, 0.1)), 6)   # exp(-2 * 100 * 0.05**2)
    0.606531
    """
    mean, n, a = _mean_bound_iv(mean_loss, n, tolerance)
    return _out(_hoeffding_core(mean, n, a))


def hoeffding_kl(mean_loss: ArrayLike, n: int, tolerance: float) -> float | np.ndarray:
    """Hoeffding p-value in its Chernoff (Kullback-Leibler) form for ``H0: risk > tolerance``.

    Parameters
    ----------
    mean_loss : float or array_like
        Empirical risk: the mean of ``n`` losses in ``[0, 1]``.
    n : int
        Number of losses averaged, ``>= 1``.
    tolerance : float
        Tolerance ``a`` on the risk, in (0, 1) (``delta`` in CALM, ``alpha`` in LTT/MAPIE).

    Returns
    -------
    float or ndarray
        ``exp(-n h(min(mean_loss, a), a))`` with
        ``h(x, a) = x log(x / a) + (1 - x) log((1 - x) / (1 - a))``.

    Raises
    ------
    ValueError
        If ``mean_loss`` is NaN or outside ``[0, 1]``, ``n < 1`` or ``tolerance`` outside (0, 1).

    Notes
    -----
    Hoeffding (1963, Thm 1) bounds ``P(R_n <= x) <= exp(-n h(x, mu))`` for ``x <= mu``; ``h(x, .)`` is
    increasing on ``[x, 1]`` so ``mu > a`` can be replaced by ``a``. ``h(0, a) = -log(1 - a)``, so an empirical
    risk of 0 gives ``(1 - a)^n``. Dominates :func:`hoeffding` (Pinsker: ``h(x, a) >= 2 (a - x)^2``).

    References
    ----------
    .. [1] A. N. Angelopoulos, S. Bates, E. J. Candès, M. I. Jordan, L. Lei, "Learn then Test:
       Calibrating Predictive Algorithms to Achieve Risk Control", 2021, Section 3.

    Examples
    --------
    >>> from calibrate import bounds
    >>> round(float(bounds.hoeffding_kl(0.0, 50, 0.1)), 12) == round(0.9**50, 12)
    True
    """
    mean, n, a = _mean_bound_iv(mean_loss, n, tolerance)
    return _out(_hoeffding_kl_core(mean, n, a))


def bentkus(mean_loss: ArrayLike, n: int, tolerance: float) -> float | np.ndarray:
    """Bentkus p-value for ``H0: risk > tolerance``.

    Parameters
    ----------
    mean_loss : float or array_like
        Empirical risk: the mean of ``n`` losses in ``[0, 1]``.
    n : int
        Number of losses averaged, ``>= 1``.
    tolerance : float
        Tolerance ``a`` on the risk, in (0, 1) (``delta`` in CALM, ``alpha`` in LTT/MAPIE).

    Returns
    -------
    float or ndarray
        ``min(1, e * P(Binomial(n, a) <= ceil(n * mean_loss)))``.

    Raises
    ------
    ValueError
        If ``mean_loss`` is NaN or outside ``[0, 1]``, ``n < 1``, ``tolerance`` outside (0, 1), or the mean's
        precision cannot give the count of failures (see Notes of :func:`bentkus`).

    Notes
    -----
    Bentkus (2004) shows ``P(S_n <= s) <= e P(Binomial(n, mu) <= ceil(s))`` for a sum ``S_n`` of ``n``
    independent ``[0, 1]`` variables with mean ``mu``. The count is the ceiling of the *sum* of the
    losses ``n * mean_loss``; to keep float error from adding one (``100 * 0.07`` is
    ``7.000000000000001``), the ceiling is taken of ``count - (18 + n.bit_length()) * eps * max(1, count)`` (a
    bound on the rounding error of a mean computed as :func:`numpy.mean` does, ``eps`` that of the mean's type:
    2**-52 for float64, 2**-23 for float32; for a float16 mean or a bfloat16 tensor, accumulated in float32 and
    rounded once, ``2 * eps * max(1, count)``, eps 2**-10 or 2**-7). This lowers the count only when the
    sum exceeds an integer by less than that float error; a mean summed less accurately may count one failure
    more (a larger p-value), as does a float32 mean passed as a Python float (``tensor.item()``: pass the tensor).
    A mean whose error bound reaches half a failure is refused (a float32 mean of
    10**6 losses, a float64 mean of 2**45). :func:`p_values` takes the sum of the losses directly, compensated,
    so its slack is ``4 * eps * max(1, sum)`` whatever ``n``.

    References
    ----------
    .. [1] V. Bentkus, "On Hoeffding's inequalities", Annals of Probability 32(2), 2004.
    .. [2] Angelopoulos et al., "Learn then Test", 2021, Section 3.

    Examples
    --------
    >>> from calibrate import bounds
    >>> from scipy.stats import binom
    >>> import numpy as np
    >>> bool(np.isclose(bounds.bentkus(0.07, 100, 0.15), np.e * binom.cdf(7, 100, 0.15)))
    True
    """
    _, total, n, a, slack = _count_iv(mean_loss, n, tolerance, binary=False)
    return _out(_bentkus_core(total, n, a, slack))


def hoeffding_bentkus(mean_loss: ArrayLike, n: int, tolerance: float) -> float | np.ndarray:
    """Hoeffding-Bentkus p-value, ``min(hoeffding_kl, bentkus)``, for ``H0: risk > tolerance``.

    Parameters
    ----------
    mean_loss : float or array_like
        Empirical risk: the mean of ``n`` losses in ``[0, 1]``.
    n : int
        Number of losses averaged, ``>= 1``.
    tolerance : float
        Tolerance ``a`` on the risk, in (0, 1) (``delta`` in CALM, ``alpha`` in LTT/MAPIE).

    Returns
    -------
    float or ndarray
        The smaller of :func:`hoeffding_kl` and :func:`bentkus`.

    Raises
    ------
    ValueError
        If ``mean_loss`` is NaN or outside ``[0, 1]``, ``n < 1``, ``tolerance`` outside (0, 1), or the mean's
        precision cannot give the count of failures (see Notes of :func:`bentkus`).

    Notes
    -----
    The minimum of two valid p-values is not valid in general; here both come from tail bounds of the
    *same* statistic ``R_n``, each decreasing in ``R_n``: ``{min <= u}`` is ``{R_n <= max(t_1(u), t_2(u))}``
    whose probability is at most ``u`` (the Hoeffding-Bentkus inequality of Bates et al., 2021). This is
    the default bound of LTT and of MAPIE.

    References
    ----------
    .. [1] Angelopoulos et al., "Learn then Test", 2021, Section 3.
    .. [2] S. Bates, A. Angelopoulos, L. Lei, J. Malik, M. Jordan, "Distribution-free,
       risk-controlling prediction sets", JACM 2021.

    Examples
    --------
    >>> from calibrate import bounds
    >>> p = bounds.hoeffding_bentkus([0.0, 0.05, 0.2], 200, 0.1)
    >>> p.shape, bool(p[0] < p[1] < p[2] == 1.0)
    ((3,), True)
    """
    mean, total, n, a, slack = _count_iv(mean_loss, n, tolerance, binary=False)
    return _out(_hoeffding_bentkus_core(mean, total, n, a, slack))


def binomial(mean_loss: ArrayLike, n: int, tolerance: float) -> float | np.ndarray:
    """Exact binomial p-value for ``H0: risk > tolerance`` with 0/1 losses.

    Parameters
    ----------
    mean_loss : float or array_like
        Empirical risk of ``n`` losses in ``{0, 1}``: ``n * mean_loss`` must be an integer (up to a
        float error: ``4 eps`` of the count for a float64 mean; for a mean of lower precision, the error
        bound of :func:`bentkus` in its ``eps``).
    n : int
        Number of losses, ``>= 1``.
    tolerance : float
        Tolerance ``a`` on the risk, in (0, 1) (``delta`` in CALM, ``alpha`` in LTT/MAPIE).

    Returns
    -------
    float or ndarray
        ``P(Binomial(n, a) <= n * mean_loss)``.

    Raises
    ------
    ValueError
        If ``n * mean_loss`` is not an integer: the exact test is valid only for 0/1 losses (for losses
        in ``[0, 1]`` use :func:`bentkus` or :func:`hoeffding_bentkus`); if the mean's precision cannot give
        the count (as :func:`bentkus`); or as the other bounds.

    Notes
    -----
    With 0/1 losses the failure count is ``Binomial(n, mu)``, stochastically larger than
    ``Binomial(n, a)`` when ``mu > a``, so its CDF at the observed count is a valid p-value. It is the
    tightest of the bounds here (MAPIE's ``binary=True``; LTT section 3.2), at most the Chernoff bound
    :func:`hoeffding_kl`.

    Examples
    --------
    >>> from calibrate import bounds
    >>> from scipy.stats import binom
    >>> bool(bounds.binomial(3 / 40, 40, 0.2) == binom.cdf(3, 40, 0.2))
    True
    """
    _, total, n, a, _ = _count_iv(mean_loss, n, tolerance, binary=True)
    return _out(stats.binom.cdf(np.rint(total), n, a))


# ---------------------------------------------------------------------------------------------------
# WSR betting test on raw losses
# ---------------------------------------------------------------------------------------------------


def _wsr_iv(losses, tolerance, epsilon):
    arr = _losses_array_iv(losses, allow_1d=True)
    return arr, _tolerance_iv(tolerance), open_interval(epsilon, "epsilon")


def _wsr_log_capital(losses: np.ndarray, a: float, epsilon: float) -> np.ndarray:
    """Log of the betting capital ``K_t``, ``t = 1..n``, per column: shape ``(n, K)``.

    ``losses`` is 2-D ``(n, K)`` and already validated.
    """
    n = losses.shape[0]
    t = np.arange(1, n + 1, dtype=np.float64)[:, None]
    # Predictable plug-in estimates (Bates et al. 2021, WSR bound; LTT appendix):
    # mu_hat_t = (1/2 + sum_{i<=t} L_i) / (t + 1),
    # sigma2_t = (1/4 + sum_{i<=t} (L_i - mu_hat_i)^2) / (t + 1)
    mu_hat = (0.5 + np.cumsum(losses, axis=0)) / (t + 1.0)
    sigma2 = (0.25 + np.cumsum((losses - mu_hat) ** 2, axis=0)) / (t + 1.0)
    # the bet at step t uses sigma2_{t-1} only (sigma2_0 = 1/4): nu_t is F_{t-1}-measurable
    sigma2_prev = np.vstack([np.full((1, losses.shape[1]), 0.25), sigma2[:-1]])
    nu = np.minimum(1.0, np.sqrt(2.0 * np.log(1.0 / epsilon) / (n * sigma2_prev)))
    # K_t = prod_{i<=t} (1 - nu_i (L_i - a)); each factor >= 1 - nu_i (1 - a) >= a > 0
    with np.errstate(divide="ignore"):  # a < 2**-53 rounds the factor a > 0 to 0: log 0 = -inf, wealth 0, p = 1
        return np.cumsum(np.log1p(-nu * (losses - a)), axis=0)


def wsr(losses: ArrayLike, tolerance: float, *, epsilon: float = 0.05) -> float | np.ndarray:
    """One-sided Waudby-Smith--Ramdas (betting) p-value for ``H0: risk > tolerance``, on raw losses.

    Parameters
    ----------
    losses : array_like, shape (n,) or (n, K)
        Losses in ``[0, 1]`` of ``n`` i.i.d. examples, in an order fixed independently of their values
        (the calibration order); one column per hypothesis.
    tolerance : float
        Tolerance ``a`` on the risk, in (0, 1) (``delta`` in CALM, ``alpha`` in LTT/MAPIE).
    epsilon : float, default=0.05
        Failure probability the bets are tuned for (``delta`` in LTT/MAPIE). It only sets the betting
        fractions, i.e. the power; the p-value is valid whatever its value, but it depends on it: a certificate
        with ``bound="wsr"`` under a method that tests each threshold at a fraction of epsilon (Bonferroni,
        Holm, multistart) can certify a slower threshold at a larger epsilon.

    Returns
    -------
    float or ndarray of shape (K,)
        ``min(1, 1 / max_{t <= n} K_t)``: a float for 1-D ``losses``, else one p-value per column.

    Raises
    ------
    ValueError
        If ``losses`` is empty, not 1-D/2-D, contains NaN or values outside ``[0, 1]``; if ``tolerance``
        or ``epsilon`` is outside (0, 1).

    Notes
    -----
    The capital process is

        K_t = prod_{i=1..t} (1 - nu_i (L_i - a)),  nu_i = min(1, sqrt(2 log(1/epsilon) / (n sigma2_{i-1})))

    with the predictable variance estimate of Bates et al. (2021) and LTT (Appendix). Because
    ``nu_i >= 0`` depends only on ``L_1..L_{i-1}``, ``E[1 - nu_i (L_i - a) | past] = 1 - nu_i (mu - a)
    <= 1`` whenever ``mu >= a``: under ``H0`` (and at ``mu = a``) ``K_t`` is a nonnegative
    supermartingale with ``K_0 = 1``, and Ville's inequality gives ``P(max_t K_t >= 1/u) <= u``, so
    ``p = min(1, 1/max_t K_t)`` is valid. Betting only on the loss being *small* (``nu_i >= 0``) makes the
    test one-sided: a low p-value is evidence that the risk is below ``a``, never above. (A two-sided
    capital such as ``(K^+ + K^-)/2`` would answer a different question.) Every factor is at least
    ``a > 0`` because ``nu_i <= 1``.

    The p-value depends on the order of the examples; it must not be chosen after looking at the
    losses. It is usually tighter than :func:`hoeffding_bentkus` when the losses have a small variance.

    References
    ----------
    .. [1] I. Waudby-Smith, A. Ramdas, "Estimating means of bounded random variables by betting",
       JRSS-B, 2023 (arXiv:2010.09686).
    .. [2] S. Bates, A. Angelopoulos, L. Lei, J. Malik, M. Jordan, "Distribution-free,
       risk-controlling prediction sets", JACM 2021 (the WSR bound).
    .. [3] Angelopoulos et al., "Learn then Test", 2021, Appendix (WSR p-value).

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate import bounds
    >>> rng = np.random.default_rng(0)
    >>> losses = rng.uniform(0, 0.1, size=(500, 2)) * [1, 4]   # true risks 0.05 and 0.2
    >>> p = bounds.wsr(losses, 0.1)
    >>> bool(p[0] < 1e-6), bool(p[1] > 0.5)
    (True, True)
    """
    arr, a, epsilon = _wsr_iv(losses, tolerance, epsilon)
    one_dim = arr.ndim == 1
    arr2 = arr[:, None] if one_dim else arr
    log_k = _wsr_log_capital(arr2, a, epsilon)
    log_max = np.maximum(log_k.max(axis=0), 0.0)  # K_0 = 1
    p = np.exp(-log_max)
    return _out(p[0] if one_dim else p)


# ---------------------------------------------------------------------------------------------------
# registry and loss-table dispatch
# ---------------------------------------------------------------------------------------------------

#: p-value functions by name. All but ``"wsr"`` take ``(mean_loss, n, tolerance)``; ``"wsr"`` takes the
#: raw losses ``(losses, tolerance, *, epsilon)``. :func:`p_values` hides the difference. Read-only: a
#: certificate names its bound, which every process must be able to recompute.
P_VALUES: Mapping[str, Callable] = MappingProxyType({
    "hoeffding": hoeffding,
    "hoeffding_kl": hoeffding_kl,
    "bentkus": bentkus,
    "hoeffding_bentkus": hoeffding_bentkus,
    "binomial": binomial,
    "wsr": wsr,
})
_ON_RAW_LOSSES = frozenset({"wsr"})
#: The bounds of the mean loss, by name, with which a stored risk's p-value is recomputed.
_MEAN_BASED: dict[str, Callable] = {name: f for name, f in P_VALUES.items() if name not in _ON_RAW_LOSSES}
#: The p-value used where none is named: the smaller of Hoeffding's and Bentkus' (CALM's choice).
DEFAULT_BOUND = "hoeffding_bentkus"


def _losses_array_iv(losses, *, allow_1d: bool) -> np.ndarray:
    return bounded_array(
        losses,
        "losses",
        ndims=(1, 2) if allow_1d else (2,),
        shapes="(n,) or (n, K)" if allow_1d else "(n, K)",
        why="the p-value bounds hold for bounded losses only",
    )


def _p_values_iv(losses, tolerance, bound, epsilon):
    if not isinstance(bound, str) or bound not in P_VALUES:
        raise ValueError(f"bound must be one of {sorted(P_VALUES)}, got {bound!r}")
    arr = _losses_array_iv(losses, allow_1d=False)
    tolerance = _tolerance_iv(tolerance)
    epsilon = open_interval(epsilon, "epsilon")  # checked whatever the bound, though only wsr reads it
    if bound == "binomial" and not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(
            "bound='binomial' is the exact test for 0/1 losses: it treats the number of failures as "
            "Binomial(n, risk), which is false for losses strictly between 0 and 1 (the p-value would not "
            "be valid). Use 'bentkus' or 'hoeffding_bentkus' for losses in [0, 1]."
        )
    return arr, tolerance, bound, epsilon


def p_values(
    losses: ArrayLike, tolerance: float, *, bound: str = DEFAULT_BOUND, epsilon: float = 0.05
) -> np.ndarray:
    """p-values of ``H0_k: risk_k > tolerance`` for every column of a loss table.

    Parameters
    ----------
    losses : array_like, shape (n, K)
        Losses in ``[0, 1]``: ``n`` i.i.d. calibration examples, one column per hypothesis (threshold),
        ordered from safest to fastest.
    tolerance : float
        Tolerance on the risk, in (0, 1) (``delta`` in CALM, ``alpha`` in LTT/MAPIE).
    bound : str, default="hoeffding_bentkus"
        Which p-value: one of ``"hoeffding_bentkus"``, ``"hoeffding"``, ``"hoeffding_kl"``, ``"bentkus"``,
        ``"binomial"``, ``"wsr"`` (the keys of :data:`P_VALUES`). ``"binomial"`` is exact for 0/1 losses
        and refused otherwise; ``"wsr"`` uses the raw losses in a fixed pseudo-random row order (see
        Notes), the others the column sums.
    epsilon : float, default=0.05
        Failure probability in (0, 1), checked for every bound; ``"wsr"`` tunes its bets with it (see
        :func:`wsr`), the other bounds do not use it.

    Returns
    -------
    ndarray of float64, shape (K,)
        One p-value in ``[0, 1]`` per column.

    Raises
    ------
    ValueError
        If ``bound`` is unknown, ``losses`` is not a non-empty 2-D array of numbers in ``[0, 1]`` (NaN
        included), ``tolerance`` or ``epsilon`` is outside (0, 1), or ``bound="binomial"`` with losses
        other than 0/1.

    Notes
    -----
    Each p-value ``p_k`` satisfies ``P(p_k <= u) <= u`` when ``risk_k > tolerance``, for i.i.d.
    examples and losses in ``[0, 1]``. Combine them with :func:`calibrate.fwer.control_fwer` to certify
    thresholds with ``P(risk(lambda_hat) <= tolerance) >= 1 - epsilon``. The count given to the Bentkus
    and binomial terms is the sum of the losses (not ``n`` times a rounded mean), with the float guard
    described in :func:`bentkus`. WSR's p-value depends on the order of the examples, which must not depend on
    their losses: ``"wsr"`` reads the rows in the order of ``numpy.random.default_rng(0).permutation(n)`` (so
    the same rows give the same p-value; :func:`wsr` itself takes them as given). A fixed permutation keeps
    the guarantee of rows stored in an order independent of their losses, but does not restore it for rows
    stored sorted (prompts by length for batching, shards by source): on loss-sorted i.i.d. rows of risk just
    above the tolerance (n=200) it rejected at 0.156 for epsilon=0.1, unsorted rows at 0.065. Shuffle such a
    cache first, with a seed drawn before looking at it: ``cache.subset(rng.permutation(cache.n_sequences))``.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate import bounds
    >>> losses = np.array([[0, 0, 1], [0, 1, 1], [0, 0, 0], [0, 0, 1]] * 50, dtype=float)
    >>> bounds.p_values(losses, 0.3, bound="binomial").round(4)
    array([0.    , 0.0695, 1.    ])
    """
    arr, a, bound, epsilon = _p_values_iv(losses, tolerance, bound, epsilon)
    n = arr.shape[0]
    if bound in _ON_RAW_LOSSES:  # order-dependent: a fixed pseudo-random order, not the caller's (see Notes)
        return np.atleast_1d(wsr(arr[np.random.default_rng(0).permutation(n)], a, epsilon=epsilon))
    total = _column_sums(np.ascontiguousarray(arr, dtype=np.float64))
    mean = total / n
    if bound == "hoeffding":
        p = _hoeffding_core(mean, n, a)
    elif bound == "hoeffding_kl":
        p = _hoeffding_kl_core(mean, n, a)
    elif bound == "bentkus":
        p = _bentkus_core(total, n, a, _sum_error(total, _COMPENSATED))
    elif bound == "hoeffding_bentkus":
        p = _hoeffding_bentkus_core(mean, total, n, a, _sum_error(total, _COMPENSATED))
    else:  # binomial: losses checked to be 0/1, so the sum is an exact integer
        p = stats.binom.cdf(np.rint(total), n, a)
    return np.clip(np.asarray(p, dtype=np.float64).reshape(arr.shape[1]), 0.0, 1.0)
