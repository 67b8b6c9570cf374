"""Token elimination (Latency-Adjustable Transformer) with a certified speed-up knob.

- :mod:`calibrate.lat.scores`: contribution scores of word vectors (attention received, value-weighted),
  normalised for causal masks; the original ACC formula is unpublished, these are our definitions.
- :mod:`calibrate.lat.schedule`: :class:`KeepSchedule`, per-layer keep counts from one speed-up knob,
  and the multiply-add cost model behind ``predicted_speedup`` (numpy only).
- :func:`generate`: greedy decoding whose prefill physically removes word vectors layer by layer
  (decoder-only models, and T5's encoder; needs torch).
- :func:`classify`: BERT-family sequence classification with the same elimination in the encoder.
- :func:`finetune`: tune a decoder (low-rank adapters, a speed-up drawn per batch) so that one set of
  weights serves every speed-up (needs torch).
- :func:`fit`: certify the speed-up knob in decoded mode (a ``token_keep`` certificate);
  :func:`audit` (risk at every speed-up, a figure) and :func:`heldout_losses` check it on held-out
  prompts (needs torch).
"""

from calibrate._extras import lazy_getattr
from calibrate.lat.schedule import KeepSchedule, LayerCosts, layer_costs

__all__ = [
    "CLASSIFIER_ARCHITECTURES",
    "CLASSIFIER_CONSISTENCIES",
    "DEFAULT_SPEEDUPS",
    "DEFAULT_TARGETS",
    "FINETUNE_ARCHITECTURES",
    "LAT_ARCHITECTURES",
    "SCORES",
    "ClassificationOutput",
    "EliminationOutput",
    "FinetuneResult",
    "KeepSchedule",
    "LayerCosts",
    "attention_received",
    "audit",
    "classify",
    "contribution_scores",
    "finetune",
    "fit",
    "generate",
    "heldout_losses",
    "layer_costs",
    "model_id",
    "survivors",
    "value_norms",
]

#: Names that need torch, imported on first use (schedules and the cost model do not).
_LAZY = {
    "SCORES": "calibrate.lat.scores",
    "attention_received": "calibrate.lat.scores",
    "contribution_scores": "calibrate.lat.scores",
    "value_norms": "calibrate.lat.scores",
    "survivors": "calibrate.lat.scores",
    "CLASSIFIER_ARCHITECTURES": "calibrate.lat.encoders",
    "ClassificationOutput": "calibrate.lat.classification",
    "classify": "calibrate.lat.classification",
    "LAT_ARCHITECTURES": "calibrate.lat.decode",
    "EliminationOutput": "calibrate.lat.decode",
    "generate": "calibrate.lat.decode",
    "model_id": "calibrate.lat.decode",
    "fit": "calibrate.lat.calibration",
    "finetune": "calibrate.lat.tuning",
    "FinetuneResult": "calibrate.lat.tuning",
    "DEFAULT_TARGETS": "calibrate.lat.tuning",
    "FINETUNE_ARCHITECTURES": "calibrate.lat.tuning",
    "audit": "calibrate.lat.calibration",
    "heldout_losses": "calibrate.lat.calibration",
    "DEFAULT_SPEEDUPS": "calibrate.lat.calibration",
    "CLASSIFIER_CONSISTENCIES": "calibrate.lat.calibration",
}


__getattr__ = lazy_getattr("calibrate.lat", _LAZY, {"calibrate.lat.scores": ("torch",)})
