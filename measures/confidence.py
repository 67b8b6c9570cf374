"""Per-token confidence measures of each layer (higher = more confident).

Three measures read the layer's next-token distribution ``softmax(W . norm(h_i))``: the softmax gap
``p_top1 - p_top2`` (CALM's default), the softmax maximum ``p_top1`` (t5x's default) and the
normalised entropy confidence ``1 - H / log V``. They are computed exactly from full logits
(:func:`softmax_gap`, :func:`softmax_max`, :func:`entropy`) or, when only the top-k log-probabilities were
cached, from those (:func:`from_topk`: max exact, gap exact for ``k >= 2``, entropy an upper bound on
``H``). The fourth, state saturation, is ``cos(h_i, h_{i-1})`` on the raw residual stream
(:func:`state_saturation`). :func:`confidence` returns one measure for every cached token and layer,
shape ``(n_tokens, n_layers)``.

Everything is vectorised numpy; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from measures._arrays import as_numpy, cache_array, working_float

__all__ = [
    "MEASURES",
    "softmax_gap",
    "softmax_max",
    "entropy",
    "from_topk",
    "state_saturation",
    "confidence",
]

#: Names of the confidence measures computed by this module (``"classifier"`` lives in
#: :mod:`measures.classifier`). They are also the names of the optional precomputed cache arrays.
MEASURES: tuple[str, ...] = ("softmax_gap", "softmax_max", "entropy", "state_saturation")

_SOFTMAX_MEASURES = ("softmax_gap", "softmax_max", "entropy")

#: Cache arrays that are not confidence scores (calibrate.cache's fixed fields); any other array of a cache
#: is one (e.g. a measure of your own).
_NOT_SCORES = ("full_tokens", "topk_ids", "topk_logprobs", "hidden")


def _stored_score(names, measure: Any) -> bool:
    """Whether ``measure`` names a score among a cache's array ``names`` (a measure of the user's own)."""
    return isinstance(measure, str) and measure not in _NOT_SCORES and measure in names

#: Largest top-k log-probability accepted above 0 (float rounding of ``log p`` for ``p ~ 1``).
_LOGPROB_TOL = 1e-4
#: Largest excess of ``sum(exp(topk_logprobs))`` over 1 accepted, here and by a LayerCache: wide enough for a softmax
#: of bfloat16 logits (up to about 1.005), narrow enough for log-probabilities of another axis (sums of 2 and more).
_MASS_TOL = 1e-2
#: Number of scalar elements processed per block by :func:`state_saturation`.
_BLOCK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------
# Full logits
# ----------------------------------------------------------------------------------------------------


def _logits_iv(logits: Any, axis: Any, name: str = "logits") -> np.ndarray:
    """Validate logits, move ``axis`` last and return them as a float array (float32 or float64)."""
    arr = as_numpy(logits)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary axis), got a scalar")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -arr.ndim <= axis < arr.ndim:
        raise ValueError(f"axis must lie in [{-arr.ndim}, {arr.ndim - 1}] for {name} of shape {arr.shape}, got {axis}")
    arr = np.moveaxis(arr, axis, -1)
    if arr.shape[-1] < 2:
        raise ValueError(
            f"{name} must have at least 2 entries (vocabulary size) along axis {axis}, got {arr.shape[-1]}"
        )
    cast = arr.astype(working_float(arr.dtype), copy=False)
    if arr.dtype.itemsize > 8 and (np.isinf(cast) & np.isfinite(arr)).any():  # a long double past float64's range
        raise ValueError(f"{name} must lie within the float64 range (+-1.8e308); got a long double beyond it")
    arr = cast
    if np.isnan(arr).any() or np.isposinf(arr).any():
        raise ValueError(f"{name} must not contain NaN or +inf (-inf marks a masked token)")
    if arr.size and not np.isfinite(arr.max(axis=-1)).all():
        raise ValueError(
            f"{name} must have at least one finite value in every distribution; found one that is all -inf"
        )
    return arr


#: ``x - max(x)`` of logits apart by more than the float range is -inf (its exp is 0, as it should be):
#: neither that overflow nor the underflow of ``exp`` is worth a warning.
_SHIFTED = {"under": "ignore", "over": "ignore"}


def _log_softmax(arr: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax along the last axis (``x - logsumexp(x)``)."""
    top = arr.max(axis=-1, keepdims=True)
    with np.errstate(**_SHIFTED):
        shifted = arr - top
        lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted - lse


def _top2(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest and second-largest values along the last axis."""
    part = np.partition(arr, (-2, -1), axis=-1)
    return part[..., -1], part[..., -2]


def softmax_gap(logits: Any, *, axis: int = -1) -> np.ndarray:
    """Softmax gap ``p_top1 - p_top2`` of each distribution.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised log-probabilities (any scale; ``-inf`` marks a masked token). At least 2 entries
        along ``axis``.
    axis : int, default=-1
        The vocabulary axis.

    Returns
    -------
    ndarray, shape (...)
        Gap in ``[0, 1]``; ``0`` when the two best tokens tie. float64 for float64 or integer input,
        float32 otherwise. A NumPy scalar for 1-d logits.

    Raises
    ------
    ValueError
        If ``logits`` contains NaN or ``+inf``, a distribution is all ``-inf``, or ``V < 2``.
    TypeError
        If ``logits`` is not real numeric or ``axis`` is not an int.

    See Also
    --------
    from_topk : the same measure from cached top-k log-probabilities.

    Notes
    -----
    Computed as ``exp(l_1 - lse) - exp(l_2 - lse)`` with ``lse = logsumexp(l)``, so huge or tiny logits
    neither overflow nor underflow. CALM (Schuster et al., 2022) uses this gap as its softmax measure.

    Examples
    --------
    >>> import numpy as np
    >>> from measures.confidence import softmax_gap
    >>> softmax_gap(np.log([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])).round(6)
    array([0.5, 0. ])
    """
    arr = _logits_iv(logits, axis)
    top = arr.max(axis=-1, keepdims=True)
    with np.errstate(**_SHIFTED):
        lse = np.log(np.exp(arr - top).sum(axis=-1))
    l1, l2 = _top2(arr)
    top = top[..., 0]
    with np.errstate(**_SHIFTED):
        return np.exp(l1 - top - lse) - np.exp(l2 - top - lse)


def softmax_max(logits: Any, *, axis: int = -1) -> np.ndarray:
    """Largest softmax probability ``p_top1`` of each distribution.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised log-probabilities (``-inf`` marks a masked token); at least 2 entries along ``axis``.
    axis : int, default=-1
        The vocabulary axis.

    Returns
    -------
    ndarray, shape (...)
        ``p_top1`` in ``[1/V, 1]``. float64 for float64 or integer input, float32 otherwise. A NumPy scalar
        for 1-d logits.

    Raises
    ------
    ValueError
        If ``logits`` contains NaN or ``+inf``, a distribution is all ``-inf``, or ``V < 2``.
    TypeError
        If ``logits`` is not real numeric or ``axis`` is not an int.

    Notes
    -----
    ``p_top1 = 1 / sum_j exp(l_j - l_max)``; the t5x CALM code uses this as its default softmax measure.

    Examples
    --------
    >>> import numpy as np
    >>> from measures.confidence import softmax_max
    >>> softmax_max(np.log([[0.7, 0.2, 0.1]])).round(6)
    array([0.7])
    """
    arr = _logits_iv(logits, axis)
    top = arr.max(axis=-1, keepdims=True)
    with np.errstate(**_SHIFTED):
        return 1.0 / np.exp(arr - top).sum(axis=-1)


def entropy(logits: Any, *, axis: int = -1) -> np.ndarray:
    """Entropy confidence ``1 - H / log V`` of each distribution.

    Parameters
    ----------
    logits : array_like, shape (..., V)
        Unnormalised log-probabilities (``-inf`` marks a masked token, which still counts in ``V``);
        at least 2 entries along ``axis``.
    axis : int, default=-1
        The vocabulary axis.

    Returns
    -------
    ndarray, shape (...)
        ``1 - H(p) / log V`` in ``[0, 1]`` (natural logs): 1 for a one-hot distribution, 0 for the
        uniform one. float64 for float64 or integer input, float32 otherwise. A NumPy scalar for 1-d
        logits.

    Raises
    ------
    ValueError
        If ``logits`` contains NaN or ``+inf``, a distribution is all ``-inf``, or ``V < 2``.
    TypeError
        If ``logits`` is not real numeric or ``axis`` is not an int.

    See Also
    --------
    from_topk : an approximation (a lower bound on this value) from top-k log-probabilities.

    Notes
    -----
    ``H = -sum_j p_j log p_j`` with ``log p_j`` taken from a stable log-softmax and ``0 log 0 = 0``.
    This returns a confidence (higher = more confident), not the entropy itself.

    Examples
    --------
    >>> import numpy as np
    >>> from measures.confidence import entropy
    >>> entropy(np.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])).round(6)
    array([0., 1.])
    """
    arr = _logits_iv(logits, axis)
    logp = _log_softmax(arr)
    with np.errstate(**_SHIFTED):
        p = np.exp(logp)
    plogp = np.where(p > 0, p * np.where(np.isfinite(logp), logp, 0.0), 0.0)
    h = -plogp.sum(axis=-1)
    conf = 1.0 - h / np.log(arr.shape[-1])
    return np.clip(conf, 0.0, 1.0).astype(arr.dtype, copy=False)


# ----------------------------------------------------------------------------------------------------
# Top-k log-probabilities
# ----------------------------------------------------------------------------------------------------


def _topk_logprobs_iv(topk_logprobs: Any, name: str = "topk_logprobs") -> np.ndarray:
    """Validate sorted top-k log-probabilities and return them as float64, clipped to ``<= 0``."""
    arr = as_numpy(topk_logprobs)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., k) with k >= 1, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if (arr > _LOGPROB_TOL).any():
        raise ValueError(f"{name} must be log-probabilities (<= 0), got a maximum of {arr.max():g}")
    np.minimum(arr, 0.0, out=arr)
    if arr.shape[-1] > 1 and (np.diff(arr, axis=-1) > 1e-6).any():
        raise ValueError(f"{name} must be sorted in descending order along the last axis (best token first)")
    if arr.size:
        mass = np.exp(arr).sum(axis=-1)
        if (mass > 1.0 + _MASS_TOL).any():
            raise ValueError(
                f"exp({name}) must sum to at most 1 over the top k (they are log-probabilities, not logits); "
                f"got a sum of {mass.max():g}"
            )
    return arr


def _vocab_size_iv(vocab_size: Any, k: int) -> int:
    if isinstance(vocab_size, (bool, np.bool_)) or not isinstance(vocab_size, (int, np.integer)):
        raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < max(k, 2):
        raise ValueError(f"vocab_size must be >= max(2, k) = {max(k, 2)} (k = top-k size), got {vocab_size}")
    return int(vocab_size)


def _topk_measures(lp: np.ndarray, vocab_size: int | None, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Measures from validated float64 top-k log-probabilities ``lp`` (..., k); entropy needs ``vocab_size``."""
    k = lp.shape[-1]
    p = np.exp(lp)
    out: dict[str, np.ndarray] = {}
    if "softmax_gap" in names:
        if k >= 2:
            out["softmax_gap"] = np.maximum(p[..., 0] - p[..., 1], 0.0)  # a rise within the sorting tolerance: a tie
        else:
            # p_2 <= min(p_1, 1 - p_1): the gap is at least max(0, 2 p_1 - 1).
            out["softmax_gap"] = np.maximum(0.0, 2.0 * p[..., 0] - 1.0)
    if "softmax_max" in names:
        out["softmax_max"] = p[..., 0].copy()
    if "entropy" in names:
        if vocab_size is None:
            raise ValueError("the entropy confidence from top-k log-probabilities needs vocab_size, got None")
        h = -(p * lp).sum(axis=-1)
        rest = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
        if vocab_size > k:
            # The remaining mass spread uniformly over the V - k other tokens: the largest entropy any
            # distribution with these top-k probabilities can have.
            pos = rest > 0
            h = h + np.where(pos, -rest * np.log(np.where(pos, rest, 1.0) / (vocab_size - k)), 0.0)
        out["entropy"] = np.clip(1.0 - h / np.log(vocab_size), 0.0, 1.0)
    return {name: np.asarray(value, dtype=np.float64) for name, value in out.items()}  # one distribution: 0-d arrays


def from_topk(topk_logprobs: Any, vocab_size: int) -> dict[str, np.ndarray]:
    """Softmax gap, softmax max and entropy confidence from the top-k log-probabilities.

    Parameters
    ----------
    topk_logprobs : array_like, shape (..., k)
        Log-probabilities (``<= 0``, finite) of each distribution's ``k`` most likely tokens, sorted in
        descending order (best first), e.g. the cache array ``"topk_logprobs"`` of shape
        ``(n_tokens, n_layers, k)``.
    vocab_size : int
        Vocabulary size ``V`` (``>= max(2, k)``), the normaliser of the entropy confidence.

    Returns
    -------
    dict of str to ndarray
        Keys ``"softmax_gap"``, ``"softmax_max"``, ``"entropy"``; each a float64 array of shape ``(...)`` (0-d for
        one distribution).

    Raises
    ------
    ValueError
        If ``topk_logprobs`` is non-finite, positive, unsorted, or its probabilities sum to more than 1;
        or ``vocab_size < max(2, k)``.
    TypeError
        If ``topk_logprobs`` is not numeric or ``vocab_size`` not an int.

    See Also
    --------
    softmax_gap, softmax_max, entropy : the exact measures from full logits.

    Notes
    -----
    - ``softmax_max = p_1`` and ``softmax_gap = p_1 - p_2`` are exact for ``k >= 2``. With ``k = 1`` the
      second probability is unknown; since ``p_2 <= min(p_1, 1 - p_1)`` the returned gap is its lower
      bound ``max(0, 2 p_1 - 1)``.
    - The entropy needs the whole distribution. The mass ``r = 1 - sum_j p_j`` outside the top k is
      spread uniformly over the other ``V - k`` tokens:
      ``H_approx = -sum_{j <= k} p_j log p_j - r log(r / (V - k))``. By concavity of ``-x log x`` this is
      the largest entropy of any distribution with these top-k probabilities, so ``H_approx >= H`` and
      the returned confidence ``1 - H_approx / log V`` is **at most** the exact :func:`entropy`
      (equal when ``k = V`` or ``r = 0``).

    Examples
    --------
    >>> import numpy as np
    >>> from measures.confidence import from_topk
    >>> out = from_topk(np.log([[0.6, 0.3], [0.5, 0.5]]), vocab_size=4)
    >>> out["softmax_gap"].round(6), out["softmax_max"].round(6)
    (array([0.3, 0. ]), array([0.6, 0.5]))
    """
    lp = _topk_logprobs_iv(topk_logprobs)
    vocab_size = _vocab_size_iv(vocab_size, lp.shape[-1])
    return _topk_measures(lp, vocab_size, _SOFTMAX_MEASURES)


# ----------------------------------------------------------------------------------------------------
# Hidden states
# ----------------------------------------------------------------------------------------------------


def _state_saturation_iv(hidden: Any) -> np.ndarray:
    arr = as_numpy(hidden)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"hidden must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(
            f"hidden must have shape (..., n_layers, d), e.g. (n_tokens, n_layers, d); got shape {arr.shape}"
        )
    if arr.shape[-2] < 1 or arr.shape[-1] < 1:
        raise ValueError(f"hidden must have at least one layer and one feature, got shape {arr.shape}")
    return arr


def state_saturation(hidden: Any) -> np.ndarray:
    """State saturation ``cos(h_i, h_{i-1})`` of consecutive layers' hidden states.

    Parameters
    ----------
    hidden : array_like, shape (n_tokens, n_layers, d)
        Raw residual-stream hidden state after each layer (any float dtype, e.g. the cache's float16
        ``"hidden"``). More leading axes are allowed: ``(..., n_layers, d)``.

    Returns
    -------
    ndarray of float32, shape (n_tokens, n_layers)
        Cosine in ``[-1, 1]`` between layer ``i`` and layer ``i - 1``. Layer 1 (index 0) has no
        predecessor and gets 0, so it never exits on this measure at a threshold above 0; a pair with a zero
        vector gets 0.

    Raises
    ------
    ValueError
        If ``hidden`` has fewer than 2 axes or contains NaN or inf.
    TypeError
        If ``hidden`` is not real numeric.

    Notes
    -----
    Computed in blocks of tokens as ``dot / (sqrt(|h_i|^2) * sqrt(|h_{i-1}|^2))`` in float64, rounded to
    float32 and clipped to ``[-1, 1]``; float64 input is first divided, vector by vector, by its largest
    absolute entry (which leaves the cosine unchanged and rules out overflow). The early-exit runtime
    (``calibrate.runtime``) computes the same formula in torch, so the two agree to the float32 bit
    except in the rare case where summation order moves a float64 value across a float32 rounding
    boundary. Cosines near 1 are where thresholds matter, so use a fine threshold grid there (DESIGN
    section 5).

    Examples
    --------
    >>> import numpy as np
    >>> from measures.confidence import state_saturation
    >>> h = np.array([[[1.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    >>> state_saturation(h).round(4)
    array([[0.    , 0.7071, 1.    , 0.    ]], dtype=float32)
    """
    arr = _state_saturation_iv(hidden)
    lead, (n_layers, d) = arr.shape[:-2], arr.shape[-2:]
    flat = arr.reshape(-1, n_layers, d)
    out = np.zeros(flat.shape[:2], dtype=np.float32)
    if flat.shape[0] == 0:
        return out.reshape(*lead, n_layers)
    block = max(1, _BLOCK_ELEMENTS // (n_layers * d))
    for start in range(0, flat.shape[0], block):
        x = np.asarray(flat[start : start + block])  # (b, L, d)
        if not np.isfinite(x).all():
            raise ValueError(
                f"hidden must be finite (no NaN or inf); found a non-finite value in tokens [{start}, {start + len(x)})"
            )
        if np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float64)
        if x.dtype.itemsize > 4:  # squares may overflow float64: rescaled in the input's own type (a long double)
            scale = np.abs(x).max(axis=-1, keepdims=True)  # (b, L, 1)
            x = x / np.where(scale > 0, scale, 1)
        x = x.astype(np.float64, copy=False)
        norm = np.sqrt(np.einsum("bld,bld->bl", x, x))  # (b, L)
        dot = np.einsum("bld,bld->bl", x[:, 1:], x[:, :-1])  # (b, L-1)
        out[start : start + len(x), 1:] = _cosine(dot, norm[:, 1:] * norm[:, :-1])
    return out.reshape(*lead, n_layers)


def _cosine(dot: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """float64 ``dot / denom`` as float32 in ``[-1, 1]``, 0 where ``denom`` is 0 (a zero vector)."""
    ok = denom > 0
    return np.clip(np.where(ok, dot / np.where(ok, denom, 1.0), 0.0).astype(np.float32), -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Cache-level dispatch
# ----------------------------------------------------------------------------------------------------


def _cache_iv(cache: Any, name: str = "cache") -> None:
    """TypeError unless ``cache`` has ``.n_layers`` and a mapping ``.arrays`` (a cache in memory)."""
    if not hasattr(cache, "arrays") or not hasattr(cache, "n_layers"):
        raise TypeError(f"{name} must be a LayerCache (with .arrays and .n_layers), got {type(cache).__name__}")
    if not isinstance(cache.arrays, Mapping):  # a chunked cache's arrays() is a method: its data are not in memory
        raise TypeError(
            f"{name} must be a cache in memory (a LayerCache, whose .arrays maps names to arrays), got "
            f"{type(cache).__name__}: read the sequences of a chunked cache with cache.take(indices), or open it with "
            "open_cache(path)"
        )


def _saturation_layer1_iv(saturation: np.ndarray) -> None:
    """Refuse a stored state saturation ``(n_tokens, L)`` that is not 0 at layer 1.

    Layer 1 has no predecessor layer: its saturation is 0 (never exit there), as the runtime scores it. A cosine
    of layer 1 with ``hidden_states[0]`` (the embedding output) would certify exits the runtime never makes.
    """
    column = np.asarray(saturation)[:, 0]
    if column.size and (column != 0).any():
        t = int(np.flatnonzero(column != 0)[0])
        raise ValueError(
            f"the stored 'state_saturation' must be 0 at layer 1 (it has no predecessor layer), got {column[t]} at "
            f"token {t}: a cosine of layer 1 with hidden_states[0], the embedding output, is no layer's saturation. "
            "Store measures.confidence.state_saturation(hidden) of the L layer outputs, or this score under another "
            "name"
        )


def _confidence_iv(cache: Any, measure: Any, classifier: Any) -> tuple[str, Any]:
    allowed = MEASURES + ("classifier",)
    if isinstance(measure, str) and measure.startswith("halting_"):
        raise ValueError(
            f"measure {measure!r} is a trained halting head: train it with measures.learned.train_measure("
            f"{measure!r}, train_cache) and call its predict_confidence(cache); confidence() computes {allowed}"
        )
    _cache_iv(cache)
    if not isinstance(measure, str) or (measure not in allowed and not _stored_score(cache.arrays, measure)):
        raise ValueError(f"measure must be one of {allowed} or the name of a score the cache stores, got {measure!r}")
    if measure == "classifier":
        if classifier is None:
            raise ValueError(
                "measure='classifier' needs a fitted measures.classifier.ExitClassifier passed as "
                "classifier=..., got None"
            )
        from measures.classifier import ExitClassifier

        if not isinstance(classifier, ExitClassifier):
            raise TypeError(f"classifier must be an ExitClassifier, got {type(classifier).__name__}")
    elif classifier is not None:
        raise ValueError(f"classifier is used only with measure='classifier', got measure={measure!r}")
    return measure, classifier


def _n_tokens(cache: Any) -> int:
    arrays = cache.arrays
    if "full_tokens" in arrays:
        return int(np.shape(arrays["full_tokens"])[0])
    return int(cache.n_tokens)


def _topk_bound(cache: Any, measure: str) -> int | None:
    """``k`` when :func:`confidence` gives ``measure`` on ``cache`` as a bound from the top-``k`` log-probabilities
    instead of its value on the full softmax (the entropy confidence with ``k < V``; the gap from the top 1
    alone), None when it gives that value (stored in the cache, exact from the top ``k``, or not a softmax
    measure). Two caches that differ here give the same tokens different confidences. ``cache`` answers
    ``has(name)``, ``top_k`` and ``vocab_size`` from its metadata (a layer cache, in memory or chunked)."""
    if measure not in ("entropy", "softmax_gap") or cache.has(measure) or not cache.has("topk_logprobs"):
        return None
    k = cache.top_k
    return k if (measure == "entropy" and k < cache.vocab_size) or (measure == "softmax_gap" and k == 1) else None


def _source(k: int | None) -> str:
    """What a confidence with :func:`_topk_bound` ``k`` is, in words."""
    return "its value on the full softmax" if k is None else f"a bound from the top-{k} log-probabilities"


def confidence(cache: Any, measure: str, *, classifier: Any = None) -> np.ndarray:
    """Confidence of every cached token at every layer.

    Parameters
    ----------
    cache : LayerCache
        The layer cache in memory (:class:`calibrate.cache.LayerCache`; any object with a mapping ``.arrays``,
        ``.n_layers`` and ``.vocab_size`` works).
    measure : {"softmax_gap", "softmax_max", "entropy", "state_saturation", "classifier"} or str
        The measure, or the name of a score the cache stores (a measure of your own: ``scores=`` of
        :meth:`calibrate.LayerCache.from_arrays`).
    classifier : ExitClassifier, optional
        A fitted :class:`measures.classifier.ExitClassifier`; required for ``measure="classifier"`` and
        not accepted otherwise.

    Returns
    -------
    ndarray of float32, shape (n_tokens, n_layers)
        Higher = more confident. A precomputed cache array is returned as is (converted to float32 when
        needed, so it may share memory with the cache: do not modify it in place).

    Raises
    ------
    ValueError
        If ``measure`` is unknown; if the measure is neither cached nor computable (softmax measures
        need ``"topk_logprobs"``, entropy also ``vocab_size``; state saturation needs ``"hidden"``);
        if a cached array has the wrong shape or non-finite values; or if ``classifier`` is missing
        for ``"classifier"`` or given for another measure.
    TypeError
        If ``cache`` lacks ``.arrays``/``.n_layers`` or ``classifier`` is not an ExitClassifier.

    Notes
    -----
    Order of preference: the cached array named ``measure`` (computed from the full logits at
    extraction time, so the entropy there is exact), else a computation from the cached top-k
    log-probabilities (:func:`from_topk`: the entropy confidence is then a lower bound on the exact one)
    or from the hidden states (:func:`state_saturation`).

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> from measures.confidence import confidence
    >>> lp = np.log(np.array([[[0.9, 0.05], [0.5, 0.3]]]))          # 1 token, 2 layers, k = 2
    >>> cache = LayerCache.from_arrays(full_tokens=[3], topk_ids=[[[3, 1], [3, 2]]], topk_logprobs=lp,
    ...                                lengths=[1], vocab_size=10)
    >>> confidence(cache, "softmax_gap").round(4)
    array([[0.85, 0.2 ]], dtype=float32)
    """
    measure, classifier = _confidence_iv(cache, measure, classifier)
    n_layers = int(cache.n_layers)
    if measure == "classifier":
        return np.asarray(classifier.predict_confidence(cache), dtype=np.float32)
    arrays = cache.arrays
    n_tokens = _n_tokens(cache)
    if measure in arrays and arrays[measure] is not None:
        out = np.asarray(cache_array(cache, measure, n_tokens), dtype=np.float32)
        if not np.isfinite(out).all():
            raise ValueError(f"cache array {measure!r} must be finite (no NaN or inf)")
        if measure == "state_saturation":
            _saturation_layer1_iv(out)
        return out
    if measure == "state_saturation":
        hidden = arrays.get("hidden")
        if hidden is None:
            raise ValueError(
                "measure 'state_saturation' is neither precomputed in the cache nor computable: "
                "the cache has no 'hidden' array"
            )
        return state_saturation(cache_array(cache, "hidden", n_tokens, "d"))
    lp_raw = arrays.get("topk_logprobs")
    if lp_raw is None:
        raise ValueError(
            f"measure {measure!r} is neither precomputed in the cache nor computable: "
            "the cache has no 'topk_logprobs' array"
        )
    k = int(np.shape(cache_array(cache, "topk_logprobs", n_tokens, "k"))[2])
    vocab_size = None
    if measure == "entropy":
        vocab_size = getattr(cache, "vocab_size", None)
        if vocab_size is None:
            raise ValueError("measure 'entropy' computed from 'topk_logprobs' needs the cache's vocab_size, got None")
        vocab_size = _vocab_size_iv(vocab_size, k)
    # Blocks of tokens bound the float64 temporaries (and read a chunked array chunk by chunk).
    out = np.empty((n_tokens, n_layers), dtype=np.float32)
    block = max(1, _BLOCK_ELEMENTS // max(1, n_layers * k))
    for start in range(0, n_tokens, block):
        lp = _topk_logprobs_iv(lp_raw[start : start + block], name="topk_logprobs")
        out[start : start + block] = _topk_measures(lp, vocab_size, (measure,))[measure]
    return out
