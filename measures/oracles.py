"""Oracle exit depths computed from a layer cache: what a perfect confidence measure would do.

An oracle looks at every layer's prediction of a cached token, including the layers a real exit rule
has not run yet, and picks one depth per token (1-based, in ``[1, L]``):

* :func:`consistency_oracle` -- the earliest layer whose top-1 token is the full model's
  (``rule="first"``, the default), or the earliest layer from which it stays the full model's at every
  later layer (``rule="stable"``);
* :func:`likelihood_oracle` -- the layer maximising ``log p_i(y_t) - penalty * i`` for the full model's
  token ``y_t`` (Elbayad et al.'s likelihood-based oracle);
* :func:`correctness_oracle` -- the earliest layer whose top-1 token is the target (a reference token,
  or the full model's; Elbayad et al.'s correctness-based oracle);
* :func:`smooth_oracle` -- an RBF kernel of width ``sigma`` over depths around an oracle: a distribution
  over depths, the training target of the halting heads in :mod:`measures.halting`.

:func:`oracle_average_layers` is the smallest token-averaged exit layer that any measure can reach on a
cache at zero drift (or at empirical risk ``delta``): the lower bound every measure is compared with.
Everything is vectorised numpy over tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from measures.classifier import _agreement_iv
from measures.confidence import _topk_logprobs_iv, _vocab_size_iv

__all__ = [
    "CONSISTENCY_RULES",
    "ORACLES",
    "consistency_oracle",
    "correctness_oracle",
    "likelihood_oracle",
    "oracle_average_layers",
    "oracle_depths",
    "smooth_oracle",
]

#: Oracle names accepted by :func:`oracle_depths` (and by the halting heads).
ORACLES: tuple[str, ...] = ("consistency", "likelihood", "correctness")
#: Readings of "the earliest layer from which the prediction equals the full model's".
CONSISTENCY_RULES: tuple[str, ...] = ("first", "stable")
#: Losses :func:`oracle_average_layers` can budget (the token-level consistencies of the proxy losses).
_BUDGETED = ("token", "sequence")


# ----------------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------------


def _first_true(mask: np.ndarray) -> np.ndarray:
    """1-based index of the first True of each row of a (T, L) mask whose last column is True."""
    return np.argmax(mask, axis=1).astype(np.int64) + 1


def _agreement(cache: Any) -> np.ndarray:
    """(T, L) bool: layer i's top-1 is the full model's token; layer L counts as agreeing (it is the full model)."""
    top1, full = _agreement_iv(cache)
    agree = top1 == full[:, None]
    agree[:, -1] = True
    return agree


def consistency_oracle(cache: Any, *, rule: str = "first") -> np.ndarray:
    """Earliest layer at which exiting reproduces the full model's token.

    Parameters
    ----------
    cache : LayerCache
        Needs ``"topk_ids"`` ``(n_tokens, n_layers, k)`` and ``"full_tokens"`` ``(n_tokens,)``.
    rule : {"first", "stable"}, default="first"
        ``"first"``: the earliest layer that predicts the full model's token, whatever later layers do.
        ``"stable"``: the earliest layer ``i`` such that layers ``i, i+1, ..., L`` all predict it (the
        literal reading of "the earliest layer from which the prediction equals the full model's").

    Returns
    -------
    ndarray of int64, shape (n_tokens,)
        Oracle exit layer in ``[1, n_layers]``; ``"first" <= "stable"`` token by token.

    Raises
    ------
    ValueError
        If ``rule`` is unknown or an array is missing or has the wrong shape.
    TypeError
        If ``cache`` has no ``.arrays``/``.n_layers``.

    Notes
    -----
    Layer ``L`` always counts as agreeing: exiting there *is* the full model (as in the exit simulation,
    :func:`calibrate.exits.early_tokens`). The two rules differ on tokens whose top-1 prediction flips
    back after having been right (about one token in eight on :func:`calibrate.synthetic_cache`).

    - ``"first"`` (the default) is what matters for drift: an exited token emits only the exit layer's
      prediction, so a later flip is irrelevant to it. It is the zero-drift lower bound (the exit rule
      takes the first layer whose confidence reaches ``lambda``, so a measure equal to 1 from that layer
      on exits every token there with no changed token; :func:`oracle_average_layers` uses it), and it
      is how Elbayad et al.'s correctness-based oracle reads "the lowest block that predicts the
      token". On :func:`calibrate.synthetic_cache` it also trains slightly better halting heads.
    - ``"stable"`` is the depth from which a layer's answer no longer changes, the issue's literal
      wording; it is never earlier than ``"first"``.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> from measures.oracles import consistency_oracle
    >>> top1 = np.array([[7, 5, 7, 7], [5, 5, 5, 7]])              # full token 7; token 0 flips back
    >>> ids = np.stack([top1, top1 + 1], axis=-1)
    >>> cache = LayerCache.from_arrays(full_tokens=[7, 7], topk_ids=ids, lengths=[2], vocab_size=10)
    >>> consistency_oracle(cache), consistency_oracle(cache, rule="stable")
    (array([1, 4]), array([3, 4]))
    """
    if rule not in CONSISTENCY_RULES:
        raise ValueError(f"rule must be one of {CONSISTENCY_RULES}, got {rule!r}")
    agree = _agreement(cache)
    if rule == "stable":
        # all layers from i to L agree: a cumulative AND from the last layer backwards
        agree = np.logical_and.accumulate(agree[:, ::-1], axis=1)[:, ::-1]
    return _first_true(agree)


def _full_token_logprobs(cache: Any) -> np.ndarray:
    """(T, L) float64 log-probability of the full model's token at each layer (tail estimate when absent)."""
    full = _agreement_iv(cache)[1]  # validates topk_ids and full_tokens
    raw = cache.arrays.get("topk_logprobs")
    if raw is None:
        raise ValueError("the cache has no 'topk_logprobs' array, needed for the likelihood oracle")
    ids = np.asarray(cache.arrays["topk_ids"])
    if np.shape(raw) != ids.shape:
        raise ValueError(
            f"cache array 'topk_logprobs' must have the shape of 'topk_ids' {ids.shape}, got {np.shape(raw)}"
        )
    lp = _topk_logprobs_iv(raw, name="topk_logprobs")
    k = lp.shape[-1]
    vocab_size = _vocab_size_iv(getattr(cache, "vocab_size", None), k)
    match = ids == full[:, None, None]  # (T, L, k): at most one hit per row (ids are distinct)
    present = match.any(axis=-1)
    value = np.where(match, lp, 0.0).sum(axis=-1)
    if vocab_size == k:  # every token is stored: none can be absent
        return value
    rest = np.clip(1.0 - np.exp(lp).sum(axis=-1), np.finfo(np.float64).tiny, 1.0)
    tail = np.minimum(np.log(rest / (vocab_size - k)), lp[..., -1])
    return np.where(present, value, tail)


def _penalty_iv(penalty: Any) -> float:
    if isinstance(penalty, (bool, np.bool_)) or not isinstance(penalty, (int, float, np.integer, np.floating)):
        raise TypeError(f"penalty must be a real number >= 0, got {penalty!r}")
    if not (np.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"penalty must be a finite number >= 0 (nats per layer), got {penalty!r}")
    return float(penalty)


def likelihood_oracle(cache: Any, *, penalty: float = 0.1) -> np.ndarray:
    """Layer maximising the log-probability of the full model's token minus a depth penalty.

    Parameters
    ----------
    cache : LayerCache
        Needs ``"topk_ids"``, ``"topk_logprobs"`` ``(n_tokens, n_layers, k)``, ``"full_tokens"`` and the
        cache's ``vocab_size``.
    penalty : float, default=0.1
        Depth penalty ``lambda >= 0`` in nats per layer: a deeper layer wins only if it raises
        ``log p(y_t)`` by more than ``penalty`` per extra layer.

    Returns
    -------
    ndarray of int64, shape (n_tokens,)
        ``argmax_i [log p_i(y_t) - penalty * i]`` in ``[1, n_layers]``; ties go to the earliest layer.

    Raises
    ------
    ValueError
        If ``penalty`` is negative or not finite, or an array is missing, malformed (not sorted
        log-probabilities) or of the wrong shape.
    TypeError
        If ``penalty`` is not a real number, ``cache`` has no ``.arrays``/``.n_layers``, or its ``vocab_size`` is
        not an int (None included).

    Notes
    -----
    ``y_t`` is the full model's token (the likelihood-based oracle of Elbayad et al. uses the reference
    token under teacher forcing; here the cache is teacher-forced along the full model's output, so
    that is the token whose likelihood each layer is scored on). Only the top-k log-probabilities are
    stored. When ``y_t`` is not among a layer's top k, its log-probability is estimated by the average
    of the tokens outside the top k, ``log(r / (V - k))`` with ``r = 1 - sum_j p_j`` (floored at the
    smallest positive float): exact when the tail is flat (as in :func:`calibrate.synthetic_cache`),
    and never above the ``k``-th log-probability, which bounds the true value from above (the k-th
    log-probability itself would be an optimistic, not a conservative, stand-in).

    References
    ----------
    M. Elbayad, J. Gu, E. Grave, M. Auli, "Depth-Adaptive Transformer", ICLR 2020, section 3.2.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> from measures.oracles import likelihood_oracle
    >>> lp = np.log([[[0.5, 0.3], [0.6, 0.3], [0.9, 0.05]]])       # 1 token, 3 layers, k = 2
    >>> ids = np.array([[[2, 7], [7, 2], [7, 1]]])                  # full token 7: rank 2, then rank 1
    >>> cache = LayerCache.from_arrays(full_tokens=[7], topk_ids=ids, topk_logprobs=lp, lengths=[1],
    ...                                vocab_size=10)
    >>> likelihood_oracle(cache, penalty=0.0), likelihood_oracle(cache, penalty=0.5)
    (array([3]), array([2]))
    """
    penalty = _penalty_iv(penalty)
    scores = _full_token_logprobs(cache) - penalty * np.arange(1, int(cache.n_layers) + 1)
    return np.argmax(scores, axis=1).astype(np.int64) + 1


def _targets_iv(targets: Any, n_tokens: int, vocab_size: int | None) -> np.ndarray:
    arr = np.asarray(targets)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"targets must be an integer array of token ids, got dtype {arr.dtype}")
    if arr.shape != (n_tokens,):
        raise ValueError(f"targets must have shape (n_tokens,) = ({n_tokens},), got {arr.shape}")
    if arr.size and (arr.min() < 0 or (vocab_size is not None and arr.max() >= vocab_size)):
        raise ValueError(
            f"targets must be token ids in [0, vocab_size={vocab_size}), got range [{arr.min()}, {arr.max()}]"
        )
    return arr


def correctness_oracle(cache: Any, targets: Any = None) -> np.ndarray:
    """Earliest layer whose top-1 token is the target token.

    Parameters
    ----------
    cache : LayerCache
        Needs ``"topk_ids"`` ``(n_tokens, n_layers, k)`` and ``"full_tokens"`` ``(n_tokens,)``.
    targets : array_like of int, shape (n_tokens,), optional
        The right token at each cached position, aligned with the cache's tokens (e.g. reference token
        ids when the cache was extracted teacher-forced along references). Default: the full model's
        tokens.

    Returns
    -------
    ndarray of int64, shape (n_tokens,)
        The earliest layer in ``[1, n_layers]`` whose top-1 token equals the target; layer 1 when no layer
        (not even the last) predicts it.

    Raises
    ------
    ValueError
        If ``targets`` has the wrong shape or ids outside ``[0, vocab_size)``, or an array is missing.
    TypeError
        If ``targets`` is not an integer array or ``cache`` has no ``.arrays``/``.n_layers``.

    Notes
    -----
    A cache stores references as text only, not as token ids aligned with the positions of the full
    model's output, so the targets come from the caller. Without them the target is the full model's
    token, and the oracle equals :func:`consistency_oracle` with ``rule="first"``. When no layer
    predicts the target, more depth buys nothing, so the cheapest layer is the oracle (the argmax of
    ``correct_i - penalty * i`` of Elbayad et al. with a small penalty); unlike the consistency
    oracles, the full model's own token is not special here.

    References
    ----------
    M. Elbayad, J. Gu, E. Grave, M. Auli, "Depth-Adaptive Transformer", ICLR 2020, section 3.2.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> from measures.oracles import correctness_oracle
    >>> top1 = np.array([[3, 4, 7], [5, 5, 7]])                      # full token 7 at both positions
    >>> cache = LayerCache.from_arrays(full_tokens=[7, 7], topk_ids=top1[..., None], lengths=[2],
    ...                                vocab_size=10)
    >>> correctness_oracle(cache), correctness_oracle(cache, targets=[4, 9])
    (array([3, 3]), array([2, 1]))
    """
    top1, full = _agreement_iv(cache)
    given = targets is not None
    targets = _targets_iv(targets, full.shape[0], getattr(cache, "vocab_size", None)) if given else full
    right = top1 == targets[:, None]
    if not given:  # the full model's token is the last layer's by definition, whatever its stored top-1
        right[:, -1] = True
    found = right.any(axis=1)
    return np.where(found, np.argmax(right, axis=1) + 1, 1).astype(np.int64)


_OPTIONS = {"consistency": ("rule",), "likelihood": ("penalty",), "correctness": ("targets",)}


def oracle_depths(cache: Any, *, oracle: str = "consistency", **options: Any) -> np.ndarray:
    """One of the oracles by name.

    Parameters
    ----------
    cache : LayerCache
        As for the chosen oracle.
    oracle : {"consistency", "likelihood", "correctness"}, default="consistency"
        :func:`consistency_oracle`, :func:`likelihood_oracle` or :func:`correctness_oracle`.
    **options
        That oracle's keyword: ``rule`` (consistency), ``penalty`` (likelihood) or ``targets``
        (correctness).

    Returns
    -------
    ndarray of int64, shape (n_tokens,)
        Oracle exit layer in ``[1, n_layers]``.

    Raises
    ------
    ValueError
        If ``oracle`` is unknown, an option does not belong to it, or the oracle itself refuses.

    Examples
    --------
    >>> from calibrate.synthetic import synthetic_cache
    >>> from measures.oracles import consistency_oracle, oracle_depths
    >>> cache = synthetic_cache(5, n_layers=4, seed=0)
    >>> depths = oracle_depths(cache, oracle="consistency", rule="first")
    >>> bool((depths == consistency_oracle(cache, rule="first")).all())
    True
    """
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
    unknown = sorted(set(options) - set(_OPTIONS[oracle]))
    if unknown:
        raise ValueError(f"oracle {oracle!r} takes the options {_OPTIONS[oracle]}, got {unknown}")
    if oracle == "consistency":
        return consistency_oracle(cache, **options)
    if oracle == "likelihood":
        return likelihood_oracle(cache, **options)
    return correctness_oracle(cache, **options)


# ----------------------------------------------------------------------------------------------------
# Smoothing
# ----------------------------------------------------------------------------------------------------


def smooth_oracle(depths: Any, n_layers: int, *, sigma: float = 1.0) -> np.ndarray:
    """A distribution over depths centred on each oracle depth: an RBF kernel of width ``sigma``.

    Parameters
    ----------
    depths : array_like of int, shape (n_tokens,)
        Oracle depths in ``[1, n_layers]`` (from any oracle of this module).
    n_layers : int
        Number of layers ``L`` (>= 1).
    sigma : float, default=1.0
        Kernel width in layers (>= 0); 0 gives the one-hot oracle.

    Returns
    -------
    ndarray of float64, shape (n_tokens, n_layers)
        ``q[t, n - 1] = exp(-(n - depths[t])^2 / (2 sigma^2)) / Z_t`` over ``n = 1..L``: rows sum to 1 and
        peak at the oracle depth (strictly, unless ``sigma`` is huge against ``L``).

    Raises
    ------
    ValueError
        If ``depths`` is not 1-D or lies outside ``[1, n_layers]``, ``n_layers < 1``, or ``sigma`` is
        negative or not finite.
    TypeError
        If ``depths`` is not an integer array, or ``n_layers``/``sigma`` has the wrong type.

    Notes
    -----
    A hard oracle depth is noisy (one flipped top-1 moves it), so the halting heads of
    :mod:`measures.halting` are trained against this smoothed distribution: it keeps the oracle's mode
    and puts some mass on neighbouring depths (depths many ``sigma`` away get exactly 0 in float64).
    Elbayad et al. also smooth their oracles with an RBF kernel; here the kernel runs over depths, and
    ``sigma`` is its standard deviation in layers.

    Examples
    --------
    >>> from measures.oracles import smooth_oracle
    >>> smooth_oracle([2, 4], 4, sigma=1.0).round(3)
    array([[0.258, 0.426, 0.258, 0.058],
           [0.006, 0.077, 0.346, 0.57 ]])
    >>> smooth_oracle([2], 3, sigma=0.0)
    array([[0., 1., 0.]])
    """
    if isinstance(n_layers, (bool, np.bool_)) or not isinstance(n_layers, (int, np.integer)):
        raise TypeError(f"n_layers must be an int >= 1, got {n_layers!r}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if isinstance(sigma, (bool, np.bool_)) or not isinstance(sigma, (int, float, np.integer, np.floating)):
        raise TypeError(f"sigma must be a real number >= 0, got {sigma!r}")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0 (kernel width in layers), got {sigma!r}")
    d = np.asarray(depths)
    if d.size == 0 and d.dtype == np.float64:  # an empty list
        d = d.astype(np.int64)
    if d.dtype == bool or not np.issubdtype(d.dtype, np.integer):
        raise TypeError(f"depths must be an integer array of 1-based layers, got dtype {d.dtype}")
    if d.ndim != 1:
        raise ValueError(f"depths must have shape (n_tokens,), got {d.shape}")
    if d.size and (d.min() < 1 or d.max() > n_layers):
        raise ValueError(f"depths must lie in [1, n_layers={n_layers}], got range [{d.min()}, {d.max()}]")
    layers = np.arange(1, n_layers + 1)
    if sigma == 0:
        return (layers == d[:, None]).astype(np.float64)
    # relative to the peak (exp(0) = 1), so the normaliser is >= 1 and never underflows
    with np.errstate(over="ignore"):  # a tiny sigma: exp(-inf) = 0 is the right value
        q = np.exp(-0.5 * ((layers - d[:, None]) / float(sigma)) ** 2)
    return q / q.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------
# The lower bound on average layers
# ----------------------------------------------------------------------------------------------------


def _oracle_average_layers_iv(cache: Any, delta: Any, consistency: Any) -> tuple[float, str]:
    if isinstance(delta, (bool, np.bool_)) or not isinstance(delta, (int, float, np.integer, np.floating)):
        raise TypeError(f"delta must be a real number in [0, 1), got {delta!r}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1) (tolerance on the risk), got {delta!r}")
    if consistency not in _BUDGETED:
        raise ValueError(f"consistency must be one of {_BUDGETED}, got {consistency!r}")
    if delta > 0 and not hasattr(cache, "offsets"):
        raise TypeError(f"delta > 0 needs a LayerCache (with .offsets), got {type(cache).__name__}")
    return float(delta), consistency


def oracle_average_layers(cache: Any, *, delta: float = 0.0, consistency: str = "token") -> float:
    """Smallest token-averaged exit layer any confidence measure can reach on this cache.

    Parameters
    ----------
    cache : LayerCache
        Needs ``"topk_ids"`` and ``"full_tokens"`` (and the sequence offsets when ``delta > 0``).
    delta : float, default=0.0
        Tolerance on the empirical risk, in ``[0, 1)`` (alpha in LTT/MAPIE). 0: zero drift, no early
        token may differ from the full model's.
    consistency : {"token", "sequence"}, default="token"
        The per-sequence loss whose mean is budgeted (as in :func:`calibrate.proxy_losses`): the fraction
        of a sequence's early tokens that differ from the full model's, or 1 if any differs.

    Returns
    -------
    float
        Average exit layer over tokens, in ``[1, n_layers]``, comparable with a certificate's
        ``expected_layers``.

    Raises
    ------
    ValueError
        If ``delta`` is outside ``[0, 1)``, ``consistency`` is unknown, or an array is missing.
    TypeError
        If ``delta`` is not a real number, or ``cache`` is not a LayerCache.

    Notes
    -----
    At ``delta = 0`` every token exits at its earliest agreeing layer, :func:`consistency_oracle` with
    ``rule="first"``: the exit rule takes the first layer whose confidence reaches ``lambda``, so a
    measure equal to ``1[i >= oracle]`` reaches this average with zero drift, and no measure does better.

    With ``delta > 0`` a token may also exit wrong at layer 1, saving ``oracle - 1`` layers for a loss
    ``1 / (n_sequences * length)`` (token consistency), or a whole sequence may (loss ``1 / n_sequences``,
    sequence consistency). Choosing what to give up under the budget ``delta`` is a 0/1 knapsack; this
    returns its linear relaxation (greedy by savings per unit of loss, the last item taken
    fractionally), a lower bound on the best average of any exit choice whose empirical risk on this
    cache is at most ``delta``, tight up to one token or sequence. It is in-sample: a certified measure
    pays for generalisation and for the test's margin too.

    Examples
    --------
    >>> from calibrate.synthetic import synthetic_cache
    >>> from measures.oracles import oracle_average_layers
    >>> cache = synthetic_cache(100, n_layers=8, seed=0)
    >>> zero = oracle_average_layers(cache)
    >>> 1.0 <= oracle_average_layers(cache, delta=0.1) < zero < 8.0
    True
    """
    delta, consistency = _oracle_average_layers_iv(cache, delta, consistency)
    depths = consistency_oracle(cache, rule="first")
    n_tokens = depths.size
    if delta == 0.0:
        return float(depths.mean())
    offsets = np.asarray(cache.offsets, dtype=np.int64)
    n_seq = offsets.size - 1
    savings = (depths - 1).astype(np.float64)
    if consistency == "token":
        lengths = np.diff(offsets)
        seq = np.repeat(np.arange(n_seq), lengths)
        cost = 1.0 / (n_seq * lengths[seq])  # loss added by one wrong token of its sequence
    else:
        savings = np.add.reduceat(savings, offsets[:-1])  # a wrong sequence exits all its tokens at layer 1
        cost = np.full(n_seq, 1.0 / n_seq)
    order = np.argsort(-savings / cost, kind="stable")
    savings, cost = savings[order], cost[order]
    spent = np.cumsum(cost)
    whole = int(np.searchsorted(spent, delta, side="right"))  # items that fit entirely
    saved = savings[:whole].sum()
    if whole < savings.size:
        left = delta - (spent[whole - 1] if whole else 0.0)
        saved += savings[whole] * left / cost[whole]
    return float((depths.sum() - saved) / n_tokens)
