"""Family-wise error rate (FWER) control over a grid of hypotheses.

Hypothesis ``k`` is ``H_k: risk(lambda_k) > delta`` ("threshold ``k`` is unsafe"); a rejected null is a
certified threshold. The p-values come in the order fixed before calibration, from the safest threshold
(index 0) to the fastest. Every procedure here returns a boolean mask of rejected nulls such that

    P( some rejected H_k is true ) <= epsilon

for any dependence between the p-values (valid p-values assumed), so the certified set contains only
thresholds with ``risk <= delta`` with probability at least ``1 - epsilon``.

Letters: CALM writes ``delta`` for the tolerance and ``epsilon`` for the failure probability (the FWER
level); LTT and MAPIE write ``alpha`` for the tolerance and ``delta`` for the FWER level.

Functions :func:`fixed_sequence`, :func:`bonferroni`, :func:`holm` and :func:`multistart`; the same as
strategy objects (:class:`FixedSequence`, :class:`Bonferroni`, :class:`Holm`, :class:`MultiStart`,
subclasses of the ABC :class:`FWERProcedure`); :func:`control_fwer` takes a name or an instance.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike

from calibrate._validation import bounded_array, open_interval

__all__ = [
    "DEFAULT_N_STARTS",
    "FWER_METHODS",
    "Bonferroni",
    "FWERProcedure",
    "FixedSequence",
    "Holm",
    "MultiStart",
    "bonferroni",
    "control_fwer",
    "fixed_sequence",
    "holm",
    "multistart",
]

#: Names accepted by :func:`control_fwer`.
FWER_METHODS = ("fixed_sequence", "bonferroni", "holm", "multistart")

#: Number of equally spaced starts used by ``control_fwer(..., method="multistart")`` and by
#: ``MultiStart()`` when no starts are given (capped at the number of hypotheses).
DEFAULT_N_STARTS = 4


# ---------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------


def _p_epsilon_iv(p_values, epsilon) -> tuple[np.ndarray, float]:
    arr = bounded_array(p_values, "p_values", ndims=(1,), shapes="(K,)")
    return arr, open_interval(epsilon, "epsilon")



def _starts_spec_iv(starts) -> int | np.ndarray:
    """``starts`` as a number of starts (an int >= 1) or distinct int indices (a non-empty 1-D array), before the
    number of hypotheses is known; TypeError for another type, ValueError for a bad value."""
    if isinstance(starts, (bool, str, bytes)) or not isinstance(starts, (numbers.Integral, Sequence, np.ndarray)):
        raise TypeError(
            "starts must be an int (number of equally spaced starts) or a sequence of int indices, "
            f"got {type(starts).__name__}"
        )
    if isinstance(starts, numbers.Integral):
        if int(starts) < 1:
            raise ValueError(f"starts, as a number of starts, must be >= 1, got {int(starts)}")
        return int(starts)
    try:
        arr = np.asarray(starts)
    except ValueError:  # ragged nesting
        arr = np.empty((0, 0))
    if arr.ndim != 1 or arr.size == 0:
        shape = "a ragged sequence" if arr.shape == (0, 0) and len(starts) else f"shape {arr.shape}"
        raise ValueError(f"starts must be a non-empty 1-D sequence of indices, got {shape}")
    if not (np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"starts must contain integer indices, got dtype {arr.dtype}")
    if np.unique(arr).size != arr.size:
        raise ValueError(f"starts must be distinct indices (each start spends epsilon / m), got {arr.tolist()}")
    return arr.astype(np.int64)


def _starts_iv(starts, n_hypotheses: int) -> np.ndarray:
    """Normalise ``starts`` (an int count or a sequence of indices) to sorted unique indices."""
    arr = _starts_spec_iv(starts)
    if isinstance(arr, int):
        m = min(arr, n_hypotheses)
        # equally spaced as MAPIE's FWERFixedSequenceTesting(n_starts=m): i * (K // m)
        return np.arange(m, dtype=np.int64) * (n_hypotheses // m)
    if arr.min() < 0 or arr.max() >= n_hypotheses:
        raise ValueError(
            f"starts must be indices in [0, {n_hypotheses - 1}] (one per hypothesis), got "
            f"[{arr.min()}, {arr.max()}]"
        )
    return np.sort(arr)


def _multistart_iv(p_values, epsilon, starts):
    arr, epsilon = _p_epsilon_iv(p_values, epsilon)
    return arr, epsilon, _starts_iv(starts, arr.size)


# ---------------------------------------------------------------------------------------------------
# procedures (private cores trust their inputs)
# ---------------------------------------------------------------------------------------------------


def _walk(p: np.ndarray, level: float, start: int, out: np.ndarray) -> None:
    """Fixed sequence from ``start`` toward the fast end at ``level``; marks rejections in ``out``."""
    passed = p[start:] <= level
    stop = int(np.argmin(passed)) if not passed.all() else passed.size
    out[start : start + stop] = True


def fixed_sequence(p_values: ArrayLike, epsilon: float) -> np.ndarray:
    """Fixed-sequence testing: reject in order while ``p <= epsilon``, stop at the first ``p > epsilon``.

    Parameters
    ----------
    p_values : array_like, shape (K,)
        Valid p-values of ``H_k: risk_k > delta``, from the safest hypothesis (index 0) to the fastest.
    epsilon : float
        FWER level in (0, 1) (the failure probability; ``delta`` in LTT/MAPIE).

    Returns
    -------
    ndarray of bool, shape (K,)
        Rejected nulls (certified hypotheses): always a prefix ``[True]*j + [False]*(K-j)``.

    Raises
    ------
    ValueError
        If ``p_values`` is empty, not 1-D, NaN or outside ``[0, 1]``, or ``epsilon`` is outside (0, 1).

    Notes
    -----
    Each hypothesis is tested at the full level ``epsilon``; the first true null met stops the walk,
    and it is rejected with probability at most ``epsilon``, so ``FWER <= epsilon``. No monotonicity of
    the risk in ``lambda`` is assumed, but the order must be fixed before seeing the calibration data;
    a non-monotone risk only costs power (the walk stops at the first bump).

    References
    ----------
    .. [1] P. Bauer, "Multiple testing in clinical trials", Statistics in Medicine 10(6), 1991.
    .. [2] Angelopoulos et al., "Learn then Test", 2021.

    Examples
    --------
    >>> from calibrate import fwer
    >>> fwer.fixed_sequence([0.001, 0.02, 0.3, 0.001], 0.05)
    array([ True,  True, False, False])
    """
    p, epsilon = _p_epsilon_iv(p_values, epsilon)
    out = np.zeros(p.size, dtype=bool)
    _walk(p, epsilon, 0, out)
    return out


def bonferroni(p_values: ArrayLike, epsilon: float) -> np.ndarray:
    """Bonferroni correction: reject every ``H_k`` with ``p_k <= epsilon / K``.

    Parameters
    ----------
    p_values : array_like, shape (K,)
        Valid p-values, safest first (the order does not matter here).
    epsilon : float
        FWER level in (0, 1) (``delta`` in LTT/MAPIE).

    Returns
    -------
    ndarray of bool, shape (K,)
        Rejected nulls. Unlike fixed sequence, the set need not be a prefix.

    Raises
    ------
    ValueError
        If ``p_values`` is empty, not 1-D, NaN or outside ``[0, 1]``, or ``epsilon`` is outside (0, 1).

    Notes
    -----
    Union bound over the ``K`` hypotheses: ``FWER <= K * epsilon / K``. It does *not* stop at the first
    non-rejection (MAPIE's ``FWERBonferroniCorrection`` docstring says it does, its code does not).

    Examples
    --------
    >>> from calibrate import fwer
    >>> fwer.bonferroni([0.001, 0.02, 0.3, 0.01], 0.05)
    array([ True, False, False,  True])
    """
    p, epsilon = _p_epsilon_iv(p_values, epsilon)
    return p <= epsilon / p.size


def holm(p_values: ArrayLike, epsilon: float) -> np.ndarray:
    """Holm's step-down procedure.

    Parameters
    ----------
    p_values : array_like, shape (K,)
        Valid p-values, safest first (the order does not matter here).
    epsilon : float
        FWER level in (0, 1) (``delta`` in LTT/MAPIE).

    Returns
    -------
    ndarray of bool, shape (K,)
        Rejected nulls.

    Raises
    ------
    ValueError
        If ``p_values`` is empty, not 1-D, NaN or outside ``[0, 1]``, or ``epsilon`` is outside (0, 1).

    Notes
    -----
    Sort the p-values ``p_(1) <= ... <= p_(K)``; reject ``H_(1), ..., H_(j)`` where ``j`` is the first
    ``i`` with ``p_(i+1) > epsilon / (K - i)``. Controls the FWER at ``epsilon`` under any dependence
    and rejects every hypothesis Bonferroni rejects.

    References
    ----------
    .. [1] S. Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist., 1979.

    Examples
    --------
    >>> from calibrate import fwer
    >>> fwer.holm([0.03, 0.001, 0.02, 0.5], 0.1)   # thresholds 0.1/4, 0.1/3, 0.1/2, 0.1/1
    array([ True,  True,  True, False])
    """
    p, epsilon = _p_epsilon_iv(p_values, epsilon)
    k = p.size
    order = np.argsort(p, kind="stable")
    passed = p[order] <= epsilon / (k - np.arange(k))
    stop = int(np.argmin(passed)) if not passed.all() else k
    out = np.zeros(k, dtype=bool)
    out[order[:stop]] = True
    return out


def multistart(p_values: ArrayLike, epsilon: float, *, starts: int | Sequence[int]) -> np.ndarray:
    """Fixed-sequence testing from several starting points, each at level ``epsilon / m``.

    Parameters
    ----------
    p_values : array_like, shape (K,)
        Valid p-values, from the safest hypothesis (index 0) to the fastest.
    epsilon : float
        FWER level in (0, 1) (``delta`` in LTT/MAPIE).
    starts : int or sequence of int
        Starting indices (distinct, in ``[0, K)``), or a number ``m`` of equally spaced starts
        ``i * (K // m)``, ``i = 0..m-1`` (as MAPIE's ``FWERFixedSequenceTesting(n_starts=m)``); ``m`` is
        capped at ``K``.

    Returns
    -------
    ndarray of bool, shape (K,)
        Union of the rejections of the ``m`` walks.

    Raises
    ------
    ValueError
        If ``starts`` holds repeated or out-of-range indices, or as :func:`fixed_sequence`.
    TypeError
        If ``starts`` is neither an int nor a sequence of ints.

    Notes
    -----
    From each start ``s`` the walk tests ``s, s+1, ...`` (toward the fast end) at level ``epsilon / m``
    and stops at the first ``p > epsilon / m``; walks may run into each other's segments. Each walk is a
    fixed-sequence test at ``epsilon / m`` and the union bound gives ``FWER <= epsilon``. It keeps power
    when the risk is not monotone in ``lambda`` (a bump stops one walk, not the others). With ``starts=[0]``
    it is :func:`fixed_sequence`; with all ``K`` indices it is :func:`bonferroni`.

    References
    ----------
    .. [1] Angelopoulos et al., "Learn then Test", 2021 (fixed-sequence testing with multiple starts).

    Examples
    --------
    >>> from calibrate import fwer
    >>> fwer.multistart([0.5, 0.001, 0.001, 0.3], 0.05, starts=[0, 1])   # level 0.025 per walk
    array([False,  True,  True, False])
    """
    p, epsilon, start_idx = _multistart_iv(p_values, epsilon, starts)
    level = epsilon / start_idx.size
    out = np.zeros(p.size, dtype=bool)
    for s in start_idx:
        if not out[s]:  # a walk from an already rejected start would repeat a part of another walk
            _walk(p, level, int(s), out)
    return out


# ---------------------------------------------------------------------------------------------------
# strategy objects
# ---------------------------------------------------------------------------------------------------


class FWERProcedure(ABC):
    """Base class of FWER-controlling procedures; subclass it to plug a custom one into
    :func:`control_fwer` or :func:`calibrate.certify`.

    Subclasses implement :meth:`reject`. The attribute ``name`` is recorded in certificates.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate import fwer
    >>> class FirstOnly(fwer.FWERProcedure):
    ...     name = "first_only"
    ...     def reject(self, p_values, epsilon):
    ...         out = np.zeros(len(p_values), dtype=bool)
    ...         out[0] = p_values[0] <= epsilon
    ...         return out
    >>> fwer.control_fwer([0.01, 0.01], 0.05, method=FirstOnly())
    array([ True, False])
    """

    name: str = "custom"

    @abstractmethod
    def reject(self, p_values: np.ndarray, epsilon: float) -> np.ndarray:
        """Rejected nulls.

        Parameters
        ----------
        p_values : ndarray of float64, shape (K,)
            Valid p-values in ``[0, 1]``, safest hypothesis first.
        epsilon : float
            FWER level in (0, 1).

        Returns
        -------
        ndarray of bool, shape (K,)
            ``True`` where the null ``risk_k > delta`` is rejected (certified), with
            ``P(any true null rejected) <= epsilon``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedSequence(FWERProcedure):
    """Fixed-sequence testing, as :func:`fixed_sequence`.

    Examples
    --------
    >>> from calibrate import fwer
    >>> procedure = fwer.FixedSequence()
    >>> procedure.name                                    # recorded in a certificate as its method
    'fixed_sequence'
    >>> fwer.control_fwer([0.001, 0.02, 0.3, 0.001], 0.05, method=procedure)   # stops at the first p > 0.05
    array([ True,  True, False, False])
    """

    name = "fixed_sequence"

    def reject(self, p_values: ArrayLike, epsilon: float) -> np.ndarray:
        return fixed_sequence(p_values, epsilon)


class Bonferroni(FWERProcedure):
    """Bonferroni correction, as :func:`bonferroni`.

    Examples
    --------
    >>> from calibrate import fwer
    >>> fwer.control_fwer([0.001, 0.02, 0.3, 0.001], 0.05, method=fwer.Bonferroni())   # p <= 0.05 / 4
    array([ True, False, False,  True])
    """

    name = "bonferroni"

    def reject(self, p_values: ArrayLike, epsilon: float) -> np.ndarray:
        return bonferroni(p_values, epsilon)


class Holm(FWERProcedure):
    """Holm's step-down procedure, as :func:`holm`.

    Examples
    --------
    >>> from calibrate import fwer
    >>> p = [0.001, 0.02, 0.3, 0.001]
    >>> fwer.control_fwer(p, 0.05, method=fwer.Holm())   # also rejects 0.02 <= 0.05 / 2, which Bonferroni keeps
    array([ True,  True, False,  True])
    """

    name = "holm"

    def reject(self, p_values: ArrayLike, epsilon: float) -> np.ndarray:
        return holm(p_values, epsilon)


class MultiStart(FWERProcedure):
    """Multi-start fixed-sequence testing, as :func:`multistart`.

    Parameters
    ----------
    starts : int or sequence of int, default=DEFAULT_N_STARTS
        Starting indices, or a number of equally spaced starts (capped at the number of hypotheses).
        Indices are checked against the number of hypotheses when :meth:`reject` runs.

    Examples
    --------
    >>> from calibrate import fwer
    >>> p = [0.001, 0.5, 0.001, 0.001]                  # a bump at index 1 stops fixed-sequence testing
    >>> fwer.control_fwer(p, 0.05, method=fwer.FixedSequence())
    array([ True, False, False, False])
    >>> fwer.control_fwer(p, 0.05, method=fwer.MultiStart([0, 2]))   # two walks at 0.025 each
    array([ True, False,  True,  True])
    >>> fwer.MultiStart()
    MultiStart(starts=4)
    """

    name = "multistart"

    def __init__(self, starts: int | Sequence[int] = DEFAULT_N_STARTS):
        spec = _starts_spec_iv(starts)
        self.starts: int | tuple[int, ...] = spec if isinstance(spec, int) else tuple(int(v) for v in spec)

    def reject(self, p_values: ArrayLike, epsilon: float) -> np.ndarray:
        return multistart(p_values, epsilon, starts=self.starts if isinstance(self.starts, int) else list(self.starts))

    def __repr__(self) -> str:
        return f"MultiStart(starts={self.starts!r})"


_BY_NAME = {
    "fixed_sequence": FixedSequence,
    "bonferroni": Bonferroni,
    "holm": Holm,
    "multistart": MultiStart,
}


def _control_fwer_iv(p_values, epsilon, method):
    p, epsilon = _p_epsilon_iv(p_values, epsilon)
    if isinstance(method, FWERProcedure):
        procedure = method
    elif isinstance(method, str):
        if method not in _BY_NAME:
            raise ValueError(f"method must be one of {FWER_METHODS} or an FWERProcedure instance, got {method!r}")
        procedure = _BY_NAME[method]()
    else:
        raise TypeError(
            f"method must be one of {FWER_METHODS} or an FWERProcedure instance, got {type(method).__name__}"
        )
    return p, epsilon, procedure


def control_fwer(
    p_values: ArrayLike, epsilon: float, *, method: str | FWERProcedure = "fixed_sequence"
) -> np.ndarray:
    """Reject nulls ``risk_k > delta`` with the family-wise error rate controlled at ``epsilon``.

    Parameters
    ----------
    p_values : array_like, shape (K,)
        Valid p-values, from the safest hypothesis (index 0) to the fastest.
    epsilon : float
        FWER level in (0, 1) (the failure probability; ``delta`` in LTT/MAPIE).
    method : {"fixed_sequence", "bonferroni", "holm", "multistart"} or FWERProcedure, default="fixed_sequence"
        Procedure; ``"multistart"`` uses :data:`DEFAULT_N_STARTS` equally spaced starts (pass
        ``MultiStart(starts)`` to choose them).

    Returns
    -------
    ndarray of bool, shape (K,)
        Rejected nulls (certified hypotheses).

    Raises
    ------
    ValueError
        If ``method`` is an unknown name, or ``p_values``/``epsilon`` are invalid, or a custom procedure
        returns something other than ``K`` booleans.
    TypeError
        If ``method`` is neither a string nor an :class:`FWERProcedure` instance.

    Notes
    -----
    ``P(risk(lambda_k) > delta for some certified k) <= epsilon`` over draws of the calibration data,
    when the p-values are valid for i.i.d. examples and the grid and its order were fixed in advance.
    Reusing the calibration data to choose the grid, the order or the method voids this.

    Examples
    --------
    >>> from calibrate import fwer
    >>> p = [0.001, 0.02, 0.3, 0.001]
    >>> fwer.control_fwer(p, 0.05)
    array([ True,  True, False, False])
    >>> fwer.control_fwer(p, 0.05, method="holm")
    array([ True,  True, False,  True])
    """
    p, epsilon, procedure = _control_fwer_iv(p_values, epsilon, method)
    out = np.asarray(procedure.reject(p.copy(), epsilon))
    if out.shape != p.shape or out.dtype != bool:
        raise ValueError(
            f"{type(procedure).__name__}.reject must return a boolean array of shape {p.shape}, got "
            f"dtype {out.dtype} and shape {out.shape}"
        )
    return out
