"""Early-exit decoding that spends a certificate: :func:`generate` and :func:`custom_generate`.

``calibrate.runtime.generate(model, input_ids, attention_mask, certificate=cert)`` decodes greedily,
each token exiting at the first layer whose confidence passes the certified threshold; without a
certificate it equals ``model.generate(do_sample=False)``. :func:`custom_generate` is the same loop as a
Hugging Face decoding method: ``model.generate(..., custom_generate=custom_generate, certificate=cert)``.

This package imports torch; ``import calibrate`` does not import it.
"""

from calibrate._extras import require

require("calibrate.runtime", "hf")

from calibrate.runtime._layers import RUNTIME_ARCHITECTURES
from calibrate.runtime._measures import RUNTIME_MEASURES
from calibrate.runtime.decode import EarlyExitConfig, EarlyExitOutput, custom_generate, generate

__all__ = [
    "RUNTIME_ARCHITECTURES",
    "RUNTIME_MEASURES",
    "EarlyExitConfig",
    "EarlyExitOutput",
    "custom_generate",
    "generate",
]
