"""Synthetic cache: reproducibility, the documented generative story, and statistical behaviour."""

import difflib
import re

import numpy as np
import pytest
from scipy import special, stats
from sklearn.metrics import roc_auc_score

from calibrate.cache import open_cache
from calibrate.synthetic import synthetic_cache
from measures.confidence import from_topk, state_saturation

MEASURES = ("softmax_gap", "softmax_max", "entropy", "state_saturation")


@pytest.fixture(scope="module")
def cache():
    return synthetic_cache(400, n_layers=12, seed=0)


def _agreement(cache):
    return cache.arrays["topk_ids"][:, :, 0] == cache.arrays["full_tokens"][:, None]


def test_fields_shapes_and_meta(cache):
    T, L = cache.n_tokens, cache.n_layers
    assert (cache.n_sequences, L, cache.top_k, cache.vocab_size, cache.hidden_size) == (400, 12, 4, 500, 16)
    assert set(cache.arrays) == {"full_tokens", "topk_ids", "topk_logprobs", "hidden", *MEASURES}
    assert cache.arrays["hidden"].shape == (T, L, 16) and cache.arrays["hidden"].dtype == np.float16
    for name in MEASURES:
        assert cache.arrays[name].shape == (T, L) and cache.arrays[name].dtype == np.float32
    assert cache.lengths.min() >= 8 and cache.lengths.max() <= 32
    assert len(np.unique(cache.lengths)) > 10  # uniform over [8, 32]
    assert cache.meta["generation"]["max_new_tokens"] == 32
    assert cache.meta["model"] == "synthetic"
    cache.validate()


def test_text_decodes_and_references_are_close_but_edited(cache):
    seq = cache.sequences
    assert cache.vocab[:3] == [" the", ".", ","] and cache.vocab[-1] == " w499"
    for s in range(5):
        assert seq["output"].iloc[s] == cache.decode(seq["output_ids"].iloc[s])
    outputs = [o.split() for o in seq["output"]]
    refs = [r.split() for r in seq["reference"]]
    changed = np.mean([o != r for o, r in zip(outputs, refs)])
    assert changed > 0.8  # ~12% of the words are edited: almost every sequence differs
    overlap = np.mean([len(set(o) & set(r)) / max(len(set(o)), 1) for o, r in zip(outputs, refs)])
    assert overlap > 0.8
    without = synthetic_cache(5, n_layers=2, references=False, seed=0)
    assert without.sequences["reference"].isna().all()


def test_same_seed_same_cache_different_seed_different_cache(cache):
    again = synthetic_cache(400, n_layers=12, seed=0)
    assert again.checksum == cache.checksum
    for name in cache.arrays:
        np.testing.assert_array_equal(again.arrays[name], cache.arrays[name])
    other = synthetic_cache(400, n_layers=12, seed=1)
    assert other.checksum != cache.checksum
    assert not np.array_equal(other.lengths, cache.lengths)


def test_round_trip_through_disk(tmp_path):
    small = synthetic_cache(30, n_layers=4, seed=5)
    again = open_cache(small.save(tmp_path / "syn"))
    assert again.checksum == small.checksum


def test_agreement_rises_with_depth_to_one(cache):
    rate = _agreement(cache).mean(axis=0)
    assert np.all(np.diff(rate) > 0), rate
    assert rate[-1] == 1.0 and rate[0] < 0.2 and 0.3 < rate[cache.n_layers // 2] < 0.7


def _reference_agreement(n_layers, difficulty, n=400_000, seed=123):
    """P(m_ti > 0) per layer from the docstring's story, integrated independently by Monte Carlo.

    The AR(1) noise is stationary with unit variance, so ``e_ti ~ N(0, 1)`` marginally and
    P(agree_i | r) = Phi(8 (x_i - r) / (1.5 sqrt(1 - x_i))) below the last layer.
    """
    rng = np.random.default_rng(seed)
    r = special.expit(special.logit(rng.beta(2 * difficulty, 2, n)) + rng.normal(0, 0.5, n))
    x = np.arange(1, n_layers) / n_layers
    p = stats.norm.cdf(8 * (x[None, :] - r[:, None]) / (1.5 * np.sqrt(1 - x)))
    return np.append(p.mean(axis=0), 1.0)


@pytest.mark.parametrize("difficulty", [0.5, 1.0, 2.0])
def test_agreement_curve_matches_the_documented_story(difficulty):
    cache = synthetic_cache(1500, n_layers=8, difficulty=difficulty, store_hidden=False, references=False, seed=7)
    observed = _agreement(cache).mean(axis=0)
    expected = _reference_agreement(8, difficulty)
    # ~29,000 tokens in 1,500 sequences (a shared shift per sequence): a few percent is ~5 standard errors.
    np.testing.assert_allclose(observed, expected, atol=0.025)


def test_difficulty_delays_agreement():
    easy = synthetic_cache(300, n_layers=8, difficulty=0.5, store_hidden=False, seed=2)
    hard = synthetic_cache(300, n_layers=8, difficulty=2.0, store_hidden=False, seed=2)
    assert _agreement(easy)[:, 3].mean() > _agreement(hard)[:, 3].mean() + 0.2


def test_predictions_flip_back_sometimes(cache):
    agree = _agreement(cache)
    lost = np.any(agree[:, :-1] & ~agree[:, 1:], axis=1).mean()  # right at layer i, wrong at i + 1
    assert 0.03 < lost < 0.4
    top1 = cache.arrays["topk_ids"][:, :-1, 0]
    wrong = ~agree[:, :-1]
    assert len(np.unique(top1[wrong])) > 50  # wrong guesses vary across tokens and layers


@pytest.mark.parametrize(
    "measure, low, high",
    [("softmax_gap", 0.7, 0.97), ("softmax_max", 0.7, 0.97), ("entropy", 0.7, 0.98), ("state_saturation", 0.6, 0.95)],
)
def test_confidence_predicts_agreement_imperfectly(cache, measure, low, high):
    agree = _agreement(cache)
    conf = cache.arrays[measure]
    for layer in (3, 5, 7):  # middle layers, where both classes are frequent
        auc = roc_auc_score(agree[:, layer], conf[:, layer])
        assert low < auc < high, (measure, layer, auc)


def test_confidence_rises_with_depth(cache):
    for name in MEASURES:
        means = cache.arrays[name].mean(axis=0)
        assert np.all(np.diff(means[1:]) > 0), (name, means)
    assert np.all(cache.arrays["state_saturation"][:, 0] == 0)


def test_measures_come_from_measures_confidence(cache):
    expected = from_topk(cache.arrays["topk_logprobs"], cache.vocab_size)
    for name, values in expected.items():
        np.testing.assert_array_equal(cache.arrays[name], values.astype(np.float32))
    np.testing.assert_array_equal(cache.arrays["state_saturation"], state_saturation(cache.arrays["hidden"]))


def test_topk_are_valid_log_probabilities(cache):
    lp = cache.arrays["topk_logprobs"].astype(np.float64)
    assert np.all(lp <= 0) and np.all(np.diff(lp, axis=-1) <= 0)
    mass = np.exp(lp).sum(axis=-1)
    assert mass.max() <= 1 + 1e-5
    assert mass[:, 0].mean() < mass[:, -1].mean()  # shallow layers spread mass over the tail
    ids = np.sort(cache.arrays["topk_ids"], axis=-1)
    assert np.all(ids[..., 1:] != ids[..., :-1])


def test_hidden_and_scalar_saturation_agree():
    with_hidden = synthetic_cache(60, n_layers=10, seed=3)
    without = synthetic_cache(60, n_layers=10, seed=3, store_hidden=False)
    assert not without.has("hidden")
    for name in ("full_tokens", "topk_ids", "topk_logprobs", "softmax_gap"):
        np.testing.assert_array_equal(with_hidden.arrays[name], without.arrays[name])
    # the same draws: only the float16 rounding of the stored hidden states differs
    np.testing.assert_allclose(with_hidden.arrays["state_saturation"], without.arrays["state_saturation"], atol=2e-3)


def test_scalar_saturation_of_one_dimensional_states():
    """d = 1: |h_i|^2 is a square that rounding made negative (NaN) or 0 (0/0): the cache was refused."""
    with_hidden = synthetic_cache(200, hidden_size=1, seed=0)
    without = synthetic_cache(200, hidden_size=1, store_hidden=False, seed=0)
    sat = without.arrays["state_saturation"]
    assert np.isfinite(sat).all() and np.all(sat[:, 0] == 0)
    # cos of 1-d vectors is their sign: float16 rounding flips it only where a state crosses 0
    assert np.mean(np.abs(sat - with_hidden.arrays["state_saturation"]) < 1e-3) > 0.99


@pytest.mark.parametrize("top_k, vocab_size", [(1, 3), (2, 3), (3, 3), (8, 20)])
def test_small_vocab_and_various_k(top_k, vocab_size):
    small = synthetic_cache(20, n_layers=3, top_k=top_k, vocab_size=vocab_size, hidden_size=1, seed=0)
    assert small.top_k == top_k and small.arrays["topk_ids"].max() < vocab_size
    small.validate()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_sequences": 0}, ValueError, "n_sequences must be an int >= 1"),
        ({"n_layers": 2.5}, TypeError, "n_layers must be an int >= 1, got 2.5 \\(float\\)"),
        ({"min_tokens": 10, "max_tokens": 5}, ValueError, "min_tokens must be <= max_tokens=5"),
        ({"min_tokens": 6, "max_tokens": 5}, ValueError, "min_tokens must be <= max_tokens=5, got 6"),
        ({"hidden_size": 0}, ValueError, "hidden_size must be an int >= 1"),
        ({"vocab_size": 2, "top_k": 1}, ValueError, "vocab_size must be an int >= 3"),
        ({"top_k": 8, "vocab_size": 5}, ValueError, "vocab_size must be an int >= 8"),
        # before allocating a word per id (16 GiB: MemoryError or a silent kill)
        ({"vocab_size": 2**31}, ValueError, r"vocab_size must be at most 2\*\*31 - 1"),
        ({"difficulty": 0.0}, ValueError, "difficulty must be a finite number > 0"),
        ({"difficulty": "hard"}, TypeError, "difficulty"),
        ({"difficulty": True}, TypeError, "difficulty must be a finite number > 0, got True"),
        ({"difficulty": float("nan")}, ValueError, "difficulty must be a finite number > 0, got nan"),
        ({"difficulty": float("inf")}, ValueError, "difficulty must be a finite number > 0, got inf"),
        ({"store_hidden": 1}, TypeError, "store_hidden must be a bool"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
        ({"first_id": 1.5}, TypeError, "first_id must be an int >= 0"),
        ({"first_id": -1}, ValueError, "first_id must be an int >= 0"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        synthetic_cache(**{"n_sequences": 5, **kwargs})


def test_lengths_cover_both_ends_and_min_equal_to_max_is_allowed():
    """Lengths are uniform over the closed range [min_tokens, max_tokens]: both ends occur."""
    lengths = synthetic_cache(300, n_layers=2, min_tokens=3, max_tokens=6, store_hidden=False, seed=4).lengths
    assert set(np.unique(lengths).tolist()) == {3, 4, 5, 6}
    fixed = synthetic_cache(10, n_layers=2, min_tokens=5, max_tokens=5, store_hidden=False, seed=4)
    assert np.all(fixed.lengths == 5) and fixed.n_tokens == 50
    assert fixed.meta["generation"]["min_new_tokens"] == fixed.meta["generation"]["max_new_tokens"] == 5


def test_ids_start_at_first_id_and_meta_records_the_arguments():
    piece = synthetic_cache(3, n_layers=2, min_tokens=4, max_tokens=9, first_id=7, seed=1)
    assert piece.sequences["id"].tolist() == ["synthetic-7", "synthetic-8", "synthetic-9"]
    assert piece.sequences["prompt"].tolist() == [f"Synthetic prompt {s}:" for s in range(3)]
    assert piece.meta["generation"]["min_new_tokens"] == 4 and piece.meta["generation"]["max_new_tokens"] == 9
    recorded = piece.meta["synthetic"]
    assert recorded["seed"] == 1 and recorded["min_tokens"] == 4 and recorded["n_layers"] == 2
    assert recorded["difficulty"] == 1.0 and recorded["vocab_size"] == 500
    small = synthetic_cache(4, n_layers=2, first_id=np.int8(125), seed=1)  # 125 + 3 wrapped to -128
    assert small.sequences["id"].tolist()[-1] == "synthetic-128"
    assert synthetic_cache(3, n_layers=2, difficulty=1e308, seed=1).n_sequences == 3  # 2 * 1e308 overflowed to inf


def _pieces(text):
    """Split a synthetic text back into its vocabulary pieces (" word", "." or ",")."""
    return re.findall(r" [^ .,]+|[.,]", text)


def test_references_keep_and_substitute_at_the_documented_rates(cache):
    """Each token is substituted (p = 0.08) or deleted (p = 0.04): 96% of the pieces stay, ~88% unchanged."""
    n_out = n_ref = matched = 0
    for output, reference in zip(cache.sequences["output"], cache.sequences["reference"]):
        out, ref = _pieces(output), _pieces(reference)
        assert "".join(out) == output and "".join(ref) == reference
        n_out, n_ref = n_out + len(out), n_ref + len(ref)
        matched += sum(b.size for b in difflib.SequenceMatcher(None, out, ref, autojunk=False).get_matching_blocks())
    assert 0.95 < n_ref / n_out < 0.97  # deletions only: 1 - 0.04
    assert 0.86 < matched / n_out < 0.91  # about 1 - 0.08 - 0.04, plus substitutions that redraw the same token


def test_margin_noise_is_correlated_across_layers(cache):
    """The logit gap between ranks 1 and 2 is ``D = exp(0.35 m + 0.8 z + 0.3)``: ``log D`` of adjacent layers
    differs by ``0.35 (8 / L + 1.5 (sqrt(1 - x') e' - sqrt(1 - x) e)) + 0.8 (z' - z)``, whose variance follows
    from the AR(1) correlation 0.7 (the token's resolution depth cancels)."""
    lp = cache.arrays["topk_logprobs"].astype(np.float64)
    log_gap = np.log(lp[:, :, 0] - lp[:, :, 1])  # (T, L)
    L = cache.n_layers
    x = np.arange(1, L + 1) / L
    a, b = np.sqrt(1 - x[1:-1]), np.sqrt(1 - x[:-2])  # layers 2..L-1 against 1..L-2
    expected = 0.35**2 * 1.5**2 * (a**2 + b**2 - 2 * 0.7 * a * b) + 2 * 0.8**2
    observed = np.diff(log_gap[:, :-1], axis=1).var(axis=0)
    np.testing.assert_allclose(observed, expected, rtol=0.06)
    np.testing.assert_allclose(np.diff(log_gap[:, :-1], axis=1).mean(axis=0), 0.35 * 8 / L, atol=0.03)


def test_output_tokens_follow_zipf_order_over_the_whole_vocabulary():
    """Token ids are in Zipf frequency order, and every id of a small vocabulary is a possible output."""
    small = synthetic_cache(400, n_layers=2, top_k=1, vocab_size=5, store_hidden=False, references=False, seed=6)
    counts = np.bincount(small.arrays["full_tokens"], minlength=5)
    assert counts.size == 5 and np.all(counts > 0), counts
    assert np.all(np.diff(counts) < 0), counts  # common words first


@pytest.mark.parametrize("top_k", [2, 3])
def test_the_token_outside_the_top_k_keeps_its_probability(top_k):
    """Log-probabilities are normalised over the whole vocabulary: with one token outside the top-k, its
    probability ``1 - sum(top-k)`` is positive and at most rank k's (its logit is ``tau >= 0.1`` lower)."""
    small = synthetic_cache(100, n_layers=4, top_k=top_k, vocab_size=top_k + 1, store_hidden=False, seed=8)
    p = np.exp(small.arrays["topk_logprobs"].astype(np.float64))
    tail = 1.0 - p.sum(axis=-1)
    assert np.all(tail >= -1e-6) and np.all(tail <= p[..., -1] * np.exp(-0.1) + 1e-6)
    assert tail.mean() > 1e-3


def test_residual_steps_are_never_small():
    """Each layer adds ``s w`` with ``s = 0.4 + 1.2 sigmoid(-0.5 m)`` in (0.4, 1.6) and ``|w| >= sqrt((d - 1) / d)``."""
    small = synthetic_cache(100, n_layers=8, hidden_size=16, seed=9)
    h = small.arrays["hidden"].astype(np.float64)
    steps = np.linalg.norm(np.diff(h, axis=1), axis=-1)
    low = 0.4 * np.sqrt(15 / 16)
    assert steps.min() > low - 0.01, steps.min()
    assert steps.max() < 1.6 * np.sqrt((3.5**2 + 15) / 16)


def test_top_k_order_when_a_layer_disagrees(cache):
    """Agreeing layers rank ``y c1 c2 c3``; the others ``c1 y c2 c3`` (probability 3/4) or ``c2 y c1 c3``.
    The last layer always agrees, so it names each token's distractors."""
    ids = cache.arrays["topk_ids"]
    y, c1, c2, c3 = (ids[:, -1, j][:, None] for j in range(4))
    wrong = ids[:, :, 0] != y
    main = wrong & (ids[:, :, 0] == c1)
    assert np.all(main | ~wrong | (ids[:, :, 0] == c2))
    assert np.all(ids[:, :, 1][wrong] == np.broadcast_to(y, wrong.shape)[wrong])
    assert np.all(ids[:, :, 2][main] == np.broadcast_to(c2, main.shape)[main])
    other = wrong & ~main
    assert np.all(ids[:, :, 2][other] == np.broadcast_to(c1, other.shape)[other])
    assert np.all(ids[:, :, 3] == c3)
    share = main.sum() / wrong.sum()
    assert abs(share - 0.75) < 0.02, share
