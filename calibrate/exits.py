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

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Decay",
    "default_lambdas",
    "exit_layers",
    "early_tokens",
    "average_layers",
    "disagreement_counts",
]

#: Tokens processed per block; keeps the (block, layers) intermediates in cache.
_BLOCK = 1 << 15


@dataclass(frozen=True)
class Decay:
    """CALM's decaying threshold ``lambda_t = clip(0.9 * lambda + 0.1 * exp(-tau * t / N), 0, 1)``.

    Parameters
    ----------
    max_len : int
        ``N``, the maximum output length in tokens (> 0).
    tau : float, default=4.0
        Decay rate (>= 0). ``t`` is the 0-based position of the token in its output.

    Notes
    -----
    With decay on, ``lambda = 1`` no longer means "never exit", which is why the full model is an
    explicit hypothesis rather than a grid value.
    """

    max_len: int
    tau: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, (int, np.integer)) or self.max_len <= 0:
            raise ValueError(f"Decay.max_len must be a positive int, got {self.max_len!r}")
        if not np.isfinite(self.tau) or self.tau < 0:
            raise ValueError(f"Decay.tau must be a finite float >= 0, got {self.tau!r}")

    def thresholds(self, lambdas: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Per-position thresholds, shape ``positions.shape + lambdas.shape`` (float64)."""
        lam = np.asarray(lambdas, dtype=np.float64)
        pos = np.asarray(positions, dtype=np.float64)[..., None]
        return np.clip(0.9 * lam + 0.1 * np.exp(-self.tau * pos / self.max_len), 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"max_len": int(self.max_len), "tau": float(self.tau)}


def default_lambdas() -> np.ndarray:
    """The default grid: 201 thresholds in ``[0, 1]``, safest (1.0) first, fine near 1.

    101 evenly spaced values plus 100 values ``1 - 10**u`` for ``u`` evenly spaced in ``[-4, -2)``, where
    saturation and softmax thresholds matter most.
    """
    grid = np.concatenate([np.linspace(0.0, 1.0, 101), 1.0 - np.logspace(-4, -2, 101)[:-1]])
    return np.unique(grid)[::-1].copy()


def _lambdas_iv(lambdas) -> np.ndarray:
    lam = np.asarray(lambdas, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise ValueError(f"lambdas must be a non-empty 1-D array, got shape {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise ValueError("lambdas must be finite (the full model is an explicit hypothesis, not lambda=inf)")
    if lam.size > 1 and not np.all(np.diff(lam) < 0):
        raise ValueError("lambdas must be strictly decreasing (safest first), got an unordered grid")
    return lam


def _conf_iv(conf, positions, decay) -> tuple[np.ndarray, np.ndarray | None]:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[1] < 1:
        raise ValueError(f"conf must have shape (n_tokens, n_layers), got {conf.shape}")
    if conf.dtype.kind != "f":
        conf = conf.astype(np.float32)
    if decay is None:
        return conf, None
    if not isinstance(decay, Decay):
        raise TypeError(f"decay must be a calibrate.Decay or None, got {type(decay).__name__}")
    if positions is None:
        raise ValueError("positions (0-based token positions, shape (n_tokens,)) are needed with decay")
    positions = np.asarray(positions)
    if positions.shape != (conf.shape[0],):
        raise ValueError(f"positions must have shape ({conf.shape[0]},), got {positions.shape}")
    return conf, positions


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
    uniq, inverse = np.unique(positions, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(uniq.size + 1))
    grids = decay.thresholds(asc, uniq)  # (n_positions, K), non-decreasing rows
    for p in range(uniq.size):
        rows = order[bounds[p] : bounds[p + 1]]
        out[rows] = np.searchsorted(grids[p], running[rows], side="right")
    return out


def exit_layers(conf, lambdas, *, positions=None, decay: Decay | None = None) -> np.ndarray:
    """Exit layer of every token under every threshold.

    Parameters
    ----------
    conf : array_like, shape (n_tokens, n_layers)
        Confidence of each layer (higher = more confident). The last layer's value is never used.
    lambdas : array_like, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    positions : array_like of int, shape (n_tokens,), optional
        0-based position of each token in its output; required with ``decay``.
    decay : Decay, optional
        Decaying threshold; ``None`` uses ``lambda`` as is.

    Returns
    -------
    ndarray of int16, shape (n_tokens, n_lambdas)
        1-based exit layer in ``[1, n_layers]``.

    Examples
    --------
    >>> import numpy as np
    >>> conf = np.array([[0.2, 0.9, 0.5, 0.0], [0.6, 0.1, 0.95, 0.0]])
    >>> exit_layers(conf, [0.99, 0.9, 0.5])
    array([[4, 2, 2],
           [4, 3, 1]], dtype=int16)
    """
    lam = _lambdas_iv(lambdas)
    conf, positions = _conf_iv(conf, positions, decay)
    n_tokens, n_layers = conf.shape
    k = lam.size
    asc = lam[::-1]
    out = np.empty((n_tokens, k), dtype=np.int16)
    for blk in _blocks(n_tokens):
        b = _crossings(conf[blk], asc, None if positions is None else positions[blk], decay)
        rows = b.shape[0]
        # exit(j) = 1 + #{i : b_i <= j}: a histogram of b per row, then a cumulative sum over j.
        flat = (np.arange(rows, dtype=np.int64)[:, None] * (k + 1) + b).ravel()
        counts = np.bincount(flat, minlength=rows * (k + 1)).reshape(rows, k + 1)[:, :k]
        out[blk] = (1 + np.cumsum(counts, axis=1))[:, ::-1]
    return out


def early_tokens(top1: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Token emitted at the exit layer.

    Parameters
    ----------
    top1 : ndarray of int, shape (n_tokens, n_layers)
        Each layer's top-1 token.
    layers : ndarray of int, shape (n_tokens, n_lambdas)
        1-based exit layers from :func:`exit_layers`.

    Returns
    -------
    ndarray, shape (n_tokens, n_lambdas), the dtype of ``top1``.
    """
    return np.take_along_axis(top1, layers.astype(np.intp) - 1, axis=1)


def _per_sequence_sums(conf, lam, positions, decay, sequence_index, n_sequences, agree):
    """Shared pass for :func:`average_layers` and :func:`disagreement_counts`."""
    conf, positions = _conf_iv(conf, positions, decay)
    n_tokens, n_layers = conf.shape
    k = lam.size
    asc = lam[::-1]
    layer_hist = np.zeros(k + 1, dtype=np.int64)
    wrong = None if agree is None else np.zeros(n_sequences * (k + 1), dtype=np.float64)
    for blk in _blocks(n_tokens):
        b = _crossings(conf[blk], asc, None if positions is None else positions[blk], decay)
        layer_hist += np.bincount(b.ravel(), minlength=k + 1)
        if wrong is None:
            continue
        # w_i = 1 - agree_i for layers 1..L-1 and w_L = 0; wrong(j) = w_{exit(j)} is a step function of j
        # that starts at w_1 and changes by w_{i+1} - w_i where j reaches b_i.
        w = np.zeros((b.shape[0], n_layers), dtype=np.int8)
        w[:, :-1] = ~agree[blk, :-1]
        step = np.diff(w, axis=1)
        # Tokens are grouped by sequence, so a block touches a narrow range of rows of the result.
        seq = sequence_index[blk].astype(np.int64)
        first = seq.min() * (k + 1)
        size = (seq.max() + 1) * (k + 1) - first
        seq = seq * (k + 1) - first
        hit = step != 0
        idx = (seq[:, None] + b)[hit]
        part = np.bincount(seq, weights=w[:, 0], minlength=size)
        part += np.bincount(idx, weights=step[hit], minlength=size)
        wrong[first : first + size] += part
    # Exit layer for ascending index j is 1 + #{(t, i): b_i <= j} / n_tokens on average.
    avg = 1.0 + np.cumsum(layer_hist[:k]) / max(n_tokens, 1)
    counts = None
    if wrong is not None:
        counts = np.rint(np.cumsum(wrong.reshape(n_sequences, k + 1), axis=1)[:, :k]).astype(np.int64)
        counts = counts[:, ::-1]
    return avg[::-1], counts


def average_layers(conf, lambdas, *, positions=None, decay: Decay | None = None) -> np.ndarray:
    """Token-averaged exit layer for each threshold, shape ``(n_lambdas,)``, values in ``[1, n_layers]``.

    Same parameters as :func:`exit_layers`; computed without materialising the exit layers.
    """
    lam = _lambdas_iv(lambdas)
    avg, _ = _per_sequence_sums(conf, lam, positions, decay, None, 0, None)
    return avg


def disagreement_counts(
    conf,
    lambdas,
    agree,
    sequence_index,
    n_sequences: int,
    *,
    positions=None,
    decay: Decay | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence number of early tokens that differ from the full model's, for every threshold.

    Parameters
    ----------
    conf : array_like, shape (n_tokens, n_layers)
        Layer confidences.
    lambdas : array_like, shape (n_lambdas,)
        Thresholds, strictly decreasing (safest first).
    agree : ndarray of bool, shape (n_tokens, n_layers)
        Whether each layer's top-1 token equals the full model's (the last column is ignored: exiting
        at the last layer is the full model).
    sequence_index : ndarray of int, shape (n_tokens,)
        Sequence of each token, in ``[0, n_sequences)``.
    n_sequences : int
        Number of sequences.
    positions, decay
        As in :func:`exit_layers`.

    Returns
    -------
    counts : ndarray of int64, shape (n_sequences, n_lambdas)
        Disagreeing tokens per sequence and threshold.
    avg_layers : ndarray of float64, shape (n_lambdas,)
        Token-averaged exit layer per threshold.
    """
    lam = _lambdas_iv(lambdas)
    agree = np.asarray(agree, dtype=bool)
    if agree.shape != np.shape(conf):
        raise ValueError(f"agree must have the shape of conf {np.shape(conf)}, got {agree.shape}")
    sequence_index = np.asarray(sequence_index)
    if sequence_index.shape != (agree.shape[0],):
        raise ValueError(f"sequence_index must have shape ({agree.shape[0]},), got {sequence_index.shape}")
    avg, counts = _per_sequence_sums(conf, lam, positions, decay, sequence_index, int(n_sequences), agree)
    return counts, avg
