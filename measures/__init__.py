"""Per-token confidence measures and consistency metrics.

* :mod:`measures.confidence` -- softmax gap, softmax max, entropy (from logits or stored top-k), state
  saturation, and :func:`confidence` to read or compute any of them from a layer cache;
* :mod:`measures.classifier` -- the learned early-exit classifier (scikit-learn, one logistic head per
  layer);
* :mod:`measures.consistency` -- ROUGE-L, BLEU and token F1 equal to rouge-score, sacrebleu and SQuAD, and
  the textual and risk consistency losses built on them.
"""

from measures.classifier import ExitClassifier, agreement
from measures.confidence import MEASURES, confidence, entropy, from_topk, softmax_gap, softmax_max, state_saturation
from measures.consistency import (
    METRICS,
    PairScorer,
    bleu,
    consistency_scores,
    lcs_f1_ids,
    risk_consistency,
    rouge_l,
    rouge_l_ids,
    textual_loss,
    token_f1,
)

__all__ = [
    "MEASURES",
    "METRICS",
    "ExitClassifier",
    "PairScorer",
    "agreement",
    "bleu",
    "confidence",
    "consistency_scores",
    "entropy",
    "from_topk",
    "lcs_f1_ids",
    "risk_consistency",
    "rouge_l",
    "rouge_l_ids",
    "softmax_gap",
    "softmax_max",
    "state_saturation",
    "textual_loss",
    "token_f1",
]
