"""Fast feedforward layers (UltraFastBERT) with a certified evaluation-depth knob.

- :mod:`calibrate.fff.layer`: :class:`FFF`, a binary tree of neurons evaluated along one path per input;
  hard descent (:func:`fff_forward`, vectorised or a compiled CPU kernel), the masked and soft training
  formulations, safetensors persistence.
- :mod:`calibrate.fff.calibration`: certify the evaluation depth (:func:`fit`, knob ``fff_depth``; for
  classifiers, or language models in decoded mode), run a model at it (:func:`apply`, :func:`at_depth`),
  audit it on held-out inputs (:func:`audit`).
- :mod:`calibrate.fff.distill`: replace a language model's MLP blocks by FFFs distilled layer by layer
  (:func:`distill`), and store the blocks beside the original model (:func:`save_blocks`, :func:`load_blocks`).

This package imports torch; ``import calibrate`` does not import it.
"""

from calibrate._extras import require

require("calibrate.fff", "hf", ("torch",))  # transformers only for language models, imported there

from calibrate.fff.calibration import CONSISTENCIES, apply, at_depth, audit, depth_losses, fff_layers, fit, model_id
from calibrate.fff.distill import DistillResult, distill, load_blocks, mlp_activations, save_blocks
from calibrate.fff.layer import ACTIVATIONS, BACKENDS, FFF, fff_forward, fff_reference

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "CONSISTENCIES",
    "DistillResult",
    "FFF",
    "apply",
    "at_depth",
    "audit",
    "depth_losses",
    "distill",
    "fff_forward",
    "fff_layers",
    "fff_reference",
    "fit",
    "load_blocks",
    "mlp_activations",
    "model_id",
    "save_blocks",
]
