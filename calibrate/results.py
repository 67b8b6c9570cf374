"""Every result object the library returns, in one place (as ``scipy.stats`` lists its own in ``_result_classes``).

Each is a frozen dataclass with a readable ``repr``; derived values are methods on it. The classes live
beside the functions that make them and are re-exported here; the five that need torch (the ``[hf]``
extra) load on first use, so ``import calibrate.results`` does not import torch.

- :class:`~calibrate.certificate.Certificate`: the certified value of a knob and the whole tested path;
  from :func:`calibrate.fit`, :func:`calibrate.certify`, :func:`calibrate.fit_decoded`,
  :func:`calibrate.lat.fit` and :func:`calibrate.fff.fit`.
- :class:`~calibrate.losses.LossTable`: losses of shape ``(n, n_lambdas)`` with their grid and average
  layers; from :func:`calibrate.proxy_losses`, :func:`calibrate.user_losses` and :func:`calibrate.decoded_losses`.
- :class:`~calibrate.audit.AuditReport`: held-out risk and layer use against a certificate; from
  :func:`calibrate.audit`, :func:`calibrate.audit_decoded`, :func:`calibrate.lat.audit` and :func:`calibrate.fff.audit`.
- :class:`~calibrate.audit.ValidityReport`: the violation rate over repeated splits; from :func:`calibrate.validity`.
- :class:`~calibrate.runtime.EarlyExitOutput`: tokens and the exit layer of each; from
  :func:`calibrate.runtime.generate`.
- :class:`~calibrate.lat.EliminationOutput`: tokens and the vectors kept per layer; from :func:`calibrate.lat.generate`.
- :class:`~calibrate.lat.ClassificationOutput`: logits and the vectors kept per layer; from
  :func:`calibrate.lat.classify`.
- :class:`~calibrate.lat.FinetuneResult`: the tuned model and its losses; from :func:`calibrate.lat.finetune`.
- :class:`~calibrate.fff.DistillResult`: the model with FFF blocks and their errors; from :func:`calibrate.fff.distill`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from calibrate._extras import lazy_getattr
from calibrate.audit import AuditReport, ValidityReport
from calibrate.certificate import Certificate
from calibrate.losses import LossTable

if TYPE_CHECKING:  # loaded on first use by __getattr__: they import torch
    from calibrate.fff import DistillResult
    from calibrate.lat import ClassificationOutput, EliminationOutput, FinetuneResult
    from calibrate.runtime import EarlyExitOutput

#: The result classes that need torch, by the public module that exports them.
_LAZY = {
    "EarlyExitOutput": "calibrate.runtime",
    "EliminationOutput": "calibrate.lat",
    "ClassificationOutput": "calibrate.lat",
    "FinetuneResult": "calibrate.lat",
    "DistillResult": "calibrate.fff",
}


__getattr__ = lazy_getattr("calibrate.results", _LAZY)


__all__ = [
    "AuditReport",
    "Certificate",
    "ClassificationOutput",
    "DistillResult",
    "EarlyExitOutput",
    "EliminationOutput",
    "FinetuneResult",
    "LossTable",
    "ValidityReport",
]
