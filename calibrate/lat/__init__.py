"""Token elimination (Latency-Adjustable Transformer) with a certified speed-up knob.

- :mod:`calibrate.lat.scores`: contribution scores of word vectors (attention received, value-weighted),
  normalised for causal masks; the original ACC formula is unpublished, these are our definitions.
- :mod:`calibrate.lat.schedule`: :class:`KeepSchedule`, per-layer keep counts from one speed-up knob,
  and the multiply-add cost model behind ``predicted_speedup`` (numpy only).
- :func:`generate`: greedy decoding whose prefill physically removes word vectors layer by layer
  (decoder-only models; needs torch).
- :func:`fit`: certify the speed-up knob in decoded mode (a ``token_keep`` certificate), and
  :func:`heldout_losses` to audit it on held-out prompts (needs torch).
"""

from calibrate.lat.schedule import KeepSchedule, LayerCosts, layer_costs

__all__ = [
    "DEFAULT_SPEEDUPS",
    "LAT_ARCHITECTURES",
    "SCORES",
    "EliminationOutput",
    "KeepSchedule",
    "LayerCosts",
    "attention_received",
    "contribution_scores",
    "fit",
    "generate",
    "heldout_losses",
    "layer_costs",
    "model_id",
    "value_norms",
]

#: Names that need torch, imported on first use (schedules and the cost model do not).
_LAZY = {
    "SCORES": "calibrate.lat.scores",
    "attention_received": "calibrate.lat.scores",
    "contribution_scores": "calibrate.lat.scores",
    "value_norms": "calibrate.lat.scores",
    "LAT_ARCHITECTURES": "calibrate.lat.decode",
    "EliminationOutput": "calibrate.lat.decode",
    "generate": "calibrate.lat.decode",
    "model_id": "calibrate.lat.decode",
    "fit": "calibrate.lat.calibration",
    "heldout_losses": "calibrate.lat.calibration",
    "DEFAULT_SPEEDUPS": "calibrate.lat.calibration",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calibrate.lat' has no attribute {name!r}")
