"""Confidence measures against SciPy and plain-loop references."""

import importlib
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import special, stats

from calibrate.cache import LayerCache
from measures.classifier import ExitClassifier
from measures.confidence import (
    MEASURES,
    confidence,
    entropy,
    from_topk,
    softmax_gap,
    softmax_max,
    state_saturation,
)

# measures/__init__ re-exports the function confidence(), which shadows the submodule attribute, so
# `import measures.confidence as mc` would give the function: fetch the module itself.
mc = importlib.import_module("measures.confidence")

# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------


def _reference_probs(logits, axis=-1):
    return special.softmax(np.asarray(logits, dtype=np.float64), axis=axis)


def _reference_gap(logits, axis=-1):
    p = np.sort(_reference_probs(logits, axis), axis=axis)
    return np.take(p, -1, axis=axis) - np.take(p, -2, axis=axis)


def _reference_max(logits, axis=-1):
    return _reference_probs(logits, axis).max(axis=axis)


def _reference_entropy(logits, axis=-1):
    p = _reference_probs(logits, axis)
    return 1.0 - stats.entropy(p, axis=axis) / np.log(p.shape[axis])


def _reference_saturation(hidden):
    """cos(h_i, h_{i-1}) with a double loop in float64; layer 1 and zero vectors give 0."""
    hidden = np.asarray(hidden, dtype=np.float64)
    n_tokens, n_layers, _ = hidden.shape
    out = np.zeros((n_tokens, n_layers))
    for t in range(n_tokens):
        for i in range(1, n_layers):
            a, b = hidden[t, i], hidden[t, i - 1]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            out[t, i] = 0.0 if na == 0 or nb == 0 else np.dot(a, b) / (na * nb)
    return out


def _cache(*, topk_logprobs=None, hidden=None, vocab_size=50, scores=None, topk_ids=None):
    """A LayerCache of sequences of 4 tokens (the last one shorter) around the given arrays."""
    source = topk_logprobs if topk_logprobs is not None else hidden
    n_tokens, n_layers = source.shape[:2]
    if topk_ids is None:
        k = 2 if topk_logprobs is None else topk_logprobs.shape[2]
        topk_ids = np.tile(np.arange(k), (n_tokens, n_layers, 1))
    lengths = [4] * (n_tokens // 4) + ([n_tokens % 4] if n_tokens % 4 else [])
    return LayerCache.from_arrays(
        full_tokens=np.zeros(n_tokens, dtype=np.int32),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        hidden=hidden,
        scores=scores,
        lengths=lengths,
        vocab_size=vocab_size,
    )


def _stand_in(cache, *, vocab_size="same", **arrays):
    """A duck-typed copy of ``cache`` with some arrays replaced by ones the LayerCache would refuse
    (NaN, wrong shape): confidence() must still check what it reads (e.g. a cache opened unverified)."""
    return SimpleNamespace(
        arrays={**cache.arrays, **arrays},
        n_layers=cache.n_layers,
        n_tokens=cache.n_tokens,
        vocab_size=cache.vocab_size if vocab_size == "same" else vocab_size,
    )


def _topk_from_logits(logits, k):
    """Sorted top-k log-probabilities (..., k) from full logits (..., V)."""
    logp = special.log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    return -np.sort(-logp, axis=-1)[..., :k]


# ----------------------------------------------------------------------------------------------------
# Full logits
# ----------------------------------------------------------------------------------------------------

FUNCS = [(softmax_gap, _reference_gap), (softmax_max, _reference_max), (entropy, _reference_entropy)]


@pytest.mark.parametrize("func, reference", FUNCS, ids=["gap", "max", "entropy"])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 8.0, 1e3, 1e5])
@pytest.mark.parametrize("offset", [0.0, -1e4, 5e5])
def test_full_logit_measures_match_scipy(func, reference, scale, offset):
    rng = np.random.default_rng(0)
    logits = offset + scale * rng.normal(size=(6, 5, 37))
    got = func(logits)
    assert got.dtype == np.float64 and got.shape == (6, 5)
    np.testing.assert_allclose(got, reference(logits), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("func, reference", FUNCS, ids=["gap", "max", "entropy"])
@pytest.mark.parametrize("axis", [0, 1, -3])
def test_full_logit_measures_axis(func, reference, axis):
    rng = np.random.default_rng(1)
    logits = 3 * rng.normal(size=(11, 7, 4))
    np.testing.assert_allclose(func(logits, axis=axis), reference(logits, axis=axis), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("func, reference", FUNCS, ids=["gap", "max", "entropy"])
def test_full_logit_measures_float32_and_int(func, reference):
    rng = np.random.default_rng(2)
    logits = (4 * rng.normal(size=(50, 100))).astype(np.float32)
    got = func(logits)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference(logits), rtol=1e-4, atol=1e-5)
    ints = rng.integers(-5, 5, size=(20, 9))
    got = func(ints)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, reference(ints), rtol=1e-12, atol=1e-12)


def test_ties_and_uniform():
    logits = np.array([[2.0, 2.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 50.0, 50.0, 3.0]])
    np.testing.assert_array_equal(softmax_gap(logits), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(softmax_max(logits)[1], 0.25, rtol=1e-15)
    np.testing.assert_allclose(entropy(logits)[1], 0.0, atol=1e-15)
    np.testing.assert_allclose(entropy(logits), _reference_entropy(logits), rtol=1e-12, atol=1e-12)


def test_one_hot_limit():
    logits = np.array([[1e4, 0.0, 0.0, 0.0], [-1e30, -1e30, 0.0, -1e30]])
    np.testing.assert_allclose(softmax_gap(logits), [1.0, 1.0], rtol=0, atol=0)
    np.testing.assert_allclose(softmax_max(logits), [1.0, 1.0], rtol=0, atol=0)
    np.testing.assert_allclose(entropy(logits), [1.0, 1.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logits_apart_by_more_than_the_float_range_warn_nothing(dtype):
    top = np.finfo(dtype).max / 1.1
    logits = np.array([[top, -top, 0.0], [0.0, -top, top]], dtype=dtype)  # top - (-top) overflows to inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(softmax_gap(logits), [1.0, 1.0])
        np.testing.assert_array_equal(softmax_max(logits), [1.0, 1.0])
        np.testing.assert_array_equal(entropy(logits), [1.0, 1.0])


def test_masked_logits_count_in_vocabulary():
    rng = np.random.default_rng(3)
    sub = rng.normal(size=(5, 6))
    logits = np.concatenate([sub, np.full((5, 4), -np.inf)], axis=1)  # V = 10, 4 masked
    np.testing.assert_allclose(softmax_gap(logits), _reference_gap(sub), rtol=1e-12)
    np.testing.assert_allclose(softmax_max(logits), _reference_max(sub), rtol=1e-12)
    h = stats.entropy(_reference_probs(sub), axis=-1)
    np.testing.assert_allclose(entropy(logits), 1 - h / np.log(10), rtol=1e-12)


@pytest.mark.parametrize("func", [softmax_gap, softmax_max, entropy])
def test_full_logit_errors(func):
    with pytest.raises(ValueError, match="logits must not contain NaN"):
        func(np.array([[0.0, np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"logits must not contain NaN or \+inf"):
        func(np.array([[0.0, np.inf, 1.0]]))
    with pytest.raises(ValueError, match="all -inf"):
        func(np.array([[0.0, 1.0], [-np.inf, -np.inf]]))
    with pytest.raises(ValueError, match="at least 2 entries"):
        func(np.ones((3, 1)))
    with pytest.raises(ValueError, match="axis must lie in"):
        func(np.ones((3, 4)), axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        func(np.ones((3, 4)), axis=1.0)
    with pytest.raises(TypeError, match="logits must be a real numeric array"):
        func(np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match="at least one dimension"):
        func(1.0)


# ----------------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 8, 40])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_from_topk_gap_and_max_exact(k, scale):
    rng = np.random.default_rng(k)
    logits = scale * rng.normal(size=(30, 4, 40))
    out = from_topk(_topk_from_logits(logits, k), vocab_size=40)
    assert set(out) == {"softmax_gap", "softmax_max", "entropy"}
    assert all(v.shape == (30, 4) and v.dtype == np.float64 for v in out.values())
    np.testing.assert_allclose(out["softmax_gap"], _reference_gap(logits), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out["softmax_max"], _reference_max(logits), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("k", [1, 2, 5, 20, 39])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_from_topk_entropy_is_a_lower_bound_on_the_confidence(k, scale):
    # The approximate entropy H_approx >= H, so 1 - H_approx/log V <= 1 - H/log V.
    rng = np.random.default_rng(100 + k)
    logits = scale * rng.normal(size=(200, 40))
    approx = from_topk(_topk_from_logits(logits, k), vocab_size=40)["entropy"]
    exact = _reference_entropy(logits)
    assert (approx <= exact + 1e-12).all()
    assert (approx >= 0).all()
    # Re-derive the approximation inline.
    lp = _topk_from_logits(logits, k)
    p = np.exp(lp)
    rest = np.clip(1 - p.sum(-1), 0, 1)
    h = -(p * lp).sum(-1) - special.xlogy(rest, rest / (40 - k))
    np.testing.assert_allclose(approx, np.clip(1 - h / np.log(40), 0, 1), rtol=1e-9, atol=1e-12)
    if k == 39:  # one token left outside the top k: its probability is known, the value is exact
        np.testing.assert_allclose(approx, exact, rtol=1e-9, atol=1e-12)
    elif scale <= 3.0:
        assert (approx < exact - 1e-6).mean() > 0.9  # a genuine approximation, not accidentally exact


def test_from_topk_entropy_exact_when_complete_or_uniform_rest():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(50, 12))
    out = from_topk(_topk_from_logits(logits, 12), vocab_size=12)  # k = V: nothing approximated
    np.testing.assert_allclose(out["entropy"], _reference_entropy(logits), rtol=1e-10, atol=1e-12)
    # Top 3 explicit, the other 9 tokens exactly uniform: the approximation is exact.
    logits = np.concatenate([rng.uniform(3, 5, size=(50, 3)), np.zeros((50, 9))], axis=1)
    out = from_topk(_topk_from_logits(logits, 3), vocab_size=12)
    np.testing.assert_allclose(out["entropy"], _reference_entropy(logits), rtol=1e-10, atol=1e-12)


def test_from_topk_k1_gap_is_lower_bound():
    rng = np.random.default_rng(6)
    logits = 3 * rng.normal(size=(300, 20))
    out = from_topk(_topk_from_logits(logits, 1), vocab_size=20)
    p1 = _reference_max(logits)
    np.testing.assert_allclose(out["softmax_max"], p1, rtol=1e-10)
    np.testing.assert_allclose(out["softmax_gap"], np.maximum(0, 2 * p1 - 1), rtol=1e-10, atol=1e-13)
    assert (out["softmax_gap"] <= _reference_gap(logits) + 1e-12).all()
    assert (out["softmax_gap"] > 0).any()


def test_from_topk_of_one_distribution_gives_0d_float64_arrays():
    """softmax_max was a 0-d array, softmax_gap and entropy NumPy scalars."""
    out = from_topk(np.log([0.6, 0.3]), vocab_size=5)
    assert all(isinstance(v, np.ndarray) and v.shape == () and v.dtype == np.float64 for v in out.values())
    assert float(out["softmax_gap"]) == pytest.approx(0.3)


def test_from_topk_accepts_float32_rounding():
    lp = np.log(np.array([[1.0, 1e-9], [0.5, 0.5]], dtype=np.float32))  # log(1) may round to +tiny
    lp[0, 0] = 3e-8
    out = from_topk(lp, vocab_size=3)
    assert out["softmax_max"][0] == 1.0 and out["entropy"][1] == pytest.approx(1 - np.log(2) / np.log(3), rel=1e-6)


def test_from_topk_errors():
    good = np.log([[0.5, 0.3]])
    with pytest.raises(ValueError, match="topk_logprobs must be finite"):
        from_topk(np.array([[np.nan, -1.0]]), vocab_size=10)
    with pytest.raises(ValueError, match="topk_logprobs must be finite"):
        from_topk(np.array([[-1.0, -np.inf]]), vocab_size=10)
    with pytest.raises(ValueError, match=r"log-probabilities \(<= 0\)"):
        from_topk(np.array([[0.5, -1.0]]), vocab_size=10)
    with pytest.raises(ValueError, match="sorted in descending order"):
        from_topk(good[:, ::-1], vocab_size=10)
    with pytest.raises(ValueError, match="must sum to at most 1"):
        from_topk(np.log([[0.7, 0.6]]), vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size must be >= max"):
        from_topk(good, vocab_size=1)
    with pytest.raises(ValueError, match="vocab_size must be >= max"):
        from_topk(np.log([[0.2, 0.2, 0.2]]), vocab_size=2)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        from_topk(good, vocab_size=10.0)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        from_topk(good, vocab_size=True)
    with pytest.raises(ValueError, match="k >= 1"):
        from_topk(np.zeros((3, 0)), vocab_size=10)


# ----------------------------------------------------------------------------------------------------
# State saturation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_state_saturation_matches_loop(dtype):
    rng = np.random.default_rng(7)
    hidden = rng.normal(size=(9, 6, 5)).astype(dtype)
    hidden[2, 3] = 0  # a zero vector: layers 4 and 5 of token 3 get 0
    hidden[4, 2] = 3 * hidden[4, 1]  # parallel: cosine 1
    hidden[5, 1] = -hidden[5, 0]  # anti-parallel: cosine -1
    got = state_saturation(hidden)
    assert got.dtype == np.float32 and got.shape == (9, 6)
    ref = _reference_saturation(hidden)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert (got[:, 0] == 0).all()
    assert got[2, 3] == 0 and got[2, 4] == 0
    assert got[4, 2] == pytest.approx(1.0, abs=1e-6) and got[5, 1] == pytest.approx(-1.0, abs=1e-6)


def test_state_saturation_extreme_magnitudes():
    rng = np.random.default_rng(8)
    base = rng.normal(size=(4, 5, 7))
    huge = (1e200 * base).astype(np.float64)  # squares overflow float32 (and float64)
    tiny = (1e-300 * base).astype(np.float64)  # underflow to 0 in float32 without rescaling
    ref = _reference_saturation(base)
    np.testing.assert_allclose(state_saturation(huge), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state_saturation(tiny), ref, rtol=1e-5, atol=1e-6)
    f16 = (6e4 * base / np.abs(base).max()).astype(np.float16)  # norms overflow float16 arithmetic
    np.testing.assert_allclose(state_saturation(f16), _reference_saturation(f16), rtol=1e-5, atol=1e-6)


def test_state_saturation_blocks_and_shapes(monkeypatch):
    rng = np.random.default_rng(9)
    hidden = rng.normal(size=(23, 4, 3))
    full = state_saturation(hidden)
    monkeypatch.setattr(mc, "_BLOCK_ELEMENTS", 25)  # 2 tokens per block, last block partial
    np.testing.assert_array_equal(state_saturation(hidden), full)
    np.testing.assert_allclose(state_saturation(hidden.reshape(23, 1, 4, 3))[:, 0], full)
    np.testing.assert_allclose(state_saturation(hidden[0]), full[0])
    np.testing.assert_array_equal(state_saturation(hidden[:, :1]), np.zeros((23, 1)))
    assert state_saturation(np.zeros((0, 4, 3))).shape == (0, 4)


def test_state_saturation_errors():
    h = np.ones((3, 4, 2))
    h[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="hidden must be finite"):
        state_saturation(h)
    h[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match="hidden must be finite"):
        state_saturation(h.astype(np.float16))
    with pytest.raises(ValueError, match="hidden must be finite"):
        state_saturation(np.full((2, 1, 3), np.nan))  # one layer: nothing to compare, still checked
    with pytest.raises(ValueError, match=r"hidden must have shape \(\.\.\., n_layers, d\)"):
        state_saturation(np.ones(5))
    with pytest.raises(TypeError, match="hidden must be a real numeric array"):
        state_saturation(np.array([["a", "b"]]))


# ----------------------------------------------------------------------------------------------------
# confidence(cache, measure)
# ----------------------------------------------------------------------------------------------------


def _topk_cache(**kwargs):
    rng = np.random.default_rng(10)
    logits = 2 * rng.normal(size=(40, 5, 30))
    hidden = rng.normal(size=(40, 5, 6))
    return _cache(topk_logprobs=_topk_from_logits(logits, 4), hidden=hidden, vocab_size=30, **kwargs)


def test_measures_constant():
    assert MEASURES == ("softmax_gap", "softmax_max", "entropy", "state_saturation")


@pytest.mark.parametrize("measure", ["softmax_gap", "softmax_max", "entropy"])
def test_confidence_from_topk(measure):
    cache = _topk_cache()
    got = confidence(cache, measure)
    assert got.dtype == np.float32 and got.shape == (40, 5)
    ref = from_topk(cache.arrays["topk_logprobs"], cache.vocab_size)[measure]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_confidence_state_saturation_from_hidden():
    cache = _topk_cache()
    got = confidence(cache, "state_saturation")
    np.testing.assert_array_equal(got, state_saturation(cache.arrays["hidden"]))
    np.testing.assert_allclose(got, _reference_saturation(cache.arrays["hidden"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("measure", MEASURES)
def test_confidence_prefers_cached_array(measure):
    sentinel = np.linspace(0, 1, 200, dtype=np.float32).reshape(40, 5)
    sentinel[:, 0] = 0.0  # layer 1 of every measure may be 0 (saturation's must)
    cache = _topk_cache(scores={measure: sentinel})
    np.testing.assert_array_equal(confidence(cache, measure), sentinel)
    cache = _topk_cache(scores={measure: sentinel.astype(np.float64)})
    assert confidence(cache, measure).dtype == np.float32


@pytest.mark.filterwarnings("ignore:the last layer's top-1 differs from full_tokens")  # on purpose
def test_confidence_classifier_dispatch():
    ids = np.tile(np.arange(1, 5), (40, 5, 1))
    ids[:, :, 0] = np.arange(40)[:, None] % 2  # layers agree with the full token (0) half the time
    cache = _topk_cache(topk_ids=ids)
    clf = ExitClassifier(features="topk").fit(cache)
    np.testing.assert_array_equal(confidence(cache, "classifier", classifier=clf), clf.predict_confidence(cache))


def test_confidence_errors():
    cache = _topk_cache()
    with pytest.raises(ValueError, match=r"measure must be one of \('softmax_gap'.*got 'gap'"):
        confidence(cache, "gap")
    with pytest.raises(ValueError, match=r"'halting_geometric' is a trained halting head: .*train_measure"):
        confidence(cache, "halting_geometric")  # fit accepts it: say where it comes from
    with pytest.raises(ValueError, match="needs a fitted measures.classifier.ExitClassifier"):
        confidence(cache, "classifier")
    with pytest.raises(TypeError, match="classifier must be an ExitClassifier"):
        confidence(cache, "classifier", classifier=object())
    with pytest.raises(ValueError, match="classifier is used only with measure='classifier'"):
        confidence(cache, "softmax_gap", classifier=ExitClassifier())
    with pytest.raises(TypeError, match="cache must be a LayerCache"):
        confidence(np.zeros((3, 4)), "softmax_gap")

    rng = np.random.default_rng(11)
    no_hidden = _cache(topk_logprobs=_topk_from_logits(rng.normal(size=(8, 3, 10)), 2), vocab_size=10)
    with pytest.raises(ValueError, match="'state_saturation' is neither precomputed.*no 'hidden' array"):
        confidence(no_hidden, "state_saturation")
    no_topk = _cache(hidden=rng.normal(size=(8, 3, 4)))
    for measure in ("softmax_gap", "softmax_max", "entropy"):
        with pytest.raises(ValueError, match=f"'{measure}' is neither precomputed.*no 'topk_logprobs' array"):
            confidence(no_topk, measure)
    no_vocab = _stand_in(no_hidden, vocab_size=None)
    with pytest.raises(ValueError, match="needs the cache's vocab_size"):
        confidence(no_vocab, "entropy")
    assert confidence(no_vocab, "softmax_gap").shape == (8, 3)  # gap and max need no vocab_size

    # Arrays that LayerCache itself refuses, on a duck-typed stand-in.
    bad = _stand_in(cache, entropy=np.zeros((40, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"cache array 'entropy' must have shape \(n_tokens, n_layers\)"):
        confidence(bad, "entropy")
    nan = np.zeros((40, 5), dtype=np.float32)
    nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="cache array 'softmax_max' must be finite"):
        confidence(_stand_in(cache, softmax_max=nan), "softmax_max")
    lp = np.array(cache.arrays["topk_logprobs"])
    lp[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="topk_logprobs must be finite"):
        confidence(_stand_in(cache, topk_logprobs=lp), "softmax_gap")
    hidden = np.array(cache.arrays["hidden"])
    hidden[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="hidden must be finite"):
        confidence(_stand_in(cache, hidden=hidden), "state_saturation")
    with pytest.raises(ValueError, match=r"'hidden' must have shape \(n_tokens, n_layers, d\)"):
        confidence(_stand_in(cache, hidden=hidden[:, :4]), "state_saturation")


@pytest.mark.parametrize("measure", ["softmax_gap", "entropy"])
def test_confidence_blocks(monkeypatch, measure):
    cache = _topk_cache()
    full = confidence(cache, measure)
    monkeypatch.setattr(mc, "_BLOCK_ELEMENTS", 3 * 5 * 4)  # 3 tokens per block, last block partial
    np.testing.assert_array_equal(confidence(cache, measure), full)


@pytest.mark.parametrize("func, reference", FUNCS, ids=["gap", "max", "entropy"])
def test_big_endian_and_long_double_logits_are_computed_in_float64(func, reference):
    """``>f8`` and long double logits were cast to float32 (a gap of 1 - 3e-11 became 1.0)."""
    logits = np.array([[0.0, -25.0, -30.0], [1.0, 0.5, -2.0]])
    want = func(logits)
    assert 0 < 1 - want[0] < 1e-9 or 0 < want[0] < 1e-9  # not representable next to 1 (or 0) in float32
    for dtype in (">f8", np.longdouble):
        got = func(logits.astype(dtype))
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)


def test_long_doubles_past_the_float64_range():
    """A finite long double state past float64's range saturated to 0 (inf / inf = NaN, read as a zero vector),
    and such logits were refused as containing "NaN or +inf"."""
    big = np.longdouble("1e400")
    if not np.isfinite(big):
        pytest.skip("long double is float64 on this platform")
    hidden = np.full((1, 2, 4), big)
    hidden[0, 1] *= 2
    np.testing.assert_array_equal(state_saturation(hidden), [[0.0, 1.0]])
    logits = np.array([big, 0, -big])
    with pytest.raises(ValueError, match="logits must lie within the float64 range"):
        softmax_gap(logits)


def test_torch_tensors_straight_from_a_model_are_accepted():
    """A tensor that requires grad, or is bfloat16 (numpy has neither), scores as its float32 values."""
    torch = pytest.importorskip("torch")
    logits = torch.randn(5, 3, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_()
    exact = logits.detach().float().numpy()  # bfloat16 -> float32 is exact
    for fn in (softmax_gap, softmax_max, entropy):
        np.testing.assert_array_equal(fn(logits), fn(exact))
        np.testing.assert_array_equal(fn(logits.detach().half()), fn(logits.detach().half().numpy()))
    hidden = torch.randn(4, 3, 8, requires_grad=True)
    np.testing.assert_array_equal(state_saturation(hidden), state_saturation(hidden.detach().numpy()))
    logprobs = torch.log_softmax(logits.float(), dim=-1).topk(3).values  # requires grad
    got, expected = from_topk(logprobs, vocab_size=11), from_topk(logprobs.detach().numpy(), vocab_size=11)
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])


# ----------------------------------------------------------------------------------------------------
# Added by mutation testing: checks whose removal or loosening no other test noticed
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["hidden", "topk_logprobs", "topk_ids", "full_tokens"])
def test_confidence_refuses_cache_fields_that_are_not_scores(field):
    cache = _topk_cache()
    assert field in cache.arrays
    with pytest.raises(ValueError, match=rf"measure must be one of .*got '{field}'"):
        confidence(cache, field)


def test_confidence_returns_a_stored_score_of_the_users_own():
    sentinel = np.linspace(0, 1, 200, dtype=np.float32).reshape(40, 5)
    sentinel[:, 0] = 0.0  # layer 1 of every measure may be 0 (saturation's must)
    cache = _topk_cache(scores={"my_score": sentinel})
    np.testing.assert_array_equal(confidence(cache, "my_score"), sentinel)
    with pytest.raises(ValueError, match="measure must be one of"):
        confidence(_topk_cache(), "my_score")  # not stored: unknown


def test_confidence_checks_the_shape_of_topk_logprobs():
    cache = _topk_cache()
    lp = np.asarray(cache.arrays["topk_logprobs"])
    for bad in (lp[:, :4], lp[:30], lp[..., 0]):
        with pytest.raises(ValueError, match=r"cache array 'topk_logprobs' must have shape \(n_tokens, n_layers, k\)"):
            confidence(_stand_in(cache, topk_logprobs=bad), "softmax_max")


def test_confidence_checks_the_vocab_size_it_computes_the_entropy_with():
    cache = _topk_cache()  # k = 4
    for vocab_size, error in ((3, ValueError), (30.0, TypeError)):
        with pytest.raises(error, match="vocab_size must be"):
            confidence(_stand_in(cache, vocab_size=vocab_size), "entropy")


def test_topk_bound_is_none_when_the_top_k_is_the_whole_vocabulary():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(8, 3, 6))
    complete = _cache(topk_logprobs=_topk_from_logits(logits, 6), vocab_size=6)  # k = V: entropy exact
    partial = _cache(topk_logprobs=_topk_from_logits(logits, 5), vocab_size=6)
    top1 = _cache(topk_logprobs=_topk_from_logits(logits, 1), vocab_size=6)
    assert mc._topk_bound(complete, "entropy") is None and mc._topk_bound(partial, "entropy") == 5
    assert mc._topk_bound(top1, "softmax_gap") == 1 and mc._topk_bound(partial, "softmax_gap") is None
    assert mc._topk_bound(top1, "softmax_max") is None and mc._topk_bound(top1, "state_saturation") is None
    np.testing.assert_allclose(confidence(complete, "entropy"), _reference_entropy(logits), rtol=1e-5, atol=1e-6)


def test_from_topk_tolerances_are_float_rounding_only():
    # Past the float16/bfloat16 rounding allowed for, the input is not sorted log-probabilities.
    with pytest.raises(ValueError, match="must sum to at most 1"):
        from_topk(np.log([[0.62, 0.4]]), vocab_size=10)  # mass 1.02
    from_topk(np.log([[0.605, 0.4]]), vocab_size=10)  # mass 1.005: a softmax of bfloat16 logits, as a cache takes it
    with pytest.raises(ValueError, match=r"log-probabilities \(<= 0\)"):
        from_topk(np.array([[1e-3, -5.0]]), vocab_size=10)
    with pytest.raises(ValueError, match="sorted in descending order"):
        from_topk(np.array([[-1.0, -1.0 + 1e-4]]), vocab_size=10)
    misordered = from_topk(np.array([[-1.0, -1.0 + 1e-7]]), vocab_size=10)  # a float32-sized misorder passes
    assert misordered["softmax_gap"] == 0.0  # as a tie (it was -3.7e-8, outside the gap's [0, 1])


def test_state_saturation_needs_a_layer_and_a_feature():
    for shape in [(3, 0, 4), (3, 4, 0)]:
        with pytest.raises(ValueError, match="at least one layer and one feature"):
            state_saturation(np.zeros(shape))


@pytest.mark.parametrize("func", [softmax_gap, softmax_max, entropy])
def test_full_logit_axis_refuses_a_bool(func):
    with pytest.raises(TypeError, match="axis must be an int"):
        func(np.ones((3, 4)), axis=True)
