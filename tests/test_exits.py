"""Exit simulation against a plain per-token, per-threshold loop."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import calibrate
from calibrate.exits import (
    Decay,
    average_layers,
    default_lambdas,
    disagreement_counts,
    early_tokens,
    exit_layers,
    with_decay_headroom,
)


def _reference_exit_layers(conf, lambdas, positions=None, decay=None):
    n_tokens, n_layers = conf.shape
    out = np.empty((n_tokens, len(lambdas)), dtype=int)
    for t in range(n_tokens):
        for k, lam in enumerate(lambdas):
            thr = lam
            if decay is not None:
                thr = min(max(0.9 * lam + 0.1 * np.exp(-decay.tau * float(positions[t]) / decay.max_len), 0.0), 1.0)
            out[t, k] = n_layers
            for i in range(n_layers - 1):
                if conf[t, i] >= thr:
                    out[t, k] = i + 1
                    break
    return out


# Values on a coarse grid make ties between confidences and thresholds frequent.
_values = st.sampled_from([-1.0, -0.5, 0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.95, 0.999, 1.0])


@st.composite
def _problem(draw):
    n_tokens = draw(st.integers(1, 30))
    n_layers = draw(st.integers(1, 7))
    conf = draw(arrays(np.float32, (n_tokens, n_layers), elements=_values.map(np.float32)))  # exact under numpy 1
    lambdas = np.array(sorted(set(draw(st.lists(_values, min_size=1, max_size=8))), reverse=True))
    positions = draw(arrays(np.int64, (n_tokens,), elements=st.integers(0, 40)))
    decay = draw(st.none() | st.builds(Decay, max_len=st.integers(1, 40), tau=st.sampled_from([0.0, 1.0, 4.0])))
    return conf, lambdas, positions, decay


@settings(max_examples=300, deadline=None)
@given(_problem())
def test_exit_layers_match_plain_loop(problem):
    conf, lambdas, positions, decay = problem
    got = exit_layers(conf, lambdas, positions=positions, decay=decay)
    np.testing.assert_array_equal(got, _reference_exit_layers(conf, lambdas, positions, decay))


@settings(max_examples=200, deadline=None)
@given(_problem(), st.data())
def test_counts_and_average_layers_match_plain_loop(problem, data):
    conf, lambdas, positions, decay = problem
    n_tokens, n_layers = conf.shape
    agree = data.draw(arrays(np.bool_, conf.shape))
    full = np.zeros(n_tokens, dtype=np.int32)
    top1 = np.where(agree, 0, 1 + np.arange(n_layers)).astype(np.int32)
    # sequences as CSR offsets; positions (for decay) count from each sequence's start
    n_sequences = data.draw(st.integers(1, 5))
    seq = np.sort(data.draw(arrays(np.int64, (n_tokens,), elements=st.integers(0, n_sequences - 1))))
    offsets = np.searchsorted(seq, np.arange(n_sequences + 1))
    positions = np.arange(n_tokens) - offsets[seq]
    layers = _reference_exit_layers(conf, lambdas, positions, decay)
    wrong = ~np.take_along_axis(agree, layers - 1, axis=1) & (layers < n_layers)
    expected = np.zeros((n_sequences, len(lambdas)), dtype=int)
    np.add.at(expected, seq, wrong)

    counts, avg = disagreement_counts(conf, lambdas, top1, full, offsets, decay=decay)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(avg, layers.mean(axis=0))
    np.testing.assert_allclose(average_layers(conf, lambdas, offsets=offsets, decay=decay), layers.mean(axis=0))


@pytest.mark.parametrize("n_lambdas", [201, 300])
def test_counts_on_long_and_fine_grids_match_exit_layers(n_lambdas):
    """Grids of more than 255 thresholds take the wider lookup table; values sit on the thresholds."""
    rng = np.random.default_rng(n_lambdas)
    lambdas = default_lambdas() if n_lambdas == 201 else np.sort(rng.uniform(0, 1, n_lambdas))[::-1]
    conf = rng.choice(np.concatenate([lambdas, rng.uniform(0, 1, 50)]), size=(400, 6)).astype(np.float32)
    top1 = rng.integers(0, 2, conf.shape).astype(np.int32)
    full = np.zeros(400, dtype=np.int32)
    offsets = np.array([0, 100, 250, 400])
    layers = exit_layers(conf, lambdas)
    wrong = (np.take_along_axis(top1, layers - 1, axis=1) != 0) & (layers < conf.shape[1])
    expected = np.add.reduceat(wrong.astype(int), offsets[:-1], axis=0)
    counts, avg = disagreement_counts(conf, lambdas, top1, full, offsets)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(avg, layers.mean(axis=0))


@pytest.mark.parametrize("n_layers", [62, 63, 64, 130])
@pytest.mark.parametrize("decay", [None, Decay(max_len=20, tau=2.0)])
def test_deep_models_match_plain_loop(n_layers, decay):
    """Models deeper than one bit-mask window of the kernel (62 early layers); disagreements flip often."""
    rng = np.random.default_rng(n_layers)
    lambdas = np.array([0.99, 0.9, 0.75, 0.5, 0.3, 0.0])
    conf = (rng.random((60, n_layers)) ** 3).astype(np.float32)  # records spread over all the layers
    conf[::7, 60:64] = 1.0
    top1 = rng.integers(0, 2, conf.shape).astype(np.int32)
    full = np.zeros(60, dtype=np.int32)
    offsets = np.array([0, 25, 60])
    positions = np.arange(60) - np.repeat(offsets[:-1], np.diff(offsets))
    layers = _reference_exit_layers(conf, lambdas, positions, decay)
    wrong = (np.take_along_axis(top1, layers - 1, axis=1) != 0) & (layers < n_layers)
    counts, avg = disagreement_counts(conf, lambdas, top1, full, offsets, decay=decay)
    np.testing.assert_array_equal(counts, np.add.reduceat(wrong.astype(int), offsets[:-1], axis=0))
    np.testing.assert_allclose(avg, layers.mean(axis=0))
    assert counts.sum() > 0 and (layers[:, 0] >= 61).sum() > 10  # many exits past the first window


@pytest.mark.parametrize("tau", [0.0, 100.0, 400.0])
def test_decay_past_the_settled_position_and_many_sequences_match_plain_loop(tau):
    """Tables by position stop where exp(-tau t / N) is 0.0 (they held a row per position of the longest sequence,
    GiBs for one long sequence); the average-layer histogram has a row per thread (it had one per sequence)."""
    decay = Decay(max_len=2, tau=tau)
    assert decay._settled() == (0 if tau == 0 else int(np.ceil(746 * 2 / tau)))
    rng = np.random.default_rng(5)
    conf = rng.random((400, 5))
    lambdas = np.linspace(1.0, 0.0, 23)
    for offsets in ([0, 400], [0, 390, 400], np.arange(401)):
        positions = np.concatenate([np.arange(n) for n in np.diff(offsets)])
        layers = _reference_exit_layers(conf, lambdas, positions, decay)
        np.testing.assert_array_equal(exit_layers(conf, lambdas, positions=positions, decay=decay), layers)
        np.testing.assert_allclose(average_layers(conf, lambdas, offsets=offsets, decay=decay), layers.mean(axis=0))
        top1, full = rng.integers(0, 2, conf.shape), rng.integers(0, 2, 400)
        counts, _ = disagreement_counts(conf, lambdas, top1, full, offsets, decay=decay)
        early = np.where(layers == 5, full[:, None], np.take_along_axis(top1, layers - 1, axis=1))
        np.testing.assert_array_equal(counts.sum(axis=0), (early != full[:, None]).sum(axis=0))


def test_decay_over_one_long_sequence_needs_no_table_of_thresholds_by_position():
    """The sweep tabulated a row of thresholds per position of the longest sequence (up to the settled one):
    N = T = 1e6 held 1.7 GB. It now computes each row from one shift per position, with the same float
    operations as Decay.thresholds (the counts still equal exit_layers' exactly)."""
    import tracemalloc

    n, decay = 200_000, Decay(max_len=10**6)
    rng = np.random.default_rng(3)
    conf = rng.random((n, 3))
    lambdas = default_lambdas(decay=True)  # 212 thresholds: a table would take 200,000 x 212 x 8 B = 339 MB
    top1, full = rng.integers(0, 2, conf.shape), rng.integers(0, 2, n)
    disagreement_counts(conf[:10], lambdas, top1[:10], full[:10], [0, 10], decay=decay)  # compile outside the trace
    tracemalloc.start()
    try:
        counts, _ = disagreement_counts(conf, lambdas, top1, full, [0, n], decay=decay)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    layers = exit_layers(conf, lambdas, positions=np.arange(n), decay=decay)
    early = np.where(layers == 3, full[:, None], np.take_along_axis(top1, layers.astype(np.intp) - 1, axis=1))
    np.testing.assert_array_equal(counts[0], (early != full[:, None]).sum(axis=0))


def test_a_huge_integer_tau_decays_in_floats_as_decay_thresholds_does():
    """The sweep's shift by position multiplied an int tau by int64 positions: wrapped above 2**63."""
    conf, lambdas = np.random.default_rng(2).random((12, 4)), np.linspace(1.0, 0.0, 9)
    positions = np.arange(12)
    for tau in (2**62, 3 * 2**60, 4):
        decay = Decay(max_len=2**62, tau=tau)
        layers = _reference_exit_layers(conf, lambdas, positions, decay)
        np.testing.assert_array_equal(exit_layers(conf, lambdas, positions=positions, decay=decay), layers)
        np.testing.assert_allclose(average_layers(conf, lambdas, offsets=[0, 12], decay=decay), layers.mean(axis=0))


def test_a_tiny_tau_settles_nowhere_without_overflow():
    """746 N / tau is inf for a subnormal tau (math.ceil raised), and a huge settled position overflowed int32
    positions."""
    conf, lambdas = np.random.default_rng(1).random((30, 4)), np.linspace(1.0, 0.0, 11)
    positions = np.arange(30, dtype=np.int32)
    for tau in (5e-324, 3e-4):
        decay = Decay(max_len=1000, tau=tau)
        assert decay._settled() >= 2**31
        got = exit_layers(conf, lambdas, positions=positions, decay=decay)
        np.testing.assert_array_equal(got, _reference_exit_layers(conf, lambdas, positions, decay))
        np.testing.assert_allclose(average_layers(conf, lambdas, offsets=[0, 30], decay=decay), got.mean(axis=0))


def test_decay_defaults_to_calms_rate():
    """CALM's decaying threshold: 0.9 lambda + 0.1 exp(-tau t / N) with tau = 4 unless told otherwise."""
    decay = Decay(max_len=10)
    assert decay.tau == 4.0
    expected = [[0.9 * 0.5 + 0.1 * np.exp(-4.0 * t / 10)] for t in (0, 3, 9)]
    np.testing.assert_allclose(decay.thresholds([0.5], [0, 3, 9]), expected)
    assert decay.thresholds(0.5, [0, 3, 9]).shape == (3,)  # positions.shape + lambdas.shape (was (3, 1))
    with pytest.raises(ValueError, match="positions must be >= 0 .*got a minimum of -20"):
        decay.thresholds([0.5], [-20, 2])  # exit_layers refuses it too


def test_decay_refuses_confidences_above_one():
    """The decaying threshold is clipped to [0, 1]: a score on [0, 10] passed every threshold of 3, 5, 7 and 9 alike,
    and each was listed as a certified row of its own."""
    conf = np.array([[0.5, 7.0, 1.0], [0.2, 0.9, 1.0]])  # the last layer's value is never read
    decay = Decay(max_len=4)
    with pytest.raises(ValueError, match="with decay, confidences must be at most 1 .* got 7: rescale"):
        average_layers(conf, [9.0, 5.0], offsets=[0, 2], decay=decay)
    with pytest.raises(ValueError, match="with decay, confidences must be at most 1"):
        exit_layers(conf, [9.0, 5.0], positions=[0, 1], decay=decay)
    conf[0, 1] = 1.0
    average_layers(conf, [1.0, 0.5], offsets=[0, 2], decay=decay)
    average_layers(conf * 7, [9.0, 5.0], offsets=[0, 2])  # without decay any scale works


def test_blocks_do_not_change_the_result(monkeypatch):
    import calibrate.exits as exits

    rng = np.random.default_rng(3)
    conf = rng.random((1000, 9)).astype(np.float32)
    lambdas = default_lambdas()
    whole = exit_layers(conf, lambdas)
    monkeypatch.setattr(exits, "_BLOCK", 37)
    np.testing.assert_array_equal(exit_layers(conf, lambdas), whole)


def test_lower_thresholds_never_exit_later():
    rng = np.random.default_rng(0)
    layers = exit_layers(rng.random((500, 12)), default_lambdas())
    assert np.all(np.diff(layers.astype(int), axis=1) <= 0)
    assert layers.min() >= 1 and layers.max() <= 12


def test_early_tokens_are_the_exit_layers_top1():
    top1 = np.array([[5, 6, 7], [8, 9, 10]])
    layers = np.array([[1, 3], [2, 2]])
    np.testing.assert_array_equal(early_tokens(top1, layers), [[5, 7], [9, 9]])
    # running to the last layer is the full model, whatever the last layer's stored top-1 says
    np.testing.assert_array_equal(early_tokens(top1, layers, np.array([70, 80])), [[5, 70], [9, 9]])


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("lam", [[1e308, -1e308], [1e308, 0.5, -1e308], [1e-310, 0.0], [2e-310, 1e-310, 0.0]])
def test_grids_beyond_the_float_range_or_with_subnormal_gaps_are_exact_and_quiet(lam):
    """Their lookup table overflowed (RuntimeWarnings; the sweep then walked the grid from a NaN cell)."""
    conf = np.random.default_rng(0).choice(np.array([*lam, 0.3, 1e-310, 0.0, 5.0]), size=(60, 4))
    top1, full = np.zeros((60, 4), np.int32), np.ones(60, np.int32)
    np.testing.assert_array_equal(average_layers(conf, lam), exit_layers(conf, lam).mean(axis=0))
    counts, _ = disagreement_counts(conf, lam, top1, full, [0, 60])
    np.testing.assert_array_equal(counts[0], (exit_layers(conf, lam) < 4).sum(axis=0))


def test_early_tokens_refuses_layers_outside_1_to_l():
    top1 = np.array([[1, 2, 3]])
    for bad in (0, 4, -1):  # layer 0 read the last layer's token (index -1)
        with pytest.raises(ValueError, match=r"1-based exit layers in \[1, 3\]"):
            early_tokens(top1, np.array([[bad]]))
    with pytest.raises(ValueError, match="must be 2-D with as many rows"):
        early_tokens(top1, np.array([[1], [2]]))
    with pytest.raises(TypeError, match="layers must be ints"):
        early_tokens(top1, np.array([[1.0]]))
    np.testing.assert_array_equal(early_tokens(top1, np.array([[1, 3]])), [[1, 3]])


def test_every_real_dtype_gives_the_float32_result():
    rng = np.random.default_rng(3)
    conf = rng.random((40, 6)).astype(np.float16)
    top1, full = rng.integers(0, 3, (40, 6)), rng.integers(0, 3, 40)
    lam, offsets = [0.9, 0.6, 0.3], [0, 15, 40]
    expected = disagreement_counts(conf.astype(np.float32), lam, top1, full, offsets)
    for dtype in (np.float16, np.float64, np.longdouble):
        got = disagreement_counts(conf.astype(dtype), lam, top1, full, offsets)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(average_layers(conf.astype(dtype), lam), expected[1])


def test_big_endian_integer_and_tensor_confidences_are_compared_at_full_precision():
    """``>f8`` was computed in float32 (0.7 fell below the threshold 0.7), ints above 2**24 were rounded, and a
    torch bfloat16 tensor failed inside numpy."""
    conf = np.array([[0.7, 0.2, 0.0], [0.3, 0.7, 0.0]])
    lam, top1, full = [0.9, 0.7, 0.5], np.array([[1, 2, 3], [4, 5, 3]]), np.array([3, 3])
    big = conf.astype(">f8")
    np.testing.assert_array_equal(exit_layers(big, lam), [[3, 1, 1], [3, 2, 2]])
    np.testing.assert_array_equal(average_layers(big, lam), average_layers(conf, lam))
    got, want = (disagreement_counts(c, lam, top1, full, [0, 1, 2]) for c in (big, conf))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    ints = np.array([[2**24 + 1, 0], [2**24, 0]], dtype=np.int64)
    np.testing.assert_array_equal(exit_layers(ints, [2**24 + 1.0]), [[1], [2]])
    torch = pytest.importorskip("torch")
    tensor = torch.tensor([[0.5, 0.0], [0.75, 0.0]], dtype=torch.bfloat16, requires_grad=True)
    np.testing.assert_array_equal(exit_layers(tensor, [0.75, 0.5]), [[2, 1], [1, 1]])


def test_tensors_from_a_model_serve_as_confidences_losses_and_thresholds():
    """exit_layers took a bfloat16 tensor requiring grad; proxy_losses, certify and the bounds failed in numpy."""
    torch = pytest.importorskip("torch")
    from calibrate import bounds, certify, proxy_losses, synthetic_cache

    cache = synthetic_cache(30, n_layers=4, seed=0)
    conf = cache.arrays["softmax_gap"]
    tensor = torch.tensor(conf, dtype=torch.bfloat16, requires_grad=True)
    lam = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64, requires_grad=True)
    table = proxy_losses(cache, tensor, lam)
    assert table == proxy_losses(cache, tensor.detach().float().numpy(), [0.9, 0.5, 0.2])
    losses = torch.tensor(table.losses, dtype=torch.bfloat16, requires_grad=True)
    assert certify(losses, lam, delta=0.3) == certify(losses.detach().float().numpy(), [0.9, 0.5, 0.2], delta=0.3)
    np.testing.assert_array_equal(bounds.p_values(losses, 0.3), bounds.p_values(losses.detach().float().numpy(), 0.3))
    means = torch.tensor([0.1, 0.2], dtype=torch.bfloat16, requires_grad=True)
    plain = means.detach().float().numpy()
    np.testing.assert_array_equal(bounds.hoeffding_kl(means, 100, 0.3), bounds.hoeffding_kl(plain, 100, 0.3))
    # bfloat16 rounds 0.1 to 0.10009765625: read in its precision, 10 failures of 100 (its float32 value: 11)
    np.testing.assert_array_equal(bounds.bentkus(means, 100, 0.3), bounds.bentkus([0.1, 0.2], 100, 0.3))
    assert certify(table, lam, delta=0.3) == certify(table, delta=0.3)  # the table's own grid, as a tensor


def test_decay_settings_of_numpy_types_are_python_numbers():
    """A long double tau reached the compiled sweep as float128 (a numba TypingError); a small numpy int n of
    with_decay_headroom overflowed in n + 1 (np.uint8(255) added nothing)."""
    decay = Decay(np.int16(30), np.longdouble(4.0))
    assert (type(decay.max_len), type(decay.tau)) == (int, float) and decay == Decay(30, 4.0)
    conf = np.random.default_rng(0).random((50, 4))
    offsets = [0, 20, 50]
    np.testing.assert_array_equal(
        average_layers(conf, [0.9, 0.5], offsets=offsets, decay=decay),
        average_layers(conf, [0.9, 0.5], offsets=offsets, decay=Decay(30, 4.0)),
    )
    assert with_decay_headroom([1.0, 0.5], np.uint8(255)).size == 257
    assert with_decay_headroom([1.0, 0.5], np.int8(127)).size == 129


def test_no_tokens_have_no_average_layer():
    conf = np.zeros((0, 4))
    assert np.isnan(average_layers(conf, [0.9, 0.5])).all()  # was [1, 1]: a mean over nothing
    counts, avg = disagreement_counts(conf, [0.9, 0.5], np.zeros((0, 4), int), np.zeros(0, int), [0, 0])
    assert counts.tolist() == [[0, 0]] and np.isnan(avg).all()  # one empty sequence


def test_huge_finite_confidences_are_safe():
    conf = np.array([[0.2, 1e30, 0.3, 0.1], [-1e30, 0.5, 0.95, 0.0]] * 3)
    lam = [0.9, 0.4]
    np.testing.assert_allclose(average_layers(conf, lam), exit_layers(conf, lam).mean(axis=0))
    top = np.full((4, 4), 1e308)  # finite, but their sum overflows
    np.testing.assert_allclose(average_layers(top, lam), [1.0, 1.0])
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or inf"):
            average_layers(np.where(np.eye(4, dtype=bool), bad, top), lam)
    with pytest.raises(ValueError, match="NaN or inf"):
        exit_layers(np.array([[0.5, np.nan, 0.1]]), lam)


def test_decay_thresholds_formula():
    decay = Decay(max_len=10, tau=4.0)
    got = decay.thresholds(np.array([0.5, -3.0]), np.array([0, 5]))
    expected = np.array(
        [[0.9 * 0.5 + 0.1, 0.0], [0.9 * 0.5 + 0.1 * np.exp(-2.0), 0.0]]
    )
    np.testing.assert_allclose(got, expected)


def test_default_grid_is_decreasing_and_fine_near_one():
    grid = default_lambdas()
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0)
    assert np.sum(grid > 0.99) >= 90


@pytest.mark.parametrize(
    "lambdas, match",
    [([0.1, 0.5], "strictly decreasing"), ([], "non-empty"), ([np.inf, 0.5], "finite"), ([[0.5]], "1-D"),
     ([0.9, 0.5, 0.5], r"lambdas\[1\]=0.5 <= lambdas\[2\]=0.5")],
)
def test_bad_lambdas(lambdas, match):
    with pytest.raises(ValueError, match=match):
        exit_layers(np.zeros((2, 3)), lambdas)


@pytest.mark.parametrize("lambdas", [["a", "b"], [1 + 2j, 0.5], [None, 0.5], [True, False]])
def test_lambdas_that_are_not_real_numbers_are_a_type_error(lambdas):
    with pytest.raises(TypeError, match="lambdas must be real numbers, got dtype"):
        exit_layers(np.zeros((2, 3)), lambdas)


def test_with_decay_headroom_checks_its_inputs():
    np.testing.assert_allclose(with_decay_headroom([1.0, 0.5], 2), [1 / 0.9, (1 / 0.9 + 1) / 2, 1.0, 0.5])
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        with_decay_headroom([1.0, 0.5], -3)  # was numpy's 'Number of samples, -2, must be non-negative'
    with pytest.raises(ValueError, match=r"grid must be strictly decreasing .*grid\[0\]=0.5 <= grid\[1\]=1"):
        with_decay_headroom([0.5, 1.0], 2)  # was returned unsorted
    with pytest.raises(ValueError, match="grid must start at or below 1"):
        with_decay_headroom([1.05, 0.5], 2)
    for n in (2.0, True):
        with pytest.raises(TypeError, match=rf"n must be an int >= 0, got .*\({type(n).__name__}\)"):
            with_decay_headroom([1.0, 0.5], n)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_confidence_is_refused(bad):
    conf = np.array([[0.5, bad, 0.1], [0.2, 0.3, 0.4]])
    with pytest.raises(ValueError, match="NaN or inf"):
        average_layers(conf, [0.9, 0.4])
    with pytest.raises(ValueError, match="NaN or inf"):
        disagreement_counts(conf, [0.9, 0.4], np.zeros((2, 3), np.int32), np.zeros(2, np.int32), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        exit_layers(conf, [0.9, 0.4])
    # the last layer's value is never read: every function takes it alike (exit_layers refused it, the sweep not)
    last = np.array([[0.5, 0.95, bad], [0.2, 0.3, bad]])
    np.testing.assert_array_equal(exit_layers(last, [0.9, 0.4]), [[2, 1], [3, 3]])
    np.testing.assert_array_equal(average_layers(last, [0.9, 0.4]), [2.5, 2.0])
    with pytest.raises(ValueError, match="offsets"):
        average_layers(np.zeros((3, 2)), [0.5], offsets=[0, 2])
    with pytest.raises(
        TypeError, match=r"Decay.max_len must be an int in 1..4611686018427387904 .*, got 1.5 \(float\)"
    ):
        Decay(max_len=1.5)
    decay = Decay(max_len=4)  # positions count from each sequence's start: without offsets, nothing to count from
    with pytest.raises(ValueError, match=r"offsets .* are needed with decay.*offsets=\[0, n_tokens\]"):
        average_layers(np.zeros((3, 2)), [0.5], decay=decay)
    np.testing.assert_array_equal(average_layers(np.zeros((3, 2)), [0.5], offsets=[0, 3], decay=decay), [2.0])


def test_bad_conf_and_decay():
    with pytest.raises(ValueError, match="conf must have shape"):
        exit_layers(np.zeros(3), [0.5])
    with pytest.raises(ValueError, match="positions"):
        exit_layers(np.zeros((2, 3)), [0.5], decay=Decay(5))
    with pytest.raises(TypeError, match="decay"):
        exit_layers(np.zeros((2, 3)), [0.5], positions=[0, 1], decay={"max_len": 5})
    with pytest.raises(ValueError, match="max_len"):
        Decay(0)
    for bad in ([np.nan, 0], [0.5, 1.7], [np.inf, 0]):  # NaN used to mean "never exit", fractions truncated
        with pytest.raises(ValueError, match="positions must be ints"):
            exit_layers(np.zeros((2, 3)), [0.5], positions=bad, decay=Decay(5))
    with pytest.raises(ValueError, match="offsets must be ints"):
        average_layers(np.zeros((2, 3)), [0.5], offsets=[0, 1.5, 2])
    wrapping = [0, 2**63 - 1, -2, 3]  # np.diff wraps to [2**63 - 1, 2**63 - 1, 5]: passed, then a segfault
    with pytest.raises(ValueError, match="offsets must be non-decreasing CSR offsets"):
        average_layers(np.zeros((3, 3)), [0.5], offsets=wrapping)
    with pytest.raises(ValueError, match="offsets must be non-decreasing CSR offsets"):
        disagreement_counts(np.zeros((3, 3)), [0.5], np.zeros((3, 3), int), np.zeros(3, int), wrapping)
    for bad in (np.array([["0.1", "0.9"]]), np.array([[None, 0.5]], dtype=object)):  # converted, or "NaN or inf"
        with pytest.raises(TypeError, match="conf must be a real numeric array"):
            exit_layers(bad, [0.5])


def test_numba_kernel_leaves_torch_thread_count_alone(monkeypatch):
    """Numba's OpenMP layer may set the process-wide thread count when it launches; a torch user's setting
    must survive fit (the side effect is simulated at every launch: it does not happen every time)."""
    torch = pytest.importorskip("torch")
    import calibrate.exits as exits

    kernel = exits._sweep

    def launch_like_numba(*args):
        torch.set_num_threads(2)
        return kernel(*args)

    monkeypatch.setattr(exits, "_sweep", launch_like_numba)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        conf = np.random.default_rng(0).random((50, 4)).astype(np.float32)
        np.testing.assert_array_equal(average_layers(conf, [0.9, 0.5]), exit_layers(conf, [0.9, 0.5]).mean(axis=0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_torch_thread_count_survives_numbas_pool_start(monkeypatch):
    """Starting numba's pool (numba.get_num_threads, which an earlier version called before the guard) changes torch's
    count too: nothing before the guard may start it."""
    import numba
    from numba.np.ufunc import parallel

    torch = pytest.importorskip("torch")

    def starts_the_pool(real):
        def start_pool_like_numba(*args):
            torch.set_num_threads(2)
            return real(*args)

        return start_pool_like_numba

    monkeypatch.setattr(numba, "get_num_threads", starts_the_pool(numba.get_num_threads))
    monkeypatch.setattr(parallel, "_launch_threads", starts_the_pool(parallel._launch_threads))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        average_layers(np.random.default_rng(0).random((50, 4)), [0.9, 0.5])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _fit_in_child(n_sequences: int) -> str:
    return calibrate.fit(calibrate.synthetic_cache(n_sequences, seed=0)).to_json()


@pytest.mark.skipif(sys.platform == "win32", reason="no fork")
def test_a_process_forked_after_a_fit_fits_alike():
    """numba's GNU OpenMP layer aborts a forked child that starts a parallel region once the parent has: a
    multiprocessing pool (fork) of audits after one fit never returned. Forked children run the serial kernels."""
    import multiprocessing

    cert = calibrate.fit(calibrate.synthetic_cache(60, seed=0))  # starts numba's threads here
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_fit_in_child, (60,)).get(timeout=120) == cert.to_json()


_CONCURRENT = """
from concurrent.futures import ThreadPoolExecutor
import numba
import calibrate
cache = calibrate.synthetic_cache(200, seed=0)
with ThreadPoolExecutor(4) as pool:
    certs = list(pool.map(lambda _: calibrate.fit(cache, delta=0.1, epsilon=0.05), range(16)))
assert len({c.to_json() for c in certs}) == 1
try:
    import torch
    from calibrate import fff
except ImportError:  # the core without the model extras: the sweep alone
    torch = None
if torch is not None:
    layer, x = fff.FFF(64, 16, 6).eval(), torch.randn(500, 64)
    with torch.no_grad():
        expected = layer(x, backend="torch")
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda _: layer(x, backend="numba"), range(32)))
    assert all(torch.allclose(o, expected, atol=1e-5) for o in outs)
print(numba.threading_layer())
"""


def test_threads_running_the_kernels_at_once_under_numbas_workqueue_layer():
    """The workqueue layer (the one every install has) aborted the process (SIGABRT, "Concurrent access has been
    detected") when two threads entered the parallel sweep or FFF descent: the second runs the serial build."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    run = subprocess.run(
        [sys.executable, "-c", _CONCURRENT], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["workqueue"]


def test_kernels_compile_uncached_where_numba_cannot_cache(monkeypatch):
    """On a read-only install without a writable cache directory numba refuses cache=True at decoration, so
    import calibrate failed ("no locator available")."""
    import numba

    from calibrate._threads import njit

    real = numba.njit

    def strict(*args, **options):
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'double': no locator available for file '<test>'")
        return real(*args, **options)

    monkeypatch.setattr(numba, "njit", strict)

    @njit(nogil=True)
    def double(x):
        return 2 * x

    assert double(21) == 42 and double.py_func(1) == 2


def test_token_ids_of_different_integer_dtypes_are_compared_exactly():
    """int64 top-1 ids against uint64 full tokens would meet in float64, where 2**53 + 1 == 2**53: refused;
    int16 top-1 ids keep a full-model token beyond their range."""
    top1 = np.array([[2**53 + 1, 0]], np.int64)
    with pytest.raises(ValueError, match="common integer dtype"):
        disagreement_counts(np.array([[0.9, 0.0]]), [0.5], top1, np.array([2**53], np.uint64), [0, 1])
    counts, _ = disagreement_counts(np.array([[0.9, 0.0]]), [0.5], top1, np.array([2**53], np.int64), [0, 1])
    assert counts.tolist() == [[1]]
    assert early_tokens(np.array([[1, 2]], np.int16), np.array([[2]]), np.array([40000])).tolist() == [[40000]]


def test_exit_layers_beyond_the_int16_range():
    layers = exit_layers(np.zeros((1, 40_000)), [0.5])
    assert layers.dtype == np.int32 and layers.tolist() == [[40_000]]


def test_default_grids_hold_round_values_where_they_are_evenly_spaced():
    pytest.importorskip("torch")  # calibrate.decoded
    from calibrate.decoded import decoded_lambdas

    grid = default_lambdas()
    even = grid[(grid <= 0.99) & np.isclose(grid * 100, np.round(grid * 100))]
    assert even.size == 100 and all(repr(float(v)) == repr(round(float(v), 2)) for v in even)  # 0.94, not 0.94...01
    assert 0.94 in grid.tolist() and 0.3 in decoded_lambdas().tolist()


_NO_JIT = """
import json
import calibrate
cache = calibrate.synthetic_cache(40, n_layers=5, seed=0)
cert = calibrate.fit(cache, delta=0.2, epsilon=0.1, decay=2.0)
print(json.dumps([cert.lambda_hat, list(cert.risks), list(cert.avg_layers)]))
"""


def test_the_sweep_runs_as_python_under_numba_disable_jit():
    """NUMBA_DISABLE_JIT=1 (numba's switch for debugging and coverage) made import calibrate fail ("'function' object
    has no attribute 'py_func'"), and the sweep's bit scan had no Python version."""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    run = subprocess.run([sys.executable, "-c", _NO_JIT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    cert = calibrate.fit(calibrate.synthetic_cache(40, n_layers=5, seed=0), delta=0.2, epsilon=0.1, decay=2.0)
    assert json.loads(run.stdout) == [cert.lambda_hat, list(cert.risks), list(cert.avg_layers)]
