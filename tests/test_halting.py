"""The Depth-Adaptive Transformer halting heads: the fit against scikit-learn, learning a known depth,
JSON state, bad input, and the measures comparison benchmark on a small synthetic cache."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression

import calibrate
from calibrate.cache import LayerCache
from calibrate.exits import exit_layers
from calibrate.synthetic import synthetic_cache
from measures.halting import HALTING_KINDS, HALTING_MEASURES, HaltingHead, _fit_linear
from measures.oracles import consistency_oracle

N_LAYERS, D, SEQ_LEN = 4, 3, 10

# ----------------------------------------------------------------------------------------------------
# The soft-label fit against scikit-learn
# ----------------------------------------------------------------------------------------------------


def _standardised(rng, n, p):
    x = rng.normal(size=(n, p)).astype(np.float32)
    return (x - x.mean(axis=0)) / x.std(axis=0)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_hard_labels_match_sklearn(n_classes):
    """One-hot targets, unit weights: the same penalised likelihood as LogisticRegression (lbfgs)."""
    rng = np.random.default_rng(0)
    x = _standardised(rng, 400, 3)
    y = np.argmax(x @ rng.normal(size=(3, n_classes)) + rng.gumbel(size=(400, n_classes)), axis=1)
    ours = _fit_linear(x, np.eye(n_classes)[y], np.ones(400), C=0.5, max_iter=500, pinned=n_classes == 2)
    ref = LogisticRegression(C=0.5, tol=1e-8, max_iter=1000).fit(x, y)
    logits = ours.logits(x)
    probs = np.concatenate([1 - expit(logits), expit(logits)], axis=1) if n_classes == 2 else softmax(logits, axis=1)
    np.testing.assert_allclose(probs, ref.predict_proba(x), atol=1e-4)


def test_soft_labels_equal_duplicated_weighted_rows():
    """A soft binary label p with weight w is the pair of rows (1, w p) and (0, w (1 - p)) for sklearn."""
    rng = np.random.default_rng(1)
    x = _standardised(rng, 300, 2)
    p = 1 / (1 + np.exp(-(x @ np.array([1.5, -1.0]))))
    w = rng.uniform(0.2, 1.0, size=300)
    ours = _fit_linear(x, np.stack([1 - p, p], axis=1), w, C=2.0, max_iter=500, pinned=True)
    ref = LogisticRegression(C=2.0, tol=1e-8, max_iter=1000).fit(
        np.concatenate([x, x]), np.r_[np.ones(300), np.zeros(300)], sample_weight=np.r_[w * p, w * (1 - p)]
    )
    np.testing.assert_allclose(ours.coef[:, 0], ref.coef_[0], atol=1e-4)
    np.testing.assert_allclose(ours.intercept, ref.intercept_, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Learning a known depth
# ----------------------------------------------------------------------------------------------------


def _depth_cache(seed, n_sequences=60, *, per_sequence=False, shuffle_states=False):
    """Tokens whose right depth is known: layers agree with the full model from ``depth`` on, and feature 0
    of every hidden state is ``depth`` plus noise (per token, or per sequence for the sequence head)."""
    rng = np.random.default_rng(seed)
    n_tokens = n_sequences * SEQ_LEN
    depth = rng.integers(1, N_LAYERS + 1, size=n_sequences if per_sequence else n_tokens)
    if per_sequence:
        depth = np.repeat(depth, SEQ_LEN)
    hidden = rng.normal(size=(n_tokens, N_LAYERS, D))
    hidden[:, :, 0] = depth[:, None] + 0.2 * rng.normal(size=(n_tokens, N_LAYERS))
    if shuffle_states:  # the states no longer say anything about the depth: a chance-level baseline
        hidden = hidden[rng.permutation(n_tokens)]
    top1 = np.where(np.arange(1, N_LAYERS + 1) >= depth[:, None], 0, 1 + rng.integers(0, 5, size=(n_tokens, 1)))
    ids = np.stack([top1, np.where(top1 == 0, 9, 0)], axis=-1)
    return LayerCache.from_arrays(
        full_tokens=np.zeros(n_tokens, dtype=int),
        topk_ids=ids,
        hidden=hidden,
        lengths=[SEQ_LEN] * n_sequences,
        vocab_size=10,
    )


def _agreement_with_oracle(head, cache, lam=0.5):
    exits = exit_layers(head.predict_confidence(cache), [lam])[:, 0]
    return float((exits == consistency_oracle(cache)).mean())


@pytest.mark.parametrize("kind", HALTING_KINDS)
def test_heads_learn_the_depth(kind):
    per_sequence = kind == "sequence_multinomial"
    train = _depth_cache(0, per_sequence=per_sequence)
    shuffled = _depth_cache(0, per_sequence=per_sequence, shuffle_states=True)
    test = _depth_cache(1, per_sequence=per_sequence)
    learned = _agreement_with_oracle(HaltingHead(kind).fit(train), test)
    chance = _agreement_with_oracle(HaltingHead(kind).fit(shuffled), test)
    assert learned > 0.85, learned
    assert chance < 0.45 and learned > chance + 0.4, (learned, chance)


@pytest.mark.parametrize("kind", HALTING_KINDS)
def test_predictions_are_distributions_and_confidences(kind):
    cache = _depth_cache(2, per_sequence=kind == "sequence_multinomial")
    head = HaltingHead(kind, sigma=1.0).fit(cache)
    q = head.predict_proba(cache)
    conf = head.predict_confidence(cache)
    assert q.shape == conf.shape == (cache.n_tokens, N_LAYERS) and conf.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-12)
    assert (q >= 0).all() and (conf >= 0).all() and (conf <= 1).all() and (conf[:, -1] == 1).all()
    if kind == "geometric":  # q(i) = chi_i prod_{j<i} (1 - chi_j)
        chi = conf[:, :-1].astype(np.float64)
        np.testing.assert_allclose(q[:, 1], chi[:, 1] * (1 - chi[:, 0]), rtol=1e-6)
    else:  # cumulative: non-decreasing, the CDF of q
        assert (np.diff(conf, axis=1) >= -1e-7).all()
        np.testing.assert_allclose(conf[:, :-1], np.cumsum(q, axis=1)[:, :-1], atol=1e-6)
    if kind == "sequence_multinomial":  # one distribution per sequence
        assert (q.reshape(-1, SEQ_LEN, N_LAYERS) == q[::SEQ_LEN][:, None]).all()


def test_oracles_and_targets():
    cache = _depth_cache(3)
    by_likelihood = HaltingHead(oracle="likelihood", oracle_options={"penalty": 0.5})
    with pytest.raises(ValueError, match="no 'topk_logprobs' array"):
        by_likelihood.fit(cache)
    # correctness against given targets: the full model's tokens give the consistency oracle's fit
    targets = np.asarray(cache.arrays["full_tokens"])
    a = HaltingHead(oracle="correctness").fit(cache, targets=targets).predict_confidence(cache)
    b = HaltingHead().fit(cache).predict_confidence(cache)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="targets are used only with oracle='correctness'"):
        HaltingHead().fit(cache, targets=targets)


def test_degenerate_layers_are_constant():
    """Every token's oracle is layer 3 of 3: layer 1 never halts, layer 2 never halts, with Laplace's rule."""
    rng = np.random.default_rng(4)
    n = 40
    ids = np.stack([np.tile([1, 1, 0], (n, 1)), np.tile([0, 0, 2], (n, 1))], axis=-1)
    cache = LayerCache.from_arrays(
        full_tokens=np.zeros(n, dtype=int),
        topk_ids=ids,
        hidden=rng.normal(size=(n, 3, 2)),
        lengths=[10] * 4,
        vocab_size=3,
    )
    conf = HaltingHead().fit(cache).predict_confidence(cache)
    np.testing.assert_allclose(conf[:, :2], 1 / (n + 2), rtol=1e-5)
    multi = HaltingHead("token_multinomial").fit(cache)
    assert multi.classes_ == (3,)
    np.testing.assert_array_equal(multi.predict_confidence(cache), np.tile([0, 0, 1], (n, 1)))


@pytest.mark.parametrize("kind", HALTING_KINDS)
def test_single_layer_cache(kind):
    rng = np.random.default_rng(5)
    cache = LayerCache.from_arrays(
        full_tokens=np.zeros(6, dtype=int),
        topk_ids=np.zeros((6, 1, 1), dtype=int),
        hidden=rng.normal(size=(6, 1, 2)),
        lengths=[3, 3],
        vocab_size=2,
    )
    head = HaltingHead.from_dict(HaltingHead(kind).fit(cache).to_dict())
    np.testing.assert_array_equal(head.predict_confidence(cache), np.ones((6, 1)))
    np.testing.assert_array_equal(head.predict_proba(cache), np.ones((6, 1)))


# ----------------------------------------------------------------------------------------------------
# JSON state
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HALTING_KINDS)
def test_json_round_trip_predicts_identically(kind):
    cache = _depth_cache(5, per_sequence=kind == "sequence_multinomial")
    head = HaltingHead(kind, sigma=0.5, C=2.0).fit(cache)
    text = json.dumps(head.to_dict(), allow_nan=False)
    restored = HaltingHead.from_dict(json.loads(text))
    np.testing.assert_array_equal(restored.predict_confidence(cache), head.predict_confidence(cache))
    assert restored.to_dict() == head.to_dict()
    assert repr(restored) == repr(head) and "fitted" in repr(head)


def test_from_dict_rejects_bad_states():
    state = HaltingHead("token_multinomial").fit(_depth_cache(6)).to_dict()
    with pytest.raises(TypeError, match="state must be a dict"):
        HaltingHead.from_dict([state])
    with pytest.raises(TypeError, match="state\\['params'\\] must be a dict"):
        HaltingHead.from_dict({**state, "params": None})
    with pytest.raises(TypeError, match="state\\['models'\\]\\[0\\] must be a dict"):
        HaltingHead.from_dict({**state, "models": [None]})
    for change, match in (
        ({"format": "other"}, "state\\['format'\\]"),
        ({"n_layers": 0}, "state\\['n_layers'\\]"),
        ({"classes": [2, 1]}, "state\\['classes'\\] must be increasing"),
        ({"classes": [1, 2, 3, 9]}, "state\\['classes'\\] must be increasing"),
        ({"models": []}, "state\\['models'\\] must be a list of 1"),
        ({"models": [{**state["models"][0], "coef": [[1.0]]}]}, "state\\['models'\\]\\[0\\]\\['coef'\\]"),
        ({"models": [{**state["models"][0], "scale": [-1.0] * (D + 1)}]}, "\\['scale'\\] must be > 0"),
        ({"models": [{}]}, "has no key 'mean'"),
    ):
        with pytest.raises(ValueError, match=match):
            HaltingHead.from_dict({**state, **change})
    with pytest.raises(ValueError, match="kind must be one of"):
        HaltingHead.from_dict({**state, "params": {**state["params"], "kind": "ponder"}})
    geometric = HaltingHead().fit(_depth_cache(6)).to_dict()
    with pytest.raises(ValueError, match="must be None for the geometric head"):
        HaltingHead.from_dict({**geometric, "classes": [1]})
    params = {k: v for k, v in state["params"].items() if k != "sigma"}
    with pytest.raises(ValueError, match=r"state\['params'\] must hold the keys .* missing \['sigma'\]"):
        HaltingHead.from_dict({**state, "params": params})  # was a TypeError about None
    with pytest.raises(ValueError, match=r"state\['n_features'\] must be >= 2 for the geometric head"):
        HaltingHead.from_dict({**geometric, "n_features": 1})  # loaded, then every predict failed


def test_from_dict_rejects_more_bad_states():
    cache = _depth_cache(6)
    state = HaltingHead("token_multinomial").fit(cache).to_dict()
    model = state["models"][0]
    sequence = HaltingHead("sequence_multinomial").fit(_depth_cache(6, per_sequence=True)).to_dict()
    narrow = {key: np.asarray(value)[: N_LAYERS - 1].tolist() for key, value in sequence["models"][0].items()}
    narrow["intercept"] = sequence["models"][0]["intercept"]  # a head of N_LAYERS - 1 features: no hidden state
    for change, match in (
        ({"format_version": 2}, r"state\['format'\] and state\['format_version'\] must be"),
        ({"n_train_tokens": True}, r"state\['n_train_tokens'\] must be a non-negative int"),
        ({"n_train_sequences": -1}, r"state\['n_train_sequences'\] must be a non-negative int"),
        ({"classes": []}, r"state\['classes'\] must be increasing depths in \[1, 4\], got \[\]"),
        ({"classes": [True, 2, 3, 4]}, r"state\['classes'\] must be increasing depths"),
        ({"classes": [1, 1, 2, 3]}, r"state\['classes'\] must be increasing depths"),
        ({"classes": [0, 1, 2, 3]}, r"state\['classes'\] must be increasing depths"),
        ({"models": [{**model, "coef": [["a"] * 4] * (D + 1)}]}, r"\['coef'\] must be a \(nested\) list of finite"),
        ({"models": [{**model, "intercept": [float("nan")] * 4}]}, r"\['intercept'\] must be finite numbers"),
        ({"models": [{**model, "intercept": [10**400] * 4}]}, r"\['intercept'\] must be a \(nested\) list of finite"),
        ({"models": [{**model, "scale": [1.0] * D + [0.0]}]}, r"state\['models'\]\[0\]\['scale'\] must be > 0"),
        ({"models": [{**model, "scale": [1e-50] * (D + 1)}]}, r"\['scale'\] must be > 0 in float32"),
        ({"models": [{**model, "intercept": [1e300] * 4}]}, r"\['intercept'\] must have magnitudes up to 1e\+30"),
    ):
        with pytest.raises(ValueError, match=match):
            HaltingHead.from_dict({**state, **change})
    with pytest.raises(ValueError, match=r"state\['n_features'\] must be >= 4 for the sequence_multinomial head"):
        HaltingHead.from_dict({**sequence, "n_features": N_LAYERS - 1, "models": [narrow]})


def test_json_round_trip_keeps_options_sizes_and_a_subset_of_depths():
    cache = _depth_cache(7)
    head = HaltingHead("token_multinomial", oracle_options={"rule": "stable"}, max_iter=300).fit(cache)
    restored = HaltingHead.from_dict(json.loads(json.dumps(head.to_dict())))
    assert (restored.oracle_options, restored.max_iter) == ({"rule": "stable"}, 300)
    assert (restored.n_train_tokens_, restored.n_train_sequences_) == (cache.n_tokens, cache.n_sequences)
    assert restored.classes_ == head.classes_ == (1, 2, 3, 4)
    rng = np.random.default_rng(4)
    ids = np.stack([np.tile([1, 0, 0], (40, 1)), np.tile([0, 2, 2], (40, 1))], axis=-1)  # depth 2 for every token
    hidden = rng.normal(size=(40, 3, 1))  # hidden size 1: the token heads' fewest features, 2
    degenerate = LayerCache.from_arrays(
        full_tokens=np.zeros(40, dtype=int), topk_ids=ids, hidden=hidden, lengths=[10] * 4, vocab_size=3
    )
    for kind in ("geometric", "token_multinomial"):
        head = HaltingHead(kind).fit(degenerate)
        restored = HaltingHead.from_dict(json.loads(json.dumps(head.to_dict())))
        assert restored.n_features_ == 2 and restored.classes_ == (None if kind == "geometric" else (2,))
        np.testing.assert_array_equal(restored.predict_confidence(degenerate), head.predict_confidence(degenerate))


def test_from_dict_ignores_unknown_params():
    state = HaltingHead().fit(_depth_cache(6)).to_dict()
    restored = HaltingHead.from_dict({**state, "params": {**state["params"], "note": "written by v2"}})
    assert restored.to_dict() == state


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_bad_parameters():
    for kwargs, error, match in (
        ({"kind": "ponder"}, ValueError, "kind must be one of"),
        ({"oracle": "entropy"}, ValueError, "oracle must be one of"),
        ({"oracle_options": ["rule"]}, TypeError, "oracle_options must be a dict"),
        ({"oracle_options": {"penalty": 0.1}}, ValueError, "may hold \\('rule',\\)"),
        ({"oracle": "correctness", "oracle_options": {"targets": [1]}}, ValueError, r"HaltingHead\.fit\(cache, targ"),
        ({"sigma": -1.0}, ValueError, "sigma must be a finite number >= 0"),
        ({"C": 0.0}, ValueError, "C must be a finite number > 0"),
        ({"C": True}, TypeError, "C must be a real number"),
        ({"max_iter": 0}, ValueError, "max_iter must be an int >= 1"),
        ({"max_iter": 5.0}, TypeError, "max_iter must be an int >= 1"),
    ):
        with pytest.raises(error, match=match):
            HaltingHead(**kwargs)
    with pytest.raises(ValueError, match="rule'\\] must be one of"):
        HaltingHead(oracle_options={"rule": "last"})
    with pytest.raises(ValueError, match="penalty must be a finite number >= 0"):
        HaltingHead(oracle="likelihood", oracle_options={"penalty": -1})
    assert (
        type(HaltingHead(oracle="likelihood", oracle_options={"penalty": np.float32(0.5)}).oracle_options["penalty"])
        is float
    )


def test_bad_caches():
    cache = _depth_cache(8)
    with pytest.raises(NotFittedError, match="not fitted"):
        HaltingHead().predict_confidence(cache)
    with pytest.raises(NotFittedError, match="not fitted"):
        HaltingHead().to_dict()
    bare = LayerCache.from_arrays(full_tokens=[0], topk_ids=[[[0, 1]]], lengths=[1], vocab_size=3)
    with pytest.raises(ValueError, match="needs a 'hidden' array"):
        HaltingHead().fit(bare)
    with pytest.raises(TypeError, match="cache must be a LayerCache"):
        HaltingHead().fit(np.zeros((3, 4, 2)))
    head = HaltingHead().fit(cache)
    with pytest.raises(ValueError, match="the cache has 5 layers but the head was fitted on 4"):
        head.predict_confidence(synthetic_cache(3, n_layers=5, hidden_size=D, seed=0))
    with pytest.raises(ValueError, match="hidden size is 16 but the head was fitted on 3"):
        head.predict_confidence(synthetic_cache(3, n_layers=N_LAYERS, seed=0))
    nan = np.asarray(cache.arrays["hidden"], dtype=np.float32).copy()
    nan[0, 0, 0] = np.nan
    stand_in = SimpleNamespace(arrays={**cache.arrays, "hidden": nan}, n_layers=N_LAYERS, n_tokens=cache.n_tokens)
    with pytest.raises(ValueError, match="must be finite"):
        head.predict_confidence(stand_in)
    with pytest.raises(TypeError, match="needs a LayerCache \\(with .offsets\\)"):
        HaltingHead("sequence_multinomial").fit(stand_in)


def test_convergence_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning, match="max_iter=1"):
            HaltingHead("token_multinomial", max_iter=1).fit(_depth_cache(9))
    with pytest.warns(ConvergenceWarning, match="max_iter=1") as caught:  # through fit: it named learned.py's line
        calibrate.fit(_depth_cache(9), measure="halting_geometric", measure_options={"max_iter": 1})
    assert {Path(w.filename).name for w in caught if issubclass(w.category, ConvergenceWarning)} == {"test_halting.py"}


# ----------------------------------------------------------------------------------------------------
# The comparison benchmark on a small synthetic cache
# ----------------------------------------------------------------------------------------------------


def test_measures_comparison_benchmark(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "measures_comparison.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling timing.py, as `python benchmarks/...` sees it
    spec = importlib.util.spec_from_file_location("measures_comparison", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    cache = synthetic_cache(240, n_layers=6, seed=0)
    rows, oracle = bench.compare(cache, delta=0.15, epsilon=0.1)
    assert [row.measure for row in rows] == ["softmax_gap", "state_saturation", "classifier", *HALTING_MEASURES]
    zero_drift = oracle["oracle, zero drift (first agreeing layer)"]
    assert 1.0 <= oracle["oracle, empirical risk <= 0.15 (in-sample bound)"] <= zero_drift < 6.0
    for row in rows:
        assert 0.0 <= row.test_risk <= 1.0 and 1.0 <= row.test_layers <= 6.0
        assert row.lambda_hat is None or row.cal_risk <= 0.15
    # for a fixed measure, the benchmark's certificate is what calibrate.fit gives on the calibration part
    _, cal, _ = cache.split(list(bench.FRACTIONS), seed=0)
    assert calibrate.fit(cal, delta=0.15, epsilon=0.1, measure="softmax_gap").lambda_hat == rows[0].lambda_hat
