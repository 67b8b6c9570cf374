"""Per-token confidence measures and consistency metrics.

* :mod:`measures.confidence` -- softmax gap, softmax max, entropy (from logits or stored top-k), state
  saturation, and :func:`confidence` to read or compute any of them from a layer cache;
* :mod:`measures.classifier` -- the learned early-exit classifier (scikit-learn, one logistic head per
  layer);
* :mod:`measures.consistency` -- ROUGE-L, BLEU and token F1 equal to rouge-score, sacrebleu and SQuAD, and
  the textual and risk consistency losses built on them;
* :mod:`measures.oracles` -- oracle exit depths (consistency, likelihood, correctness, smoothed) and the
  oracle's average layers, the lower bound every measure is compared with;
* :mod:`measures.halting` -- the Depth-Adaptive Transformer halting heads (geometric-like, token and
  sequence multinomial) as learned confidence measures.
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
from measures.halting import HALTING_KINDS, HALTING_MEASURES, HaltingHead
from measures.oracles import (
    CONSISTENCY_RULES,
    ORACLES,
    consistency_oracle,
    correctness_oracle,
    likelihood_oracle,
    oracle_average_layers,
    oracle_depths,
    smooth_oracle,
)

__all__ = [
    "CONSISTENCY_RULES",
    "HALTING_KINDS",
    "HALTING_MEASURES",
    "MEASURES",
    "METRICS",
    "ORACLES",
    "ExitClassifier",
    "HaltingHead",
    "PairScorer",
    "agreement",
    "bleu",
    "confidence",
    "consistency_oracle",
    "consistency_scores",
    "correctness_oracle",
    "entropy",
    "from_topk",
    "lcs_f1_ids",
    "likelihood_oracle",
    "oracle_average_layers",
    "oracle_depths",
    "risk_consistency",
    "rouge_l",
    "rouge_l_ids",
    "smooth_oracle",
    "softmax_gap",
    "softmax_max",
    "state_saturation",
    "textual_loss",
    "token_f1",
]
