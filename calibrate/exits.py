"""Exit rule and its vectorised simulation over a grid of thresholds.

A token exits at the first layer ``i`` (1-based, ``i < L``) whose confidence reaches the threshold
``lambda_t``; otherwise it uses the last layer ``L``. With the running maximum
``m_i = max_{j <= i} conf_j`` the exit layer for a threshold is the first ``i`` with ``m_i >= lambda_t``,
so one ``searchsorted`` of the running maximum into the sorted grid serves all thresholds at once:
``b_i`` = number of grid thresholds ``<= m_i`` is non-decreasing in ``i``, and the token exits at layer
``i`` exactly for the grid thresholds (in ascending order) with index in ``[b_{i-1}, b_i)``. Every result
below is built from ``b`` with difference arrays; nothing loops over tokens or thresholds in Python.

Thresholds are always given **safest first** (decreasing ``lambda``), the order in which the risk
control tests them. The full model is not a grid value: it is the explicit hypothesis
``lambda = inf`` that the certificate falls back to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numpy.typing import ArrayLike

from calibrate._threads import njit, parallel_allowed, serial
from calibrate._validation import finite_at_least, int_at_least, int_in
from measures._arrays import as_numpy, working_float

if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1 (debugging, coverage): the sweep runs as Python, slowly

    def trailing_zeros(x) -> int:
        """Index of the lowest set bit of ``x > 0``."""
        x = int(x)
        return (x & -x).bit_length() - 1

else:
    from numba.cpython.unsafe.numbers import trailing_zeros

__all__ = [
    "Decay",
    "default_lambdas",
    "exit_layers",
    "early_tokens",
    "with_decay_headroom",
    "average_layers",
    "disagreement_counts",
]

#: Tokens processed per block; keeps the (block, layers) intermediates in cache.
_BLOCK = 1 << 15


#: What both the sweep and exit_layers say of a non-finite confidence.
_NON_FINITE = "conf contains NaN or inf in a layer before the last (whose value is never read)"


@dataclass(frozen=True)
class Decay:
    """CALM's decaying threshold ``lambda_t = clip(0.9 * lambda + 0.1 * exp(-tau * t / N), 0, 1)``.

    Parameters
    ----------
    max_len : int
        ``N``, the maximum output length in tokens, in ``1..2**62``.
    tau : float, default=4.0
        Decay rate (>= 0). ``t`` is the 0-based position of the token in its output.

    Notes
    -----
    ``lambda = 1`` is not "never exit" (a confidence of exactly 1 passes it), and with decay on it exits far
    more, which is why the full model is an explicit hypothesis rather than a grid value.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.exits import Decay, exit_layers
    >>> decay = Decay(max_len=100)
    >>> np.round(decay.thresholds([0.9, 0.5], positions=[0, 50, 99]), 3)   # rows: positions, columns: lambdas
    array([[0.91 , 0.55 ],
           [0.824, 0.464],
           [0.812, 0.452]])
    >>> conf = np.array([[0.2, 0.9, 0.5, 0.0], [0.6, 0.1, 0.95, 0.0]])
    >>> exit_layers(conf, [0.99, 0.9, 0.5], positions=np.array([0, 99]), decay=decay)   # stricter early, laxer late
    array([[4, 4, 2],
           [3, 3, 1]], dtype=int16)
    """

    max_len: int
    tau: float = 4.0

    def __post_init__(self) -> None:
        int_in(self.max_len, "Decay.max_len", 1, 2**62, " (positions are int64)")
        # Python numbers: a numpy long double tau reached the compiled sweep as float128, which it cannot take
        object.__setattr__(self, "max_len", int(self.max_len))
        object.__setattr__(self, "tau", finite_at_least(self.tau, "Decay.tau"))

    def thresholds(self, lambdas: ArrayLike, positions: ArrayLike) -> np.ndarray:
        """Per-position thresholds, shape ``positions.shape + lambdas.shape`` (float64); ``positions`` are 0-based
        (ValueError for a negative one)."""
        positions = np.asarray(positions)
        if positions.size and positions.min() < 0:
            raise ValueError(f"positions must be >= 0 (0-based output positions), got a minimum of {positions.min()}")
        lam = np.asarray(lambdas, dtype=np.float64)
        return np.clip(np.add.outer(self._shift(positions), 0.9 * lam), 0.0, 1.0)

    def _shift(self, positions) -> np.ndarray:
        """``0.1 exp(-tau t / N)`` at each position ``t`` (float64, whatever the types of ``t`` and ``tau``)."""
        return 0.1 * np.exp(-self.tau * np.asarray(positions, dtype=np.float64) / self.max_len)

    def _settled(self) -> int:
        """A position from which :meth:`thresholds` are the same at every later one: ``exp(-tau t / N)`` is 0.0 in
        float64 (below ``exp(-745.2)``); 0 when ``tau = 0``. Tables by position stop there."""
        if self.tau == 0:
            return 0
        position = 746.0 * self.max_len / self.tau  # inf for a subnormal tau
        return math.ceil(position) if position < 2**62 else 2**62

    def to_dict(self) -> dict:
        """``{"max_len": N, "tau": tau}``, as certificates record it."""
        return {"max_len": int(self.max_len), "tau": float(self.tau)}


def default_lambdas(*, decay: bool = False) -> np.ndarray:
    """The default grid: 201 thresholds in ``[0, 1]``, safest (1.0) first, fine near 1.

    101 evenly spaced values plus 100 values ``1 - 10**u`` for ``u`` evenly spaced in ``[-4, -2)``, where
    saturation and softmax thresholds matter most. With ``decay=True``, 11 values above 1 come first (see
    :func:`with_decay_headroom`): 212 values.

    Parameters
    ----------
    decay : bool, default=False
        Whether the grid is for the decaying threshold (then it starts at ``1 / 0.9``).

    Returns
    -------
    ndarray of float64, shape (201,) or (212,)
        Strictly decreasing thresholds.

    Examples
    --------
    >>> from calibrate.exits import default_lambdas
    >>> grid = default_lambdas()
    >>> grid.size, float(grid[0]), float(grid[1]), float(grid[-1])
    (201, 1.0, 0.9999, 0.0)
    >>> default_lambdas(decay=True).size
    212
    """
    return _grid(101, 2, np.logspace(-4, -2, 101)[:-1], headroom=11 if decay else 0)


def _grid(n_even: int, digits: int, gaps: np.ndarray, *, headroom: int = 0) -> np.ndarray:
    """A default grid, safest first: ``n_even`` evenly spaced values in ``[0, 1]`` rounded to ``digits`` decimals
    (0.94, not 0.9400000000000001), ``1 - gaps`` (values near 1), and ``headroom`` values above 1 before them
    (:func:`with_decay_headroom`)."""
    grid = np.concatenate([np.linspace(0.0, 1.0, n_even).round(digits), 1.0 - gaps])
    return with_decay_headroom(np.unique(grid)[::-1].copy(), headroom)


def with_decay_headroom(grid: ArrayLike, n: int) -> np.ndarray:
    """``grid`` preceded by ``n`` values evenly spaced from ``1 / 0.9`` down towards 1 (exclusive).

    Under the decaying threshold, ``lambda = 1`` still exits early: position ``t`` gets
    ``0.9 + 0.1 exp(-tau t / N)``, about 0.9 at the end. At ``1 / 0.9`` every position's threshold is 1,
    as ``lambda = 1`` is without decay (only a confidence of exactly 1 exits), so a grid that starts there has
    a safe first hypothesis (without it, a decayed ``lambda = 1`` that fails leaves only the full model).

    Parameters
    ----------
    grid : array_like of float, shape (K,)
        Strictly decreasing thresholds, the first at most 1 when ``n > 0``.
    n : int
        Values added above the grid, ``>= 0``.

    Returns
    -------
    ndarray of float64, shape (n + K,)
        Strictly decreasing.

    Raises
    ------
    TypeError
        If ``n`` is not an int.
    ValueError
        If ``n < 0``, ``grid`` is not strictly decreasing or starts above 1 (with ``n > 0``).

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.exits import with_decay_headroom
    >>> np.round(with_decay_headroom([1.0, 0.5], 3), 4)   # 1 / 0.9 = 1.1111 first
    array([1.1111, 1.0741, 1.037 , 1.    , 0.5   ])
    """
    n = int_at_least(n, "n", 0)  # values added above the grid
    grid = _lambdas_iv(grid, "grid")
    if n and grid[0] > 1.0:
        raise ValueError(f"grid must start at or below 1 to take values above it, got grid[0]={grid[0]:g}")
    n = int(n)  # n + 1 in a small numpy int overflowed: np.uint8(255) added nothing
    return np.concatenate([np.linspace(1 / 0.9, 1.0, n + 1)[:-1], grid])


def _lambdas_iv(lambdas, name: str = "lambdas") -> np.ndarray:
    lam = as_numpy(lambdas)
    if lam.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be real numbers, got dtype {lam.dtype}")
    lam = lam.astype(np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise ValueError(f"{name} must be finite (the full model is an explicit hypothesis, not lambda=inf)")
    if lam.size > 1 and not np.all(lam[1:] < lam[:-1]):  # not np.diff: it overflows for [1e308, -1e308]
        i = int(np.argmax(lam[1:] >= lam[:-1]))
        raise ValueError(
            f"{name} must be strictly decreasing (safest first), got "
            f"{name}[{i}]={lam[i]:g} <= {name}[{i + 1}]={lam[i + 1]:g}"
        )
    return lam


def _conf_iv(conf, decay) -> np.ndarray:
    conf = as_numpy(conf)
    if conf.dtype.kind not in "biuf":  # strings, objects (None), complex: no silent conversion
        raise TypeError(f"conf must be a real numeric array, got dtype {conf.dtype}")
    if conf.ndim != 2 or conf.shape[1] < 1:
        raise ValueError(f"conf must have shape (n_tokens, n_layers), got {conf.shape}")
    conf = conf.astype(working_float(conf.dtype), copy=False)  # the compiled sweep knows float32 and float64
    if decay is not None and not isinstance(decay, Decay):
        raise TypeError(f"decay must be a calibrate.Decay or None, got {type(decay).__name__}")
    if decay is not None and conf.shape[0] and np.nanmax(conf[:, :-1], initial=-np.inf) > 1.0:
        raise ValueError(
            f"with decay, confidences must be at most 1 (the decaying threshold is clipped to [0, 1], so a larger "
            f"value passes every threshold alike), got {np.nanmax(conf[:, :-1]):g}: rescale the score to [0, 1]"
        )
    return conf


def _exit_layers_iv(conf, lambdas, positions, decay):
    lam = _lambdas_iv(lambdas)
    conf = _conf_iv(conf, decay)
    if not np.all(np.isfinite(conf[:, :-1])):  # the last layer's value is never read (as in the sweep)
        raise ValueError(_NON_FINITE)
    if decay is None:  # positions matter only for the decaying threshold
        return lam, conf, None
    if positions is None:
        raise ValueError("positions (0-based token positions, shape (n_tokens,)) are needed with decay")
    positions = np.asarray(positions)
    if positions.shape != (conf.shape[0],):
        raise ValueError(f"positions must have shape ({conf.shape[0]},), got {positions.shape}")
    if not (np.issubdtype(positions.dtype, np.integer) or positions.size == 0):
        raise ValueError(f"positions must be ints (0-based token positions), got dtype {positions.dtype}")
    if positions.size and positions.min() < 0:
        raise ValueError(f"positions must be >= 0, got a minimum of {positions.min()}")
    return lam, conf, positions


def _blocks(n: int):
    for start in range(0, n, _BLOCK):
        yield slice(start, min(start + _BLOCK, n))


def _crossings(conf: np.ndarray, asc: np.ndarray, positions: np.ndarray | None, decay: Decay | None) -> np.ndarray:
    """``b[t, i]`` = number of ascending thresholds ``<= max(conf[t, :i+1])`` for layers ``1..L-1``.

    Shape ``(n_tokens, L - 1)``, int32; ``b`` is non-decreasing along the layer axis.
    """
    running = np.maximum.accumulate(conf[:, :-1], axis=1)
    if decay is None:
        return np.searchsorted(asc, running, side="right").astype(np.int32, copy=False)
    out = np.empty(running.shape, dtype=np.int32)
    # Threshold grids differ only by position: one searchsorted per distinct position, never per token.
    settled = decay._settled()
    if positions.size and positions.max() > settled:  # then settled fits the positions' dtype
        positions = np.minimum(positions, settled)
    uniq, inverse = np.unique(positions, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(uniq.size + 1))
    grids = decay.thresholds(asc, uniq)  # (n_positions, K), non-decreasing rows
    for p in range(uniq.size):
        rows = order[bounds[p] : bounds[p + 1]]
        out[rows] = np.searchsorted(grids[p], running[rows], side="right")
    return out


def exit_layers(
    conf: ArrayLike, lambdas: ArrayLike, *, positions: ArrayLike | None = None, decay: Decay | None = None
) -> np.ndarray:
    """Exit layer of every token under every threshold.

    Parameters
    ----------
    conf : array_like, shape (n_tokens, n_layers)
        Confidence of each layer (higher = more confident). The last layer's value is never used.
    lambdas : array_like, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    positions : array_like of int, shape (n_tokens,), optional
        0-based position of each token in its output; required with ``decay``, unused without it.
    decay : Decay, optional
        Decaying threshold; ``None`` uses ``lambda`` as is.

    Returns
    -------
    ndarray of int16 (int32 beyond 32767 layers), shape (n_tokens, n_lambdas)
        1-based exit layer in ``[1, n_layers]``.

    Examples
    --------
    >>> import numpy as np
    >>> conf = np.array([[0.2, 0.9, 0.5, 0.0], [0.6, 0.1, 0.95, 0.0]])
    >>> exit_layers(conf, [0.99, 0.9, 0.5])
    array([[4, 2, 2],
           [4, 3, 1]], dtype=int16)
    """
    lam, conf, positions = _exit_layers_iv(conf, lambdas, positions, decay)
    n_tokens, n_layers = conf.shape
    k = lam.size
    asc = lam[::-1]
    out = np.empty((n_tokens, k), dtype=np.int16 if n_layers <= np.iinfo(np.int16).max else np.int32)
    for blk in _blocks(n_tokens):
        b = _crossings(conf[blk], asc, None if positions is None else positions[blk], decay)
        rows = b.shape[0]
        # exit(j) = 1 + #{i : b_i <= j}: a histogram of b per row, then a cumulative sum over j.
        flat = (np.arange(rows, dtype=np.int64)[:, None] * (k + 1) + b).ravel()
        counts = np.bincount(flat, minlength=rows * (k + 1)).reshape(rows, k + 1)[:, :k]
        out[blk] = (1 + np.cumsum(counts, axis=1))[:, ::-1]
    return out


def early_tokens(top1: np.ndarray, layers: np.ndarray, full_tokens: np.ndarray | None = None) -> np.ndarray:
    """Token emitted at the exit layer.

    Parameters
    ----------
    top1 : ndarray of int, shape (n_tokens, n_layers)
        Each layer's top-1 token.
    layers : ndarray of int, shape (n_tokens, n_lambdas)
        1-based exit layers from :func:`exit_layers`.
    full_tokens : ndarray of int, shape (n_tokens,), optional
        The full model's tokens. When given, a token that runs to the last layer emits the full model's
        token (the full model by definition), whatever the last layer's stored top-1 says.

    Returns
    -------
    ndarray, shape (n_tokens, n_lambdas), the dtype of ``top1`` (with ``full_tokens``: the integer dtype
    holding both).

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.exits import early_tokens, exit_layers
    >>> conf = np.array([[0.2, 0.9, 0.5, 0.0], [0.6, 0.1, 0.95, 0.0]])
    >>> top1 = np.array([[3, 7, 7, 7], [1, 4, 8, 8]])
    >>> layers = exit_layers(conf, [0.99, 0.9, 0.5])   # [[4, 2, 2], [4, 3, 1]]
    >>> early_tokens(top1, layers)
    array([[7, 7, 7],
           [8, 8, 1]])
    """
    top1, layers = as_numpy(top1), as_numpy(layers)
    if layers.dtype.kind not in "iu":
        raise TypeError(f"layers must be ints (1-based exit layers), got dtype {layers.dtype}")
    if layers.ndim != 2 or top1.ndim != 2 or layers.shape[0] != top1.shape[0]:
        raise ValueError(
            f"top1 (n_tokens, n_layers) and layers (n_tokens, n_lambdas) must be 2-D with as many rows; got shapes "
            f"{top1.shape} and {layers.shape}"
        )
    if layers.size and (layers.min() < 1 or layers.max() > top1.shape[1]):
        raise ValueError(
            f"layers must be 1-based exit layers in [1, {top1.shape[1]}], got a range [{layers.min()}, {layers.max()}]"
        )
    early = np.take_along_axis(top1, layers.astype(np.intp) - 1, axis=1)
    if full_tokens is not None:
        top1, full_tokens = _token_ids_iv(top1, full_tokens)
        early = np.where(layers == top1.shape[1], full_tokens[:, None], early).astype(top1.dtype, copy=False)
    return early


def _token_ids_iv(top1, full_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Both token arrays in the integer dtype that holds both (a copy only when they differ)."""
    top1, full_tokens = as_numpy(top1), as_numpy(full_tokens)
    dtype = np.result_type(top1.dtype, full_tokens.dtype)
    if dtype.kind not in "iu":  # e.g. int64 with uint64 (numpy goes to float64, where ids above 2**53 collide)
        raise ValueError(
            f"top1 ({top1.dtype}) and full_tokens ({full_tokens.dtype}) must be integer token ids with a common "
            "integer dtype"
        )
    return top1.astype(dtype, copy=False), full_tokens.astype(dtype, copy=False)


#: Most cells of the lookup table that maps a confidence to its approximate place in the grid.
_MAX_CELLS = 1 << 20


#: Layers per pass of :func:`_sweep` (an int64 bit mask holds them plus one bit of look-ahead, never the sign).
_WINDOW = 62


@njit(parallel=True, nogil=True)
def _sweep(  # pragma: no cover
    conf, base, shift, clip, inv_slope, lut, lut_lo, lut_inv, offsets, top1, full, layer_hist, wrong
):
    """Histograms of ``b`` (per thread) and of disagreement steps (per sequence), visiting only the layers where one
    changes.

    ``layer_hist[h, j]`` counts the (token, layer i < L) pairs that thread ``h`` visited with ``b_i = j``, where
    ``b_i`` is the number of the token's ascending thresholds at most the running maximum of its
    confidences; ``wrong[s, j]`` is the difference array of the number of disagreeing early tokens over
    ascending threshold index ``j`` (layer ``i`` adds ``w_{i+1} - w_i`` at ``b_i``). With ``top1`` None
    (a branch numba removes at compile time) only ``layer_hist`` is filled.

    Per token and window of layers, a branch-free pass lists the records (layers whose confidence
    exceeds all earlier ones: only there does ``b`` change) and builds a bit mask of the disagreements
    ``w_i``; then each record gets its ``b``, read from a uniform lookup table over the base grid (at
    ``(m - shift) / slope``) and corrected by exact comparisons with the token's own thresholds; then
    each flip of ``w`` adds its step at the ``b`` of the latest record.

    A token at position ``p`` in its sequence compares with the thresholds ``clip(base + shift[p])`` (the last
    entry of ``shift`` serves every later position), computed as :meth:`Decay.thresholds` does, so never
    tabulated per position; without decay ``shift`` is ``[0.0]`` and ``clip`` is ``(-inf, inf)``.
    Returns False if ``conf`` holds a non-finite value in layers ``1..L-1``.
    """
    n_early = conf.shape[1] - 1  # layers a token can leave early; the last one is the full model
    k = base.size
    lo_clip, hi_clip = clip
    top = lut.size - 1
    one = np.int64(1)
    finite = np.ones(offsets.size - 1, dtype=np.bool_)
    for s in numba.prange(offsets.size - 1):
        value = np.empty(_WINDOW, dtype=conf.dtype)  # the window's records: their confidences (new maxima),
        layer = np.empty(_WINDOW, dtype=np.intp)  # their layers,
        after = np.empty(_WINDOW, dtype=np.intp)  # b after each of them,
        seen = np.empty(_WINDOW, dtype=np.intp)  # and per layer of the window, the records up to it
        lo = offsets[s]
        thread = numba.get_thread_id()  # in [0, NUMBA_NUM_THREADS)
        total = 0.0  # sum of 0 * confidence: NaN iff one of them is NaN or infinite (never overflows)
        sh = shift[0]
        for t in range(lo, offsets[s + 1]):
            if shift.size > 1:  # decay: thresholds by position
                sh = shift[min(t - lo, shift.size - 1)]
            target = full[t] if top1 is not None else 0
            m = -np.inf
            b = 0  # thresholds <= m
            run = 0  # first layer with the current b
            for w0 in range(0, n_early, _WINDOW):
                width = min(_WINDOW, n_early - w0)
                n = 0
                w = np.int64(0)  # bit j: layer w0 + j disagrees with the full model
                for j in range(width):
                    c = conf[t, w0 + j]
                    total += c * 0.0
                    value[n] = c  # kept only if it is a record
                    layer[n] = w0 + j
                    n += c > m
                    seen[j] = n
                    m = max(m, c)
                    if top1 is not None:
                        w |= np.int64(top1[t, w0 + j] != target) << j
                before = b  # b before the window's first record
                for r in range(n):
                    c = value[r]
                    cell = ((c - sh) * inv_slope - lut_lo) * lut_inv
                    nb = np.intp(lut[int(min(cell, top))]) if cell > 0 else 0  # clamped before int (+inf)
                    while nb < k and min(max(base[nb] + sh, lo_clip), hi_clip) <= c:
                        nb += 1
                    while nb > 0 and min(max(base[nb - 1] + sh, lo_clip), hi_clip) > c:
                        nb -= 1
                    layer_hist[thread, b] += layer[r] - run
                    b, run = nb, layer[r]
                    after[r] = nb
                if top1 is not None:
                    if w0 + width < n_early:  # look-ahead: the next window's first layer
                        w |= np.int64(top1[t, w0 + width] != target) << width
                    if w0 == 0:
                        wrong[s, 0] += w & one
                    flips = (w ^ (w >> one)) & ((one << width) - one)  # w of the last layer is 0: the full model
                    while flips != 0:
                        j = trailing_zeros(flips)
                        flips &= flips - one
                        at = after[seen[j] - 1] if seen[j] > 0 else before
                        wrong[s, at] += ((w >> (j + one)) & one) - ((w >> j) & one)
            layer_hist[thread, b] += n_early - run
        finite[s] = total == 0.0
    return finite.all()


#: The sweep without threads (:func:`calibrate._threads.parallel_allowed`): in a process forked after numba's threads
#: started (its GNU OpenMP layer aborts a forked child that launches a parallel region), or while another thread
#: runs the parallel one.
_sweep_serial = serial(_sweep, nogil=True)


def _sweep_iv(conf, lambdas, offsets, decay):
    lam = _lambdas_iv(lambdas)
    conf = _conf_iv(conf, decay)  # finiteness is checked inside the sweep
    n_tokens = conf.shape[0]
    offsets = np.asarray([0, n_tokens] if offsets is None else offsets)
    if offsets.size and not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be ints (CSR offsets into the token axis), got dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    # offsets[1:] < offsets[:-1], not np.diff < 0, which wraps: [0, 2**63 - 1, -2, 3] reached the compiled sweep
    ends = offsets.ndim == 1 and offsets.size >= 2 and offsets[0] == 0 and offsets[-1] == n_tokens
    if not ends or np.any(offsets[1:] < offsets[:-1]):
        raise ValueError(
            f"offsets must be non-decreasing CSR offsets from 0 to n_tokens={n_tokens} (shape (n_sequences + 1,)), "
            f"got shape {offsets.shape} from {offsets[:1].tolist()} to {offsets[-1:].tolist()}"
        )
    return lam, conf, offsets


def _run_sweep(conf, lam, offsets, decay, top1, full):
    """``(avg_layers, wrong difference arrays)``; without ``top1`` (None) only the average layers."""
    asc = lam[::-1]
    k, n_seq = asc.size, offsets.size - 1
    if decay is None:
        base, shift, clip, slope = asc, np.zeros(1), (-np.inf, np.inf), 1.0
    else:  # Decay.thresholds(asc, p) = clip(0.9 * asc + shift[p], 0, 1), the same float operations
        positions = np.arange(min(max(int(np.diff(offsets).max()), 1), decay._settled() + 1))
        base, shift, clip, slope = 0.9 * asc, decay._shift(positions), (0.0, 1.0), 0.9
    # Lookup table: cell c covers [lo + c / inv, lo + (c + 1) / inv) and stores #{asc <= its lower edge}.
    with np.errstate(over="ignore", invalid="ignore"):  # a grid wider than the float range, or subnormal gaps
        span = asc[-1] - asc[0]
        gap = np.min(np.diff(asc)) if k > 1 else 1.0
        n_cells = int(min(_MAX_CELLS, np.ceil(span / gap) + 1)) if span > 0 else 1
        inv = n_cells / span if span > 0 else 0.0
    if not 0 < inv < np.inf:  # one cell: the sweep finds every place by walking the grid (exact, only slower)
        n_cells, inv = 1, 0.0
    edges = asc[0] + np.arange(n_cells) / inv if inv else asc[:1]
    lut = np.searchsorted(asc, edges, side="right").astype(np.uint8 if k < 256 else np.int32)  # small: stays in cache
    wrong = np.zeros((n_seq, k + 1) if top1 is not None else (0, 0), dtype=np.int64)
    with parallel_allowed() as parallel:
        serial = not parallel
        # a row a thread, never n_seq rows: numba.get_thread_id() < the pool's size, whatever set_num_threads says
        layer_hist = np.zeros((1 if serial else numba.config.NUMBA_NUM_THREADS, k + 1), dtype=np.int64)
        ok = (_sweep_serial if serial else _sweep)(
            conf, np.ascontiguousarray(base), shift, clip, 1.0 / slope, lut, float(asc[0]), float(inv),
            offsets, top1, full, layer_hist, wrong,
        )
    if not ok:
        raise ValueError(_NON_FINITE)
    # exit layer at ascending index j = 1 + #{i < L : b_i <= j}; averaged over tokens
    n = conf.shape[0]  # exact integer sum of exit layers, one division (as every other path computes it)
    avg = (n + np.cumsum(layer_hist.sum(axis=0)[:k])) / n if n else np.full(k, np.nan)  # no tokens: no mean
    return avg[::-1], wrong


def average_layers(
    conf: ArrayLike, lambdas: ArrayLike, *, offsets: ArrayLike | None = None, decay: Decay | None = None
) -> np.ndarray:
    """Token-averaged exit layer for each threshold, shape ``(n_lambdas,)``, values in ``[1, n_layers]``.

    Parameters
    ----------
    conf : array_like, shape (n_tokens, n_layers)
        Layer confidences.
    lambdas : array_like, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    offsets : array_like of int, shape (n_sequences + 1,), optional
        CSR offsets of the sequences in the token axis (positions for ``decay`` count from each
        sequence's start); default: one sequence. Required with ``decay``.
    decay : Decay, optional
        Decaying threshold.

    Returns
    -------
    ndarray of float, shape (n_lambdas,)
        Mean exit layer (1-based) over all tokens, at each threshold; NaN when there are no tokens.

    Raises
    ------
    ValueError
        For a bad ``conf``, ``lambdas`` or ``offsets``, or ``decay`` without ``offsets`` (the positions would
        silently run on across sequences).

    Notes
    -----
    Computed in one compiled pass, without materialising the exit layers.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.exits import average_layers
    >>> conf = np.array([[0.2, 0.9, 0.5, 0.0], [0.6, 0.1, 0.95, 0.0]])   # exit layers [[4, 2, 2], [4, 3, 1]]
    >>> average_layers(conf, [0.99, 0.9, 0.5])
    array([4. , 2.5, 1.5])
    """
    if decay is not None and offsets is None:
        raise ValueError(
            "offsets (CSR offsets of the sequences) are needed with decay, whose positions count from each "
            "sequence's start; pass offsets=[0, n_tokens] for one sequence"
        )
    lam, conf, offsets = _sweep_iv(conf, lambdas, offsets, decay)
    avg, _ = _run_sweep(conf, lam, offsets, decay, None, None)
    return avg


def disagreement_counts(
    conf: ArrayLike,
    lambdas: ArrayLike,
    top1: ArrayLike,
    full_tokens: ArrayLike,
    offsets: ArrayLike,
    *,
    decay: Decay | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence number of early tokens that differ from the full model's, for every threshold.

    Parameters
    ----------
    conf : array_like, shape (n_tokens, n_layers)
        Layer confidences.
    lambdas : array_like, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    top1 : ndarray of int, shape (n_tokens, n_layers)
        Each layer's top-1 token (the last column is ignored: exiting there is the full model).
    full_tokens : ndarray of int, shape (n_tokens,)
        The full model's token at each position.
    offsets : array_like of int, shape (n_sequences + 1,)
        CSR offsets of the sequences in the token axis.
    decay : Decay, optional
        Decaying threshold (positions count from each sequence's start).

    Returns
    -------
    counts : ndarray of int64, shape (n_sequences, n_lambdas)
        Disagreeing tokens per sequence and threshold.
    avg_layers : ndarray of float64, shape (n_lambdas,)
        Token-averaged exit layer per threshold.

    Notes
    -----
    One compiled pass (numba, parallel over sequences) over the (token, layer) pairs: with ``b_i`` the
    number of ascending thresholds at most the running maximum of the confidences, a token's
    disagreement at ascending index ``j`` starts at ``w_1`` and changes by ``w_{i+1} - w_i`` where ``j``
    reaches ``b_i`` (``w_i`` = 1 if layer ``i`` disagrees, ``w_L = 0``), so per-sequence difference
    arrays over the grid give every threshold at once. ``b`` changes only at records (layers whose
    confidence exceeds every earlier one), so only records and changes of ``w`` are visited.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.exits import disagreement_counts
    >>> conf = np.array([[0.2, 0.9, 0.5, 0.0], [0.6, 0.1, 0.95, 0.0]])   # exit layers [[4, 2, 2], [4, 3, 1]]
    >>> top1 = np.array([[3, 7, 7, 7], [1, 4, 8, 8]])                   # early tokens [[7, 7, 7], [8, 8, 1]]
    >>> counts, avg = disagreement_counts(conf, [0.99, 0.9, 0.5], top1, top1[:, -1], offsets=[0, 1, 2])
    >>> counts                                        # two one-token sequences; the second errs at lambda = 0.5
    array([[0, 0, 0],
           [0, 0, 1]])
    >>> avg
    array([4. , 2.5, 1.5])
    """
    lam, conf, offsets = _sweep_iv(conf, lambdas, offsets, decay)
    top1, full_tokens = _token_ids_iv(top1, full_tokens)
    if top1.shape != conf.shape or full_tokens.shape != (conf.shape[0],):
        raise ValueError(
            f"top1 must have shape {conf.shape} and full_tokens ({conf.shape[0]},), got "
            f"{top1.shape} and {full_tokens.shape}"
        )
    avg, wrong = _run_sweep(conf, lam, offsets, decay, top1, full_tokens)
    counts = np.cumsum(wrong, axis=1)[:, : lam.size][:, ::-1]
    return counts, avg
