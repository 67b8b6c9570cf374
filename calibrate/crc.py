"""Conformal risk control (CRC): a threshold whose *expected* risk is at most ``delta``.

This is a different guarantee from the rest of :mod:`calibrate`: Learn-then-Test with a p-value bound
and FWER control gives ``P(risk(lambda_hat) <= delta) >= 1 - epsilon`` (a high-probability statement
over calibration draws); CRC gives ``E[loss of a new example at lambda_hat] <= delta``, averaged over
calibration draws, with no ``epsilon``. It is tighter but a single unlucky calibration set may give a
threshold whose risk exceeds ``delta``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numpy.typing import ArrayLike

from calibrate._validation import bounded_array, caller_stacklevel, finite_positive, open_interval
from calibrate.bounds import _COMPENSATED, _column_sums, _sum_error

__all__ = ["conformal_risk_control"]

# slack when checking that losses are nondecreasing along the columns
_MONOTONE_ATOL = 1e-12


def _conformal_risk_control_iv(losses, delta, max_loss) -> tuple[np.ndarray, float, float]:
    max_loss = finite_positive(max_loss, "max_loss", " (the bound B on every loss)")
    delta = open_interval(delta, "delta", upper=max_loss, upper_name=f"max_loss={max_loss:g}")
    arr = bounded_array(
        losses, "losses", upper=max_loss, upper_name=f"max_loss={max_loss:g}",
        why="CRC needs losses bounded by max_loss"
    )
    return arr, delta, max_loss


#: The words that end :func:`_non_monotone_reason`'s note (a certificate's ``guarantee`` looks for them).
_NO_GUARANTEE = "the returned index carries no guarantee"


def _non_monotone_reason(losses: np.ndarray) -> str:
    """Why CRC's guarantee fails for these ``(n, K)`` losses (``""`` when every row is nondecreasing)."""
    n_bad = int((np.diff(losses, axis=1) < -_MONOTONE_ATOL).any(axis=1).sum())
    if not n_bad:
        return ""
    return (
        f"conformal risk control's guarantee E[risk] <= delta needs monotone losses: every example's loss must be "
        f"nondecreasing from the safest column to the fastest, but {n_bad} of {losses.shape[0]} examples are not; "
        f"{_NO_GUARANTEE}"
    )


def conformal_risk_control(losses: ArrayLike, delta: float, *, max_loss: float = 1.0) -> int | None:
    """Index of the fastest threshold chosen by conformal risk control.

    Parameters
    ----------
    losses : array_like, shape (n, K)
        Losses in ``[0, max_loss]`` of ``n`` exchangeable calibration examples; columns are the
        thresholds from safest (index 0) to fastest, each example's loss nondecreasing along them.
    delta : float
        Tolerance on the expected loss, in ``(0, max_loss)`` (``alpha`` in the CRC paper, LTT and MAPIE).
    max_loss : float, default=1.0
        Bound ``B`` on every loss, and the loss of a threshold faster than all the tested ones.

    Returns
    -------
    int or None
        The largest ``k`` such that every column ``j <= k`` satisfies

            n / (n + 1) * mean(losses[:, j]) + max_loss / (n + 1) <= delta,

        or ``None`` when column 0 fails (only the full model is safe; always the case when
        ``max_loss / (n + 1) > delta``).

    Raises
    ------
    ValueError
        If ``losses`` is not a non-empty 2-D array in ``[0, max_loss]`` (NaN included), ``delta`` is outside
        ``(0, max_loss)`` or ``max_loss <= 0``.
    TypeError
        If ``delta`` or ``max_loss`` is not a real number, or ``losses`` not numeric.

    Warns
    -----
    UserWarning
        If some example's losses decrease along the columns: the guarantee needs monotone losses.

    Notes
    -----
    With losses ``L_i(lambda)`` nonincreasing in ``lambda`` (here: nondecreasing from the safest column to
    the fastest), bounded by ``B``, and ``n + 1`` exchangeable examples, the choice
    ``lambda_hat = inf{lambda : n/(n+1) R_n(lambda) + B/(n+1) <= delta}`` satisfies

        E[ L_{n+1}(lambda_hat) ] <= delta

    (Angelopoulos et al., 2022, Thm 1), the expectation being over the calibration set *and* the new
    example. It is a bound in expectation, not with probability ``1 - epsilon``: certificates from
    different calibration sets exceed ``delta`` about half the time when the bound is tight. For monotone
    losses the adjusted risk is monotone along the columns, so the infimum is the end of the prefix of
    columns that satisfy the condition, which is what is returned. The grid is assumed to end (beyond its
    fastest column) with a threshold of loss ``B``, and to start from the full model (loss 0, returned as
    ``None``).

    References
    ----------
    .. [1] A. N. Angelopoulos, S. Bates, A. Fisch, L. Lei, T. Schuster, "Conformal Risk Control",
       ICLR 2024 (arXiv:2208.02814).

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.crc import conformal_risk_control
    >>> losses = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]] * 10, dtype=float)
    >>> losses.mean(axis=0)
    array([0.  , 0.25, 0.5 , 0.75])
    >>> conformal_risk_control(losses, 0.3)   # 40/41 * 0.25 + 1/41 = 0.268 <= 0.3
    1
    >>> conformal_risk_control(losses, 0.02) is None   # 1/41 = 0.024 > 0.02
    True
    """
    arr, delta, max_loss = _conformal_risk_control_iv(losses, delta, max_loss)
    reason = _non_monotone_reason(arr)
    if reason:
        warnings.warn(reason, UserWarning, stacklevel=caller_stacklevel())
    return _crc_index(arr, delta, max_loss)


def _crc_index(arr: np.ndarray, delta: float, max_loss: float = 1.0) -> int | None:
    """:func:`conformal_risk_control` of checked losses, without its warning (a caller that reports it itself).

    The condition is tested as ``sum + B <= delta (n + 1)`` on correctly rounded column sums, so that the order of
    the rows never decides it (a float mean's last bit did, where the adjusted risk equals ``delta``): compiled
    compensated sums (within a few eps of the exact sum) decide every column but those that close to the
    threshold, which ``math.fsum`` sums again (it alone took 100 times as long)."""
    n = arr.shape[0]
    sums = _column_sums(np.ascontiguousarray(arr, dtype=np.float64))
    threshold = delta * (n + 1)
    near = np.abs(sums + max_loss - threshold) <= 4 * _sum_error(sums + max_loss, _COMPENSATED)
    for j in np.flatnonzero(near):
        sums[j] = math.fsum(arr[:, j])
    ok = sums + max_loss <= threshold
    if not ok[0]:
        return None
    return int(np.argmin(ok)) - 1 if not ok.all() else ok.size - 1
