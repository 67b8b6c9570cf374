"""calm-calibrate: statistically certified early-exit thresholds.

``calibrate.fit(cache, delta=0.1, epsilon=0.05)`` returns a :class:`Certificate` whose ``lambda_hat``
satisfies ``P(risk(lambda_hat) <= delta) >= 1 - epsilon``. ``delta`` is the tolerance on the
consistency loss and ``epsilon`` the failure probability (CALM's letters; Learn-Then-Test and MAPIE
write alpha for the tolerance and delta for the failure probability).

The core never imports torch (its dependencies: numpy, scipy, pandas, scikit-learn, numba for the exit
sweep, zarr and pyarrow for caches, rapidfuzz and sacrebleu for text metrics); torch will be
needed only to extract caches from a model and to decode.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("calm-calibrate")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from calibrate import _progress as _progress  # first: loads tqdm.auto, without its notebook warning
from calibrate import bounds, fwer
from calibrate._extras import lazy_getattr
from calibrate.audit import AuditReport, ValidityReport, audit, validity
from calibrate.cache import LayerCache, open_cache
from calibrate.certificate import Certificate
from calibrate.concat import concat_caches
from calibrate.crc import conformal_risk_control
from calibrate.exits import Decay, average_layers, default_lambdas, exit_layers, with_decay_headroom
from calibrate.fit import certify, fit
from calibrate.losses import LossTable, proxy_losses, tokenizer_decode, user_losses
from calibrate.synthetic import synthetic_cache

#: Names that need torch (the ``[hf]`` extra), imported on first use (a module maps to itself).
_LAZY = {
    "runtime": "calibrate.runtime",
    "ExitHeads": "calibrate.heads",
    "SUPPORTED_ARCHITECTURES": "calibrate.heads",
    "extract": "calibrate.extraction",
    "read_prompts": "calibrate.extraction",
    "rehead": "calibrate.extraction",
    "fit_decoded": "calibrate.decoded",
    "audit_decoded": "calibrate.decoded",
    "decoded_losses": "calibrate.decoded",
    "decoded_lambdas": "calibrate.decoded",
    "train_adapters": "calibrate.adapters",
    "smollm2": "calibrate.models",
}


__getattr__ = lazy_getattr("calibrate", _LAZY)  # smollm2() itself names [real] for what loading GGUF needs


__all__ = [
    "__version__",
    "AuditReport",
    "Certificate",
    "Decay",
    "ExitHeads",
    "LayerCache",
    "LossTable",
    "SUPPORTED_ARCHITECTURES",
    "ValidityReport",
    "audit",
    "audit_decoded",
    "average_layers",
    "bounds",
    "certify",
    "concat_caches",
    "conformal_risk_control",
    "decoded_lambdas",
    "decoded_losses",
    "default_lambdas",
    "exit_layers",
    "extract",
    "fit",
    "fit_decoded",
    "fwer",
    "open_cache",
    "proxy_losses",
    "read_prompts",
    "rehead",
    "runtime",
    "smollm2",
    "synthetic_cache",
    "tokenizer_decode",
    "train_adapters",
    "user_losses",
    "validity",
    "with_decay_headroom",
]
