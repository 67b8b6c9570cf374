"""Confidence measures evaluated inside the decoding loop, on torch tensors (one layer, active rows).

Each measure reproduces the definition used to build the cache and calibrate the certificate:

- ``state_saturation``: ``cos(h_i, h_{i-1})`` of the raw residual stream, 0 at layer 1 and for a zero
  vector (:func:`measures.confidence.state_saturation`); ``O(d)`` per row and layer.
- ``classifier``: the certificate's :class:`~measures.classifier.ExitClassifier` (``features="hidden"``):
  ``sigmoid(w_i . standardise([h_i, saturation_i]) + b_i)``, folded into one affine map per layer;
  ``O(d)`` per row and layer.
- ``softmax_gap`` / ``softmax_max`` / ``entropy``: from the full softmax of the layer's logits through the
  :class:`~calibrate.heads.ExitHeads`, exactly as :mod:`calibrate.extraction` computes them. They cost
  one vocabulary-sized head product per row and layer (for SmolLM2 ~8 decoder layers' worth), which is
  why they rarely pay off (DESIGN section 5); the runtime reuses those logits to emit the token.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["RUNTIME_MEASURES", "RuntimeMeasure", "build_measure"]

#: Measures the runtime can evaluate (names as in ``Certificate.measure``).
RUNTIME_MEASURES: tuple[str, ...] = ("state_saturation", "classifier", "softmax_gap", "softmax_max", "entropy")
_SOFTMAX = ("softmax_gap", "softmax_max", "entropy")


def _saturation(h: torch.Tensor, prev: torch.Tensor, layer: int) -> torch.Tensor:
    """``cos(h, prev)`` per row in float32, ``(n, d) -> (n,)``; 0 at layer 0 and for zero vectors."""
    if layer == 0:
        return torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    a, b = h.float(), prev.float()
    denom = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)  # (n,)
    dot = (a * b).sum(dim=-1)  # (n,)
    return torch.where(denom > 0, dot / torch.where(denom > 0, denom, 1.0), 0.0)


class RuntimeMeasure(ABC):
    """A confidence measure at run time: ``measure(layer, h, prev, logits) -> (n,)`` float32.

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

    @abstractmethod
    def __call__(self, layer: int, h: torch.Tensor, prev: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Confidence of each row at ``layer`` (0-based), shape ``(n,)``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _Saturation(RuntimeMeasure):
    def __init__(self) -> None:
        super().__init__("state_saturation", needs_logits=False)

    def __call__(self, layer, h, prev, logits):
        return _saturation(h, prev, layer)


class _Softmax(RuntimeMeasure):
    def __init__(self, name: str, vocab_size: int) -> None:
        super().__init__(name, needs_logits=True)
        self.log_v = math.log(vocab_size)

    def __call__(self, layer, h, prev, logits):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
        if self.name == "entropy":
            p = logp.exp()
            ent = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)  # (n,) nats
            return (1.0 - ent / self.log_v).clamp(0.0, 1.0)
        top = torch.topk(logp, 2, dim=-1).values.exp()  # (n, 2)
        if self.name == "softmax_max":
            return top[:, 0].clamp(0.0, 1.0)
        return (top[:, 0] - top[:, 1]).clamp(0.0, 1.0)


class _Classifier(RuntimeMeasure):
    """The exit classifier's logistic heads folded into ``sigmoid(h . w_i + sat * u_i + c_i)``."""

    def __init__(self, state: Mapping[str, Any], n_layers: int, hidden_size: int, *, dtype, device) -> None:
        super().__init__("classifier", needs_logits=False)
        from measures.classifier import ExitClassifier

        clf = ExitClassifier.from_dict(dict(state))
        if clf.features_ != "hidden":
            raise ValueError(
                f"the certificate's classifier uses features={clf.features_!r}; the runtime supports only "
                "features='hidden' (hidden state + saturation, O(d) per layer)"
            )
        if clf.n_layers_ != n_layers or clf.n_features_ != hidden_size + 1:
            raise ValueError(
                f"the certificate's classifier was fitted on n_layers={clf.n_layers_}, hidden size "
                f"{clf.n_features_ - 1}; the model has n_layers={n_layers}, hidden size {hidden_size}"
            )
        weights, biases, constants = [], [], []
        for layer in clf.to_dict()["layers"]:  # validated by from_dict
            if layer["constant"] is not None:
                weights.append(torch.zeros(hidden_size + 1, dtype=torch.float64))
                biases.append(0.0)
                constants.append(float(layer["constant"]))
                continue
            mean, scale, coef = (np.asarray(layer[k], dtype=np.float64) for k in ("mean", "scale", "coef"))
            # (x - mean) / scale . coef + b  =  x . (coef / scale) + (b - mean . coef / scale)
            weights.append(torch.as_tensor(coef / scale))
            biases.append(float(layer["intercept"] - (mean * coef / scale).sum()))
            constants.append(math.nan)
        self.weight = torch.stack(weights).to(device=device, dtype=torch.float64)  # (L-1, d+1)
        self.bias = torch.tensor(biases, dtype=torch.float64, device=device)  # (L-1,)
        self.constant = constants  # python floats, nan = fitted layer

    def __call__(self, layer, h, prev, logits):
        if not math.isnan(self.constant[layer]):
            return torch.full((h.shape[0],), self.constant[layer], dtype=torch.float32, device=h.device)
        # The classifier was fitted on the cache's float16 states: round the same way, then score in float64.
        h16 = h.to(torch.float16)  # (n, d)
        sat = _saturation(h16, None if prev is None else prev.to(torch.float16), layer).double()  # (n,)
        w = self.weight[layer]  # (d+1,)
        z = h16.double() @ w[:-1] + sat * w[-1] + self.bias[layer]  # (n,)
        return torch.sigmoid(z).float()


def build_measure(
    name: str, *, state: Mapping[str, Any] | None, n_layers: int, hidden_size: int, vocab_size: int, dtype, device
) -> RuntimeMeasure:
    """The runtime measure ``name`` (validated by the caller against :data:`RUNTIME_MEASURES`)."""
    if name == "state_saturation":
        return _Saturation()
    if name in _SOFTMAX:
        return _Softmax(name, vocab_size)
    if name == "classifier":
        if state is None:
            raise ValueError("the certificate's measure is 'classifier' but it carries no measure_state")
        return _Classifier(state, n_layers, hidden_size, dtype=dtype, device=device)
    raise ValueError(f"measure must be one of {RUNTIME_MEASURES}, got {name!r}")
