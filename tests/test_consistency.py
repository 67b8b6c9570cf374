"""Tests for measures.consistency against rouge-score, sacrebleu and the SQuAD v2.0 script."""

from __future__ import annotations

import collections
import functools
import re
import string
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from measures import _text_metrics
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

DATA = Path(__file__).parent / "data" / "sentences.tsv"
COLUMNS = ["id", "kind", "package", "description_md5", "prediction", "reference"]

# Hand-written edge cases: (prediction, reference).
EDGE_CASES = [
    ("", ""),
    ("", "The cat sat on the mat."),
    ("The cat sat on the mat.", ""),
    ("!!!", "?"),
    ("...", "..."),
    ("   ", "\t\n"),
    ("Hello, World!", "hello world"),
    ("HELLO world", "hello World"),
    ("hello world", "Hello world ."),
    ("the the the", "the"),
    ("a b c d e f", "f e d c b a"),
    ("café au lait", "cafe au lait"),
    ("Crème brûlée à la française", "creme brulee a la francaise"),
    ("Straße in München", "strasse in munchen"),
    ("İstanbul is big", "istanbul is big"),  # 'İ'.lower() is 'i' + U+0307
    ("\u212a is the Kelvin sign", "k is the kelvin sign"),  # KELVIN SIGN lowers to 'k'
    ("ＡＢＣ full width", "abc full width"),
    ("ﬁnal ligature", "final ligature"),
    ("我喜欢猫", "我喜欢狗"),
    ("我喜欢猫 and cats", "我 喜欢 狗 and cats"),
    ("東京 2020 olympics", "tokyo 2020 olympics"),
    ("I ❤️ NY 🗽", "i love ny"),
    ("🙂🙂🙂", "🙂🙂🙂"),
    ("emoji👍inside words", "emoji inside words"),
    ("Ελληνικά και English", "ελληνικά και english"),
    ("مرحبا بالعالم hello", "hello"),
    ("zero\u200bwidth space", "zerowidth space"),
    ("non\u00a0breaking space", "non breaking space"),
    ("version 2.0.1-rc1", "version 2 0 1 rc1"),
    ("e-mail: foo@example.org", "email foo example org"),
    ("It's a \"quoted\" word — really", "It’s a “quoted” word - really"),
    ("AT&amp;T &lt;tag&gt;", "AT&T <tag>"),
    ("tokenized period .", "tokenized period."),
    ("trailing spaces   ", "trailing spaces"),
    ("x", "x"),
    ("x", "y"),
    ("1 2 3 4 5 6 7 8 9 10", "1 2 3 4 5 6 7 8 9 10 11"),
    ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."),
]


def _load_pairs() -> dict[str, list[tuple[str, str]]]:
    """sentences.tsv grouped by pair kind (no quoting: fields never hold tabs or newlines)."""
    lines = DATA.read_text(encoding="utf-8").split("\n")
    assert lines[0].split("\t") == COLUMNS
    groups: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for line in lines[1:]:
        if line:
            _, kind, _, _, prediction, reference = line.split("\t")
            groups[kind].append((prediction, reference))
    return dict(groups)


PAIRS = _load_pairs()
PAIRS["edge_cases"] = EDGE_CASES
KINDS = sorted(PAIRS)
ALL_PAIRS = [pair for kind in KINDS for pair in PAIRS[kind]]


# ---------------------------------------------------------------------------------------
# References (upstream packages; the SQuAD v2.0 script is re-derived inline).
# ---------------------------------------------------------------------------------------


@functools.cache
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"])


@functools.cache
def _reference_rouge_l_pair(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


@functools.cache
def _reference_bleu_pair(prediction: str, reference: str) -> float:
    return sacrebleu.sentence_bleu(prediction, [reference], use_effective_order=True).score / 100


def _reference_rouge_l(predictions, references) -> np.ndarray:
    return np.array([_reference_rouge_l_pair(p, r) for p, r in zip(predictions, references)], float)


def _reference_bleu(predictions, references) -> np.ndarray:
    return np.array([_reference_bleu_pair(p, r) for p, r in zip(predictions, references)], float)


def _squad_normalize_answer(s: str) -> str:
    # SQuAD v2.0 official evaluate-v2.0.py, normalize_answer.
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _squad_compute_f1(a_gold: str, a_pred: str) -> float:
    # SQuAD v2.0 official evaluate-v2.0.py, get_tokens + compute_f1.
    gold_toks = _squad_normalize_answer(a_gold).split() if a_gold else []
    pred_toks = _squad_normalize_answer(a_pred).split() if a_pred else []
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def _reference_token_f1(predictions, references) -> np.ndarray:
    return np.array([_squad_compute_f1(r, p) for p, r in zip(predictions, references)], float)


def _reference(metric: str, predictions, references) -> np.ndarray:
    if metric == "rouge_l":
        return _reference_rouge_l(predictions, references)
    if metric == "bleu":
        # sacrebleu scores a perfect match exp(log 100) = 100.00000000000004: capped at 1.
        return np.minimum(_reference_bleu(predictions, references), 1.0)
    return _reference_token_f1(predictions, references)


FUNCTIONS = {"rouge_l": rouge_l, "bleu": bleu, "token_f1": token_f1}


def _score(api: str, metric: str, predictions, references) -> np.ndarray:
    if api == "function":
        return FUNCTIONS[metric](predictions, references)
    if api == "consistency_scores":
        return consistency_scores(predictions, references, metric=metric)
    # Stateful API: score twice with one scorer, the second call served from the caches.
    scorer = PairScorer(metric)
    first = scorer.score(predictions, references)
    second = scorer.score(list(predictions), list(references))
    np.testing.assert_array_equal(first, second)
    return second


# ---------------------------------------------------------------------------------------
# Equality with the upstream packages on real text and edge cases.
# ---------------------------------------------------------------------------------------


def test_data_file_is_small_and_well_formed():
    assert DATA.stat().st_size < 200_000
    n_real = sum(len(v) for k, v in PAIRS.items() if k != "edge_cases")
    assert n_real >= 300
    assert {"identical", "perturbed", "same_description", "summary", "unicode_folded"} <= set(PAIRS)
    assert any(ord(c) > 127 for p, r in PAIRS["unicode_folded"] for c in p + r)


def test_rouge_tokenizer_matches_rouge_score():
    texts = {t for pair in ALL_PAIRS for t in pair}
    for text in texts:
        expected = rouge_tokenize.tokenize(text, None)
        assert _text_metrics._ROUGE_TOKEN_RE.findall(text.lower()) == expected, text


@pytest.mark.parametrize("api", ["function", "consistency_scores", "pair_scorer"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", KINDS)
def test_equals_reference(kind, metric, api):
    predictions, references = map(list, zip(*PAIRS[kind]))
    for preds, refs in ((predictions, references), (references, predictions)):
        actual = _score(api, metric, preds, refs)
        assert actual.dtype == np.float64 and actual.shape == (len(preds),)
        np.testing.assert_array_equal(actual, _reference(metric, preds, refs))
        assert np.all((actual >= 0) & (actual <= 1))


def test_reference_wrappers_are_not_vacuous():
    predictions, references = map(list, zip(*ALL_PAIRS))
    for metric in METRICS:
        scores = _reference(metric, predictions, references)
        assert 0 < np.mean(scores == 1.0) < 0.5
        assert np.mean((scores > 0) & (scores < 1)) > 0.4, metric


def test_bleu_cap_only_removes_rounding_excess():
    predictions, references = map(list, zip(*ALL_PAIRS))
    raw = _reference_bleu(predictions, references)
    ours = bleu(predictions, references)
    differ = ours != raw
    assert differ.any()  # identical pairs score 100.00000000000004 in sacrebleu
    np.testing.assert_array_equal(ours[differ], 1.0)
    assert np.all(raw[differ] - 1.0 <= 4 * np.finfo(float).eps)


@settings(max_examples=150, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("abcAB 01.,!éİ\u212a我🙂 \t-'")), max_size=30),
    st.text(alphabet=st.sampled_from(list("abcAB 01.,!éİ\u212a我🙂 \t-'")), max_size=30),
)
def test_random_text_equals_reference(prediction, reference):
    for metric in METRICS:
        np.testing.assert_array_equal(
            consistency_scores([prediction], [reference], metric=metric),
            _reference(metric, [prediction], [reference]),
        )


def test_rouge_l_ascii_fast_path_agrees_with_unicode_path():
    # ASCII texts are tokenised with bytes.translate, others with the regex: tokens must match
    # across the two paths (the Kelvin sign and dotted capital I lowercase to ASCII letters).
    predictions = ["The cat sat é", "\u212aing of the hill", "The cat, sat!", "İstanbul tonight", "naïve café"]
    references = ["the cat sat", "king of the hill", "the cat sat é", "i̇stanbul tonight", "naive cafe"]
    scorer = PairScorer("rouge_l")
    np.testing.assert_array_equal(scorer.score(predictions, references), _reference_rouge_l(predictions, references))
    assert scorer.score(["KING"], ["\u212aing"])[0] == 1.0


# ---------------------------------------------------------------------------------------
# Token ids.
# ---------------------------------------------------------------------------------------


def _reference_lcs_f1_ids(a, b) -> float:
    return rouge_scorer._score_lcs(list(b), list(a)).fmeasure


def test_lcs_f1_ids_hand_worked():
    # LCS([1,2,3,4], [1,3,4]) = 3; P = 3/4, R = 1, F = 2 * 0.75 / 1.75.
    assert lcs_f1_ids([1, 2, 3, 4], [1, 3, 4]) == 2 * 0.75 * 1.0 / 1.75
    assert lcs_f1_ids(np.array([5, 5, 5]), np.array([5])) == 2 * (1 / 3) * 1.0 / (1 / 3 + 1)
    assert lcs_f1_ids([7], [8]) == 0.0
    assert lcs_f1_ids([], []) == 0.0
    assert lcs_f1_ids([1, 2], []) == 0.0


def test_rouge_l_ids_equals_reference_on_random_ids():
    rng = np.random.default_rng(20250107)
    # Code-point edges, the surrogate block, values past 0x10FFFF and negatives.
    surrogates = np.array([0, 0xD7FF, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000, 0x10FFFF])
    # 2**61 - 1 and 0 (and 2**62 and 2**62 + 2**61 - 1) have equal Python hashes, which rapidfuzz compares.
    out_of_range = np.array(
        [0, 1, 0xD800, 0x10FFFF, 0x110000, 2**40, -1, -(2**31), 2**61 - 1, 2**62, 2**62 + 2**61 - 1]
    )
    pools = {
        "small": lambda: rng.integers(0, 12, 20),
        "vocab": lambda: rng.integers(0, 50_000, 20),
        "surrogates": lambda: surrogates,  # all packed into str, lone surrogates included
        "out_of_range": lambda: out_of_range,  # renumbered by rank
    }
    for name, pool in pools.items():
        preds, refs = [], []
        for _ in range(100):
            values = pool()
            preds.append(rng.choice(values, size=rng.integers(0, 25)))
            refs.append(rng.choice(values, size=rng.integers(0, 25)))
        expected = np.array([_reference_lcs_f1_ids(a, b) for a, b in zip(preds, refs)])
        np.testing.assert_array_equal(rouge_l_ids(preds, refs), expected, err_msg=name)
        np.testing.assert_array_equal([lcs_f1_ids(a, b) for a, b in zip(preds, refs)], expected)
        assert 0.2 < np.mean((expected > 0) & (expected < 1)), name
    assert rouge_l_ids([], []).shape == (0,)
    assert lcs_f1_ids([2**61 - 1], [0]) == 0.0  # hash-equal, not equal


def test_rouge_l_ids_matches_rouge_l_on_the_same_tokens():
    predictions, references = map(list, zip(*PAIRS["perturbed"]))
    vocab: dict[str, int] = {}

    def ids(text):
        return [vocab.setdefault(t, len(vocab)) for t in rouge_tokenize.tokenize(text, None)]

    np.testing.assert_array_equal(
        rouge_l_ids([ids(p) for p in predictions], [ids(r) for r in references]),
        rouge_l(predictions, references),
    )


# ---------------------------------------------------------------------------------------
# Token F1 (SQuAD v2.0).
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # pred [eiffel, tower], gold [eiffel, tower, in, paris]: P = 1, R = 1/2.
        ("The Eiffel tower", "eiffel tower in Paris", 2 * 1.0 * 0.5 / 1.5),
        # "a" is an article: pred [b, c], gold [b, d]: P = R = 1/2.
        ("a b c", "a b d", 0.5),
        # bags: common = {cat: 1, dog: 1}: P = R = 2/3.
        ("cat cat dog", "cat dog dog", 2 * (2 / 3) * (2 / 3) / (4 / 3)),
        ("Hello, World!", "hello   world", 1.0),
        ("it's", "its", 1.0),  # punctuation is deleted, not replaced by a space
        ("café", "cafe", 0.0),  # no unicode folding
        ("", "", 1.0),
        ("the", "an", 1.0),  # both normalise to no token
        ("", "Paris", 0.0),
        ("Paris", "...", 0.0),
        ("Paris", "London", 0.0),
    ],
)
def test_token_f1_hand_worked(prediction, reference, expected):
    assert token_f1([prediction], [reference])[0] == expected
    assert _squad_compute_f1(reference, prediction) == expected


# ---------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_textual_loss_properties(metric):
    early, full = map(list, zip(*ALL_PAIRS))
    loss = textual_loss(early, full, metric=metric)
    assert loss.dtype == np.float64 and loss.shape == (len(early),)
    assert np.all((loss >= 0) & (loss <= 1))
    same = np.array([e == f for e, f in zip(early, full)])
    assert same.sum() >= 25 and np.all(loss[same] == 0)
    np.testing.assert_array_equal(loss[~same], 1 - _reference(metric, early, full)[~same])
    assert np.all(textual_loss(full, full, metric=metric) == 0)
    assert np.mean(loss[~same] > 0) > 0.5


def test_textual_loss_identical_unscorable_texts_cost_nothing():
    texts = ["", "!!!", "🙂", "我喜欢猫", "the"]
    for metric in METRICS:
        assert np.all(textual_loss(texts, texts, metric=metric) == 0)
    # ... while different unscorable strings get the metric's value.
    assert textual_loss(["!!!"], ["?"], metric="rouge_l")[0] == 1.0
    assert textual_loss(["Hi!"], ["hi"], metric="rouge_l")[0] == 0.0


@pytest.mark.parametrize("metric", METRICS)
def test_risk_consistency_properties(metric):
    rng = np.random.default_rng(7)
    texts = [t for pair in ALL_PAIRS for t in pair]
    n = 400
    early = [texts[i] for i in rng.integers(0, len(texts), n)]
    full = [texts[i] for i in rng.integers(0, len(texts), n)]
    refs = [texts[i] for i in rng.integers(0, len(texts), n)]
    # Make some outputs equal to each other or to the reference.
    for i in range(0, n, 5):
        full[i] = early[i]
    for i in range(1, n, 5):
        early[i] = refs[i]
    for i in range(2, n, 5):
        full[i] = refs[i]
    loss = risk_consistency(early, full, refs, metric=metric)
    assert loss.dtype == np.float64 and loss.shape == (n,)
    assert np.all((loss >= 0) & (loss <= 1))
    assert np.all(loss[0::5] == 0)  # early == full
    assert np.all(loss[1::5] == 0)  # early == reference
    assert np.mean(loss[2::5] > 0) > 0.5  # full == reference, early differs
    # Definition: max(0, R(early, ref) - R(full, ref)), R = 1 - score, R = 0 for x == ref.
    ref_score = functools.partial(_reference, metric)
    r_early = np.where([e == r for e, r in zip(early, refs)], 0.0, 1 - ref_score(early, refs))
    r_full = np.where([f == r for f, r in zip(full, refs)], 0.0, 1 - ref_score(full, refs))
    np.testing.assert_array_equal(loss, np.maximum(0.0, r_early - r_full))


def test_risk_consistency_hand_worked():
    # R(early) = 1 - ROUGE-L("the cat", "the cat sat") = 1 - 0.8; R(full) = 0 (equal strings).
    loss = risk_consistency(["the cat", "the cat sat", ""], ["the cat sat", "the cat", ""],
                            ["the cat sat", "the cat sat", ""])
    np.testing.assert_array_equal(loss, [1 - 2 * 1.0 * (2 / 3) / (1 + 2 / 3), 0.0, 0.0])


# ---------------------------------------------------------------------------------------
# Caching.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_pair_scorer_tokenises_each_text_once(metric, monkeypatch):
    predictions, references = map(list, zip(*PAIRS["same_description"]))
    scorer = PairScorer(metric)
    prepared, scored = [], []
    prepare, pair = scorer._backend.prepare, scorer._backend.pair
    monkeypatch.setattr(scorer._backend, "prepare", lambda t: prepared.append(t) or prepare(t))
    monkeypatch.setattr(scorer._backend, "pair", lambda a, b: scored.append(1) or pair(a, b))
    first = scorer.score(predictions, references)
    # 200 "thresholds" over the same texts: nothing new to tokenise or score.
    for _ in range(200):
        again = scorer.score(predictions, references)
    np.testing.assert_array_equal(first, again)
    assert len(prepared) == len(set(prepared)) == len(set(predictions + references)) == scorer.n_texts
    assert len(scored) == len(set(zip(predictions, references))) == scorer.n_pairs
    textual_loss(references, predictions, metric=scorer)  # reversed pairs: new pairs, no new texts
    assert len(prepared) == scorer.n_texts
    assert scorer.n_pairs == len(scored) == len(
        set(zip(predictions, references)) | set(zip(references, predictions)))
    assert "PairScorer(metric=" in repr(scorer)
    scorer.clear()
    assert scorer.n_texts == scorer.n_pairs == 0
    np.testing.assert_array_equal(scorer.score(predictions, references), first)


def test_pair_scorer_duplicate_pairs_scored_once():
    scorer = PairScorer("rouge_l")
    scores = scorer.score(["a b", "a b", "c", "a b"], ["a b c"] * 4)
    assert scorer.n_pairs == 2 and scorer.n_texts == 3
    assert scores[0] == scores[1] == scores[3] != scores[2]


# ---------------------------------------------------------------------------------------
# Input validation.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rouge_l("a b", ["a b"]), TypeError, "`predictions` must be a sequence of str"),
        (lambda: rouge_l(5, ["a"]), TypeError, "`predictions` must be a sequence of str, got int"),
        (lambda: rouge_l({"a b", "c d"}, ["a b", "c d"]), TypeError, r"paired by position\), got a set"),  # hash order
        (lambda: textual_loss(["a"], {"a": 1}), TypeError, r"`full` .*paired by position\), got a dict"),
        (lambda: bleu(["a"], [None]), TypeError, r"`references` must contain only str.*index 0"),
        (lambda: token_f1(["a", float("nan")], ["a", "b"]), TypeError, "index 1"),
        (lambda: rouge_l(["a"], ["a", "b"]), ValueError, "same length"),
        (lambda: consistency_scores(["a"], ["a"], metric="rougeL"), ValueError, r"\['bleu', 'rouge_l'"),
        (lambda: consistency_scores(["a"], ["a"], metric=3), TypeError, "`metric` must be one of"),
        (lambda: PairScorer("chrf"), ValueError, "got 'chrf'"),
        (lambda: PairScorer(None), TypeError, "got NoneType"),
        (lambda: textual_loss(["a"], "a"), TypeError, "`full`"),
        (lambda: risk_consistency(["a"], ["a"], [None]), TypeError, "`references`"),
        (lambda: risk_consistency(["a"], ["a", "b"], ["a"]), ValueError, "len\\(full\\)=2"),
        (lambda: rouge_l_ids([[1, 2]], [[[1, 2]]]), ValueError, r"references_ids\[0\]"),
        (lambda: rouge_l_ids([[1.5]], [[1]]), TypeError, "integer token ids"),
        (lambda: rouge_l_ids([[1]], []), ValueError, "same length"),
        (lambda: lcs_f1_ids(1, [1]), ValueError, "`a_ids`"),
        (lambda: lcs_f1_ids([1], np.array([2**63], np.uint64)), ValueError, "`b_ids`.*int64"),
    ],
)
def test_input_validation(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_inputs_give_empty_arrays():
    for metric in METRICS:
        for result in (consistency_scores([], [], metric=metric), textual_loss([], [], metric=metric),
                       risk_consistency([], [], [], metric=metric)):
            assert result.dtype == np.float64 and result.shape == (0,)


def test_accepts_numpy_and_pandas_inputs():
    import pandas as pd

    predictions, references = map(list, zip(*PAIRS["summary"]))
    expected = rouge_l(predictions, references)
    np.testing.assert_array_equal(rouge_l(np.array(predictions), pd.Series(references)), expected)
    np.testing.assert_array_equal(rouge_l(tuple(predictions), iter(references)), expected)


# ---------------------------------------------------------------------------------------
# Added by mutation testing.
# ---------------------------------------------------------------------------------------


def test_negative_ids_within_the_code_point_range_are_renumbered():
    # e.g. the -100 "ignore index" of a label tensor left in place: no other id is out of range.
    a, b = [-100, 5, 7, -100], [5, -100, 7]
    expected = _reference_lcs_f1_ids(a, b)  # LCS = 2 ([5, 7] or [-100, 7]): P = 2/4, R = 2/3
    assert expected == 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    assert lcs_f1_ids(a, b) == expected
    np.testing.assert_array_equal(rouge_l_ids([a, [-1]], [b, [-1]]), [expected, 1.0])


def test_rouge_l_ids_renumbers_predictions_and_references_together():
    # Only the prediction holds an id past 0x10FFFF: renumbering the two sides apart would map 5 and 7 to
    # ranks on one side and leave them as they are on the other.
    preds, refs = [[2**40, 5, 7], [1, 2]], [[5, 7], [1, 3]]
    expected = [_reference_lcs_f1_ids(a, b) for a, b in zip(preds, refs)]
    assert expected == [2 * (2 / 3) * 1.0 / (2 / 3 + 1), 0.5]
    np.testing.assert_array_equal(rouge_l_ids(preds, refs), expected)
    assert lcs_f1_ids(preds[0], refs[0]) == expected[0]
