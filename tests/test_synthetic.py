"""Synthetic cache: reproducibility, the documented generative story, and statistical behaviour."""


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
        ({"vocab_size": 2, "top_k": 1}, ValueError, "vocab_size must be an int >= 3"),
        ({"top_k": 8, "vocab_size": 5}, ValueError, "vocab_size must be an int >= 8"),
        ({"difficulty": 0.0}, ValueError, "difficulty must be a finite float > 0"),
        ({"difficulty": "hard"}, TypeError, "difficulty"),
        ({"store_hidden": 1}, TypeError, "store_hidden must be a bool"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
        ({"first_id": 1.5}, TypeError, "first_id must be an int >= 0"),
        ({"first_id": -1}, ValueError, "first_id must be an int >= 0"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        synthetic_cache(**{"n_sequences": 5, **kwargs})

