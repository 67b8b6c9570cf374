"""Metric back ends of :mod:`measures.consistency`: ROUGE-L, BLEU and token F1 per text and per pair.

Also the LCS helpers of ROUGE-L on token ids; the heavy dependencies (rapidfuzz, sacrebleu) load on first use.
"""

from __future__ import annotations

import importlib
import re
import string
from collections import Counter
from typing import Any

import numpy as np

# rouge-score 0.1.2 `tokenize.tokenize` (no stemmer): lowercase, replace every run of
# characters outside [a-z0-9] by a space, split, drop empty tokens. Lowercasing first and
# then keeping the maximal [a-z0-9] runs yields exactly the same tokens.
_ROUGE_TOKEN_RE = re.compile(r"[a-z0-9]+")
_ROUGE_BYTE_TABLE = bytes(c if chr(c) in "abcdefghijklmnopqrstuvwxyz0123456789" else 32 for c in range(256))
# SQuAD v2.0 evaluation script `normalize_answer`.
_SQUAD_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_SQUAD_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
# Token ids are packed into str code points (LCS on str is the fastest rapidfuzz path).
_MAX_CODEPOINT = 0x10FFFF
_BLEU_MAX_ORDER = 4


def _lcs_similarity() -> Any:
    """rapidfuzz's LCS length, ``similarity(a, b) -> int`` on str or hashable sequences (imported when first
    needed: it and sacrebleu are dependencies, loaded only by the text metrics)."""
    return importlib.import_module("rapidfuzz.distance.LCSseq").similarity


def _lcs_f1(lcs: int, n_prediction: int, n_reference: int) -> float:
    """rouge-score's `_score_lcs` F-measure, with its arithmetic in its order."""
    if n_prediction == 0 or n_reference == 0:
        return 0.0
    precision = lcs / n_prediction
    recall = lcs / n_reference
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _encode_ids(seqs: list[np.ndarray]) -> list[str | tuple[int, ...]]:
    """Pack 1-D int64 arrays into strs with one code point per id, equal ids to equal code points.

    Ids outside ``[0, 0x10FFFF]`` are first replaced by their rank among the distinct ids of all of
    ``seqs`` (so only sequences encoded together compare); past 0x110000 distinct ids the ranks go into
    tuples (ints below ``2**61`` hash without collisions, which rapidfuzz relies on). All sequences are
    packed with one concatenation and one decode, then sliced.
    """
    if not seqs:
        return []
    flat = np.concatenate(seqs)
    if flat.size and (flat.min() < 0 or flat.max() > _MAX_CODEPOINT):
        flat = np.unique(flat, return_inverse=True)[1].reshape(-1)
    ends = np.cumsum([seq.size for seq in seqs]).tolist()
    bounds = list(zip([0, *ends[:-1]], ends))
    if flat.size and flat.max() > _MAX_CODEPOINT:
        return [tuple(flat[start:end].tolist()) for start, end in bounds]
    packed = flat.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
    return [packed[start:end] for start, end in bounds]


# ---------------------------------------------------------------------------------------
# Metric back ends: `prepare` runs once per distinct text, `pair` once per distinct pair.
# ---------------------------------------------------------------------------------------


class _RougeL:
    """ROUGE-L F on rouge-score's default tokens (as bytes), LCS by rapidfuzz on token lists."""

    def __init__(self) -> None:
        self._similarity = _lcs_similarity()

    def prepare(self, text: str) -> list[bytes]:
        text = text.lower()
        if text.isascii():  # one C-level pass: every byte outside [a-z0-9] becomes a space
            return text.encode("ascii").translate(_ROUGE_BYTE_TABLE).split()
        return [tok.encode("ascii") for tok in _ROUGE_TOKEN_RE.findall(text)]

    def pair(self, prediction: list[bytes], reference: list[bytes]) -> float:
        if not prediction or not reference:
            return 0.0
        lcs = int(self._similarity(prediction, reference))
        return _lcs_f1(lcs, len(prediction), len(reference))


class _Bleu:
    """sacrebleu sentence BLEU (13a tokenizer, exp smoothing, effective order) / 100."""

    def __init__(self) -> None:
        sacrebleu_bleu = importlib.import_module("sacrebleu.metrics.bleu")
        helpers = importlib.import_module("sacrebleu.metrics.helpers")
        # The same settings as sacrebleu.sentence_bleu(..., use_effective_order=True).
        self._metric = sacrebleu_bleu.BLEU(effective_order=True)
        self._ngrams = helpers.extract_all_word_ngrams

    def prepare(self, text: str) -> tuple[Counter, int]:
        # BLEU._preprocess_segment without lowercasing: tokenizer(sent.rstrip()).
        tokenized = self._metric.tokenizer(text.rstrip())
        return self._ngrams(tokenized, 1, _BLEU_MAX_ORDER)

    def pair(self, prediction: tuple[Counter, int], reference: tuple[Counter, int]) -> float:
        hyp_ngrams, hyp_len = prediction
        ref_ngrams, ref_len = reference
        # BLEU._compute_segment_statistics for a single reference.
        correct = [0] * _BLEU_MAX_ORDER
        total = [0] * _BLEU_MAX_ORDER
        for ngram, count in hyp_ngrams.items():
            n = len(ngram) - 1
            total[n] += count
            if ngram in ref_ngrams:
                correct[n] += min(count, ref_ngrams[ngram])
        metric = self._metric
        result = metric.compute_bleu(
            correct=correct,
            total=total,
            sys_len=hyp_len,
            ref_len=ref_len,
            smooth_method=metric.smooth_method,
            smooth_value=metric.smooth_value,
            effective_order=metric.effective_order,
            max_ngram_order=metric.max_ngram_order,
        )
        # exp(log(100)) = 100.00000000000004: clip the rounding excess of a perfect match.
        return min(result.score / 100, 1.0)


class _TokenF1:
    """SQuAD v2.0 `compute_f1` on `normalize_answer` tokens."""

    def prepare(self, text: str) -> tuple[Counter, int]:
        tokens = _SQUAD_ARTICLES_RE.sub(" ", text.lower().translate(_SQUAD_PUNCT_TABLE)).split()
        return Counter(tokens), len(tokens)

    def pair(self, prediction: tuple[Counter, int], reference: tuple[Counter, int]) -> float:
        pred_counts, n_pred = prediction
        ref_counts, n_ref = reference
        if n_pred == 0 or n_ref == 0:
            return float(n_pred == n_ref)
        num_same = sum((pred_counts & ref_counts).values())
        if num_same == 0:
            return 0.0
        precision = 1.0 * num_same / n_pred
        recall = 1.0 * num_same / n_ref
        return (2 * precision * recall) / (precision + recall)


_BACKENDS = {"rouge_l": _RougeL, "bleu": _Bleu, "token_f1": _TokenF1}
