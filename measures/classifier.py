"""Learned early-exit classifier: one logistic head per layer predicting agreement with the last layer.

The label of token ``t`` at layer ``i`` is ``1[argmax at layer i == full-model token]``
(:func:`agreement`). :class:`ExitClassifier` fits one class-balanced
:class:`sklearn.linear_model.LogisticRegression` per layer ``1 .. L-1`` on frozen features (the hidden
state, or the layer's top-k log-probabilities plus the softmax measures) and predicts a class-balanced
agreement score in [0, 1] as the layer's confidence (a ranking score, not the agreement probability:
the balanced weights move every layer's prior to one half; the certificate calibrates the threshold).
Its state is a JSON-able dict (no pickle), so a certificate can carry it.

The classifier must be trained on sequences **disjoint** from the calibration split: a measure fitted
on the calibration data makes the calibration losses optimistic and voids the risk guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression

from measures._arrays import cache_array
from measures.confidence import _cache_iv, _topk_logprobs_iv, _topk_measures, _vocab_size_iv, state_saturation

__all__ = ["ExitClassifier", "agreement"]

_FORMAT = "calm-calibrate.ExitClassifier"
_FORMAT_VERSION = 1
_FEATURES = ("auto", "hidden", "topk")
_TOPK_SCALARS = ("softmax_gap", "softmax_max", "entropy")
_FLOAT_MAX = float(np.finfo(np.float64).max)


# ----------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------


def _agreement_iv(cache: Any) -> tuple[np.ndarray, np.ndarray]:
    _cache_iv(cache)
    arrays = cache.arrays
    for field in ("topk_ids", "full_tokens"):
        if arrays.get(field) is None:
            raise ValueError(f"the cache has no {field!r} array, needed for the agreement labels")
    ids, full = arrays["topk_ids"], np.asarray(arrays["full_tokens"])
    n_layers = int(cache.n_layers)
    if full.ndim != 1:
        raise ValueError(f"cache array 'full_tokens' must have shape (n_tokens,), got {full.shape}")
    if np.ndim(ids) != 3 or np.shape(ids)[:2] != (full.shape[0], n_layers) or np.shape(ids)[2] < 1:
        raise ValueError(
            f"cache array 'topk_ids' must have shape (n_tokens, n_layers, k) = ({full.shape[0]}, {n_layers}, k>=1), "
            f"got {np.shape(ids)}"
        )
    return np.asarray(ids[:, :, 0]), full


def agreement(cache: Any) -> np.ndarray:
    """Whether each layer's top-1 token equals the full-model token.

    Parameters
    ----------
    cache : LayerCache
        Needs the arrays ``"topk_ids"`` ``(n_tokens, n_layers, k)`` and ``"full_tokens"`` ``(n_tokens,)``.

    Returns
    -------
    ndarray of bool, shape (n_tokens, n_layers)
        ``topk_ids[t, i, 0] == full_tokens[t]``: the exit label of the classifier, the per-token loss of
        the token-agreement consistency, and the oracle exit (first agreeing layer).

    Raises
    ------
    ValueError
        If an array is missing or has the wrong shape.
    TypeError
        If ``cache`` has no ``.arrays``/``.n_layers``.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> from measures.classifier import agreement
    >>> ids = np.array([[[5, 1], [7, 5]], [[2, 3], [2, 0]]])   # 2 tokens, 2 layers, k = 2
    >>> cache = LayerCache.from_arrays(full_tokens=[7, 2], topk_ids=ids, lengths=[2], vocab_size=10)
    >>> agreement(cache)
    array([[False,  True],
           [ True,  True]])
    """
    top1, full = _agreement_iv(cache)
    return top1 == full[:, None]


# ----------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------


def _resolve_features(cache: Any, features: str) -> str:
    arrays = cache.arrays
    has_hidden = arrays.get("hidden") is not None
    has_topk = arrays.get("topk_logprobs") is not None
    if features == "auto":
        if has_hidden:
            return "hidden"
        if has_topk:
            return "topk"
        raise ValueError("features='auto' needs a cache with a 'hidden' or a 'topk_logprobs' array; it has neither")
    if features == "hidden" and not has_hidden:
        raise ValueError("features='hidden' needs a cache with a 'hidden' array; it has none")
    if features == "topk" and not has_topk:
        raise ValueError("features='topk' needs a cache with a 'topk_logprobs' array; it has none")
    return features


def _layer_features(cache: Any, layer: int, features: str, n_tokens: int) -> np.ndarray:
    """Feature matrix (n_tokens, n_features) of one layer (0-based index), float32 and finite."""
    if features == "hidden":
        hidden = cache_array(cache, "hidden", n_tokens, "d")
        x = np.asarray(hidden[:, layer, :], dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"cache array 'hidden' must be finite (no NaN or inf); layer {layer + 1} is not")
        if layer == 0:
            saturation = np.zeros(n_tokens, dtype=np.float32)
        else:
            pair = np.stack([np.asarray(hidden[:, layer - 1, :]), np.asarray(hidden[:, layer, :])], axis=1)
            try:
                saturation = state_saturation(pair)[:, 1]
            except ValueError:
                raise ValueError(
                    f"cache array 'hidden' must be finite (no NaN or inf); layer {layer} is not"
                ) from None
        return np.concatenate([x, saturation[:, None]], axis=1)
    raw = cache_array(cache, "topk_logprobs", n_tokens, "k")
    lp = _topk_logprobs_iv(raw[:, layer, :], name="topk_logprobs")
    vocab_size = getattr(cache, "vocab_size", None)
    if vocab_size is None:
        raise ValueError("features='topk' needs the cache's vocab_size (for the entropy feature), got None")
    scalars = _topk_measures(lp, _vocab_size_iv(vocab_size, lp.shape[-1]), _TOPK_SCALARS)
    cols = [lp] + [scalars[name][:, None] for name in _TOPK_SCALARS]
    return np.concatenate(cols, axis=1).astype(np.float32)


def _standardize(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - mean) / scale`` in float32; shared by fit and predict so both see identical inputs."""
    return (x - mean.astype(np.float32)) / scale.astype(np.float32)


#: Largest magnitude of a loaded linear model's coefficients and intercepts: float64 products with standardised
#: float32 features stay finite (trained values are of order 1 to 100).
_COEF_MAX = 1e30


def _linear_state_iv(arrays: dict[str, np.ndarray], where: str) -> None:
    """Refuse a loaded linear model (``mean``, ``scale``, ``coef``, optional ``intercept``, finite float64) that
    scores NaN or saturates: ``mean`` and ``scale`` are used in float32 (:func:`_standardize`), where 1e300
    overflows and a scale of 1e-50 is 0."""
    for key in ("mean", "scale"):
        if (np.abs(arrays[key]) > np.finfo(np.float32).max).any():  # inf in float32 (compared: a cast warns)
            raise ValueError(f"{where}[{key!r}] must be finite in float32 (magnitude below 3.4e38)")
    if (arrays["scale"].astype(np.float32) <= 0).any():
        raise ValueError(f"{where}['scale'] must be > 0 in float32 (at least 1.4e-45)")
    for key in ("coef", "intercept"):
        if key in arrays and np.abs(arrays[key]).max(initial=0.0) > _COEF_MAX:
            raise ValueError(f"{where}[{key!r}] must have magnitudes up to {_COEF_MAX:g}")


@dataclass(frozen=True)
class _LayerModel:
    """One layer's head: a constant probability, or a logistic model on standardised features."""

    n_train: int
    n_positive: int
    constant: float | None = None
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    coef: np.ndarray | None = None
    intercept: float | None = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.constant is not None:
            return np.full(x.shape[0], self.constant, dtype=np.float64)
        z = _standardize(x, self.mean, self.scale).astype(np.float64) @ self.coef + self.intercept
        return expit(z)

    def to_dict(self, layer: int) -> dict[str, Any]:
        def _list(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(v) for v in a]

        return {
            "layer": layer,
            "n_train": int(self.n_train),
            "n_positive": int(self.n_positive),
            "constant": None if self.constant is None else float(self.constant),
            "mean": _list(self.mean),
            "scale": _list(self.scale),
            "coef": _list(self.coef),
            "intercept": None if self.intercept is None else float(self.intercept),
        }


# ----------------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------------


def _random_state(seed: int | None) -> int | np.random.RandomState | None:
    """scikit-learn's ``random_state`` for ``seed``: the seed itself where it takes it (below 2**32)."""
    return seed if seed is None or seed < 2**32 else np.random.RandomState(np.random.MT19937(seed))


def _init_iv(C: Any, features: Any, max_iter: Any, seed: Any) -> tuple[float, str, int, int | None]:
    if isinstance(C, (bool, np.bool_)) or not isinstance(C, (int, float, np.integer, np.floating)):
        raise TypeError(f"C must be a positive float, got {C!r}")
    if not (np.isfinite(C) and C > 0):
        raise ValueError(f"C must be a finite float > 0 (inverse regularisation strength), got {C!r}")
    if not isinstance(features, str) or features not in _FEATURES:
        raise ValueError(f"features must be one of {_FEATURES}, got {features!r}")
    if isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, (int, np.integer)):
        raise TypeError(f"max_iter must be an int >= 1, got {max_iter!r} ({type(max_iter).__name__})")
    if max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if seed is not None:  # as calibrate's seeds (measures does not import calibrate)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be None or an int >= 0 (it seeds the random draws), got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be None or an int >= 0 (it seeds the random draws), got {seed}")
    return float(C), features, int(max_iter), None if seed is None else int(seed)


class ExitClassifier:
    """Per-layer logistic exit classifier (the learned confidence measure of CALM).

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 regularisation strength of each :class:`~sklearn.linear_model.LogisticRegression`.
    features : {"auto", "hidden", "topk"}, default="auto"
        ``"hidden"``: the layer's hidden state and its state saturation ``cos(h_i, h_{i-1})``
        (``(d + 1,)``, both ``O(d)`` at run time). ``"topk"``: the layer's top-k log-probabilities
        plus its softmax gap, softmax max and entropy confidence (all from :func:`measures.confidence.from_topk`,
        ``(k + 3,)``). ``"auto"``: ``"hidden"`` when the cache has hidden states, else ``"topk"``.
    max_iter : int, default=200
        Iteration cap of the lbfgs solver.
    seed : int or None, default=0
        ``random_state`` of the estimators (lbfgs itself is deterministic for a given BLAS build and thread
        count; another ``OMP_NUM_THREADS`` sums the matrix products in another order, which moves the weights
        in their last digits).

    Attributes
    ----------
    features_ : {"hidden", "topk"}
        The resolved feature set (after :meth:`fit` or :meth:`from_dict`).
    n_layers_ : int
        Number of layers ``L`` of the training cache.
    n_features_ : int
        Feature dimension (``d + 1`` or ``k + 3``).
    top_k_, vocab_size_ : int or None
        ``k`` and ``V`` of the training cache for ``features_="topk"`` (checked at prediction), else None.
    n_train_tokens_ : int
        Number of training tokens.
    estimators_ : list of LogisticRegression or None
        The fitted estimators of layers ``1 .. L-1`` (None for a single-class layer). Set by :meth:`fit`;
        None after :meth:`from_dict` (the restored classifier predicts from the stored coefficients).

    Notes
    -----
    - Label: ``y[t, i] = 1[topk_ids[t, i, 0] == full_tokens[t]]`` (:func:`agreement`). Each layer
      ``i < L`` gets its own head, fitted with ``class_weight="balanced"`` on standardised features
      (mean and standard deviation of the training tokens; a constant feature gets scale 1). The
      confidence is the head's predicted probability of agreement under those balanced weights: a score
      on a balanced scale (0.5 where agreement and disagreement are as likely as in a balanced training
      set), not the probability that the layer agrees (with uninformative features and 90% agreement it
      predicts about 0.5). Layer ``L`` always gets 1.0.
    - A layer whose training labels are all equal gets the constant
      ``(n_positive + 1) / (n + 2)`` (Laplace's rule of succession), never exactly 0 or 1: an unweighted
      rate, on another scale than the balanced heads' (such a layer has no second class to balance).
    - **Train on sequences disjoint from the calibration split.** Calibrating with a classifier fitted
      on the calibration sequences makes their losses optimistic and voids
      ``P(risk(lambda_hat) <= delta) >= 1 - epsilon`` (delta = tolerance, epsilon = failure probability;
      LTT writes alpha and delta). Split by sequence, e.g. ``train, cal = cache.split([0.3, 0.7], seed=0)``.
    - The saturation feature is added to the hidden state because a linear head on ``h_i`` alone cannot
      see how far the state moved from ``h_{i-1}`` (on ``calibrate.synthetic_cache``, whose residual
      updates are isotropic, such a head is at chance level; with the cosine it is not). Layer 1's
      cosine is 0, as in :func:`measures.confidence.state_saturation`.
    - At run time the hidden-state head costs ``O(d)`` per layer, unlike the softmax measures, which need
      the vocabulary-sized head product (DESIGN section 5).

    References
    ----------
    T. Schuster et al., "Confident Adaptive Language Modeling", NeurIPS 2022, section 3.5.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> from measures.classifier import ExitClassifier
    >>> rng = np.random.default_rng(0)
    >>> T, L, d = 400, 3, 4
    >>> hidden = rng.normal(size=(T, L, d))
    >>> top1 = np.where(hidden[:, :, 0] > 0, 0, 1)                 # agree iff feature 0 is positive
    >>> top1[:, -1] = 0                                              # the last layer's is the full token
    >>> cache = LayerCache.from_arrays(full_tokens=np.zeros(T, dtype=int),
    ...                                topk_ids=np.stack([top1, top1 + 2], axis=-1),
    ...                                hidden=hidden, lengths=[10] * 40, vocab_size=10)
    >>> clf = ExitClassifier().fit(cache)
    >>> conf = clf.predict_confidence(cache)
    >>> conf.shape, conf.dtype, bool((conf[:, :2][top1[:, :2] == 0] > 0.5).mean() > 0.9)
    ((400, 3), dtype('float32'), True)
    >>> bool((ExitClassifier.from_dict(clf.to_dict()).predict_confidence(cache) == conf).all())
    True
    """

    def __init__(self, *, C: float = 1.0, features: str = "auto", max_iter: int = 200, seed: int | None = 0):
        self.C, self.features, self.max_iter, self.seed = _init_iv(C, features, max_iter, seed)
        self._layers: list[_LayerModel] | None = None

    # -- fitting -------------------------------------------------------------------------------------

    def fit(self, cache: Any) -> ExitClassifier:
        """Fit one head per layer ``1 .. L-1`` on a training cache.

        Parameters
        ----------
        cache : LayerCache
            Training sequences, disjoint from the calibration sequences. Needs ``"topk_ids"``,
            ``"full_tokens"`` and the feature arrays (``"hidden"`` or ``"topk_logprobs"``).

        Returns
        -------
        ExitClassifier
            ``self``, fitted.

        Raises
        ------
        ValueError
            If the cache lacks the needed arrays, has wrong shapes, or features contain NaN or inf.
        TypeError
            If ``cache`` has no ``.arrays``/``.n_layers``.
        """
        top1, full = _agreement_iv(cache)
        labels = top1 == full[:, None]  # (T, L)
        features = _resolve_features(cache, self.features)
        n_tokens, n_layers = labels.shape
        if n_tokens == 0:
            raise ValueError("cache must contain at least one token to fit the classifier, got 0")
        from sklearn.linear_model import LogisticRegression  # scikit-learn loads when a classifier is trained

        layers: list[_LayerModel] = []
        estimators: list[LogisticRegression | None] = []
        n_features = None
        for layer in range(n_layers - 1):
            x = _layer_features(cache, layer, features, n_tokens)
            n_features = x.shape[1]
            y = labels[:, layer].astype(np.int8)
            n_pos = int(y.sum())
            if n_pos in (0, n_tokens):
                layers.append(_LayerModel(n_tokens, n_pos, constant=(n_pos + 1.0) / (n_tokens + 2.0)))
                estimators.append(None)
                continue
            mean = x.mean(axis=0, dtype=np.float64)
            std = x.std(axis=0, dtype=np.float64)
            scale = np.where(std > 0, std, 1.0)
            est = LogisticRegression(
                C=self.C, class_weight="balanced", max_iter=self.max_iter, random_state=_random_state(self.seed)
            )
            est.fit(_standardize(x, mean, scale), y)
            layers.append(
                _LayerModel(
                    n_tokens,
                    n_pos,
                    mean=mean,
                    scale=scale,
                    coef=np.asarray(est.coef_[0], dtype=np.float64),
                    intercept=float(est.intercept_[0]),
                )
            )
            estimators.append(est)
        if n_features is None:  # a one-layer cache: nothing to fit, only the shape of the features
            n_features = _layer_features(cache, 0, features, n_tokens).shape[1]
        self._set_fitted(
            layers,
            features=features,
            n_layers=n_layers,
            n_features=n_features,
            top_k=int(np.shape(cache.arrays["topk_logprobs"])[2]) if features == "topk" else None,
            vocab_size=int(cache.vocab_size) if features == "topk" else None,
            n_train_tokens=n_tokens,
        )
        self.estimators_ = estimators
        return self

    def _set_fitted(self, layers, *, features, n_layers, n_features, top_k, vocab_size, n_train_tokens) -> None:
        self._layers = layers
        self.features_ = features
        self.n_layers_ = n_layers
        self.n_features_ = n_features
        self.top_k_ = top_k
        self.vocab_size_ = vocab_size
        self.n_train_tokens_ = n_train_tokens

    def _check_fitted(self) -> None:
        if self._layers is None:
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(
                "this ExitClassifier is not fitted yet: call fit(cache) or ExitClassifier.from_dict(state)"
            )

    # -- prediction ----------------------------------------------------------------------------------

    def _predict_confidence_iv(self, cache: Any) -> int:
        self._check_fitted()
        _cache_iv(cache)
        n_layers = int(cache.n_layers)
        if n_layers != self.n_layers_:
            raise ValueError(f"the cache has {n_layers} layers but the classifier was fitted on {self.n_layers_}")
        _resolve_features(cache, self.features_)
        arrays = cache.arrays
        if self.features_ == "hidden":
            d = np.shape(arrays["hidden"])[-1]
            if d + 1 != self.n_features_:
                raise ValueError(
                    f"the cache's hidden size is {d} but the classifier was fitted on {self.n_features_ - 1}"
                )
        else:
            k = np.shape(arrays["topk_logprobs"])[-1]
            vocab_size = getattr(cache, "vocab_size", None)
            if k != self.top_k_ or vocab_size != self.vocab_size_:
                raise ValueError(
                    f"the cache has top_k={k}, vocab_size={vocab_size} but the classifier was fitted on "
                    f"top_k={self.top_k_}, vocab_size={self.vocab_size_}"
                )
        if arrays.get("full_tokens") is not None:
            return int(np.shape(arrays["full_tokens"])[0])
        return int(cache.n_tokens)

    def predict_confidence(self, cache: Any) -> np.ndarray:
        """Class-balanced score that each layer agrees with the full model, in [0, 1] (see the class Notes: a
        ranking score, not the agreement probability). Stored in float32, a logit above about 17 scores exactly
        1.0 (such tokens exit at every threshold, lambda = 1 included), one below about -104 exactly 0.

        Parameters
        ----------
        cache : LayerCache
            A cache with the fitted feature arrays, same number of layers (and hidden size, or top-k
            and vocabulary size) as the training cache.

        Returns
        -------
        ndarray of float32, shape (n_tokens, n_layers)
            Confidence in ``[0, 1]``; the last layer gets 1.0.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the classifier is not fitted (a ValueError subclass).
        ValueError
            If the cache does not match the training cache's shapes or features are non-finite.
        """
        n_tokens = self._predict_confidence_iv(cache)
        out = np.ones((n_tokens, self.n_layers_), dtype=np.float32)
        for layer, model in enumerate(self._layers):
            if model.constant is not None:
                out[:, layer] = model.constant
            else:
                out[:, layer] = model.predict(_layer_features(cache, layer, self.features_, n_tokens))
        return out

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fitted state as a JSON-serialisable dict (plain lists, floats, ints, strings, None).

        Returns
        -------
        dict
            Restorable with :meth:`from_dict`; predictions of the restored classifier are identical.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the classifier is not fitted.
        """
        self._check_fitted()
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "params": {"C": self.C, "features": self.features, "max_iter": self.max_iter, "seed": self.seed},
            "features": self.features_,
            "n_layers": int(self.n_layers_),
            "n_features": int(self.n_features_),
            "top_k": self.top_k_,
            "vocab_size": self.vocab_size_,
            "n_train_tokens": int(self.n_train_tokens_),
            "layers": [model.to_dict(i + 1) for i, model in enumerate(self._layers)],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ExitClassifier:
        """Restore a fitted classifier from :meth:`to_dict` output.

        Parameters
        ----------
        state : dict
            As returned by :meth:`to_dict` (possibly through ``json.dumps``/``json.loads``).

        Returns
        -------
        ExitClassifier
            Fitted; ``estimators_`` is not restored (predictions use the stored coefficients).

        Raises
        ------
        ValueError
            If ``state`` is not a valid ExitClassifier state (the message names the faulty key).
        TypeError
            If ``state`` is not a dict.
        """
        layers, kwargs, params = _from_dict_iv(state)
        clf = cls(**params)
        clf._set_fitted(layers, **kwargs)
        clf.estimators_ = None
        return clf

    def __repr__(self) -> str:
        head = (
            f"ExitClassifier(C={self.C!r}, features={self.features!r}, max_iter={self.max_iter!r}, "
            f"seed={self.seed!r})"
        )
        if self._layers is None:
            return head
        n_const = sum(m.constant is not None for m in self._layers)
        return (
            f"{head}  # fitted: features={self.features_!r}, n_layers={self.n_layers_}, "
            f"n_features={self.n_features_}, n_train_tokens={self.n_train_tokens_}, constant layers={n_const}"
        )


def _from_dict_iv(state: Any) -> tuple[list[_LayerModel], dict[str, Any], dict[str, Any]]:
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from ExitClassifier.to_dict(), got {type(state).__name__}")

    def need(d: dict, key: str, types: tuple, where: str = "state") -> Any:
        if key not in d:
            raise ValueError(f"{where} has no key {key!r}")
        value = d[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise ValueError(f"{where}[{key!r}] must be of type {tuple(t.__name__ for t in types)}, got {value!r}")
        return value

    if state.get("format") != _FORMAT or state.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"state['format'] and state['format_version'] must be {_FORMAT!r} and {_FORMAT_VERSION}, "
            f"got {state.get('format')!r} and {state.get('format_version')!r}"
        )
    params = need(state, "params", (dict,))
    missing = [key for key in ("C", "features", "max_iter", "seed") if key not in params]
    if missing:
        raise ValueError(f"state['params'] must hold the keys C, features, max_iter and seed; missing {missing}")
    params = {key: params[key] for key in ("C", "features", "max_iter", "seed")}
    features = need(state, "features", (str,))
    if features not in ("hidden", "topk"):
        raise ValueError(f"state['features'] must be 'hidden' or 'topk', got {features!r}")
    n_layers = need(state, "n_layers", (int,))
    n_features = need(state, "n_features", (int,))
    if n_layers < 1 or n_features < 1:
        raise ValueError(f"state['n_layers'] and state['n_features'] must be >= 1, got {n_layers} and {n_features}")
    top_k = state.get("top_k")
    vocab_size = state.get("vocab_size")
    if features == "topk":
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (top_k, vocab_size))
        if not (ints and 1 <= top_k <= vocab_size and vocab_size >= 2):
            raise ValueError(
                "state['top_k'] and state['vocab_size'] must be ints with 1 <= top_k <= vocab_size and vocab_size >= "
                f"2 for features='topk', got {top_k!r:.40}, {vocab_size!r:.40}"
            )
        if n_features != top_k + len(_TOPK_SCALARS):  # the log-probs, then one column per scalar measure
            raise ValueError(
                f"state['n_features'] must be top_k + {len(_TOPK_SCALARS)} = {top_k + len(_TOPK_SCALARS)} for "
                f"features='topk' (the top-k log-probs and {', '.join(_TOPK_SCALARS)}), got {n_features}"
            )
    raw_layers = need(state, "layers", (list,))
    if len(raw_layers) != n_layers - 1:
        raise ValueError(f"state['layers'] must hold n_layers - 1 = {n_layers - 1} entries, got {len(raw_layers)}")
    layers = []
    for i, entry in enumerate(raw_layers):
        where = f"state['layers'][{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
        n_train = need(entry, "n_train", (int,), where)
        n_pos = need(entry, "n_positive", (int,), where)
        if not 0 <= n_pos <= n_train:
            raise ValueError(f"{where}: 0 <= n_positive <= n_train must hold, got {n_pos} and {n_train}")
        constant = entry.get("constant")
        if constant is not None:
            if isinstance(constant, bool) or not isinstance(constant, (int, float)) or not 0.0 <= constant <= 1.0:
                raise ValueError(f"{where}['constant'] must be a probability in [0, 1] or None, got {constant!r}")
            layers.append(_LayerModel(n_train, n_pos, constant=float(constant)))
            continue
        arrays = {}
        for key in ("mean", "scale", "coef"):
            value = need(entry, key, (list,), where)
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):  # not numbers, or beyond the float range
                arr = np.full(len(value), np.nan)  # refused below, naming the key
            if arr.shape != (n_features,) or not np.isfinite(arr).all():
                raise ValueError(f"{where}[{key!r}] must be {n_features} finite numbers, got {value!r:.80}")
            arrays[key] = arr
        intercept = need(entry, "intercept", (int, float), where)
        if not (abs(intercept) <= _FLOAT_MAX):  # NaN, inf, or an int beyond the float range
            raise ValueError(f"{where}['intercept'] must be a finite float, got {intercept!r:.40}")
        _linear_state_iv({**arrays, "intercept": np.array([float(intercept)])}, where)
        layers.append(_LayerModel(n_train, n_pos, intercept=float(intercept), **arrays))
    kwargs = dict(
        features=features,
        n_layers=n_layers,
        n_features=n_features,
        top_k=top_k if features == "topk" else None,
        vocab_size=vocab_size if features == "topk" else None,
        n_train_tokens=need(state, "n_train_tokens", (int,)) if "n_train_tokens" in state else 0,
    )
    return layers, kwargs, params
