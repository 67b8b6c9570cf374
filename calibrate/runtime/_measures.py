"""Confidence measures evaluated inside the decoding loop, on torch tensors (one layer, active rows).

Each measure reproduces the definition used to build the cache and calibrate the certificate:

- ``state_saturation``: ``cos(h_i, h_{i-1})`` of the raw residual stream, 0 at layer 1 and for a zero
  vector (:func:`measures.confidence.state_saturation`); ``O(d)`` per row and layer.
- ``classifier``: the certificate's :class:`~measures.classifier.ExitClassifier` (``features="hidden"``):
  ``sigmoid(w_i . standardise([h_i, saturation_i]) + b_i)``, standardised in float32 with the fitted mean
  and scale, then a float64 product with ``w_i``, as :mod:`measures.classifier` computes it (not folded into
  one affine map, which would round otherwise): the cached value to the bit; ``O(d)`` per row and layer.
- ``halting_geometric``: the certificate's geometric :class:`~measures.halting.HaltingHead`,
  ``chi_i = sigmoid(w_i . standardise([h_i, saturation_i]) + b_i)``: the classifier's form, computed the
  same way; ``O(d)`` per row and layer.
- ``halting_token_multinomial``: the token multinomial head: a softmax over depths from each token's
  ``[h_1, saturation_1]`` after layer 1, confidence ``P(depth <= i)``; one ``O(d L)`` product per row
  at layer 1, a lookup at the other layers.
- ``halting_sequence_multinomial``: the sequence multinomial head: one softmax over depths per row from
  the last prompt position's states at every layer (their mean over layers and their saturation at
  layers 2..L), computed once after the prompt pass; a lookup per layer afterwards.
- ``softmax_gap`` / ``softmax_max`` / ``entropy``: from the full softmax of the layer's logits through the
  :class:`~calibrate.heads.ExitHeads`, exactly as :mod:`calibrate.extraction` computes them. They cost
  one vocabulary-sized head product per row and layer (for SmolLM2 ~8 decoder layers' worth), which is
  why they rarely pay off (DESIGN section 5); the runtime reuses those logits to emit the token.

The learned measures were fitted on the cache's float16 states: they round the runtime's states to
float16 the same way and score them in float64.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from calibrate.fit import _FROM_FLOAT16_STATES
from measures.confidence import _SOFTMAX_MEASURES

__all__ = ["RUNTIME_MEASURES", "RuntimeMeasure", "build_measure"]

#: Measures the runtime can evaluate (names as in ``Certificate.measure``).
RUNTIME_MEASURES: tuple[str, ...] = (
    "state_saturation",
    "classifier",
    "halting_geometric",
    "halting_token_multinomial",
    "halting_sequence_multinomial",
    "softmax_gap",
    "softmax_max",
    "entropy",
)


def _saturation(h: torch.Tensor, prev: torch.Tensor, layer: int) -> torch.Tensor:
    """``cos(h, prev)`` per row as float32 in ``[-1, 1]``, ``(n, d) -> (n,)``; 0 at layer 0 and for zero vectors.

    The arithmetic of :func:`measures.confidence.state_saturation`, so that the runtime exits where the
    cache says: float64 dot and norms (float64 states first divided by their largest absolute entry),
    rounded to float32, clipped.
    """
    if layer == 0:
        return torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    a, b = h.double(), prev.double()
    if h.dtype == torch.float64:
        a = a / torch.where((m := a.abs().amax(dim=-1, keepdim=True)) > 0, m, 1.0)
        b = b / torch.where((m := b.abs().amax(dim=-1, keepdim=True)) > 0, m, 1.0)
    denom = (a * a).sum(dim=-1).sqrt() * (b * b).sum(dim=-1).sqrt()  # (n,)
    dot = (a * b).sum(dim=-1)  # (n,)
    cos = torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0)
    return cos.float().clamp(-1.0, 1.0)


def _token_features(h: torch.Tensor, prev: torch.Tensor, layer: int) -> torch.Tensor:
    """The token-level learned measures' features ``[h_i, cos(h_i, h_{i-1})]``, ``(n, d) -> (n, d + 1)``.

    The states are rounded to float16 as the cache stores them; the result is float32, as
    ``measures.classifier`` builds them.
    """
    h16 = h.to(torch.float16)  # (n, d)
    sat = _saturation(h16, prev.to(torch.float16), layer)  # (n,)
    return _unscorable_as_nan(torch.cat([h16.float(), sat[:, None]], dim=1))


def _unscorable_as_nan(features: torch.Tensor) -> torch.Tensor:
    """Rows ``(n, p)`` holding a state beyond float16's range (inf there; no cache holds one) as NaN features: their
    confidence is NaN, which passes no threshold, so they run on (a logit of inf was a confidence of 1)."""
    return torch.where(torch.isfinite(features).all(dim=1, keepdim=True), features, torch.nan)


def _sequence_features(states: torch.Tensor) -> torch.Tensor:
    """The sequence head's features, ``(B, L, d) -> (B, d + L - 1)`` float32 (``measures.halting``).

    ``states`` are the last prompt position's outputs of layers ``1..L``; rounded to float16 as in the
    cache, then their mean over layers (in float64, rounded to float32) and their saturation
    ``cos(h_i, h_{i-1})``, ``i = 2..L``.
    """
    s16 = states.to(torch.float16)  # (B, L, d)
    saturation = [_saturation(s16[:, i], s16[:, i - 1], i) for i in range(1, s16.shape[1])]  # L - 1 of (B,)
    return _unscorable_as_nan(torch.cat([s16.double().mean(dim=1).float(), *(s[:, None] for s in saturation)], dim=1))


class _Linear:
    """A standardised linear model ``((x - mean) / scale) @ coef + intercept`` of a learned measure's state.

    ``model`` holds ``mean``, ``scale`` ``(p,)``, ``coef`` ``(p,)`` or ``(p, m)`` and ``intercept`` (a
    number or ``(m,)``), as the learned measures' JSON states write them. Calling it maps float32
    features ``(n, p)`` to float64 logits ``(n, m)`` with the arithmetic of ``measures.classifier``:
    standardised in float32, then a float64 product.
    """

    def __init__(self, model: Mapping[str, Any], device) -> None:
        mean = np.asarray(model["mean"], dtype=np.float64)
        self.mean = torch.as_tensor(mean.astype(np.float32), device=device)  # (p,)
        self.scale = torch.as_tensor(np.asarray(model["scale"], dtype=np.float32), device=device)  # (p,)
        self.coef = torch.as_tensor(np.asarray(model["coef"], dtype=np.float64).reshape(mean.size, -1), device=device)
        self.intercept = torch.as_tensor(np.asarray(model["intercept"], dtype=np.float64).reshape(-1), device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale).double() @ self.coef + self.intercept


class RuntimeMeasure(ABC):
    """A confidence measure at run time: ``measure(layer, h, prev, logits, rows) -> (m,)`` float32.

    The decoding loop calls :meth:`prefill` once, after the prompt pass, then the measure at every layer
    ``i < L - 1`` for the rows still active; at each step every row is scored at layer 0 before any later
    layer. A measure may keep per-row state between those calls (the multinomial halting heads do), so an
    instance serves one decoding run at a time.

    Attributes
    ----------
    name : str
        One of :data:`RUNTIME_MEASURES`.
    needs_logits : bool
        Whether the measure reads the layer's logits (the caller computes them through the heads).
    """

    def __init__(self, name: str, needs_logits: bool) -> None:
        self.name = name
        self.needs_logits = needs_logits

    def prefill(self, states: torch.Tensor) -> None:
        """Start a run; ``states`` ``(B, L, d)`` are the last prompt position's outputs of every layer.

        For an encoder-decoder model, those of the decoder's start token. Default: nothing to prepare.
        """

    @abstractmethod
    def __call__(
        self, layer: int, h: torch.Tensor, prev: torch.Tensor, logits: torch.Tensor | None, rows: torch.Tensor
    ) -> torch.Tensor:
        """Confidence of each row at ``layer`` (0-based), shape ``(m,)``.

        Parameters
        ----------
        layer : int
            0-based layer index, ``< L - 1``.
        h, prev : torch.Tensor, shape (m, d)
            The rows' outputs of layer ``layer`` and of the layer before (its input).
        logits : torch.Tensor of shape (m, V), or None
            The layer's logits through the exit heads when :attr:`needs_logits`, else None.
        rows : torch.LongTensor, shape (m,)
            The rows' indices in the batch (those of :meth:`prefill`'s ``states``).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _Saturation(RuntimeMeasure):
    """``float16``: computed on the states rounded to float16, as a certificate calibrated on a cache's stored
    states (``measure_state={"from_hidden": "float16"}``) computed it."""

    def __init__(self, float16: bool = False) -> None:
        super().__init__("state_saturation", needs_logits=False)
        self.float16 = float16

    def __call__(self, layer, h, prev, logits, rows):
        if self.float16:
            return _saturation(h.to(torch.float16), prev.to(torch.float16), layer)
        return _saturation(h, prev, layer)


class _Softmax(RuntimeMeasure):
    def __init__(self, name: str, vocab_size: int) -> None:
        super().__init__(name, needs_logits=True)
        self.log_v = math.log(vocab_size)

    def __call__(self, layer, h, prev, logits, rows):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
        if self.name == "entropy":
            p = logp.exp()
            ent = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)  # (n,) nats
            return (1.0 - ent / self.log_v).clamp(0.0, 1.0)
        top = torch.topk(logp, 2, dim=-1).values.exp()  # (n, 2)
        if self.name == "softmax_max":
            return top[:, 0].clamp(0.0, 1.0)
        return (top[:, 0] - top[:, 1]).clamp(0.0, 1.0)


class _LogisticLayers(RuntimeMeasure):
    """One logistic head per layer ``i < L`` on ``[h_i, saturation_i]``: ``sigmoid(x . w_i + c_i)``.

    The exit classifier and the geometric halting head. ``layers[i]`` is a fitted model (a mapping, see
    :class:`_Linear`) or a constant probability (a layer whose training labels were all alike).
    """

    def __init__(self, name: str, layers: Sequence[Mapping[str, Any] | float], device) -> None:
        super().__init__(name, needs_logits=False)
        self.layers = [_Linear(layer, device) if isinstance(layer, Mapping) else float(layer) for layer in layers]

    def __call__(self, layer, h, prev, logits, rows):
        model = self.layers[layer]
        if isinstance(model, float):  # a constant, but NaN where the features are (_unscorable_as_nan), as fitted
            unscorable = torch.isnan(_token_features(h, prev, layer)[:, 0])  # (m,)
            return torch.where(unscorable, torch.nan, model).float()
        return torch.sigmoid(model(_token_features(h, prev, layer))[:, 0]).float()  # (m,)


class _DepthCDF(RuntimeMeasure):
    """A multinomial halting head: a softmax over depths per row, confidence ``P(depth <= i)``.

    ``per="token"``: each token's distribution is computed from its layer-1 features when layer 0 scores
    it. ``per="sequence"``: each row's distribution is computed once by :meth:`prefill` from the last
    prompt position's states and holds for every token of the row.
    """

    def __init__(
        self, name: str, model: Mapping[str, Any], classes: Sequence[int], n_layers: int, *, per: str, device
    ) -> None:
        super().__init__(name, needs_logits=False)
        self.linear = _Linear(model, device)  # (p,) features -> (m,) logits
        self.classes = torch.as_tensor([c - 1 for c in classes], dtype=torch.long, device=device)  # (m,) 0-based
        self.n_layers, self.per = n_layers, per
        self._cdf: torch.Tensor | None = None  # (B, L) float32, set by prefill

    def _depth_cdf(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, p)`` float32 features -> ``(n, L)`` float32 ``P(depth <= i)``, 1 at layer ``L``."""
        probs = x.new_zeros((x.shape[0], self.n_layers), dtype=torch.float64)  # (n, L)
        probs[:, self.classes] = torch.softmax(self.linear(x), dim=1)
        cdf = probs.cumsum(dim=1)
        cdf[:, -1] = 1.0
        return cdf.clamp(0.0, 1.0).float()

    def prefill(self, states):
        if self.per == "sequence":
            self._cdf = self._depth_cdf(_sequence_features(states))
        else:
            self._cdf = torch.zeros((states.shape[0], self.n_layers), dtype=torch.float32, device=states.device)

    def __call__(self, layer, h, prev, logits, rows):
        if self.per == "token" and layer == 0:  # every row of a step is scored at layer 0 first
            self._cdf[rows] = self._depth_cdf(_token_features(h, prev, 0))
        return self._cdf[rows, layer]


def _fitted_iv(name: str, n_layers_fit: int, hidden_fit: int, n_layers: int, hidden_size: int) -> None:
    if (n_layers_fit, hidden_fit) != (n_layers, hidden_size):
        raise ValueError(
            f"the certificate's {name} measure was fitted on n_layers={n_layers_fit}, hidden size {hidden_fit}; "
            f"the model has n_layers={n_layers}, hidden size {hidden_size}"
        )


def _classifier_features_iv(features: Any) -> None:
    """Refuse a classifier on other features than the hidden states the runtime has at each layer."""
    if features != "hidden":
        raise ValueError(
            f"the certificate's classifier uses features={features!r}; the runtime supports only "
            "features='hidden' (hidden state + saturation, O(d) per layer): fit it with features='hidden' on a "
            "cache extracted with store_hidden=True (the default there, unless measure_options={'features': "
            "'topk'} asked otherwise)"
        )


def _learned(name: str, state: Mapping[str, Any] | None, n_layers: int, hidden_size: int, device) -> RuntimeMeasure:
    """The learned measure ``name`` rebuilt from the certificate's ``measure_state`` and checked against the model."""
    from measures.learned import measure_from_state

    if state is None:
        raise ValueError(f"the certificate's measure is {name!r} but it carries no measure_state")
    try:
        learned = measure_from_state(name, state)
    except (TypeError, ValueError) as err:
        raise type(err)(f"certificate.measure_state is not a valid {name!r} state: {err}") from err
    if name == "classifier":
        _classifier_features_iv(learned.features_)
        _fitted_iv(name, learned.n_layers_, learned.n_features_ - 1, n_layers, hidden_size)
        layers = [layer if layer["constant"] is None else layer["constant"] for layer in learned.to_dict()["layers"]]
        return _LogisticLayers(name, layers, device)
    sequence = name == "halting_sequence_multinomial"
    hidden_fit = learned.n_features_ - (learned.n_layers_ - 1 if sequence else 1)  # d + L - 1, or d + 1
    _fitted_iv(name, learned.n_layers_, hidden_fit, n_layers, hidden_size)
    models = learned.to_dict()["models"]  # validated by from_dict
    if name == "halting_geometric":
        return _LogisticLayers(name, models, device)
    per = "sequence" if sequence else "token"
    return _DepthCDF(name, models[0], learned.classes_, n_layers, per=per, device=device)


def build_measure(
    name: str, *, state: Mapping[str, Any] | None, n_layers: int, hidden_size: int, vocab_size: int, device
) -> RuntimeMeasure:
    """The runtime measure ``name``.

    Parameters
    ----------
    name : str
        One of :data:`RUNTIME_MEASURES`.
    state : dict or None
        The certificate's ``measure_state``: the learned measures' JSON state, None for the others.
    n_layers, hidden_size, vocab_size : int
        The model's decoder layers ``L``, width ``d`` and the exit heads' vocabulary size ``V``.
    device : torch.device
        Where the model runs.

    Returns
    -------
    RuntimeMeasure

    Raises
    ------
    ValueError
        When ``name`` is unknown, or a learned measure's ``state`` is missing, invalid (the message says
        why), of another measure, or fitted on another layer count or hidden size than the model's.
    TypeError
        When a learned measure's ``state`` has entries of the wrong type.
    """
    if name == "state_saturation":
        return _Saturation(float16=dict(state or {}) == _FROM_FLOAT16_STATES)
    if name in _SOFTMAX_MEASURES:
        return _Softmax(name, vocab_size)
    if name in RUNTIME_MEASURES:
        return _learned(name, state, n_layers, hidden_size, device)
    raise ValueError(f"measure must be one of {RUNTIME_MEASURES}, got {name!r}")
