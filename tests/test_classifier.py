"""The learned exit classifier and the agreement labels."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import special
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from calibrate.cache import LayerCache
from calibrate.synthetic import synthetic_cache
from measures.classifier import ExitClassifier, agreement
from measures.confidence import confidence, from_topk, state_saturation
from measures.learned import measure_from_state

N_LAYERS, D, VOCAB, K = 5, 8, 60, 4


def _cache(*, full_tokens, topk_ids, topk_logprobs=None, hidden=None, vocab_size=VOCAB):
    """A LayerCache of sequences of 10 tokens (the last one possibly shorter)."""
    n_tokens = len(full_tokens)
    lengths = [10] * (n_tokens // 10) + ([n_tokens % 10] if n_tokens % 10 else [])
    return LayerCache.from_arrays(
        full_tokens=full_tokens,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        hidden=hidden,
        lengths=lengths,
        vocab_size=vocab_size,
    )


def _stand_in(cache, *, vocab_size="same", **arrays):
    """A duck-typed copy of ``cache`` with arrays replaced by ones the LayerCache would refuse (NaN):
    the classifier must still check what it reads (e.g. from a cache opened unverified)."""
    return SimpleNamespace(
        arrays={**cache.arrays, **arrays},
        n_layers=cache.n_layers,
        n_tokens=cache.n_tokens,
        vocab_size=cache.vocab_size if vocab_size == "same" else vocab_size,
    )


def _params(seed=0, n_layers=N_LAYERS, d=D):
    """Generative parameters shared by a training and a test draw: a direction and bias per layer."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_layers, d))
    w *= 4.0 / np.linalg.norm(w, axis=1, keepdims=True)
    return w, np.linspace(-1.5, 2.0, n_layers)


def _draw(params, n_tokens, seed, *, with_hidden=True, with_topk=True):
    """Tokens whose agreement at layer i is Bernoulli(expit(h_i . w_i + b_i)), linear in the hidden state.

    The layer's top-1 token is its argmax; its log-probability margin grows with the same signal, so the
    top-k log-probabilities are informative too. The last layer always agrees (its argmax is the full token).
    """
    w, b = params
    n_layers, d = w.shape
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n_tokens, n_layers, d))
    signal = np.einsum("tld,ld->tl", hidden, w) + b  # (T, L)
    agree = rng.random((n_tokens, n_layers)) < special.expit(signal)
    agree[:, -1] = True
    full = rng.integers(VOCAB, size=n_tokens)
    other = (full[:, None] + 1 + rng.integers(VOCAB - 1, size=(n_tokens, n_layers))) % VOCAB
    top1 = np.where(agree, full[:, None], other)
    logits = rng.normal(size=(n_tokens, n_layers, VOCAB))
    margin = 0.1 + 3 * special.expit(signal)[..., None]
    np.put_along_axis(logits, top1[..., None], logits.max(-1, keepdims=True) + margin, -1)
    logp = special.log_softmax(logits, axis=-1)
    order = np.argsort(-logp, axis=-1, kind="stable")[..., :K]
    cache = _cache(
        full_tokens=full,
        topk_ids=order,
        topk_logprobs=np.take_along_axis(logp, order, -1) if with_topk else None,
        hidden=hidden if with_hidden else None,
    )
    assert (cache.arrays["topk_ids"][:, :, 0] == top1).all()
    return cache, agree


# ----------------------------------------------------------------------------------------------------
# agreement
# ----------------------------------------------------------------------------------------------------


def test_agreement_matches_loop():
    cache, agree = _draw(_params(), 200, seed=1)
    got = agreement(cache)
    assert got.dtype == bool and got.shape == (200, N_LAYERS)
    ids, full = cache.arrays["topk_ids"], cache.arrays["full_tokens"]
    ref = np.array([[ids[t, i, 0] == full[t] for i in range(N_LAYERS)] for t in range(200)])
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, agree)
    assert 0.1 < got[:, :-1].mean() < 0.9


def test_agreement_errors():
    cache, _ = _draw(_params(), 20, seed=1)
    with pytest.raises(ValueError, match="no 'topk_ids' array"):
        agreement(SimpleNamespace(arrays={"full_tokens": cache.arrays["full_tokens"]}, n_layers=N_LAYERS))
    with pytest.raises(ValueError, match=r"'topk_ids' must have shape \(n_tokens, n_layers, k\)"):
        agreement(SimpleNamespace(arrays=dict(cache.arrays, full_tokens=np.zeros(19)), n_layers=N_LAYERS))
    with pytest.raises(ValueError, match=r"'full_tokens' must have shape \(n_tokens,\)"):
        agreement(SimpleNamespace(arrays=dict(cache.arrays, full_tokens=np.zeros((20, 1))), n_layers=N_LAYERS))
    with pytest.raises(TypeError, match="cache must be a LayerCache"):
        agreement(cache.arrays)


def test_agreement_refuses_an_empty_top_k():
    cache, _ = _draw(_params(), 20, seed=1)
    no_k = np.zeros((20, N_LAYERS, 0), dtype=int)
    empty = SimpleNamespace(arrays=dict(cache.arrays, topk_ids=no_k), n_layers=N_LAYERS)
    with pytest.raises(ValueError, match=r"'topk_ids' must have shape .*k>=1\), got \(20, 5, 0\)"):
        agreement(empty)


# ----------------------------------------------------------------------------------------------------
# Fitting and prediction
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hidden_pair():
    params = _params(seed=0)
    return _draw(params, 3000, seed=1), _draw(params, 3000, seed=2)


@pytest.mark.parametrize("features", ["hidden", "topk", "auto"])
def test_held_out_auc(hidden_pair, features):
    (train, _), (test, agree) = hidden_pair
    clf = ExitClassifier(features=features).fit(train)
    assert clf.features_ == ("topk" if features == "topk" else "hidden")
    conf = clf.predict_confidence(test)
    assert conf.dtype == np.float32 and conf.shape == (3000, N_LAYERS)
    assert ((conf >= 0) & (conf <= 1)).all()
    np.testing.assert_array_equal(conf[:, -1], 1.0)
    for layer in range(N_LAYERS - 1):
        auc = roc_auc_score(agree[:, layer], conf[:, layer])
        # hidden: the true linear signal is recoverable; topk: only its magnitude through the margin.
        assert auc > (0.85 if clf.features_ == "hidden" else 0.8), (layer, auc)
    # Deeper layers agree more often, and the predictions follow.
    assert np.all(np.diff(conf[:, :-1].mean(axis=0)) > 0)


def test_uses_balanced_logistic_regression(hidden_pair):
    (train, agree), _ = hidden_pair
    clf = ExitClassifier(C=0.5, max_iter=123, seed=7).fit(train)
    assert len(clf.estimators_) == N_LAYERS - 1
    for est in clf.estimators_:
        assert isinstance(est, LogisticRegression)
        params = est.get_params()
        assert params["class_weight"] == "balanced"
        assert params["C"] == 0.5 and params["max_iter"] == 123 and params["random_state"] == 7


def test_prediction_equals_sklearn_on_standardised_features(hidden_pair):
    (train, _), (test, _) = hidden_pair
    clf = ExitClassifier().fit(train)
    conf = clf.predict_confidence(test)
    x_train = train.arrays["hidden"].astype(np.float32)
    x_test = test.arrays["hidden"].astype(np.float32)
    sat_train = state_saturation(train.arrays["hidden"])[..., None]
    sat_test = state_saturation(test.arrays["hidden"])[..., None]
    x_train, x_test = np.concatenate([x_train, sat_train], -1), np.concatenate([x_test, sat_test], -1)
    for layer, est in enumerate(clf.estimators_):
        mean = x_train[:, layer].astype(np.float64).mean(0)
        std = x_train[:, layer].astype(np.float64).std(0)
        std[std == 0] = 1.0  # layer 1's cosine is the constant 0
        z = ((x_test[:, layer] - mean) / std).astype(np.float32)
        np.testing.assert_allclose(conf[:, layer], est.predict_proba(z)[:, 1], rtol=1e-5, atol=1e-6)


def test_balanced_weights_centre_uninformative_predictions():
    # Features carry no information and 90% of tokens agree: an unweighted logistic regression would
    # predict ~0.9 everywhere; the class-balanced one predicts ~0.5.
    rng = np.random.default_rng(3)
    n = 4000
    full = rng.integers(VOCAB, size=n)
    agree = rng.random((n, 3)) < 0.9
    agree[:, -1] = True
    top1 = np.where(agree, full[:, None], (full[:, None] + 1) % VOCAB)
    ids = np.stack([top1, (top1 + 1) % VOCAB], axis=-1)
    cache = _cache(full_tokens=full, topk_ids=ids, hidden=rng.normal(size=(n, 3, 4)))
    conf = ExitClassifier().fit(cache).predict_confidence(cache)
    assert abs(conf[:, :2].mean() - 0.5) < 0.05
    unweighted = LogisticRegression().fit(cache.arrays["hidden"][:, 0].astype(np.float32), agree[:, 0])
    assert unweighted.predict_proba(cache.arrays["hidden"][:, 0].astype(np.float32))[:, 1].mean() > 0.85


def test_single_class_layers_get_constant_probability():
    rng = np.random.default_rng(4)
    n = 300
    full = rng.integers(VOCAB, size=n)
    top1 = np.stack(
        [
            (full + 1) % VOCAB,  # layer 1: never agrees
            np.where(rng.random(n) < 0.5, full, (full + 1) % VOCAB),  # layer 2: mixed
            full,  # layer 3: always agrees
            full,  # layer 4 (last)
        ],
        axis=1,
    )
    ids = np.stack([top1, (top1 + 7) % VOCAB], axis=-1)
    cache = _cache(full_tokens=full, topk_ids=ids, hidden=rng.normal(size=(n, 4, 3)))
    clf = ExitClassifier().fit(cache)
    assert clf.estimators_[0] is None and clf.estimators_[2] is None
    assert isinstance(clf.estimators_[1], LogisticRegression)
    conf = clf.predict_confidence(cache)
    np.testing.assert_allclose(conf[:, 0], 1 / (n + 2), rtol=1e-6)
    np.testing.assert_allclose(conf[:, 2], (n + 1) / (n + 2), rtol=1e-6)
    assert np.ptp(conf[:, 1]) > 0
    np.testing.assert_array_equal(conf[:, 3], 1.0)
    state = clf.to_dict()
    assert state["layers"][0]["constant"] == pytest.approx(1 / (n + 2)) and state["layers"][0]["coef"] is None
    np.testing.assert_array_equal(ExitClassifier.from_dict(state).predict_confidence(cache), conf)


def test_one_layer_cache():
    cache = _cache(full_tokens=[1, 2], topk_ids=[[[1, 0]], [[2, 0]]], hidden=np.ones((2, 1, 3)))
    clf = ExitClassifier().fit(cache)
    np.testing.assert_array_equal(clf.predict_confidence(cache), np.ones((2, 1)))
    assert ExitClassifier.from_dict(json.loads(json.dumps(clf.to_dict()))).n_layers_ == 1


def test_topk_features_are_logprobs_plus_measures(hidden_pair):
    (train, _), _ = hidden_pair
    clf = ExitClassifier(features="topk").fit(train)
    assert clf.n_features_ == K + 3 and clf.top_k_ == K and clf.vocab_size_ == VOCAB
    # Rebuild the layer-1 features by hand and reproduce the prediction.
    lp = train.arrays["topk_logprobs"][:, 0].astype(np.float64)
    m = from_topk(lp, VOCAB)
    x = np.column_stack([lp, m["softmax_gap"], m["softmax_max"], m["entropy"]]).astype(np.float32)
    est = clf.estimators_[0]
    mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    z = ((x - mean.astype(np.float32)) / std.astype(np.float32)).astype(np.float32)
    np.testing.assert_allclose(clf.predict_confidence(train)[:, 0], est.predict_proba(z)[:, 1], rtol=1e-5, atol=1e-6)


def test_auto_falls_back_to_topk_and_requires_something():
    params = _params(seed=5)
    cache, _ = _draw(params, 300, seed=6, with_hidden=False)
    assert ExitClassifier().fit(cache).features_ == "topk"
    with pytest.raises(ValueError, match="features='hidden' needs a cache with a 'hidden' array"):
        ExitClassifier(features="hidden").fit(cache)
    bare, _ = _draw(params, 300, seed=6, with_hidden=False, with_topk=False)
    with pytest.raises(ValueError, match="features='auto' needs a cache with a 'hidden' or a 'topk_logprobs'"):
        ExitClassifier().fit(bare)
    with pytest.raises(ValueError, match="features='topk' needs a cache with a 'topk_logprobs' array"):
        ExitClassifier(features="topk").fit(bare)


def test_fit_refuses_an_empty_cache():
    cache, _ = _draw(_params(seed=8), 20, seed=9)
    arrays = {name: np.asarray(cache.arrays[name])[:0] for name in ("full_tokens", "topk_ids", "hidden")}
    empty = SimpleNamespace(arrays=arrays, n_layers=N_LAYERS, n_tokens=0, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="cache must contain at least one token to fit the classifier, got 0"):
        ExitClassifier().fit(empty)


def test_features_of_small_spread_are_standardised_by_their_own_scale():
    cache, _ = _draw(_params(seed=8), 300, seed=9)
    hidden = np.asarray(cache.arrays["hidden"]) * 1e-4  # informative, but with a standard deviation of ~1e-4
    state = ExitClassifier().fit(_stand_in(cache, hidden=hidden)).to_dict()
    for layer, entry in enumerate(state["layers"]):
        x = hidden[:, layer].astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(entry["scale"][:D], x.std(axis=0), rtol=1e-6)


def test_seeds_from_two_to_the_32_are_drawn_from_not_passed_to_sklearn():
    cache, _ = _draw(_params(seed=8), 200, seed=9)
    assert ExitClassifier(seed=2**32 - 1).fit(cache).estimators_[0].get_params()["random_state"] == 2**32 - 1
    est = ExitClassifier(seed=2**32).fit(cache).estimators_[0]  # sklearn refuses an int seed >= 2**32
    assert isinstance(est.get_params()["random_state"], np.random.RandomState)


def test_topk_prediction_checks_the_top_k_size():
    cache, _ = _draw(_params(seed=5), 300, seed=6, with_hidden=False)
    clf = ExitClassifier(features="topk").fit(cache)
    fewer = _stand_in(cache, topk_logprobs=np.asarray(cache.arrays["topk_logprobs"])[:, :, :3])
    msg = f"the cache has top_k=3, vocab_size={VOCAB} but the classifier was fitted on top_k={K}"
    with pytest.raises(ValueError, match=msg):
        clf.predict_confidence(fewer)


def test_topk_features_need_the_vocab_size():
    cache, _ = _draw(_params(seed=5), 100, seed=6, with_hidden=False)
    with pytest.raises(ValueError, match="features='topk' needs the cache's vocab_size"):
        ExitClassifier().fit(_stand_in(cache, vocab_size=None))


def test_hidden_states_must_have_a_row_per_token():
    cache, _ = _draw(_params(seed=8), 200, seed=9)
    short = _stand_in(cache, hidden=np.asarray(cache.arrays["hidden"])[:-1])
    match = r"cache array 'hidden' must have shape \(n_tokens, n_layers, d\), got \(199, 5, 8\)"
    with pytest.raises(ValueError, match=match):
        ExitClassifier().fit(short)
    clf = ExitClassifier().fit(cache)
    with pytest.raises(ValueError, match=match):
        clf.predict_confidence(short)


# ----------------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", ["hidden", "topk"])
def test_dict_round_trip_is_exact_and_json(hidden_pair, features):
    (train, _), (test, _) = hidden_pair
    clf = ExitClassifier(features=features, C=2.0, seed=3).fit(train)
    state = clf.to_dict()
    text = json.dumps(state, allow_nan=False)
    restored = ExitClassifier.from_dict(json.loads(text))
    np.testing.assert_array_equal(restored.predict_confidence(test), clf.predict_confidence(test))
    assert restored.features_ == features and restored.n_layers_ == N_LAYERS and restored.estimators_ is None
    assert (restored.C, restored.features, restored.max_iter, restored.seed) == (2.0, features, 200, 3)
    assert restored.to_dict() == state
    assert "fitted" in repr(restored) and "features='" in repr(restored)


def test_from_dict_errors(hidden_pair):
    (train, _), _ = hidden_pair
    state = ExitClassifier().fit(train).to_dict()
    with pytest.raises(TypeError, match="state must be a dict"):
        ExitClassifier.from_dict(json.dumps(state))
    with pytest.raises(ValueError, match=r"state\['format'\]"):
        ExitClassifier.from_dict(dict(state, format="pickle"))
    with pytest.raises(ValueError, match="state has no key 'layers'"):
        ExitClassifier.from_dict({k: v for k, v in state.items() if k != "layers"})
    with pytest.raises(ValueError, match=r"state\['layers'\] must hold n_layers - 1 = 4 entries, got 3"):
        ExitClassifier.from_dict(dict(state, layers=state["layers"][:3]))
    bad_layer = dict(state["layers"][1], coef=state["layers"][1]["coef"][:-1])
    with pytest.raises(ValueError, match=r"state\['layers'\]\[1\]\['coef'\] must be 9 finite numbers"):
        ExitClassifier.from_dict(dict(state, layers=[state["layers"][0], bad_layer] + state["layers"][2:]))
    with pytest.raises(ValueError, match=r"state\['features'\] must be 'hidden' or 'topk'"):
        ExitClassifier.from_dict(dict(state, features="auto"))
    with pytest.raises(ValueError, match=r"C must be a finite float > 0"):
        ExitClassifier.from_dict(dict(state, params=dict(state["params"], C=-1.0)))
    with pytest.raises(ValueError, match=r"state\['params'\] must hold the keys .* missing \['C', 'features'"):
        ExitClassifier.from_dict(dict(state, params={}))

    def with_layer(**entry):
        return dict(state, layers=[dict(state["layers"][0], **entry)] + state["layers"][1:])

    with pytest.raises(ValueError, match=r"state\['layers'\]\[0\]\['coef'\] must be 9 finite numbers"):
        ExitClassifier.from_dict(with_layer(coef=["a"] * 9))
    with pytest.raises(ValueError, match=r"state\['layers'\]\[0\]: 0 <= n_positive <= n_train"):
        ExitClassifier.from_dict(with_layer(n_train=-5))
    with pytest.raises(ValueError, match=r"0 <= n_positive <= n_train must hold, got 1000000000"):
        ExitClassifier.from_dict(with_layer(n_positive=10**9))
    with pytest.raises(ValueError, match=r"\['constant'\] must be a probability"):
        ExitClassifier.from_dict(with_layer(constant=True))
    with pytest.raises(ValueError, match=r"state\['n_train_tokens'\] must be of type"):
        ExitClassifier.from_dict(dict(state, n_train_tokens="x"))
    with pytest.raises(TypeError, match="measure_state must be a mapping"):
        measure_from_state("classifier", "abc")


def test_state_numbers_the_layers_and_counts_the_training_tokens():
    cache, _ = _draw(_params(seed=8), 300, seed=9)
    state = ExitClassifier().fit(cache).to_dict()
    assert [entry["layer"] for entry in state["layers"]] == list(range(1, N_LAYERS))
    assert state["n_train_tokens"] == 300 and ExitClassifier.from_dict(state).n_train_tokens_ == 300
    # layer 1 has no previous state: its saturation feature is the constant 0, which the head ignores
    assert (state["layers"][0]["mean"][-1], state["layers"][0]["coef"][-1]) == (0.0, 0.0)


def test_from_dict_refuses_more_bad_states():
    cache, _ = _draw(_params(seed=8), 300, seed=9)
    state = ExitClassifier().fit(cache).to_dict()
    topk_state = ExitClassifier(features="topk").fit(cache).to_dict()

    def with_layer(**entry):
        return dict(state, layers=[dict(state["layers"][0], **entry)] + state["layers"][1:])

    for bad, match in (
        (dict(state, format_version=2), r"state\['format'\] and state\['format_version'\] must be"),
        (dict(state, n_train_tokens=True), r"state\['n_train_tokens'\] must be of type \('int',\), got True"),
        (with_layer(n_train=True), r"state\['layers'\]\[0\]\['n_train'\] must be of type"),
        (dict(state, n_features=0), r"state\['n_layers'\] and state\['n_features'\] must be >= 1, got 5 and 0"),
        (dict(topk_state, top_k=None), r"state\['top_k'\] and state\['vocab_size'\] must be ints with 1 <= top_k"),
        (dict(state, layers=[None] + state["layers"][1:]), r"state\['layers'\]\[0\] must be a dict, got NoneType"),
        (with_layer(constant=1.5), r"state\['layers'\]\[0\]\['constant'\] must be a probability in \[0, 1\]"),
        (with_layer(scale=[1.0] * D + [0.0]), r"state\['layers'\]\[0\]\['scale'\] must be > 0"),
        # finite in float64 but not in the float32 scoring: 0 or inf there, NaN confidences (a tampered state)
        (with_layer(scale=[1.0] * D + [1e-50]), r"\['scale'\] must be > 0 in float32"),
        (with_layer(mean=[1e300] * (D + 1)), r"\['mean'\] must be finite in float32"),
        (with_layer(coef=[1e308] * (D + 1)), r"\['coef'\] must have magnitudes up to 1e\+30"),
        (with_layer(intercept=float("inf")), r"state\['layers'\]\[0\]\['intercept'\] must be a finite float"),
        # beyond the float range (JSON holds any integer): a numpy TypeError and an OverflowError
        (with_layer(intercept=10**400), r"state\['layers'\]\[0\]\['intercept'\] must be a finite float, got 10{39}$"),
        (with_layer(mean=[10**400] * (D + 1)), r"state\['layers'\]\[0\]\['mean'\] must be 9 finite numbers"),
        # a top-k state loaded whatever its sizes: refused at prediction, or a numpy broadcasting error
        *[(dict(topk_state, **change), r"must be ints with 1 <= top_k <= vocab_size and vocab_size >= 2")
          for change in ({"top_k": True}, {"top_k": 0}, {"vocab_size": 1}, {"top_k": topk_state["vocab_size"] + 1})],
        (dict(topk_state, n_features=topk_state["top_k"] + 4), r"\['n_features'\] must be top_k \+ 3 = 7 .*got 8$"),
    ):
        with pytest.raises(ValueError, match=match):
            ExitClassifier.from_dict(bad)


def test_from_dict_takes_int_intercepts_extra_params_and_no_token_count():
    cache, _ = _draw(_params(seed=8), 300, seed=9)
    state = ExitClassifier().fit(cache).to_dict()
    layers = [dict(state["layers"][0], intercept=0)] + state["layers"][1:]  # JSON from another writer: 0, not 0.0
    loose = {k: v for k, v in state.items() if k != "n_train_tokens"}
    restored = ExitClassifier.from_dict(dict(loose, layers=layers, params=dict(state["params"], note="v2")))
    assert restored.n_train_tokens_ == 0 and restored.to_dict()["layers"][0]["intercept"] == 0.0
    assert repr(restored).startswith("ExitClassifier(C=1.0, features='auto', max_iter=200, seed=0)")


# ----------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------


def test_init_validation():
    with pytest.raises(ValueError, match=r"C must be a finite float > 0.*got 0"):
        ExitClassifier(C=0)
    with pytest.raises(ValueError, match=r"C must be a finite float > 0.*got inf"):
        ExitClassifier(C=float("inf"))
    with pytest.raises(TypeError, match="C must be a positive float"):
        ExitClassifier(C="1")
    with pytest.raises(ValueError, match=r"features must be one of \('auto', 'hidden', 'topk'\), got 'logits'"):
        ExitClassifier(features="logits")
    with pytest.raises(ValueError, match="max_iter must be an int >= 1, got 0"):
        ExitClassifier(max_iter=0)
    with pytest.raises(TypeError, match=r"max_iter must be an int >= 1, got 5.0 \(float\)"):
        ExitClassifier(max_iter=5.0)
    with pytest.raises(ValueError, match=r"seed must be None or an int >= 0 \(.*\), got -1"):
        ExitClassifier(seed=-1)
    with pytest.raises(TypeError):
        ExitClassifier(1.0)  # options are keyword-only
    assert repr(ExitClassifier()) == "ExitClassifier(C=1.0, features='auto', max_iter=200, seed=0)"


def test_init_refuses_bools_and_stores_plain_python_numbers():
    with pytest.raises(TypeError, match="C must be a positive float, got True"):
        ExitClassifier(C=True)
    with pytest.raises(TypeError, match=r"max_iter must be an int >= 1, got True \(bool\)"):
        ExitClassifier(max_iter=True)
    clf = ExitClassifier(C=np.float32(0.5), max_iter=np.int64(100), seed=np.int64(3))
    assert (type(clf.C), type(clf.max_iter), type(clf.seed)) == (float, int, int)
    cache, _ = _draw(_params(seed=8), 200, seed=9)
    params = json.loads(json.dumps(clf.fit(cache).to_dict()))["params"]
    assert params == {"C": 0.5, "features": "auto", "max_iter": 100, "seed": 3}


def test_non_finite_features_are_rejected():
    params = _params(seed=8)
    cache, _ = _draw(params, 200, seed=9)
    hidden = np.array(cache.arrays["hidden"])
    hidden[17, 2, 3] = np.nan
    with pytest.raises(ValueError, match="cache array 'hidden' must be finite.*layer 3"):
        ExitClassifier().fit(_stand_in(cache, hidden=hidden))
    hidden[17, 2, 3] = np.inf
    with pytest.raises(ValueError, match="cache array 'hidden' must be finite"):
        ExitClassifier().fit(_stand_in(cache, hidden=hidden))
    cache, _ = _draw(params, 200, seed=9, with_hidden=False)
    lp = np.array(cache.arrays["topk_logprobs"])
    lp[5, 1, 0] = -np.inf
    with pytest.raises(ValueError, match="topk_logprobs must be finite"):
        ExitClassifier().fit(_stand_in(cache, topk_logprobs=lp))
    # Also at prediction time, on a cache other than the training one.
    good, _ = _draw(params, 200, seed=10)
    clf = ExitClassifier().fit(good)
    bad, _ = _draw(params, 50, seed=11)
    hidden = np.array(bad.arrays["hidden"])
    hidden[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="cache array 'hidden' must be finite"):
        clf.predict_confidence(_stand_in(bad, hidden=hidden))


def test_prediction_checks_fit_and_shapes(hidden_pair):
    (train, _), _ = hidden_pair
    with pytest.raises(NotFittedError, match="not fitted"):
        ExitClassifier().predict_confidence(train)
    with pytest.raises(NotFittedError, match="not fitted"):
        ExitClassifier().to_dict()
    clf = ExitClassifier().fit(train)
    fewer_layers, _ = _draw(_params(seed=0, n_layers=3), 50, seed=12)
    with pytest.raises(ValueError, match="the cache has 3 layers but the classifier was fitted on 5"):
        clf.predict_confidence(fewer_layers)
    other_d, _ = _draw(_params(seed=0, d=5), 50, seed=12)
    with pytest.raises(ValueError, match="hidden size is 5 but the classifier was fitted on 8"):
        clf.predict_confidence(other_d)
    topk = ExitClassifier(features="topk").fit(train)
    other_vocab = _stand_in(train, vocab_size=VOCAB + 1)
    msg = f"vocab_size={VOCAB + 1} but the classifier was fitted on top_k={K}, vocab_size={VOCAB}"
    with pytest.raises(ValueError, match=msg):
        topk.predict_confidence(other_vocab)
    no_hidden, _ = _draw(_params(seed=0), 50, seed=12, with_hidden=False)
    with pytest.raises(ValueError, match="features='hidden' needs a cache with a 'hidden' array"):
        clf.predict_confidence(no_hidden)


def test_fit_on_a_disjoint_split(hidden_pair):
    # The intended use: train on one split of the sequences, calibrate on the other.
    (cache, agree), _ = hidden_pair
    train, cal = cache.split([0.4, 0.6], seed=0)
    assert set(train.sequences["id"]).isdisjoint(cal.sequences["id"])
    conf = ExitClassifier().fit(train).predict_confidence(cal)
    assert conf.shape == (cal.n_tokens, N_LAYERS)
    labels = agreement(cal)
    assert all(roc_auc_score(labels[:, i], conf[:, i]) > 0.85 for i in range(N_LAYERS - 1))


def test_hidden_features_include_saturation_on_synthetic_cache():
    # synthetic_cache's residual updates are isotropic: a linear head on h_i alone is at chance; the
    # saturation feature cos(h_i, h_{i-1}) carries the signal and the classifier must find it.
    cache = synthetic_cache(300, n_layers=8, seed=0)
    train, cal = cache.split([0.5, 0.5], seed=0)
    clf = ExitClassifier(features="hidden").fit(train)
    assert clf.n_features_ == cache.arrays["hidden"].shape[2] + 1
    conf, sat, labels = clf.predict_confidence(cal), confidence(cal, "state_saturation"), agreement(cal)
    for i in range(1, cache.n_layers - 1):
        if 0 < labels[:, i].mean() < 1:
            auc = roc_auc_score(labels[:, i], conf[:, i])
            assert auc > 0.65 and auc > roc_auc_score(labels[:, i], sat[:, i]) - 0.03, (i, auc)


@pytest.mark.filterwarnings("ignore:the last layer's top-1 differs from full_tokens")  # on purpose
def test_agreement_is_with_the_full_models_token_not_the_last_layers_top1():
    """The label is agreement with full_tokens (what the full model emitted: after logits processing, an adapter
    on the last layer or a tie, the last layer's stored top-1 may differ); every other fixture has them equal."""
    ids = np.array([[[7], [5], [5]], [[2], [2], [2]]])
    cache = LayerCache.from_arrays(full_tokens=[7, 2], topk_ids=ids, lengths=[2], vocab_size=10)
    np.testing.assert_array_equal(agreement(cache), [[True, False, False], [True, True, True]])


def test_scikit_learn_loads_when_a_measure_is_trained_not_on_import():
    """Importing scikit-learn took about a fifth of ``import calibrate`` (and of every command line call)."""
    code = (
        "import sys, calibrate, measures; assert 'sklearn' not in sys.modules, 'imported';"
        "measures.ExitClassifier().fit(calibrate.synthetic_cache(20, seed=0)); assert 'sklearn' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
