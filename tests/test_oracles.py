"""Oracle exit depths against plain per-token loops, and the oracle's average layers against an LP solver."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from calibrate.cache import LayerCache
from calibrate.synthetic import synthetic_cache
from measures.oracles import (
    consistency_oracle,
    correctness_oracle,
    likelihood_oracle,
    oracle_average_layers,
    oracle_depths,
    smooth_oracle,
)

# ----------------------------------------------------------------------------------------------------
# Plain-loop references
# ----------------------------------------------------------------------------------------------------


def _reference_consistency(top1, full, rule):
    n_tokens, n_layers = top1.shape
    out = np.empty(n_tokens, dtype=int)
    for t in range(n_tokens):
        agree = [top1[t, i] == full[t] or i == n_layers - 1 for i in range(n_layers)]
        for i in range(n_layers):
            if agree[i] and (rule == "first" or all(agree[i:])):
                out[t] = i + 1
                break
    return out


def _reference_likelihood(ids, lp, full, vocab_size, penalty):
    n_tokens, n_layers, k = ids.shape
    out = np.empty(n_tokens, dtype=int)
    for t in range(n_tokens):
        best, best_layer = -np.inf, 0
        for i in range(n_layers):
            row = lp[t, i].astype(np.float64)
            hits = np.flatnonzero(ids[t, i] == full[t])
            if hits.size:
                value = row[hits[0]]
            else:  # the average tail probability, floored, and never above the k-th
                rest = max(1.0 - np.exp(row).sum(), np.finfo(np.float64).tiny)
                value = min(np.log(rest / (vocab_size - k)), row[-1])
            score = value - penalty * (i + 1)
            if score > best:  # strict: ties keep the earliest layer
                best, best_layer = score, i + 1
        out[t] = best_layer
    return out


def _reference_correctness(top1, targets):
    out = np.ones(top1.shape[0], dtype=int)
    for t in range(top1.shape[0]):
        for i in range(top1.shape[1]):
            if top1[t, i] == targets[t]:
                out[t] = i + 1
                break
    return out


def _reference_smooth(depths, n_layers, sigma):
    out = np.zeros((len(depths), n_layers))
    for t, d in enumerate(depths):
        for n in range(1, n_layers + 1):
            out[t, n - 1] = float(n == d) if sigma == 0 else np.exp(-((n - d) ** 2) / (2 * sigma**2))
        out[t] /= out[t].sum()
    return out


def _reference_average_layers(depths, offsets, delta, consistency):
    """The knapsack relaxation solved by scipy's LP solver: x_j in [0, 1] = share of item j given up."""
    lengths = np.diff(offsets)
    n_seq = lengths.size
    savings = (depths - 1).astype(float)
    if consistency == "token":
        cost = 1.0 / (n_seq * np.repeat(lengths, lengths))
    else:
        savings = np.array([savings[offsets[s] : offsets[s + 1]].sum() for s in range(n_seq)])
        cost = np.full(n_seq, 1.0 / n_seq)
    res = linprog(-savings, A_ub=cost[None, :], b_ub=[delta], bounds=[(0, 1)] * savings.size, method="highs")
    assert res.status == 0
    return (depths.sum() + res.fun) / depths.size


# ----------------------------------------------------------------------------------------------------
# Random caches
# ----------------------------------------------------------------------------------------------------


def _random_cache(seed, n_tokens, n_layers, k, vocab_size):
    """Top-k ids from a small vocabulary (so agreement and absence are both frequent) and sorted
    log-probabilities whose tail mass is random; the full token is the last layer's top-1."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n_tokens, n_layers, vocab_size)), axis=-1)[..., :k]
    probs = rng.dirichlet(np.ones(k + 1), size=(n_tokens, n_layers))[..., :k]
    lp = np.log(-np.sort(-probs, axis=-1))
    cuts = np.sort(rng.choice(np.arange(1, n_tokens), size=min(2, n_tokens - 1), replace=False))  # up to 3 sequences
    lengths = np.diff(np.concatenate([[0], cuts, [n_tokens]]))
    return LayerCache.from_arrays(
        full_tokens=ids[:, -1, 0], topk_ids=ids, topk_logprobs=lp, lengths=lengths, vocab_size=vocab_size
    )


@st.composite
def _caches(draw):
    k = draw(st.integers(1, 3))
    return _random_cache(
        draw(st.integers(0, 2**32 - 1)),
        n_tokens=draw(st.integers(1, 25)),
        n_layers=draw(st.integers(1, 6)),
        k=k,
        vocab_size=draw(st.integers(max(k, 2), 6)),
    )


def _arrays(cache):
    ids = np.asarray(cache.arrays["topk_ids"])
    return ids, np.asarray(cache.arrays["topk_logprobs"]), np.asarray(cache.arrays["full_tokens"])


@settings(max_examples=150, deadline=None)
@given(_caches(), st.sampled_from(["first", "stable"]))
def test_consistency_oracle_matches_plain_loop(cache, rule):
    ids, _, full = _arrays(cache)
    np.testing.assert_array_equal(consistency_oracle(cache, rule=rule), _reference_consistency(ids[..., 0], full, rule))


@settings(max_examples=150, deadline=None)
@given(_caches(), st.sampled_from([0.0, 0.05, 0.5, 3.0]))
def test_likelihood_oracle_matches_plain_loop(cache, penalty):
    ids, lp, full = _arrays(cache)
    expected = _reference_likelihood(ids, lp, full, cache.vocab_size, penalty)
    np.testing.assert_array_equal(likelihood_oracle(cache, penalty=penalty), expected)


@settings(max_examples=150, deadline=None)
@given(_caches(), st.data())
def test_correctness_oracle_matches_plain_loop(cache, data):
    ids, _, full = _arrays(cache)
    targets = np.array(
        data.draw(st.lists(st.integers(0, cache.vocab_size - 1), min_size=full.size, max_size=full.size))
    )
    np.testing.assert_array_equal(correctness_oracle(cache, targets), _reference_correctness(ids[..., 0], targets))
    # without targets it is the first agreeing layer
    np.testing.assert_array_equal(correctness_oracle(cache), consistency_oracle(cache, rule="first"))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(1, n), min_size=1, max_size=20))),
    st.sampled_from([0.0, 0.3, 1.0, 2.5]),
)
def test_smooth_oracle_matches_plain_loop(problem, sigma):
    n_layers, depths = problem
    q = smooth_oracle(np.array(depths), n_layers, sigma=sigma)
    np.testing.assert_allclose(q, _reference_smooth(depths, n_layers, sigma), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    rows = np.arange(len(depths))
    assert (q[rows, np.array(depths) - 1][:, None] >= q).all()  # peaks at the oracle ...
    assert (
        (q < q[rows, np.array(depths) - 1][:, None]) | (np.arange(1, n_layers + 1) == np.array(depths)[:, None])
    ).all()


@settings(max_examples=100, deadline=None)
@given(_caches(), st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.9]), st.sampled_from(["token", "sequence"]))
def test_oracle_average_layers_is_the_lp_optimum(cache, delta, consistency):
    depths = consistency_oracle(cache, rule="first")
    got = oracle_average_layers(cache, delta=delta, consistency=consistency)
    expected = _reference_average_layers(depths, np.asarray(cache.offsets), delta, consistency)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert 1.0 <= got <= depths.mean() + 1e-12


# ----------------------------------------------------------------------------------------------------
# Properties on the synthetic cache
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache():
    return synthetic_cache(80, n_layers=8, seed=3)


def test_rules_and_penalties_order_the_depths(cache):
    first, stable = consistency_oracle(cache), consistency_oracle(cache, rule="stable")
    assert (first <= stable).all() and (first < stable).any()  # some tokens flip back
    assert np.array_equal(oracle_depths(cache), first)
    depths = [likelihood_oracle(cache, penalty=p).mean() for p in (0.0, 0.1, 0.5, 100.0)]
    assert depths == sorted(depths, reverse=True)  # a larger penalty never goes deeper on average
    assert (likelihood_oracle(cache, penalty=100.0) == 1).all()


def test_average_layers_bound(cache):
    zero = oracle_average_layers(cache)
    assert zero == pytest.approx(consistency_oracle(cache).mean())
    curve = [oracle_average_layers(cache, delta=d) for d in (0.0, 0.02, 0.1, 0.5)]
    assert curve == sorted(curve, reverse=True) and curve[-1] < zero
    # sequence consistency is the stricter loss: it saves less for the same budget
    assert oracle_average_layers(cache, delta=0.1, consistency="sequence") >= curve[2]


def test_smooth_oracle_one_hot_and_wide():
    np.testing.assert_array_equal(smooth_oracle(np.array([1, 3]), 3, sigma=0.0), [[1, 0, 0], [0, 0, 1]])
    wide = smooth_oracle(np.array([2]), 3, sigma=1e6)
    np.testing.assert_allclose(wide, 1 / 3)
    assert smooth_oracle(np.zeros(0, dtype=int), 4).shape == (0, 4)
    assert smooth_oracle([], 4).shape == (0, 4)  # a plain empty list is an empty int array too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was "overflow encountered in square"
        np.testing.assert_array_equal(smooth_oracle(np.array([2]), 3, sigma=1e-200), [[0, 1, 0]])


@pytest.mark.filterwarnings("ignore:the last layer's top-1 differs from full_tokens")  # on purpose
def test_correctness_oracle_counts_the_full_models_token_at_the_last_layer():
    """The last layer's stored top-1 may differ from the generated token (a repetition penalty, forced
    tokens); the full model still emits it, so the default target is met there, as consistency says."""
    top1 = np.array([[3, 4, 5]])  # no layer's top-1 is the generated token 7
    cache = LayerCache.from_arrays(
        full_tokens=[7], topk_ids=np.stack([top1, top1 + 1], axis=-1), lengths=[1], vocab_size=10
    )
    assert correctness_oracle(cache).tolist() == consistency_oracle(cache, rule="first").tolist() == [3]
    assert correctness_oracle(cache, targets=[7]).tolist() == [1]  # given targets: nothing special


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_bad_input(cache):
    with pytest.raises(ValueError, match="rule must be one of"):
        consistency_oracle(cache, rule="last")
    with pytest.raises(TypeError, match="cache must be a LayerCache"):
        consistency_oracle(np.zeros((3, 2)))
    for penalty, error in ((-0.1, ValueError), (np.inf, ValueError), (True, TypeError), ("0.1", TypeError)):
        with pytest.raises(error, match="penalty"):
            likelihood_oracle(cache, penalty=penalty)
    n = cache.n_tokens
    with pytest.raises(ValueError, match=r"targets must have shape \(n_tokens,\)"):
        correctness_oracle(cache, np.zeros(n + 1, dtype=int))
    with pytest.raises(TypeError, match="targets must be an integer array"):
        correctness_oracle(cache, np.zeros(n))
    with pytest.raises(ValueError, match="targets must be token ids in"):
        correctness_oracle(cache, np.full(n, cache.vocab_size))
    with pytest.raises(ValueError, match="oracle must be one of"):
        oracle_depths(cache, oracle="entropy")
    with pytest.raises(ValueError, match="takes the options"):
        oracle_depths(cache, oracle="consistency", penalty=0.1)
    for args, error, match in (
        (([0, 2], 3), ValueError, r"depths must lie in \[1, n_layers=3\]"),
        (([1.0], 3), TypeError, "depths must be an integer array"),
        (([[1]], 3), ValueError, "depths must have shape"),
        (([1], 0), ValueError, "n_layers must be >= 1"),
        (([1], True), TypeError, "n_layers must be an int"),
    ):
        with pytest.raises(error, match=match):
            smooth_oracle(np.asarray(args[0]), args[1])
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        smooth_oracle(np.array([1]), 2, sigma=-1.0)
    for delta, error in ((1.0, ValueError), (-0.1, ValueError), ("0", TypeError)):
        with pytest.raises(error, match="delta"):
            oracle_average_layers(cache, delta=delta)
    with pytest.raises(ValueError, match="consistency must be one of"):
        oracle_average_layers(cache, consistency="rouge_l")
    stand_in = SimpleNamespace(arrays=cache.arrays, n_layers=cache.n_layers)
    with pytest.raises(TypeError, match="needs a LayerCache"):
        oracle_average_layers(stand_in, delta=0.1)


def test_likelihood_needs_topk_logprobs():
    ids = np.array([[[1, 2], [2, 1]]])
    bare = LayerCache.from_arrays(full_tokens=[2], topk_ids=ids, lengths=[1], vocab_size=5)
    with pytest.raises(ValueError, match="no 'topk_logprobs' array"):
        likelihood_oracle(bare)
    assert consistency_oracle(bare).tolist() == [2]


# ----------------------------------------------------------------------------------------------------
# Added by mutation testing
# ----------------------------------------------------------------------------------------------------


def test_likelihood_oracle_ties_go_to_the_earliest_layer():
    # Token 0: every layer gives the full token (7) p = 0.6, so with no penalty all layers tie.
    # Token 1: 7 is absent from layers 1 and 2 (the same tail estimate, tied), then p = 0.6 at layer 3.
    ids = np.array([[[7, 2], [7, 2], [7, 2]], [[2, 3], [3, 2], [7, 2]]])
    lp = np.log(np.tile([0.6, 0.3], (2, 3, 1)))
    cache = LayerCache.from_arrays(full_tokens=[7, 7], topk_ids=ids, topk_logprobs=lp, lengths=[2], vocab_size=10)
    np.testing.assert_array_equal(likelihood_oracle(cache, penalty=0.0), [1, 3])
    np.testing.assert_array_equal(likelihood_oracle(cache, penalty=10.0), [1, 1])


@pytest.mark.filterwarnings("ignore:the last layer's top-1 differs from full_tokens")  # on purpose
def test_likelihood_oracle_tail_estimate_is_floored_and_quiet():
    # The top 2 hold all the mass (r = 0), so the tail estimate log(r / (V - k)) is floored at
    # log(tiny / (V - k)) ~ -709.8, above the stored log p = -745 of the full token (3) at layer 2.
    lp = np.array([[[np.log(0.5), np.log(0.5)], [0.0, -745.0]]])
    absent_then_low = LayerCache.from_arrays(
        full_tokens=[3], topk_ids=np.array([[[0, 1], [0, 3]]]), topk_logprobs=lp, lengths=[1], vocab_size=4
    )
    absent_then_top = LayerCache.from_arrays(
        full_tokens=[3], topk_ids=np.array([[[0, 1], [3, 0]]]), topk_logprobs=lp, lengths=[1], vocab_size=4
    )
    # k = V: every token is stored, nothing is estimated (and nothing divides by V - k = 0).
    complete = LayerCache.from_arrays(
        full_tokens=[0], topk_ids=np.array([[[1, 0], [0, 1]]]), topk_logprobs=lp, lengths=[1], vocab_size=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(likelihood_oracle(absent_then_low, penalty=0.0), [1])
        np.testing.assert_array_equal(likelihood_oracle(absent_then_top, penalty=0.0), [2])
        np.testing.assert_array_equal(likelihood_oracle(complete, penalty=0.0), [2])


def test_likelihood_oracle_checks_topk_logprobs_against_topk_ids(cache):
    # A single log-probability per layer would broadcast against the k ids and be read as every id's.
    lp = np.asarray(cache.arrays["topk_logprobs"])
    assert lp.shape[-1] >= 2
    stand_in = SimpleNamespace(
        arrays={**cache.arrays, "topk_logprobs": lp[..., :1]}, n_layers=cache.n_layers, vocab_size=cache.vocab_size
    )
    with pytest.raises(ValueError, match="'topk_logprobs' must have the shape of 'topk_ids'"):
        likelihood_oracle(stand_in)


def test_oracle_depths_dispatches_to_each_oracle(cache):
    targets = np.asarray(cache.arrays["topk_ids"])[:, 2, 0]  # layer 3's top-1 as the "reference"
    likelihood, consistency = likelihood_oracle(cache, penalty=0.05), consistency_oracle(cache)
    assert not np.array_equal(likelihood, consistency)
    np.testing.assert_array_equal(oracle_depths(cache, oracle="likelihood", penalty=0.05), likelihood)
    correctness = correctness_oracle(cache, targets)
    np.testing.assert_array_equal(oracle_depths(cache, oracle="correctness", targets=targets), correctness)
    np.testing.assert_array_equal(oracle_depths(cache), consistency)
    np.testing.assert_array_equal(oracle_depths(cache, rule="stable"), consistency_oracle(cache, rule="stable"))


def test_negative_targets_and_non_numeric_sigma_are_refused(cache):
    with pytest.raises(ValueError, match="targets must be token ids in"):
        correctness_oracle(cache, np.full(cache.n_tokens, -1))
    with pytest.raises(TypeError, match="sigma must be a real number"):
        smooth_oracle(np.array([1]), 2, sigma=True)
    with pytest.raises(TypeError, match="sigma must be a real number"):
        smooth_oracle(np.array([1]), 2, sigma="1")
