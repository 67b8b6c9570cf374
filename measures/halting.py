"""Depth-Adaptive Transformer halting heads as confidence measures, trained on frozen hidden states.

The Depth-Adaptive Transformer (DAT, Elbayad et al., ICLR 2020) decides per token (or per sequence) how
many decoder layers to run with small linear halting classifiers trained against oracle depths
(:mod:`measures.oracles`). :class:`HaltingHead` fits the three DAT heads on a cache's hidden states and
exposes each as a per-layer confidence ``(n_tokens, n_layers)`` in ``[0, 1]``, so the exit rule
("exit at the first layer whose confidence reaches lambda") and the risk control certify its threshold
like any other measure:

* ``"geometric"`` -- token-level geometric-like halting: one logistic head per layer,
  ``chi_i = sigmoid(w_i . x_i + b_i)``, the probability of stopping at layer ``i`` having reached it;
  the confidence is ``chi_i`` (DAT exits at the first ``chi_i`` above a threshold);
* ``"token_multinomial"`` -- token-level multinomial: one softmax over depths from the state after
  layer 1; the confidence at layer ``i`` is the predicted probability that the depth is ``<= i``;
* ``"sequence_multinomial"`` -- sequence-level multinomial: one softmax over depths per sequence from
  the prompt's states, with the same cumulative confidence for every token of the sequence.

Heads are linear and fitted with L-BFGS on a soft-label cross-entropy (numpy and scipy only; no torch).
Their state is a JSON-able dict (no pickle), so a certificate can carry it. Like the learned classifier
they must be trained on sequences **disjoint** from the calibration split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, log_softmax, softmax

from measures._callers import caller_stacklevel
from measures.classifier import _layer_features, _linear_state_iv, _standardize
from measures.confidence import _cache_iv, state_saturation
from measures.oracles import _OPTIONS, CONSISTENCY_RULES, ORACLES, _penalty_iv, oracle_depths, smooth_oracle

__all__ = ["HALTING_KINDS", "HALTING_MEASURES", "HaltingHead"]

#: The three DAT halting heads.
HALTING_KINDS: tuple[str, ...] = ("geometric", "token_multinomial", "sequence_multinomial")
#: Their names as confidence measures (``"halting_" + kind``), e.g. for ``calibrate.fit(measure=...)``.
HALTING_MEASURES: tuple[str, ...] = tuple(f"halting_{kind}" for kind in HALTING_KINDS)

_FORMAT = "calm-calibrate.HaltingHead"
_FORMAT_VERSION = 1
#: Training rows whose weight (the oracle's probability of reaching the layer) is below this are dropped:
#: each would change the loss by less than this fraction of one token's.
_MIN_WEIGHT = 1e-6


# ----------------------------------------------------------------------------------------------------
# Linear soft-label models
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    """Standardised features -> logits: ``((x - mean) / scale) @ coef + intercept``, shape (n, m)."""

    mean: np.ndarray  # (p,)
    scale: np.ndarray  # (p,), > 0
    coef: np.ndarray  # (p, m)
    intercept: np.ndarray  # (m,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return _standardize(x, self.mean, self.scale).astype(np.float64) @ self.coef + self.intercept

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": [float(v) for v in self.mean],
            "scale": [float(v) for v in self.scale],
            "coef": [[float(v) for v in row] for row in self.coef],
            "intercept": [float(v) for v in self.intercept],
        }

    @classmethod
    def from_dict(cls, state: Any, where: str, n_features: int, n_outputs: int) -> _Linear:
        if not isinstance(state, dict):
            raise TypeError(f"{where} must be a dict, got {type(state).__name__}")
        shapes = {
            "mean": (n_features,),
            "scale": (n_features,),
            "coef": (n_features, n_outputs),
            "intercept": (n_outputs,),
        }
        arrays = {}
        for key, shape in shapes.items():
            if key not in state:
                raise ValueError(f"{where} has no key {key!r}")
            try:
                arr = np.asarray(state[key], dtype=np.float64)
            except (TypeError, ValueError, OverflowError):  # not numbers, or beyond the float range
                raise ValueError(f"{where}[{key!r}] must be a (nested) list of finite floats") from None
            if arr.shape != shape or not np.isfinite(arr).all():
                raise ValueError(f"{where}[{key!r}] must be finite numbers of shape {shape}, got shape {arr.shape}")
            arrays[key] = arr
        _linear_state_iv(arrays, where)
        return cls(**arrays)


def _constant(n_features: int, logits: np.ndarray) -> _Linear:
    """A model that ignores its input and returns ``logits`` (m,)."""
    return _Linear(np.zeros(n_features), np.ones(n_features), np.zeros((n_features, logits.size)), logits)


def _fit_linear(
    x: np.ndarray, targets: np.ndarray, weights: np.ndarray, *, C: float, max_iter: int, pinned: bool
) -> _Linear:
    """Weighted soft-label softmax regression with an L2 penalty on the coefficients.

    Minimises ``sum_r w_r CE(targets_r, softmax(z_r)) + |coef|^2 / (2 C)`` over standardised features,
    the objective of :class:`sklearn.linear_model.LogisticRegression` (intercept not penalised) with soft
    labels. ``targets`` (n, K) rows sum to 1. With ``pinned`` the first class's logit is fixed at 0 and the
    model has ``K - 1`` outputs (``K = 2``: binary logistic regression, output = logit of class 1).
    """
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    scale = np.where(std > 0, std, 1.0)
    z = _standardize(x, mean, scale).astype(np.float64)
    n, p = z.shape
    m = targets.shape[1] - 1 if pinned else targets.shape[1]
    total = float(weights.sum())

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef, intercept = theta[: p * m].reshape(p, m), theta[p * m :]
        logits = z @ coef + intercept
        if pinned:
            logits = np.concatenate([np.zeros((n, 1)), logits], axis=1)
        logp = log_softmax(logits, axis=1)
        loss = -(weights @ (targets * logp).sum(axis=1)) + (coef**2).sum() / (2.0 * C)
        grad_logits = weights[:, None] * (np.exp(logp) - targets)  # rows of targets sum to 1
        if pinned:
            grad_logits = grad_logits[:, 1:]
        grad = np.concatenate([(z.T @ grad_logits + coef / C).ravel(), grad_logits.sum(axis=0)])
        return loss / total, grad / total  # scaled by the total weight: same optimum, better conditioned

    from scipy.optimize import minimize  # loaded when a head is trained, as scikit-learn is
    from sklearn.exceptions import ConvergenceWarning

    result = minimize(objective, np.zeros(p * m + m), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    if result.nit >= max_iter:
        warnings.warn(
            f"L-BFGS stopped after max_iter={max_iter} iterations before converging; increase max_iter "
            "(calibrate.fit: measure_options={'max_iter': ...})",
            ConvergenceWarning,
            stacklevel=caller_stacklevel(),  # the user's line, through calibrate.fit too
        )
    return _Linear(mean, scale, result.x[: p * m].reshape(p, m), result.x[p * m :])


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


def _hidden_iv(cache: Any) -> int:
    """Check the cache's hidden states and return the number of tokens."""
    _cache_iv(cache)
    hidden = cache.arrays.get("hidden")
    if hidden is None:
        raise ValueError("halting heads read hidden states: the cache needs a 'hidden' array; it has none")
    n_layers = int(cache.n_layers)
    if np.ndim(hidden) != 3 or np.shape(hidden)[1] != n_layers or np.shape(hidden)[2] < 1:
        raise ValueError(
            f"cache array 'hidden' must have shape (n_tokens, n_layers={n_layers}, d>=1), got {np.shape(hidden)}"
        )
    n_tokens = int(np.shape(hidden)[0])
    if n_tokens == 0:
        raise ValueError("the cache must contain at least one token, got 0")
    full = cache.arrays.get("full_tokens")
    if full is not None and np.shape(full) != (n_tokens,):
        raise ValueError(
            f"cache arrays 'hidden' and 'full_tokens' disagree on n_tokens: {n_tokens} vs {np.shape(full)}"
        )
    return n_tokens


def _sequence_features(cache: Any) -> np.ndarray:
    """(n_sequences, d + L - 1) float32: the first generated token's states averaged over layers (in float64),
    and its saturation ``cos(h_i, h_{i-1})`` at layers 2..L. All are computed by the prefill of the prompt."""
    if not hasattr(cache, "offsets"):
        raise TypeError(f"the sequence-level head needs a LayerCache (with .offsets), got {type(cache).__name__}")
    first = np.asarray(cache.offsets, dtype=np.int64)[:-1]
    states = np.asarray(np.asarray(cache.arrays["hidden"])[first], dtype=np.float32)  # (S, L, d)
    if not np.isfinite(states).all():
        raise ValueError("cache array 'hidden' must be finite (no NaN or inf) at the first token of every sequence")
    mean = states.mean(axis=1, dtype=np.float64).astype(np.float32)  # as the runtime computes it
    return np.concatenate([mean, state_saturation(states)[:, 1:]], axis=1)


# ----------------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------------


def _init_iv(kind, oracle, oracle_options, sigma, C, max_iter) -> dict[str, Any]:
    if kind not in HALTING_KINDS:
        raise ValueError(f"kind must be one of {HALTING_KINDS}, got {kind!r}")
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}, got {oracle!r}")
    options = {} if oracle_options is None else oracle_options
    if not isinstance(options, dict):
        raise TypeError(f"oracle_options must be a dict or None, got {type(options).__name__}")
    allowed = tuple(key for key in _OPTIONS[oracle] if key != "targets")  # arrays go to fit(), not the state
    if set(options) - set(allowed):
        raise ValueError(
            f"oracle_options for oracle={oracle!r} may hold {allowed}, got {sorted(options)}"
            + (
                " (targets are arrays: pass them to HaltingHead.fit(cache, targets=...); calibrate.fit trains on the "
                "full model's tokens, with which oracle='correctness' equals oracle='consistency', rule='first')"
                if "targets" in options
                else ""
            )
        )
    options = dict(options)
    if "rule" in options and options["rule"] not in CONSISTENCY_RULES:
        raise ValueError(f"oracle_options['rule'] must be one of {CONSISTENCY_RULES}, got {options['rule']!r}")
    if "penalty" in options:
        options["penalty"] = _penalty_iv(options["penalty"])  # a plain float, for the JSON state
    for name, value in (("sigma", sigma), ("C", C)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a real number, got {value!r}")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0 (kernel width in layers), got {sigma!r}")
    if not (np.isfinite(C) and C > 0):
        raise ValueError(f"C must be a finite number > 0 (inverse regularisation strength), got {C!r}")
    if isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, (int, np.integer)):
        raise TypeError(f"max_iter must be an int >= 1, got {max_iter!r} ({type(max_iter).__name__})")
    if max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    return {
        "kind": kind,
        "oracle": oracle,
        "oracle_options": options,
        "sigma": float(sigma),
        "C": float(C),
        "max_iter": int(max_iter),
    }


class HaltingHead:
    """A Depth-Adaptive Transformer halting head, used as a per-layer confidence measure.

    Parameters
    ----------
    kind : {"geometric", "token_multinomial", "sequence_multinomial"}, default="geometric"
        Which DAT head (see Notes).
    oracle : {"consistency", "likelihood", "correctness"}, default="consistency"
        The oracle depths the head is trained against (:func:`measures.oracles.oracle_depths`).
    oracle_options : dict, optional
        The oracle's option: ``{"rule": "first" | "stable"}`` (consistency, default ``"first"``) or
        ``{"penalty": float}`` (likelihood, default 0.1). Correctness targets are arrays: pass them to
        :meth:`fit`. Without them (as :func:`calibrate.fit` trains) the target is the full model's token
        and the correctness oracle equals the consistency oracle with ``rule="first"``.
    sigma : float, default=0.0
        Width in layers of the RBF kernel that smooths the oracle into the training distribution over
        depths (:func:`measures.oracles.smooth_oracle`); 0 trains on the one-hot oracle. On
        :func:`calibrate.synthetic_cache`, ``sigma=1`` costs the geometric head about 0.4 layers at the
        certified threshold and changes little for the multinomial heads, hence the default 0.
    C : float, default=1.0
        Inverse L2 regularisation strength, as in :class:`sklearn.linear_model.LogisticRegression`.
    max_iter : int, default=500
        Iteration cap of each L-BFGS fit (a :class:`~sklearn.exceptions.ConvergenceWarning` when reached).

    Attributes
    ----------
    n_layers_ : int
        Number of layers ``L`` of the training cache.
    n_features_ : int
        Feature dimension: ``d + 1`` for the token-level heads, ``d + L - 1`` for the sequence head.
    classes_ : tuple of int or None
        Multinomial heads: the depths (1-based) with positive target mass in training; the others get
        probability 0. None for the geometric head.
    n_train_tokens_, n_train_sequences_ : int
        Size of the training cache.

    Notes
    -----
    **Features.** The token-level heads read the layer's hidden state and its saturation
    ``cos(h_i, h_{i-1})`` (the features of :class:`measures.classifier.ExitClassifier`; a linear head on an
    isotropic state alone cannot see how far the state moved), standardised on the training tokens.

    **Geometric-like** (``"geometric"``). Layer ``i < L`` has its own head
    ``chi_i = sigmoid(w_i . [h_i, cos_i] + b_i)``, the probability of halting at ``i`` having reached it;
    the depth distribution is ``q(i) = chi_i prod_{j<i} (1 - chi_j)``, ``q(L) = prod_{j<L} (1 - chi_j)``.
    DAT trains it by the cross-entropy ``-sum_i q*(i) log q(i)`` against the (smoothed) oracle ``q*``,
    which splits exactly into one weighted logistic regression per layer: target the hazard
    ``q*(i) / S*(i)``, weight the survival ``S*(i) = sum_{j>=i} q*(j)`` (a token the oracle has already
    stopped does not train later layers). The confidence at layer ``i`` is ``chi_i``, so the exit rule is
    DAT's own: halt at the first layer whose ``chi_i`` reaches the threshold (DAT uses 0.5; here the
    risk control certifies it).

    **Token multinomial** (``"token_multinomial"``). One softmax over the ``L`` depths from
    ``[h_1, cos_1]``, the state after the first layer (as DAT: its multinomial head reads the first
    block's output), trained by cross-entropy against ``q*``. The depth is decided after layer 1; the
    confidence at layer ``i`` is the predicted ``P(depth <= i)``, so exiting at the first layer with
    confidence ``>= lambda`` runs the ``lambda``-quantile of the predicted depth.

    **Sequence multinomial** (``"sequence_multinomial"``). DAT reads the mean of the encoder states;
    a decoder-only model's analogue is the prompt. At decode time the prefill runs the whole prompt
    through every layer before the first generated token's exit is decided (see
    :mod:`calibrate.runtime`), so the states of the last prompt position -- the cache's first generated
    token, all ``L`` layers -- are available; the rest of the prompt's states are not in the cache. The
    features of a sequence are that token's states averaged over layers and its saturation profile
    ``cos(h_i, h_{i-1})``, ``i = 2..L``. The target of a sequence is the mean of its tokens' ``q*``
    weighted by its length (the maximum-likelihood fit of one depth distribution to all its tokens'
    oracle depths). Every token of the sequence gets the cumulative confidence ``P(depth <= i)``, so
    ``lambda`` picks a quantile of the sequence's depth distribution.

    **Calibration.** Train on sequences disjoint from the calibration split: a measure fitted on the
    calibration sequences makes their losses optimistic and voids
    ``P(risk(lambda_hat) <= delta) >= 1 - epsilon`` (delta = tolerance, epsilon = failure probability;
    LTT writes alpha and delta). Fitting is deterministic (L-BFGS from zero weights): no seed; the weights
    move in their last digits only with the BLAS build or its thread count (``OMP_NUM_THREADS``).

    **Run-time cost.** ``O(d)`` per layer for the geometric head; one ``O(d L)`` product after layer 1
    (token multinomial) or at prefill (sequence multinomial), then nothing per layer: none needs the
    vocabulary-sized head product of the softmax measures.

    References
    ----------
    M. Elbayad, J. Gu, E. Grave, M. Auli, "Depth-Adaptive Transformer", ICLR 2020, section 3.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> from measures.halting import HaltingHead
    >>> from measures.oracles import consistency_oracle
    >>> rng = np.random.default_rng(0)
    >>> T, L, d = 600, 4, 3
    >>> depth = rng.integers(1, L + 1, size=T)                     # the right depth of each token
    >>> hidden = rng.normal(size=(T, L, d))
    >>> hidden[:, :, 0] = depth[:, None] + 0.2 * rng.normal(size=(T, L))   # ... written in feature 0
    >>> top1 = np.where(np.arange(1, L + 1) >= depth[:, None], 0, 1)       # layers agree from `depth` on
    >>> cache = LayerCache.from_arrays(full_tokens=np.zeros(T, dtype=int),
    ...                                topk_ids=np.stack([top1, top1 + 2], axis=-1),
    ...                                hidden=hidden, lengths=[10] * 60, vocab_size=10)
    >>> head = HaltingHead("geometric").fit(cache)
    >>> conf = head.predict_confidence(cache)
    >>> conf.shape, conf.dtype
    ((600, 4), dtype('float32'))
    >>> exits = 1 + np.argmax(conf >= 0.5, axis=1)                 # the exit rule at lambda = 0.5
    >>> bool((exits == consistency_oracle(cache)).mean() > 0.9)
    True
    >>> bool((HaltingHead.from_dict(head.to_dict()).predict_confidence(cache) == conf).all())
    True
    """

    def __init__(
        self,
        kind: str = "geometric",
        *,
        oracle: str = "consistency",
        oracle_options: dict[str, Any] | None = None,
        sigma: float = 0.0,
        C: float = 1.0,
        max_iter: int = 500,
    ):
        params = _init_iv(kind, oracle, oracle_options, sigma, C, max_iter)
        self.kind, self.oracle, self.oracle_options = params["kind"], params["oracle"], params["oracle_options"]
        self.sigma, self.C, self.max_iter = params["sigma"], params["C"], params["max_iter"]
        self._models: list[_Linear] | None = None

    # -- fitting -------------------------------------------------------------------------------------

    def fit(self, cache: Any, *, targets: Any = None) -> HaltingHead:
        """Fit the head against the oracle depths of a training cache.

        Parameters
        ----------
        cache : LayerCache
            Training sequences, disjoint from the calibration sequences. Needs ``"hidden"``
            ``(n_tokens, n_layers, d)``, ``"topk_ids"``, ``"full_tokens"`` (and ``"topk_logprobs"`` for the
            likelihood oracle).
        targets : array_like of int, shape (n_tokens,), optional
            Right token ids for ``oracle="correctness"`` (default: the full model's tokens); only with
            that oracle.

        Returns
        -------
        HaltingHead
            ``self``, fitted.

        Raises
        ------
        ValueError
            If the cache lacks an array or has wrong shapes or non-finite states, if the oracle refuses
            its options, or ``targets`` is given for another oracle.
        TypeError
            If ``cache`` has no ``.arrays``/``.n_layers`` (the sequence head also needs ``.offsets``).
        """
        n_tokens = _hidden_iv(cache)
        options = dict(self.oracle_options)
        if targets is not None:
            if self.oracle != "correctness":
                raise ValueError(f"targets are used only with oracle='correctness', not oracle={self.oracle!r}")
            options["targets"] = targets
        n_layers = int(cache.n_layers)
        q = smooth_oracle(oracle_depths(cache, oracle=self.oracle, **options), n_layers, sigma=self.sigma)  # (T, L)
        if self.kind == "geometric":
            models, classes = self._fit_geometric(cache, q, n_tokens), None
            n_features = int(np.shape(cache.arrays["hidden"])[2]) + 1  # the state and its saturation
        else:
            models, classes, n_features = self._fit_multinomial(cache, q, n_tokens)
        self._set_fitted(
            models,
            n_layers=n_layers,
            n_features=int(n_features),
            classes=classes,
            n_train_tokens=n_tokens,
            n_train_sequences=int(getattr(cache, "n_sequences", 0)),
        )
        return self

    def _fit_geometric(self, cache: Any, q: np.ndarray, n_tokens: int) -> list[_Linear]:
        """One weighted logistic regression per layer ``1..L-1``: target the hazard, weight the survival."""
        models = []
        survival = np.cumsum(q[:, ::-1], axis=1)[:, ::-1]  # S*(i) = sum_{j >= i} q*(j)
        for layer in range(q.shape[1] - 1):
            x = _layer_features(cache, layer, "hidden", n_tokens)
            keep = survival[:, layer] > _MIN_WEIGHT
            weight = survival[keep, layer]
            hazard = np.clip(q[keep, layer] / weight, 0.0, 1.0)
            stops, total = float(weight @ hazard), float(weight.sum())
            if min(stops, total - stops) <= _MIN_WEIGHT * max(total, 1.0):
                # one class only (or no token reaches the layer): Laplace's rule of succession
                rate = (stops + 1.0) / (total + 2.0)
                models.append(_constant(x.shape[1], np.array([np.log(rate / (1.0 - rate))])))
                continue
            two = np.stack([1.0 - hazard, hazard], axis=1)
            models.append(_fit_linear(x[keep], two, weight, C=self.C, max_iter=self.max_iter, pinned=True))
        return models

    def _fit_multinomial(self, cache: Any, q: np.ndarray, n_tokens: int) -> tuple[list[_Linear], tuple[int, ...], int]:
        """One softmax over the depths with target mass: per token (layer-1 state) or per sequence."""
        if self.kind == "token_multinomial":
            x, weight = _layer_features(cache, 0, "hidden", n_tokens), np.ones(n_tokens)
        else:  # a sequence's target is its tokens' mean, weighted by its length
            x, offsets = _sequence_features(cache), np.asarray(cache.offsets, dtype=np.int64)
            weight = np.diff(offsets).astype(np.float64)
            q = np.add.reduceat(q, offsets[:-1], axis=0) / weight[:, None]
        support = np.flatnonzero(weight @ q > 0)
        if support.size == 1:
            model = _constant(x.shape[1], np.zeros(1))
        else:
            model = _fit_linear(x, q[:, support], weight, C=self.C, max_iter=self.max_iter, pinned=False)
        return [model], tuple(int(c) + 1 for c in support), x.shape[1]

    def _set_fitted(self, models, *, n_layers, n_features, classes, n_train_tokens, n_train_sequences) -> None:
        self._models = models
        self.n_layers_ = n_layers
        self.n_features_ = n_features
        self.classes_ = classes
        self.n_train_tokens_ = n_train_tokens
        self.n_train_sequences_ = n_train_sequences

    def _check_fitted(self) -> None:
        if self._models is None:
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this HaltingHead is not fitted yet: call fit(cache) or HaltingHead.from_dict(state)")

    # -- prediction ----------------------------------------------------------------------------------

    def _predict_iv(self, cache: Any) -> int:
        self._check_fitted()
        n_tokens = _hidden_iv(cache)
        if int(cache.n_layers) != self.n_layers_:
            raise ValueError(f"the cache has {cache.n_layers} layers but the head was fitted on {self.n_layers_}")
        d = int(np.shape(cache.arrays["hidden"])[2])
        expected = self.n_features_ - (self.n_layers_ - 1 if self.kind == "sequence_multinomial" else 1)
        if d != expected:
            raise ValueError(f"the cache's hidden size is {d} but the head was fitted on {expected}")
        return n_tokens

    def predict_proba(self, cache: Any) -> np.ndarray:
        """Predicted distribution over exit depths.

        Parameters
        ----------
        cache : LayerCache
            With ``"hidden"`` states of the training cache's shape (layers and hidden size).

        Returns
        -------
        ndarray of float64, shape (n_tokens, n_layers)
            ``q[t, i - 1]`` = probability of halting at layer ``i``; rows sum to 1.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the head is not fitted (a ValueError subclass).
        ValueError
            If the cache does not match the training cache's shapes or states are non-finite.
        """
        n_tokens = self._predict_iv(cache)
        if self.kind == "geometric":
            chi = self._halting(cache, n_tokens)  # (T, L - 1)
            survive = np.concatenate([np.ones((n_tokens, 1)), np.cumprod(1.0 - chi, axis=1)], axis=1)  # (T, L)
            return np.concatenate([chi * survive[:, :-1], survive[:, -1:]], axis=1)
        x = (
            _layer_features(cache, 0, "hidden", n_tokens)
            if self.kind == "token_multinomial"
            else _sequence_features(cache)
        )
        probs = np.zeros((x.shape[0], self.n_layers_))
        probs[:, np.asarray(self.classes_) - 1] = softmax(self._models[0].logits(x), axis=1)
        if self.kind == "sequence_multinomial":
            probs = np.repeat(probs, np.diff(np.asarray(cache.offsets, dtype=np.int64)), axis=0)
        return probs

    def _halting(self, cache: Any, n_tokens: int) -> np.ndarray:
        """(T, L - 1) geometric halting probabilities ``chi_i``."""
        chi = np.empty((n_tokens, self.n_layers_ - 1))
        for layer, model in enumerate(self._models):
            chi[:, layer] = expit(model.logits(_layer_features(cache, layer, "hidden", n_tokens))[:, 0])
        return chi

    def predict_confidence(self, cache: Any) -> np.ndarray:
        """Per-layer confidence for the exit rule (higher = more ready to halt).

        Parameters
        ----------
        cache : LayerCache
            With ``"hidden"`` states of the training cache's shape (layers and hidden size).

        Returns
        -------
        ndarray of float32, shape (n_tokens, n_layers)
            In ``[0, 1]``; the last layer gets 1.0. Geometric head: ``chi_i`` (in float32, exactly 1.0 for a
            logit above about 17: such tokens halt at every threshold). Multinomial heads: the predicted
            ``P(depth <= i)``, non-decreasing in ``i``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the head is not fitted (a ValueError subclass).
        ValueError
            If the cache does not match the training cache's shapes or states are non-finite.
        """
        if self.kind == "geometric":
            n_tokens = self._predict_iv(cache)
            conf = np.ones((n_tokens, self.n_layers_), dtype=np.float32)
            conf[:, :-1] = self._halting(cache, n_tokens)
            return conf
        conf = np.cumsum(self.predict_proba(cache), axis=1)
        conf[:, -1] = 1.0
        return np.clip(conf, 0.0, 1.0).astype(np.float32)

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fitted state as a JSON-serialisable dict (plain lists, floats, ints, strings, None).

        Returns
        -------
        dict
            Restorable with :meth:`from_dict`; predictions of the restored head are identical.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the head is not fitted.
        """
        self._check_fitted()
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "params": {
                "kind": self.kind,
                "oracle": self.oracle,
                "oracle_options": dict(self.oracle_options),
                "sigma": self.sigma,
                "C": self.C,
                "max_iter": self.max_iter,
            },
            "n_layers": int(self.n_layers_),
            "n_features": int(self.n_features_),
            "classes": None if self.classes_ is None else list(self.classes_),
            "n_train_tokens": int(self.n_train_tokens_),
            "n_train_sequences": int(self.n_train_sequences_),
            "models": [model.to_dict() for model in self._models],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> HaltingHead:
        """Restore a fitted head from :meth:`to_dict` output.

        Parameters
        ----------
        state : dict
            As returned by :meth:`to_dict` (possibly through ``json.dumps``/``json.loads``).

        Returns
        -------
        HaltingHead
            Fitted.

        Raises
        ------
        ValueError
            If ``state`` is not a valid HaltingHead state (the message names the faulty key).
        TypeError
            If ``state``, ``state["params"]`` or a model entry is not a dict.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from HaltingHead.to_dict(), got {type(state).__name__}")
        if state.get("format") != _FORMAT or state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"state['format'] and state['format_version'] must be {_FORMAT!r} and {_FORMAT_VERSION}, "
                f"got {state.get('format')!r} and {state.get('format_version')!r}"
            )
        params = state.get("params")
        if not isinstance(params, dict):
            raise TypeError(f"state['params'] must be a dict, got {type(params).__name__}")
        keys = ("kind", "oracle", "oracle_options", "sigma", "C", "max_iter")
        missing = [key for key in keys if key not in params]
        if missing:
            raise ValueError(f"state['params'] must hold the keys {keys}; missing {missing}")
        head = cls(**{key: params[key] for key in keys})
        sizes = {}
        for key in ("n_layers", "n_features", "n_train_tokens", "n_train_sequences"):
            value = state.get(key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if key in ("n_layers", "n_features") else 0)
            ):
                raise ValueError(f"state[{key!r}] must be a non-negative int (>= 1 for sizes), got {value!r}")
            sizes[key] = value
        n_layers, n_features = sizes["n_layers"], sizes["n_features"]
        fewest = n_layers if head.kind == "sequence_multinomial" else 2  # d + L - 1 or d + 1 features, d >= 1
        if n_features < fewest:
            raise ValueError(f"state['n_features'] must be >= {fewest} for the {head.kind} head, got {n_features}")
        classes = state.get("classes")
        if head.kind == "geometric":
            if classes is not None:
                raise ValueError(f"state['classes'] must be None for the geometric head, got {classes!r}")
            n_models, n_outputs = n_layers - 1, 1
        else:
            if (
                not isinstance(classes, list)
                or not classes
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
                or sorted(set(classes)) != classes
                or classes[0] < 1
                or classes[-1] > n_layers
            ):
                raise ValueError(f"state['classes'] must be increasing depths in [1, {n_layers}], got {classes!r}")
            classes = tuple(classes)
            n_models, n_outputs = 1, len(classes)
        raw = state.get("models")
        if not isinstance(raw, list) or len(raw) != n_models:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise ValueError(f"state['models'] must be a list of {n_models} models, got {got}")
        models = [_Linear.from_dict(m, f"state['models'][{i}]", n_features, n_outputs) for i, m in enumerate(raw)]
        head._set_fitted(
            models,
            n_layers=n_layers,
            n_features=n_features,
            classes=classes,
            n_train_tokens=sizes["n_train_tokens"],
            n_train_sequences=sizes["n_train_sequences"],
        )
        return head

    def __repr__(self) -> str:
        options = f", oracle_options={self.oracle_options!r}" if self.oracle_options else ""
        head = (
            f"HaltingHead({self.kind!r}, oracle={self.oracle!r}{options}, sigma={self.sigma!r}, C={self.C!r}, "
            f"max_iter={self.max_iter!r})"
        )
        if self._models is None:
            return head
        return (
            f"{head}  # fitted: n_layers={self.n_layers_}, n_features={self.n_features_}, "
            f"n_train_tokens={self.n_train_tokens_}"
        )
