"""Text consistency scores between an early-exit output and a target text.

Scores lie in [0, 1] with 1 = identical: ROUGE-L F (summarisation), sentence BLEU
(translation) and SQuAD token F1 (question answering), plus ROUGE-L on token-id sequences.
The losses of DESIGN §7 are built on them: :func:`textual_loss` compares the early output
with the full-model output, :func:`risk_consistency` compares both with a reference.

Convention: ``predictions`` are early outputs; ``references`` are the full-model outputs
(textual consistency) or the gold references (risk consistency).

Calibration scores the same texts for many thresholds, and many thresholds give the same
early output, so :class:`PairScorer` tokenises each distinct text once and scores each
distinct (prediction, reference) pair once, keeping both caches across calls. The
module-level functions build a fresh scorer per call.

The ROUGE-L path reproduces ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])`` (default
tokenizer, no stemmer) float for float: the same tokenisation, the longest common
subsequence computed by ``rapidfuzz`` on integer token ids instead of a Python dynamic
programme, and the same F-measure arithmetic. BLEU reuses sacrebleu's own tokenizer and
``BLEU.compute_bleu``, caching the n-gram counts of each distinct text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from measures._text_metrics import _BACKENDS, _encode_ids, _lcs_f1, _lcs_similarity

__all__ = [
    "METRICS",
    "PairScorer",
    "bleu",
    "consistency_scores",
    "lcs_f1_ids",
    "risk_consistency",
    "rouge_l",
    "rouge_l_ids",
    "textual_loss",
    "token_f1",
]

METRICS: tuple[str, ...] = ("rouge_l", "bleu", "token_f1")
"""Names accepted by ``metric`` arguments."""


# ---------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------


def _texts_iv(texts: Any, name: str) -> list[str]:
    """A sequence of str as a list; TypeError naming `name` otherwise."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"`{name}` must be a sequence of str (one text per example), got a single "
            f"{type(texts).__name__}; wrap it in a list"
        )
    if not isinstance(texts, Iterable):
        raise TypeError(
            f"`{name}` must be a sequence of str, got {type(texts).__name__}"
        )
    if isinstance(texts, (AbstractSet, Mapping)):  # no order (a set) or keys alone (a dict): pairs by position
        raise TypeError(
            f"`{name}` must be a sequence of str (texts are paired by position), got a "
            f"{type(texts).__name__}, which has no such order; pass a list"
        )
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise TypeError(
                f"`{name}` must contain only str, got {type(text).__name__} "
                f"{text!r} at index {i} (missing texts must be filtered out first)"
            )
    return out


def _same_length(**named: list) -> None:
    lengths = {name: len(value) for name, value in named.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"len({name})={n}" for name, n in lengths.items())
        raise ValueError(f"{' and '.join(f'`{n}`' for n in lengths)} must have the same "
                         f"length, got {described}")


def _metric_iv(metric: Any) -> PairScorer:
    """A metric name or a PairScorer, as a PairScorer."""
    if isinstance(metric, PairScorer):
        return metric
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(
                f"`metric` must be one of {sorted(METRICS)} or a PairScorer, got {metric!r}"
            )
        return PairScorer(metric)
    raise TypeError(
        f"`metric` must be one of {sorted(METRICS)} or a PairScorer, got "
        f"{type(metric).__name__}"
    )


def _pair_scorer_iv(metric: Any) -> str:
    if not isinstance(metric, str):
        raise TypeError(f"`metric` must be one of {sorted(METRICS)}, got {type(metric).__name__}")
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {sorted(METRICS)}, got {metric!r}")
    return metric


def _consistency_scores_iv(
    predictions: Any, references: Any, metric: Any
) -> tuple[list[str], list[str], PairScorer]:
    preds = _texts_iv(predictions, "predictions")
    refs = _texts_iv(references, "references")
    _same_length(predictions=preds, references=refs)
    return preds, refs, _metric_iv(metric)


def _textual_loss_iv(early: Any, full: Any, metric: Any) -> tuple[list[str], list[str], PairScorer]:
    early = _texts_iv(early, "early")
    full = _texts_iv(full, "full")
    _same_length(early=early, full=full)
    return early, full, _metric_iv(metric)


def _risk_consistency_iv(
    early: Any, full: Any, references: Any, metric: Any
) -> tuple[list[str], list[str], list[str], PairScorer]:
    early = _texts_iv(early, "early")
    full = _texts_iv(full, "full")
    refs = _texts_iv(references, "references")
    _same_length(early=early, full=full, references=refs)
    return early, full, refs, _metric_iv(metric)


def _ids_iv(ids: Any, name: str) -> np.ndarray:
    """One token-id sequence as a 1-D int64 array."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D sequence of integer token ids, got shape {arr.shape}"
        )
    if arr.dtype.kind not in "iu":
        if arr.size:
            raise TypeError(f"`{name}` must hold integer token ids, got dtype {arr.dtype}")
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"`{name}` holds token ids above the int64 range")
    return arr.astype(np.int64, copy=False)


def _lcs_f1_ids_iv(a_ids: Any, b_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    return _ids_iv(a_ids, "a_ids"), _ids_iv(b_ids, "b_ids")


def _rouge_l_ids_iv(
    predictions_ids: Any, references_ids: Any
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    out = []
    for name, seqs in (("predictions_ids", predictions_ids), ("references_ids", references_ids)):
        if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Iterable):
            raise TypeError(
                f"`{name}` must be a sequence of 1-D integer arrays, got {type(seqs).__name__}"
            )
        out.append([_ids_iv(seq, f"{name}[{i}]") for i, seq in enumerate(seqs)])
    _same_length(predictions_ids=out[0], references_ids=out[1])
    return out[0], out[1]


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


class PairScorer:
    """Score (prediction, reference) text pairs with caches kept across calls.

    Each distinct text is tokenised once and each distinct (prediction, reference) pair is
    scored once for the lifetime of the object, so scoring the same texts for hundreds of
    thresholds costs little more than scoring them once.

    Parameters
    ----------
    metric : {"rouge_l", "bleu", "token_f1"}, default="rouge_l"
        ``"rouge_l"``: ROUGE-L F-measure, equal to
        ``rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score(reference,
        prediction)["rougeL"].fmeasure`` (no stemmer). ``"bleu"``: equal to
        ``sacrebleu.sentence_bleu(prediction, [reference],
        use_effective_order=True).score / 100``, capped at 1.0. ``"token_f1"``: SQuAD v2.0
        token F1.

    Raises
    ------
    TypeError
        If `metric` is not a str.
    ValueError
        If `metric` is not one of the names above.

    See Also
    --------
    consistency_scores : the same scores without keeping the caches.

    Notes
    -----
    The caches grow with the number of distinct texts and pairs seen and are never
    evicted; call :meth:`clear` (or make a new scorer) between unrelated data sets.
    Scores are deterministic functions of the pair: the caches change the cost, never
    the value. Empty cases: ROUGE-L and BLEU give 0.0 when either side has no token
    (including empty-vs-empty, as rouge-score and sacrebleu do); token F1 gives 1.0 when
    both sides normalise to no token and 0.0 when only one does (SQuAD v2.0).

    Examples
    --------
    >>> scorer = PairScorer("rouge_l")
    >>> scorer.score(["The cat sat."], ["the cat sat on the mat"])
    array([0.66666667])
    >>> scorer.score(["The cat sat.", "a dog"], ["the cat sat on the mat"] * 2)
    array([0.66666667, 0.        ])
    >>> scorer.n_texts, scorer.n_pairs
    (3, 2)
    """

    def __init__(self, metric: str = "rouge_l") -> None:
        self._metric = _pair_scorer_iv(metric)
        self._backend = _BACKENDS[self._metric]()
        self._index: dict[str, int] = {}
        self._prepared: list[Any] = []
        self._pairs: dict[tuple[int, int], float] = {}

    @property
    def metric(self) -> str:
        """The metric name."""
        return self._metric

    @property
    def n_texts(self) -> int:
        """Number of distinct texts tokenised so far."""
        return len(self._prepared)

    @property
    def n_pairs(self) -> int:
        """Number of distinct (prediction, reference) pairs scored so far."""
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"PairScorer(metric={self._metric!r}, n_texts={self.n_texts}, n_pairs={self.n_pairs})"

    def clear(self) -> None:
        """Drop every cached text and pair."""
        self._backend = _BACKENDS[self._metric]()
        self._index.clear()
        self._prepared.clear()
        self._pairs.clear()

    def _text_ids(self, texts: list[str]) -> list[int]:
        index, prepared, prepare = self._index, self._prepared, self._backend.prepare
        out = []
        for text in texts:
            i = index.get(text)
            if i is None:
                i = index[text] = len(prepared)
                prepared.append(prepare(text))
            out.append(i)
        return out

    def _score_ids(self, pred_ids: list[int], ref_ids: list[int]) -> np.ndarray:
        pairs, prepared, pair = self._pairs, self._prepared, self._backend.pair
        out = np.empty(len(pred_ids), dtype=np.float64)
        for k, key in enumerate(zip(pred_ids, ref_ids)):
            value = pairs.get(key)
            if value is None:
                value = pairs[key] = pair(prepared[key[0]], prepared[key[1]])
            out[k] = value
        return out

    def _losses(self, predictions: list[str], references: list[str]) -> np.ndarray:
        """1 - score, with 0 wherever the two texts are the same string."""
        pred_ids = self._text_ids(predictions)
        ref_ids = self._text_ids(references)
        loss = 1.0 - self._score_ids(pred_ids, ref_ids)
        loss[np.asarray(pred_ids) == np.asarray(ref_ids)] = 0.0
        return loss

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Score each prediction against the reference at the same index.

        Parameters
        ----------
        predictions : sequence of str, length n
            Early outputs (candidates, hypotheses).
        references : sequence of str, length n
            Full-model outputs or gold references.

        Returns
        -------
        ndarray of float64, shape (n,)
            Scores in [0, 1]; 1 = identical under the metric.

        Raises
        ------
        TypeError
            If either argument is a single string or holds a non-str item (None, NaN).
        ValueError
            If the lengths differ.
        """
        preds, refs, _ = _consistency_scores_iv(predictions, references, self)
        return self._score_ids(self._text_ids(preds), self._text_ids(refs))


def consistency_scores(
    predictions: Sequence[str], references: Sequence[str], *, metric: str | PairScorer = "rouge_l"
) -> np.ndarray:
    """Score each prediction against its reference with a text metric.

    Parameters
    ----------
    predictions : sequence of str, length n
        Early outputs.
    references : sequence of str, length n
        Full-model outputs or gold references.
    metric : {"rouge_l", "bleu", "token_f1"} or PairScorer, default="rouge_l"
        A name builds a fresh :class:`PairScorer`; pass a scorer to reuse its caches.

    Returns
    -------
    ndarray of float64, shape (n,)
        Scores in [0, 1]; each distinct pair is computed once.

    Raises
    ------
    TypeError
        If a text argument is a single string or holds a non-str item, or `metric` has the
        wrong type.
    ValueError
        If the lengths differ or `metric` is an unknown name.

    Examples
    --------
    >>> consistency_scores(["a b c"], ["a b d"], metric="token_f1")
    array([0.5])
    """
    preds, refs, scorer = _consistency_scores_iv(predictions, references, metric)
    return scorer._score_ids(scorer._text_ids(preds), scorer._text_ids(refs))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F-measure of each prediction against its reference.

    Parameters
    ----------
    predictions : sequence of str, length n
        Candidate texts.
    references : sequence of str, length n
        Target texts.

    Returns
    -------
    ndarray of float64, shape (n,)
        F-measures in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`consistency_scores`.

    See Also
    --------
    rouge_l_ids : the same F-measure on token-id sequences.

    Notes
    -----
    Equal float for float to ``RougeScorer(["rougeL"]).score(reference,
    prediction)["rougeL"].fmeasure`` of rouge-score 0.1.2 with its default tokenizer and no
    stemmer: text is lowercased and split into maximal runs of ``[a-z0-9]`` (every other
    character, including accented letters, CJK and emoji, separates tokens); with LCS the
    length of the longest common token subsequence, P = LCS / len(prediction), R = LCS /
    len(reference) and F = 2PR / (P + R). A side with no token scores 0.0, so the
    empty-vs-empty pair scores 0.0 as in rouge-score; :func:`textual_loss` treats identical
    strings separately. F is symmetric in its two arguments.

    References
    ----------
    C.-Y. Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", Text Summarization
    Branches Out, ACL 2004.

    Examples
    --------
    >>> rouge_l(["The cat sat."], ["the cat sat on the mat"])
    array([0.66666667])
    """
    return consistency_scores(predictions, references, metric="rouge_l")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Sentence BLEU / 100 of each prediction against its single reference.

    Parameters
    ----------
    predictions : sequence of str, length n
        Hypotheses.
    references : sequence of str, length n
        One reference per hypothesis.

    Returns
    -------
    ndarray of float64, shape (n,)
        Scores in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`consistency_scores`.

    Notes
    -----
    Equals ``sacrebleu.sentence_bleu(prediction, [reference],
    use_effective_order=True).score / 100`` (13a tokenizer, case-sensitive, exponential
    smoothing, n-gram orders up to 4 stopping at the first order with no hypothesis n-gram),
    except that a perfect match, which sacrebleu scores exp(log 100) = 100.00000000000004,
    is capped at 1.0. An empty side scores 0.0 (empty-vs-empty included).

    References
    ----------
    M. Post, "A Call for Clarity in Reporting BLEU Scores", WMT 2018.

    Examples
    --------
    >>> bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    array([1.])
    """
    return consistency_scores(predictions, references, metric="bleu")


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """SQuAD token F1 of each prediction against its reference.

    Parameters
    ----------
    predictions : sequence of str, length n
        Predicted answers.
    references : sequence of str, length n
        Reference answers.

    Returns
    -------
    ndarray of float64, shape (n,)
        F1 in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`consistency_scores`.

    Notes
    -----
    As the SQuAD v2.0 evaluation script: lowercase, delete ASCII punctuation
    (``string.punctuation``), delete the articles a/an/the, split on whitespace; F1 of the
    two bags of tokens. Both sides empty after normalisation -> 1.0, exactly one empty ->
    0.0 (v2.0 behaviour; the v1.1 script returned 0.0 for both).

    Examples
    --------
    >>> token_f1(["The Eiffel tower", "", "Paris"], ["eiffel tower in Paris", "the", "London"])
    array([0.66666667, 1.        , 0.        ])
    """
    return consistency_scores(predictions, references, metric="token_f1")


def lcs_f1_ids(a_ids: Sequence[int] | np.ndarray, b_ids: Sequence[int] | np.ndarray) -> float:
    """ROUGE-L F-measure of two token-id sequences.

    Parameters
    ----------
    a_ids : 1-D sequence of int
        Prediction token ids.
    b_ids : 1-D sequence of int
        Reference token ids.

    Returns
    -------
    float
        2PR / (P + R) with P = LCS / len(a), R = LCS / len(b); 0.0 when either is empty.

    Raises
    ------
    TypeError
        If the ids are not integers.
    ValueError
        If an argument is not one-dimensional.

    Examples
    --------
    >>> lcs_f1_ids([1, 2, 3, 4], [1, 3, 4])
    0.8571428571428571
    """
    a, b = _lcs_f1_ids_iv(a_ids, b_ids)
    if a.size == 0 or b.size == 0:
        return 0.0
    a_enc, b_enc = _encode_ids([a, b])
    return _lcs_f1(int(_lcs_similarity()(a_enc, b_enc)), a.size, b.size)


def rouge_l_ids(
    predictions_ids: Sequence[Sequence[int] | np.ndarray],
    references_ids: Sequence[Sequence[int] | np.ndarray],
) -> np.ndarray:
    """ROUGE-L F-measure of each token-id sequence against its reference sequence.

    Parameters
    ----------
    predictions_ids : sequence of 1-D int arrays, length n
        Prediction token ids (e.g. slices of a cache's early tokens).
    references_ids : sequence of 1-D int arrays, length n
        Reference token ids.

    Returns
    -------
    ndarray of float64, shape (n,)
        :func:`lcs_f1_ids` of each pair.

    Raises
    ------
    TypeError, ValueError
        As :func:`lcs_f1_ids`, naming the offending item, or if the lengths differ.

    Notes
    -----
    Sequences are compared as given: remove padding and end-of-sequence ids first. On ids
    of the same tokens this is the ROUGE-L of :func:`rouge_l` without text tokenisation.

    Examples
    --------
    >>> rouge_l_ids([[1, 2, 3, 4], []], [[1, 3, 4], [5]])
    array([0.85714286, 0.        ])
    """
    preds, refs = _rouge_l_ids_iv(predictions_ids, references_ids)
    similarity = _lcs_similarity()
    out = np.zeros(len(preds), dtype=np.float64)
    encoded = _encode_ids([*preds, *refs])  # together: equal ids get equal symbols on both sides
    for k, (a, b) in enumerate(zip(encoded[: len(preds)], encoded[len(preds) :])):
        if a and b:
            out[k] = _lcs_f1(int(similarity(a, b)), len(a), len(b))
    return out


def textual_loss(
    early: Sequence[str], full: Sequence[str], *, metric: str | PairScorer = "rouge_l"
) -> np.ndarray:
    """Textual consistency loss 1 - score(early, full), 0 for identical strings.

    Parameters
    ----------
    early : sequence of str, length n
        Early-exit outputs (scored as predictions).
    full : sequence of str, length n
        Full-model outputs (scored as references).
    metric : {"rouge_l", "bleu", "token_f1"} or PairScorer, default="rouge_l"
        Metric name, or a scorer whose caches are reused (e.g. across thresholds).

    Returns
    -------
    ndarray of float64, shape (n,)
        Losses in [0, 1]; 0 = as good as the full model.

    Raises
    ------
    TypeError, ValueError
        As :func:`consistency_scores`, naming `early` / `full`.

    Notes
    -----
    Identical outputs cost nothing: where ``early[i] == full[i]`` the loss is 0.0 even when
    the metric scores the pair below 1 (rouge-score and sacrebleu give 0 to an empty or
    punctuation-only text against itself). Different strings that tokenise alike (``"Hi!"``
    vs ``"hi"`` under ROUGE-L) get whatever the metric says, here 0.0 too.

    Examples
    --------
    >>> textual_loss(["", "the cat", "a dog"], ["", "the cat", "the cat"])
    array([0., 0., 1.])
    """
    early, full, scorer = _textual_loss_iv(early, full, metric)
    return scorer._losses(early, full)


def risk_consistency(
    early: Sequence[str],
    full: Sequence[str],
    references: Sequence[str],
    *,
    metric: str | PairScorer = "rouge_l",
) -> np.ndarray:
    """Risk consistency loss max(0, R(early, ref) - R(full, ref)).

    Parameters
    ----------
    early : sequence of str, length n
        Early-exit outputs.
    full : sequence of str, length n
        Full-model outputs.
    references : sequence of str, length n
        Gold references.
    metric : {"rouge_l", "bleu", "token_f1"} or PairScorer, default="rouge_l"
        Metric name, or a scorer whose caches are reused.

    Returns
    -------
    ndarray of float64, shape (n,)
        Losses in [0, 1]: how much worse than the full model the early output does against
        the reference; 0 where it does as well or better.

    Raises
    ------
    TypeError, ValueError
        As :func:`consistency_scores`; missing references (None, NaN) raise TypeError:
        drop those examples first.

    Notes
    -----
    R(x, ref) = 1 - score(x, ref), computed as in :func:`textual_loss`: an output equal to
    its reference string has R = 0 even when the metric cannot score it (empty or
    punctuation-only texts), so ``early == full`` always gives 0 and an early output that
    misses an exactly reproduced reference is charged in full.

    Examples
    --------
    >>> risk_consistency(["the cat", "the cat sat"], ["the cat sat", "the cat"],
    ...                  ["the cat sat", "the cat sat"])
    array([0.2, 0. ])
    """
    early, full, refs, scorer = _risk_consistency_iv(early, full, references, metric)
    risk_early = scorer._losses(early, refs)
    risk_full = scorer._losses(full, refs)
    return np.maximum(0.0, risk_early - risk_full)
