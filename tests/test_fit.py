"""certify() on loss arrays and fit() on synthetic caches."""

import dataclasses
import importlib
import warnings

import numpy as np
import pytest
from scipy import stats

import calibrate
from calibrate import fwer
from calibrate.exits import early_tokens, exit_layers


def _manual_hb(mean, n, delta):
    """Hoeffding-Bentkus p-value re-derived inline (DESIGN section 8)."""
    x = min(mean, delta)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = (x * np.log(x / delta) if x > 0 else 0.0) + (1 - x) * np.log((1 - x) / (1 - delta))
    hoeff = np.exp(-n * h)
    bentkus = np.e * stats.binom.cdf(np.ceil(n * mean - 1e-9), n, delta)
    return min(1.0, hoeff, bentkus)


def test_certify_matches_hand_computed_fixed_sequence():
    n = 400
    means = np.array([0.0, 0.02, 0.05, 0.08, 0.04, 0.2])
    losses = np.zeros((n, means.size))
    for k, m in enumerate(means):
        losses[: int(round(m * n)), k] = 1.0
    lambdas = np.linspace(0.9, 0.4, means.size)
    cert = calibrate.certify(losses, lambdas, delta=0.1, epsilon=0.05)
    p = np.array([_manual_hb(m, n, 0.1) for m in means])
    np.testing.assert_allclose(cert.p_values, p, rtol=1e-9, atol=1e-300)
    first_fail = int(np.argmax(p > 0.05))
    assert cert.index == first_fail - 1
    assert cert.lambda_hat == lambdas[first_fail - 1]
    assert cert.certified == tuple(np.arange(means.size) < first_fail)
    assert cert.risk_hat == pytest.approx(means[first_fail - 1])
    assert cert.mode == "user" and cert.n == n


def test_loss_table_owns_its_grid_and_json_takes_numpy_ints():
    grid = np.array([0.9, 0.5, 0.1])
    table = calibrate.user_losses(np.zeros((400, 3)), grid, n_layers=np.int64(12))
    grid[0] = 0.95  # the caller's array stays writable, and the table does not follow it
    assert table.lambdas[0] == 0.9 and not table.lambdas.flags.writeable
    cert = calibrate.certify(table, delta=0.1, epsilon=0.05)
    assert type(cert.n_layers) is int
    assert calibrate.Certificate.from_json(cert.to_json()) == cert


def test_loss_tables_compare_by_value_with_a_short_repr():
    losses = np.random.default_rng(0).random((2000, 50))
    grid = np.linspace(1, 0, 50)
    table = calibrate.user_losses(losses, grid, avg_layers=np.full(50, np.nan))
    assert table == calibrate.user_losses(losses.copy(), grid, avg_layers=np.full(50, np.nan))  # NaN layers equal
    assert table != calibrate.user_losses(losses, grid) and table != table.subset(np.arange(10))
    assert table != dataclasses.replace(table, consistency="token") and table != "a table"
    with pytest.raises(TypeError, match="unhashable"):
        hash(table)
    assert repr(table) == "LossTable(n=2000, n_lambdas=50, mode='user', consistency=None, n_layers=None)"


def test_loss_table_refuses_bad_metadata():
    losses, grid = np.zeros((2, 2)), [1.0, 0.5]
    with pytest.raises(ValueError, match="mode must be one of"):
        calibrate.LossTable(losses, grid, mode="bogus")
    for bad, exc in ((2.7, TypeError), (0, ValueError), ("x", TypeError)):  # 2.7 used to become 2 silently
        with pytest.raises(exc, match="n_layers must be an int >= 1"):
            calibrate.LossTable(losses, grid, n_layers=bad)
    with pytest.raises(ValueError, match=r"avg_layers must be exit layers in \[1, inf\] or NaN"):
        calibrate.LossTable(losses, grid, avg_layers=[np.inf, 1.0])
    with pytest.raises(ValueError, match=r"avg_layers must be exit layers in \[1, 2\]"):
        calibrate.LossTable(losses, grid, avg_layers=[3.0, 1.0], n_layers=2)
    with pytest.raises(TypeError, match="consistency must be a str or None"):
        calibrate.LossTable(losses, grid, consistency=3)


def test_certify_accepts_strategy_objects_and_names():
    rng = np.random.default_rng(1)
    losses = (rng.random((1000, 5)) < np.linspace(0, 0.2, 5)).astype(float)
    lambdas = np.linspace(1, 0.2, 5)
    a = calibrate.certify(losses, lambdas, method="holm")
    b = calibrate.certify(losses, lambdas, method=fwer.Holm())
    assert a.certified == b.certified
    bonf = calibrate.certify(losses, lambdas, method="bonferroni")
    assert sum(bonf.certified) <= sum(a.certified)


def test_too_few_examples_is_full_model_not_error():
    cert = calibrate.certify(np.zeros((5, 3)), [0.9, 0.5, 0.1], delta=0.1, epsilon=0.05)
    assert cert.lambda_hat is None and cert.full_model_only
    assert "too few examples" in cert.reason
    assert "full model only" in cert.summary()


@pytest.mark.parametrize("method", ["bonferroni", "holm", "multistart"])
def test_too_few_examples_counts_the_methods_per_test_level(method):
    """40 zero losses give p = 0.0148 < epsilon = 0.05, but Bonferroni/Holm test the first of 201 thresholds
    at epsilon / 201 (multi-start at epsilon / m): nothing can be certified whatever the losses."""
    lam = np.linspace(1, 0, 201)
    cert = calibrate.certify(np.zeros((40, 201)), lam, delta=0.1, epsilon=0.05, method=method)
    assert cert.lambda_hat is None
    assert "too few examples" in cert.reason and method in cert.reason
    assert "too few" not in calibrate.certify(np.zeros((4000, 201)), lam, delta=0.1, method=method).reason


def test_a_custom_procedure_named_crc_is_refused():
    class Mine(fwer.FWERProcedure):
        name = "crc"

        def reject(self, p_values, epsilon):
            return fwer.bonferroni(p_values, epsilon)

    with pytest.raises(ValueError, match="cannot be named 'crc'"):
        calibrate.certify(np.zeros((200, 3)), [3, 2, 1], method=Mine())



def test_reason_of_a_custom_procedure_that_certifies_nothing():
    """The reason tests zero loss with the procedure itself (its name is no built-in method)."""

    class Mine(fwer.FWERProcedure):
        name = "mine"

        def reject(self, p_values, epsilon):
            return fwer.bonferroni(p_values, epsilon)

    assert "no threshold rejected by mine" in calibrate.certify(np.ones((400, 3)), [3, 2, 1], method=Mine()).reason
    assert "which mine rejects at none of 3" in calibrate.certify(np.zeros((35, 3)), [3, 2, 1], method=Mine()).reason


def test_safest_failing_says_so():
    cert = calibrate.certify(np.ones((2000, 2)), [0.9, 0.5], delta=0.1, epsilon=0.05)
    assert cert.lambda_hat is None and "safest value" in cert.reason


def test_crc_is_labelled_as_expectation():
    rng = np.random.default_rng(2)
    losses = np.sort(rng.random((500, 6)) < np.linspace(0, 0.3, 6), axis=1).astype(float)
    cert = calibrate.certify(losses, np.linspace(1, 0.5, 6), delta=0.1, method="crc")
    assert cert.method == "crc" and cert.bound is None
    assert "expectation" in cert.guarantee
    assert cert.lambda_hat is not None
    assert "p = nan" not in cert.summary() and f"lambda_hat = {cert.lambda_hat:.6g} (risk" in cert.summary()
    assert (
        "epsilon (failure" not in cert.summary()
        and "expected risk (conformal risk control: no epsilon)" in cert.summary()
    )
    assert "the fastest conformal risk control keeps" in cert.summary()
    with pytest.warns(UserWarning, match="monotone"):
        bumpy = calibrate.certify(np.eye(6)[::-1].repeat(100, axis=0), np.linspace(1, 0.5, 6), delta=0.5, method="crc")
    assert bumpy.guarantee.startswith("none: conformal risk control needs monotone losses")
    with pytest.raises(ValueError, match="method='crc' .* uses none: leave bound unset"):
        calibrate.certify(losses, np.linspace(1, 0.5, 6), delta=0.1, method="crc", bound="wsr")
    assert calibrate.certify(losses, np.linspace(1, 0.5, 6), delta=0.1).bound == "hoeffding_bentkus"



def test_crc_with_exactly_enough_examples_is_not_too_few():
    """1/(n+1) = delta: zero losses are certified, so nothing certified is the losses' doing, not the count's."""
    assert calibrate.certify(np.zeros((9, 2)), [0.9, 0.5], delta=0.1, method="crc").lambda_hat == 0.5
    cert = calibrate.certify(np.ones((9, 2)), [0.9, 0.5], delta=0.1, method="crc")
    assert cert.lambda_hat is None and cert.reason == "the safest value has adjusted risk above delta=0.1"
    few = calibrate.certify(np.zeros((8, 2)), [0.9, 0.5], delta=0.1, method="crc")
    assert few.lambda_hat is None and few.reason.startswith("too few examples: with n=8, CRC needs 1/(n+1) <= delta")


def test_knob_grids_hold_values_the_knob_takes():
    losses = np.zeros((200, 3))
    assert calibrate.certify(losses, [2, 1, 0], delta=0.1, knob="fff_depth").lambda_hat == 0.0  # depth 0: the root
    assert calibrate.certify(losses, [1.0, 0.5, 0.25], delta=0.1, knob="token_keep").lambda_hat == 0.25
    for lambdas, knob, match in [
        ([2.5, 1, 0], "fff_depth", "an fff_depth grid holds whole depths >= 0"),
        ([1, 0, -1], "fff_depth", "an fff_depth grid holds whole depths >= 0"),
        ([2.0, 1.0, 0.5], "token_keep", r"a token_keep grid holds 1 / speed-up, in \(0, 1\]"),  # a speed-up, not 1 / it
        ([1.0, 0.5, 0.0], "token_keep", r"a token_keep grid holds 1 / speed-up, in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            calibrate.certify(losses, lambdas, delta=0.1, knob=knob)

@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"delta": 0.0}, ValueError, "delta must lie in the open interval"),
        ({"delta": 1.5}, ValueError, "delta"),
        ({"epsilon": 1.0}, ValueError, "epsilon"),
        ({"delta": "0.1"}, TypeError, "delta"),
        ({"bound": "chernoff"}, ValueError, "bound must be one of"),
        ({"method": "bh"}, ValueError, "method must be one of"),
        ({"method": object()}, TypeError, "FWERProcedure"),
        ({"knob": "warp"}, ValueError, "knob"),
    ],
)
def test_certify_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        calibrate.certify(np.zeros((10, 2)), [0.9, 0.5], **kwargs)


@pytest.mark.parametrize(
    "losses, lambdas, match",
    [
        (np.full((10, 2), np.nan), [0.9, 0.5], "NaN"),
        (np.full((10, 2), 1.5), [0.9, 0.5], r"\[0, 1\]"),
        (np.full((10, 2), -0.1), [0.9, 0.5], r"\[0, 1\]"),
        (np.zeros((10, 2)), [0.5, 0.9], "strictly decreasing"),
        (np.zeros((10, 3)), [0.9, 0.5], "columns"),
        (np.zeros((0, 2)), [0.9, 0.5], "non-empty"),
        (np.zeros(10), [0.9], "shape"),
    ],
)
def test_certify_bad_losses(losses, lambdas, match):
    with pytest.raises(ValueError, match=match):
        calibrate.certify(losses, lambdas)


def test_certify_refuses_other_lambdas_for_a_loss_table_and_says_how_to_get_them():
    table = calibrate.user_losses(np.tile([0.0, 0.1, 0.3], (50, 1)), [0.99, 0.9, 0.5])
    with pytest.raises(ValueError, match=r"thresholds its columns were computed at: drop lambdas= .*proxy_losses"):
        calibrate.certify(table, [0.95, 0.8, 0.6])  # it said "pass one or the other"
    assert list(calibrate.certify(table, [0.99, 0.9, 0.5]).lambdas) == table.lambdas.tolist()


@pytest.fixture(scope="module")
def cache():
    return calibrate.synthetic_cache(400, n_layers=8, max_tokens=24, seed=0)


def _reference_token_losses(cache, conf, lambdas):
    top1 = cache.arrays["topk_ids"][:, :, 0]
    full = cache.arrays["full_tokens"]
    early = early_tokens(top1, exit_layers(conf, lambdas), full)
    wrong = early != full[:, None]
    return np.stack([wrong[a:b].mean(axis=0) for a, b in zip(cache.offsets[:-1], cache.offsets[1:])])


def test_proxy_token_and_sequence_losses_match_reference(cache):
    conf = cache.arrays["softmax_gap"]
    lam = calibrate.default_lambdas()
    token = calibrate.proxy_losses(cache, conf, lam, consistency="token")
    expected = _reference_token_losses(cache, conf, lam)
    np.testing.assert_allclose(token.losses, expected)
    seq = calibrate.proxy_losses(cache, conf, lam, consistency="sequence")
    np.testing.assert_array_equal(seq.losses, (expected > 0).astype(float))
    layers = exit_layers(conf, lam)
    np.testing.assert_allclose(token.avg_layers, layers.mean(axis=0))


def test_proxy_rouge_losses_match_rouge_score(cache):
    from rouge_score import rouge_scorer

    small = cache.subset(np.arange(25))
    conf = small.arrays["softmax_gap"]
    lam = np.linspace(1.0, 0.0, 21)
    got = calibrate.proxy_losses(small, conf, lam, consistency="rouge_l")
    ref_risk = calibrate.proxy_losses(small, conf, lam, consistency="risk_rouge_l")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    full = small.arrays["full_tokens"]
    early = early_tokens(small.arrays["topk_ids"][:, :, 0], exit_layers(conf, lam), full)
    for s in range(small.n_sequences):
        lo, hi = small.offsets[s], small.offsets[s + 1]
        full_text = small.decode(full[lo:hi].tolist())
        reference = small.sequences["reference"].iloc[s]
        r_full = 1 - scorer.score(reference, full_text)["rougeL"].fmeasure
        for k in range(lam.size):
            text = small.decode(early[lo:hi, k].tolist())
            expected = 0.0 if text == full_text else 1 - scorer.score(full_text, text)["rougeL"].fmeasure
            assert got.losses[s, k] == pytest.approx(expected, abs=1e-12)
            r_early = 1 - scorer.score(reference, text)["rougeL"].fmeasure
            assert ref_risk.losses[s, k] == pytest.approx(max(0.0, r_early - r_full), abs=1e-12)


@pytest.mark.parametrize("metric", ["bleu", "token_f1", "risk_bleu", "risk_token_f1"])
def test_proxy_textual_losses_match_a_per_threshold_loop(cache, metric):
    from measures.consistency import risk_consistency, textual_loss

    small = cache.subset(np.arange(15))
    conf = small.arrays["state_saturation"]
    lam = np.linspace(1.0, 0.0, 11)
    got = calibrate.proxy_losses(small, conf, lam, consistency=metric)
    full = small.arrays["full_tokens"]
    early = early_tokens(small.arrays["topk_ids"][:, :, 0], exit_layers(conf, lam), full)
    name = metric.removeprefix("risk_")
    for s in range(small.n_sequences):
        lo, hi = small.offsets[s], small.offsets[s + 1]
        full_text = small.decode(full[lo:hi])
        texts = [small.decode(early[lo:hi, k]) for k in range(lam.size)]
        if metric.startswith("risk_"):
            reference = small.sequences["reference"].iloc[s]
            expected = risk_consistency(texts, [full_text] * lam.size, [reference] * lam.size, metric=name)
        else:
            expected = textual_loss(texts, [full_text] * lam.size, metric=name)
        np.testing.assert_allclose(got.losses[s], expected, atol=1e-12)


@pytest.mark.parametrize("metric", ["rouge_l", "risk_bleu"])
def test_textual_losses_hold_one_sequence_of_texts_at_a_time(cache, metric, monkeypatch):
    # Texts never recur across sequences: a scorer kept for the whole cache grew with it (BLEU's n-gram
    # counts reached 40 times the cache's arrays).
    import measures.consistency

    held = []

    class Recording(measures.consistency.PairScorer):
        def clear(self):
            held.append(self.n_texts)
            super().clear()

    monkeypatch.setattr(measures.consistency, "PairScorer", Recording)
    lam = np.linspace(1.0, 0.0, 11)
    table = calibrate.proxy_losses(cache, cache.arrays["softmax_gap"], lam, consistency=metric)
    assert len(held) == cache.n_sequences and 1 <= max(held) <= lam.size + 2  # early outputs, full, reference
    monkeypatch.undo()
    np.testing.assert_array_equal(
        table.losses, calibrate.proxy_losses(cache, cache.arrays["softmax_gap"], lam, consistency=metric).losses
    )


@pytest.mark.filterwarnings("ignore:the last layer's top-1 differs from full_tokens")  # on purpose
def test_last_layer_is_the_full_model_for_every_loss():
    # a cache whose last layer's stored top-1 disagrees with the full-model token
    vocab = [f" w{i}" for i in range(10)]
    topk = np.array([[[1, 2], [3, 4], [5, 6]]] * 4, dtype=np.int32)
    cache = calibrate.LayerCache.from_arrays(
        full_tokens=np.array([3, 3, 3, 3]), topk_ids=topk, lengths=[2, 2], vocab=vocab, references=["w3 w3", "w3"]
    )
    conf = np.zeros((4, 3))  # nothing is confident: every token runs to the last layer
    for consistency in ("token", "sequence", "rouge_l", "bleu", "risk_rouge_l"):
        table = calibrate.proxy_losses(cache, conf, [0.9, 0.5], consistency=consistency)
        np.testing.assert_array_equal(table.losses, 0.0, err_msg=consistency)
        np.testing.assert_array_equal(table.avg_layers, 3.0)


def test_multistart_and_reason_for_other_methods():
    rng = np.random.default_rng(4)
    losses = (rng.random((3000, 8)) < np.linspace(0.0, 0.3, 8)).astype(float)
    lambdas = np.linspace(1, 0.2, 8)
    multi = calibrate.certify(losses, lambdas, method="multistart")
    assert multi.method == "multistart" and multi.lambda_hat is not None
    cert = calibrate.certify(np.ones((400, 5)), np.linspace(1, 0.5, 5), method="bonferroni")
    assert cert.lambda_hat is None and "no threshold rejected by bonferroni" in cert.reason


def test_binomial_bound_needs_zero_one_losses(cache):
    with pytest.raises(ValueError, match="0/1"):
        calibrate.fit(cache, bound="binomial", consistency="token")
    cert = calibrate.fit(cache, bound="binomial", consistency="sequence")
    assert cert.bound == "binomial"


def test_fit_certifies_and_audit_holds(cache):
    dev, test = cache.split([0.5, 0.5], seed=1)
    cert = calibrate.fit(dev, delta=0.1, epsilon=0.05)
    assert cert.mode == "proxy" and cert.measure == "softmax_gap" and cert.consistency == "token"
    assert cert.lambda_hat is not None and cert.risk_hat < 0.1 and cert.p_value <= 0.05
    assert cert.expected_layers < dev.n_layers
    assert cert.cache_checksum == dev.checksum
    back = calibrate.Certificate.from_json(cert.to_json())
    assert back == cert
    report = calibrate.audit(back, test)
    assert report.n == test.n_sequences
    assert 0 <= report.risk <= 1 and 1 <= report.layers <= dev.n_layers
    assert report.risk == pytest.approx(report.risks[cert.index])
    assert "held-out risk" in report.summary()


@pytest.mark.parametrize("measure", ["softmax_gap", "softmax_max", "entropy", "state_saturation", "classifier"])
def test_fit_every_measure(cache, measure):
    cert = calibrate.fit(cache, measure=measure, seed=3)
    assert cert.measure == measure
    assert len(cert.lambdas) == 201
    if measure == "classifier":
        assert cert.n_train > 0 and cert.n + cert.n_train == cache.n_sequences
        assert cert.measure_state is not None
        report = calibrate.audit(calibrate.Certificate.from_json(cert.to_json()), cache.subset(np.arange(50)))
        assert report.n == 50
    else:
        assert cert.n == cache.n_sequences and cert.n_train == 0


def test_fit_with_decay_records_it(cache):
    cert = calibrate.fit(cache, decay=4.0)
    assert cert.decay == {"max_len": cache.meta["generation"]["max_new_tokens"], "tau": 4.0}
    assert cert.max_new_tokens == cache.meta["generation"]["max_new_tokens"]  # what the outputs were generated with
    assert calibrate.fit(cache, decay={"max_len": 24, "tau": 4.0}) == cert
    assert calibrate.fit(cache, decay=np.float32(4.0)) == cert  # a numpy tau was a TypeError
    plain = calibrate.fit(cache)
    assert cert.to_frame()["avg_layers"].tolist() != plain.to_frame()["avg_layers"].tolist()
    in_sample = dataclasses.replace(cert, cache_checksum=None)  # audit refuses its calibration cache otherwise
    assert calibrate.audit(in_sample, cache).risk == pytest.approx(cert.risk_hat if cert.index is not None else 0.0)



def test_a_loss_table_carries_its_decay_into_the_certificate(cache):
    """certify(proxy_losses(..., decay=...)) recorded no decay: its lambda_hat > 1 then read as 'never exit'."""
    decay = calibrate.Decay(24, 4.0)
    lambdas = calibrate.default_lambdas(decay=True)
    table = calibrate.proxy_losses(cache, cache.arrays["softmax_gap"], lambdas, decay=decay)
    assert table.decay == decay and table.subset([0, 1]).decay == decay
    assert table != calibrate.proxy_losses(cache, cache.arrays["softmax_gap"], lambdas)  # other exits, other table
    cert = calibrate.certify(table, delta=0.1, epsilon=0.05)
    fitted = calibrate.fit(cache, decay=decay, lambdas=lambdas)
    assert cert.decay == fitted.decay == {"max_len": 24, "tau": 4.0} and cert.lambda_hat == fitted.lambda_hat
    assert "decaying threshold" in cert.summary()
    with pytest.raises(TypeError, match="decay must be a calibrate.Decay or None, got dict"):
        calibrate.LossTable(table.losses, table.lambdas, decay={"max_len": 24, "tau": 4.0})


def test_fit_records_its_method_decay_rate_model_and_heads(cache):
    for method in ("bonferroni", "holm", "multistart"):
        assert calibrate.fit(cache, delta=0.2, method=method).method == method
    heads = {"kind": "logit_lens", "model_digest": "d1"}
    cert = calibrate.fit(cache.with_meta({**cache.user_meta, "heads": heads}), decay=2.0)
    assert cert.decay == {"max_len": cache.meta["generation"]["max_new_tokens"], "tau": 2.0}  # not Decay's default 4
    assert cert.model == "synthetic" and cert.heads == heads  # what the runtime checks the model it runs against


def test_fit_warns_that_conformal_risk_control_needs_monotone_losses(cache):
    with pytest.warns(UserWarning, match=r"guarantee E\[risk\] <= delta needs monotone losses"):
        cert = calibrate.fit(cache, delta=0.2, method="crc")
    assert "carries no guarantee" in cert.reason


def test_fit_refuses_options_it_would_ignore(cache):
    with pytest.raises(ValueError, match="model, tokenizer and heads are used only with mode='decoded'"):
        calibrate.fit(cache, heads=object())
    with pytest.raises(ValueError, match="client= runs a chunked cache on Dask"):
        calibrate.fit(cache, client=object())  # an in-memory cache: the client would go unused
    with pytest.raises(ValueError, match="client= computes proxy losses on Dask; mode='decoded' decodes in this"):
        calibrate.fit(cache, mode="decoded", client=object(), model=object(), tokenizer=object())
    with pytest.raises(TypeError, match="decay must be None, a Decay, a dict or a float tau, got bool"):
        calibrate.fit(cache, decay=True)  # not a rate of 1
    nothing = cache.with_meta({**cache.user_meta, "generation": {"max_new_tokens": 0}})
    with pytest.raises(ValueError, match=r"meta\['generation'\]\['max_new_tokens'\] must be an int >= 1, got 0"):
        calibrate.fit(nothing)

def test_decay_grids_start_where_every_threshold_is_one():
    pytest.importorskip("torch")  # calibrate.decoded_lambdas
    from calibrate.exits import default_lambdas

    grid = default_lambdas(decay=True)
    assert grid.size == 212 and np.all(np.diff(grid) < 0) and grid[11] == 1.0
    np.testing.assert_array_equal(grid[11:], default_lambdas())
    assert np.all(calibrate.Decay(max_len=32, tau=4.0).thresholds(grid[:1], np.arange(64)) == 1.0)
    assert calibrate.decoded_lambdas(decay=True)[:4].tolist() == pytest.approx(
        [1 / 0.9, 1 / 0.9 - 1 / 27, 1 / 0.9 - 2 / 27, 1.0]
    )
    dev, _ = calibrate.synthetic_cache(300, seed=0).split([0.5, 0.5], seed=0)
    old = calibrate.fit(dev, decay=4.0, lambdas=default_lambdas())  # a decayed lambda = 1 exits, and fails here
    assert old.lambda_hat is None and old.certified[0] is False
    cert = calibrate.fit(dev, decay=4.0)
    assert cert.lambdas == tuple(grid) and cert.lambda_hat is not None and cert.expected_layers < dev.n_layers
    rule = f"decaying threshold lambda_t = clip(0.9 lambda + 0.1 exp(-4 t / {cert.decay['max_len']}), 0, 1)"
    first, last = calibrate.Decay(**cert.decay).thresholds(cert.lambda_hat, [0, 10**6])
    assert f"{rule} at output position t = 0, 1, ...; at lambda_hat from {first:.4g} at the first token towards " \
        f"{last:.4g} (its limit)" in cert.summary()  # fmt: skip
    headroom = calibrate.fit(dev, decay=4.0, lambdas=grid[:1])  # 1 / 0.9: every threshold is 1
    assert headroom.lambda_hat == grid[0] and "at lambda_hat every threshold is 1" in headroom.summary()  # "exits late"


def test_fit_checks_its_risk_options_before_any_work(cache, monkeypatch):
    fit_module = importlib.import_module("calibrate.fit")  # calibrate.fit is the function

    def no_work(*args, **kwargs):
        raise AssertionError("the loss table was computed before the options were checked")

    monkeypatch.setattr(fit_module, "_proxy_table", no_work)
    for kwargs, match in [
        ({"delta": 1.5}, "delta"),
        ({"epsilon": 0}, "epsilon"),
        ({"bound": "chernoff"}, "bound must be one of"),
        ({"method": "bh"}, "method must be one of"),
        ({"method": "crc", "bound": "bentkus"}, "leave bound unset"),
    ]:
        with pytest.raises(ValueError, match=match):
            calibrate.fit(cache, **kwargs)


def test_fit_bad_inputs(cache):
    with pytest.raises(ValueError, match="measure must be one of"):
        calibrate.fit(cache, measure="vibes")
    with pytest.raises(
        ValueError, match=r"decay as a dict needs the keys 'max_len' and optionally 'tau', got \['max_len', 'tua'\]"
    ):
        calibrate.fit(cache, decay={"max_len": 8, "tua": 4.0})  # a misspelt key (was a TypeError from Decay)
    with pytest.raises(ValueError, match="consistency must be one of"):
        calibrate.fit(cache, consistency="meteor")
    with pytest.raises(TypeError, match="decay"):
        calibrate.fit(cache, decay="fast")
    with pytest.raises(ValueError, match="max_len"):
        calibrate.fit(cache, decay={"maxlen": 3})
    with pytest.raises(TypeError, match="seed"):
        calibrate.fit(cache, seed="x")
    no_refs = cache.subset(np.arange(10))
    no_refs = calibrate.LayerCache.from_arrays(
        full_tokens=no_refs.arrays["full_tokens"],
        topk_ids=no_refs.arrays["topk_ids"],
        topk_logprobs=no_refs.arrays["topk_logprobs"],
        lengths=no_refs.lengths,
        vocab_size=no_refs.vocab_size,
    )
    with pytest.raises(ValueError, match="reference"):
        calibrate.fit(no_refs, consistency="risk_rouge_l")
    with pytest.raises(ValueError, match=r"generation settings .*pass decay=calibrate.Decay\(max_len=N, tau=tau\)"):
        calibrate.fit(no_refs, decay=4.0)
    budget = int(no_refs.lengths.max())
    advised = calibrate.fit(no_refs, decay=calibrate.Decay(max_len=budget, tau=4.0))  # the advice
    recorded = no_refs.with_meta({"generation": {"max_new_tokens": budget}})
    assert calibrate.fit(recorded, decay=4.0).decay == advised.decay == {"max_len": budget, "tau": 4.0}
    assert calibrate.fit(no_refs).max_new_tokens is None  # no generation settings: the budget is unknown
    garbled = no_refs.with_meta({"generation": {"max_new_tokens": "24"}})
    with pytest.raises(ValueError, match=r"meta\['generation'\]\['max_new_tokens'\] must be an int >= 1, got '24'"):
        calibrate.fit(garbled)
    longest = int(np.argmax(no_refs.lengths))
    short = no_refs.with_meta({"generation": {"max_new_tokens": int(no_refs.lengths.max()) - 1}})
    with pytest.raises(ValueError, match=rf"is below the length of its sequence {longest} "):  # was certified as is
        calibrate.fit(short, decay=4.0)
    exact = no_refs.with_meta({"generation": {"max_new_tokens": int(no_refs.lengths.max())}})
    assert calibrate.fit(exact).max_new_tokens == no_refs.lengths.max()


def test_fit_names_what_it_takes_instead_of_failing_inside(cache, tmp_path):
    with pytest.raises(TypeError, match=r"cache must be a calibrate.LayerCache .*got str.*open_cache\(path\)"):
        calibrate.fit(str(tmp_path))  # was AttributeError: 'str' object has no attribute 'has'
    with pytest.raises(TypeError, match=r"got ndarray.*calibrate.certify\(losses, lambdas\)"):
        calibrate.fit(np.zeros((10, 3)), measure="classifier")
    with pytest.raises(TypeError, match="decode must be a callable from token ids to text, got int"):
        calibrate.fit(cache, consistency="rouge_l", decode=5)
    with pytest.raises(TypeError, match="decode must return str .*, got bytes"):  # was "`early` must contain only str"
        calibrate.fit(cache, consistency="rouge_l", decode=lambda ids: cache.decode(ids).encode())
    with pytest.raises(TypeError, match="cache must be a calibrate.LayerCache .*got str"):
        calibrate.fit(str(tmp_path), mode="decoded", model=object(), tokenizer=object())  # decoded mode too


@pytest.mark.parametrize(
    "options, match",
    [(dict(consistency="nope"), "consistency must be one of"), (dict(lambdas=[0.1, 0.5]), "strictly decreasing"),
     (dict(consistency="risk_rouge_l"), "no 'reference'")],
)  # fmt: skip
def test_fit_checks_its_options_before_a_measure_trains(options, match, monkeypatch):
    import measures.learned

    def train(*args, **kwargs):
        raise AssertionError("trained before checking the options")

    monkeypatch.setattr(measures.learned, "train_measure", train)
    no_refs = calibrate.synthetic_cache(40, n_layers=4, references=False, seed=0)
    with pytest.raises(ValueError, match=match):
        calibrate.fit(no_refs, measure="classifier", **options)


@pytest.mark.parametrize("chunks", [None, 10])
def test_a_learned_measures_train_split_needs_no_references(chunks, tmp_path):
    """A risk loss scores the calibration rows only: references missing in the train split were refused."""
    from calibrate.cache import _split_indices

    if chunks is not None:
        pytest.importorskip("dask")
    full = calibrate.synthetic_cache(40, n_layers=4, references=True, store_hidden=True, seed=0)
    train_rows = set(_split_indices(40, [0.3, 0.7], seed=0)[0].tolist())
    references = [None if i in train_rows else r for i, r in enumerate(full.sequences["reference"])]
    cache = calibrate.LayerCache.from_arrays(
        full_tokens=full.arrays["full_tokens"], topk_ids=full.arrays["topk_ids"],
        topk_logprobs=full.arrays["topk_logprobs"], hidden=full.arrays["hidden"], lengths=full.lengths,
        outputs=full.sequences["output"].tolist(), references=references, vocab=full.vocab,
    )  # fmt: skip
    if chunks is not None:
        cache = calibrate.open_cache(cache.save(tmp_path / "cache"), chunks=chunks)
    cert = calibrate.fit(cache, measure="classifier", consistency="risk_rouge_l", delta=0.5, epsilon=0.1)
    assert cert.n == 40 - len(train_rows) and cert.n_train == len(train_rows)
    with pytest.raises(ValueError, match="no 'reference'"):  # the calibration rows' are checked
        calibrate.fit(cache, measure="classifier", consistency="risk_rouge_l", train_fraction=0.5, seed=3)


def test_an_empty_training_or_calibration_part_names_train_fraction(cache):
    with pytest.raises(ValueError, match=r"train_fraction=0.999 of \d+ sequences leaves none to train the measure"):
        calibrate.fit(cache, measure="classifier", train_fraction=0.999)  # was 'split: part 1 of fractions=...'


def test_seeds_beyond_32_bits_train_the_classifier_reproducibly(cache):
    a, b = (calibrate.fit(cache, measure="classifier", seed=2**40) for _ in range(2))  # sklearn takes < 2**32
    assert a == b and a.n_train > 0


def test_torch_seeds_are_the_seed_below_64_bits_and_drawn_from_it_above():
    from calibrate._validation import torch_seed

    assert [torch_seed(s) for s in (0, 7, 2**64 - 1)] == [0, 7, 2**64 - 1]
    big = [torch_seed(2**64 + k) for k in range(3)]
    assert all(0 <= v < 2**64 for v in big) and len(set(big)) == 3 and torch_seed(2**64) == big[0]


@pytest.mark.parametrize("seed, exc", [(None, TypeError), (1.5, TypeError), (True, TypeError), (-1, ValueError)])
def test_every_seed_is_checked_alike(cache, seed, exc):
    from calibrate.data import load_task
    from measures.classifier import ExitClassifier

    calls = [
        lambda: calibrate.synthetic_cache(10, seed=seed),
        lambda: cache.split([0.5, 0.5], seed=seed),
        lambda: calibrate.fit(cache, seed=seed),
        lambda: calibrate.validity(cache, trials=2, seed=seed, progress=False),
        lambda: load_task(seed=seed),
    ]
    for call in calls:
        with pytest.raises(exc, match=r"seed must be an int >= 0 \(it seeds the random draws\), got"):
            call()
    if seed is not None:  # None is the classifier's unseeded option
        with pytest.raises(exc, match=r"seed must be None or an int >= 0"):
            ExitClassifier(seed=seed)


@pytest.mark.slow
def test_validity_study_is_valid_and_naive_rule_is_not():
    cache = calibrate.synthetic_cache(3000, n_layers=8, max_tokens=16, seed=11)
    # a fine grid lets the naive rule land right at delta, where sampling noise pushes it over half the time
    study = calibrate.validity(
        cache, trials=200, cal_fraction=0.5, seed=0, delta=0.1, epsilon=0.1, progress=False,
        lambdas=np.linspace(1.0, 0.5, 1001),
    )
    assert study.trials == 200
    # certified: violations are rare (binomial test against epsilon, one-sided)
    assert stats.binomtest(int(np.sum(study.test_risks > 0.1)), 200, 0.1, alternative="greater").pvalue > 0.01
    # the naive rule "empirical risk <= delta" violates far more often than epsilon
    assert study.naive_violation_rate > 0.2
    assert "violation rate" in study.summary()


@pytest.mark.parametrize("measure", ["halting_geometric", "halting_token_multinomial", "halting_sequence_multinomial"])
def test_halting_measures_train_on_a_disjoint_split_and_audit_rebuilds_them(measure):
    from measures.halting import HaltingHead
    from measures.learned import measure_from_state

    cache = calibrate.synthetic_cache(300, n_layers=6, seed=3)
    dev, test = cache.split([0.6, 0.4], seed=0)
    cert = calibrate.fit(dev, delta=0.2, epsilon=0.1, measure=measure, seed=1)
    assert cert.n_train + cert.n == dev.n_sequences and cert.n_train > 0
    head = measure_from_state(measure, cert.measure_state)
    assert isinstance(head, HaltingHead) and f"halting_{head.kind}" == measure
    # The audit evaluates the same function on new data: its risk path matches a direct recomputation.
    train, cal = dev.split([0.3, 0.7], seed=1)
    table = calibrate.proxy_losses(cal, head.predict_confidence(cal), np.asarray(cert.lambdas), consistency="token")
    np.testing.assert_allclose(table.risks, cert.risks)
    report = calibrate.audit(cert, test)
    assert 0.0 <= report.risk <= 1.0
    with pytest.raises(ValueError, match="not the certificate's"):
        measure_from_state(
            "halting_geometric" if measure != "halting_geometric" else "halting_token_multinomial", cert.measure_state
        )


def test_measure_options_configure_the_learned_measure(cache):
    """fit could not pass options to the estimator it trains; its ConvergenceWarning advised max_iter regardless."""
    from sklearn.exceptions import ConvergenceWarning

    from measures.learned import train_measure

    train, _ = cache.split([0.3, 0.7], seed=0)  # fit's own seeded split
    cert = calibrate.fit(cache, delta=0.2, measure="classifier", measure_options={"C": 0.001, "max_iter": 50})
    expected = train_measure("classifier", train, seed=0, options={"C": 0.001, "max_iter": 50}).to_dict()
    assert cert.to_dict()["measure_state"] == expected
    assert expected != train_measure("classifier", train, seed=0).to_dict()  # the options changed the fit
    with pytest.warns(ConvergenceWarning, match=r"max_iter=1 .*measure_options=\{'max_iter'"):
        calibrate.fit(cache, delta=0.2, measure="halting_geometric", measure_options={"max_iter": 1})


@pytest.mark.parametrize(
    "measure, options, exc, match",
    [
        ("softmax_gap", {"C": 1.0}, ValueError, r"configure the learned measures .* measure='softmax_gap'"),
        ("classifier", {"max_iters": 5}, ValueError,
         r"\['max_iters'\] are not options of measure='classifier' \(ExitClassifier\); "
         r"it takes \['C', 'features', 'max_iter'\]"),
        ("classifier", {"seed": 1}, ValueError, r"the seed is fit's seed="),
        ("halting_geometric", {"kind": "geometric"}, ValueError,
         r"\['kind'\] are not options of measure='halting_geometric'"),
        ("classifier", [("C", 1.0)], TypeError, "measure_options must be a dict"),
        ("classifier", {"max_iter": 0}, ValueError, "max_iter must be an int >= 1"),
    ],
)
def test_bad_measure_options_are_refused_naming_them(cache, monkeypatch, measure, options, exc, match):
    import measures.learned

    monkeypatch.setattr(measures.learned.ExitClassifier, "fit", lambda *a: pytest.fail("trained first"))
    with pytest.raises(exc, match=match):  # every one before the training (max_iter by the estimator's constructor)
        calibrate.fit(cache, measure=measure, measure_options=options)


def test_check_options_refuses_non_mappings_and_non_str_keys():
    from measures.learned import check_options

    assert check_options("softmax_gap", None) == {}
    with pytest.raises(TypeError, match="measure_options must be a dict of keyword arguments"):
        check_options("classifier", ["C"])  # str items, but not a mapping
    with pytest.raises(TypeError, match="measure_options must be a dict of keyword arguments"):
        check_options("classifier", {1: 0.5})


def test_check_options_takes_the_halting_heads_own_options():
    from measures.learned import check_options

    options = {"sigma": 1.0, "oracle": "likelihood", "C": 0.5}
    assert check_options("halting_token_multinomial", options) == options
    with pytest.raises(ValueError, match=r"\['features'\] are not options of measure='halting_geometric'"):
        check_options("halting_geometric", {"features": "hidden"})


def test_learned_measures_refuse_other_names_and_missing_states():
    from measures.learned import measure_from_state, train_measure

    train = calibrate.synthetic_cache(40, n_layers=4, seed=0)
    with pytest.raises(ValueError, match=r"a learned measure must be one of \('classifier', 'halting_geometric'"):
        train_measure("softmax_gap", train)
    state = train_measure("halting_geometric", train).to_dict()
    with pytest.raises(ValueError, match="a learned measure must be one of"):
        measure_from_state("geometric", state)
    with pytest.raises(ValueError, match="the certificate uses measure='classifier' but carries no measure_state"):
        measure_from_state("classifier", None)


def test_train_measure_seeds_the_classifier():
    from measures.learned import train_measure

    train = calibrate.synthetic_cache(40, n_layers=4, seed=0)
    assert train_measure("classifier", train).seed == 0
    assert train_measure("classifier", train, seed=5).to_dict()["params"]["seed"] == 5


def test_learned_measure_trains_on_a_given_train_cache():
    """With train_cache= the measure trains on it and calibrates on all of the calibration cache."""
    from calibrate.losses import proxy_losses
    from measures.learned import train_measure

    cache = calibrate.synthetic_cache(240, seed=5)
    train, cal = cache.split([0.4, 0.6], seed=1)
    cert = calibrate.fit(cal, measure="classifier", train_cache=train, seed=3)
    assert (cert.n, cert.n_train) == (cal.n_sequences, train.n_sequences)
    # the same by hand: train on `train`, calibrate on every sequence of `cal`
    learned = train_measure("classifier", train, seed=3)
    table = proxy_losses(cal, learned.predict_confidence(cal), cert.lambdas)
    manual = calibrate.certify(table, delta=0.1, epsilon=0.05)
    assert manual.lambda_hat == cert.lambda_hat
    np.testing.assert_allclose(manual.risks, cert.risks)
    assert cert.to_dict()["measure_state"] == learned.to_dict()
    # and it differs from the default (a seeded split of `cal`)
    assert calibrate.fit(cal, measure="classifier", seed=3).n < cal.n_sequences


def test_train_cache_bad_input():
    cache = calibrate.synthetic_cache(120, seed=5)
    train, cal = cache.split([0.5, 0.5], seed=1)
    with pytest.raises(ValueError, match="only by the learned measures"):
        calibrate.fit(cal, measure="softmax_gap", train_cache=train)
    with pytest.raises(ValueError, match="calibration cache itself"):
        calibrate.fit(cal, measure="classifier", train_cache=cal)
    other = train.with_meta({**train.user_meta, "heads": {"kind": "adapters", "adapters_digest": "a1"}})
    with pytest.raises(ValueError, match=r"different heads .*; re-score the train cache with calibrate.rehead"):
        calibrate.fit(cal, measure="classifier", train_cache=other)
    weights = ({"kind": "logit_lens", "model_digest": d} for d in ("d1", "d2"))
    one, two = (c.with_meta({**c.user_meta, "heads": h}) for c, h in zip((cal, train), weights))
    with pytest.raises(ValueError, match=r"different heads .*; it comes from another model .*extract it with"):
        calibrate.fit(one, measure="classifier", train_cache=two)  # it advised rehead, which cannot help here
    heads = {"kind": "logit_lens", "model_digest": "d1"}
    here = cal.with_meta({**cal.user_meta, "model": "model", "heads": heads})
    there = train.with_meta({**train.user_meta, "model": "/abs/model", "heads": heads})
    calibrate.fit(here, measure="classifier", train_cache=there)  # the same weights, loaded by another path
    for described in ({**heads, "generation": "g2"}, {"kind": "logit_lens", "model_digest": "d1", "generation": "g1"}):
        decoded_otherwise = there.with_meta({**there.user_meta, "heads": described})  # states read alone: taken
        calibrate.fit(here.with_meta({**here.user_meta, "heads": {**heads, "generation": "g1"}}), measure="classifier",
                      train_cache=decoded_otherwise)  # fmt: skip
    with pytest.raises(ValueError, match="different model"):  # no digest: the name is all there is
        calibrate.fit(cal, measure="classifier", train_cache=train.with_meta({**train.user_meta, "model": "m2"}))
    with pytest.raises(TypeError, match="LayerCache"):
        calibrate.fit(cal, measure="classifier", train_cache="train/")
    with pytest.warns(
        UserWarning, match=f"{cal.n_sequences} calibration sequences also occur in train_cache"
    ) as caught:
        calibrate.fit(cal, measure="halting_geometric", train_cache=cache)  # the whole cache: it holds cal too
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.fit(cal, measure="halting_geometric", train_cache=train)  # disjoint: silent




def test_a_failure_inside_the_losses_progress_bar_closes_it(capsys):
    """The bar ends its line before the error propagates (else a CLI prints the error after the bar's text)."""
    cache = calibrate.synthetic_cache(600, n_layers=4, min_tokens=2, max_tokens=3, seed=0)
    texts = []

    def decode(ids):
        texts.append(ids)
        if len(texts) == 1000:  # in the second batch of 256 sequences
            raise RuntimeError("boom")
        return " ".join(map(str, ids))

    capsys.readouterr()
    with pytest.raises(RuntimeError, match="boom") as failure:  # keeps the frames alive, as a handler does
        calibrate.proxy_losses(cache, cache.arrays["softmax_gap"], [0.9, 0.5], consistency="rouge_l", decode=decode,
                               progress=True)  # fmt: skip
    err = capsys.readouterr().err
    assert "256/600" in err  # the bar was drawn
    assert err.endswith("\n"), failure


def test_a_score_of_your_own_is_a_measure(tmp_path):
    """A (T, L) score stored with the cache (scores=) is fitted, audited and run on Dask by its name."""
    pytest.importorskip("dask")
    synthetic = calibrate.synthetic_cache(300, n_layers=4, seed=0)
    arrays = {name: synthetic.arrays[name] for name in ("full_tokens", "topk_ids", "topk_logprobs")}
    mine = synthetic.arrays["softmax_max"] ** 2
    own = calibrate.LayerCache.from_arrays(
        **arrays, scores={"my_score": mine}, lengths=synthetic.lengths, vocab_size=synthetic.vocab_size
    )
    cal, test = own.split([0.5, 0.5], seed=0)
    cert = calibrate.fit(cal, measure="my_score", delta=0.2)
    expected = calibrate.certify(
        calibrate.proxy_losses(cal, cal.arrays["my_score"], cert.lambdas), delta=0.2, epsilon=0.05
    )
    assert cert.measure == "my_score" and cert.lambda_hat == expected.lambda_hat and cert.risks == expected.risks
    assert calibrate.audit(cert, test).n == test.n_sequences
    own.save(tmp_path / "own")
    lazy = calibrate.open_cache(tmp_path / "own", chunks=64)
    assert calibrate.fit(lazy, measure="my_score", delta=0.2) == calibrate.fit(own, measure="my_score", delta=0.2)
    bare = calibrate.LayerCache.from_arrays(**arrays, lengths=synthetic.lengths, vocab_size=synthetic.vocab_size)
    with pytest.raises(ValueError, match="'my_score' is a stored score: the test cache stores none"):
        calibrate.audit(cert, bare.split([0.5, 0.5], seed=0)[1])
    for name in ("nope", "hidden", "topk_logprobs"):  # not stored, or not a score
        with pytest.raises(ValueError, match="or the name of a score the cache stores"):
            calibrate.fit(own, measure=name)
    named_classifier = calibrate.LayerCache.from_arrays(
        **arrays, scores={"classifier": mine}, lengths=synthetic.lengths, vocab_size=synthetic.vocab_size
    )
    with pytest.raises(ValueError, match="stores a score named 'classifier', which is also a learned measure"):
        calibrate.fit(named_classifier, measure="classifier")  # trained a classifier, ignoring the score


def test_textual_risk_losses_past_the_first_batch_compare_with_their_own_references(cache):
    """Sequences are scored in batches of 256: a sequence of a later batch is scored against its own reference,
    as it is in a cache of that batch alone."""
    conf = cache.arrays["softmax_gap"]
    lam = np.linspace(1.0, 0.0, 6)
    whole = calibrate.proxy_losses(cache, conf, lam, consistency="risk_token_f1")
    rows = np.arange(256, cache.n_sequences)
    alone = cache.subset(rows)
    part = calibrate.proxy_losses(alone, alone.arrays["softmax_gap"], lam, consistency="risk_token_f1")
    assert part.losses.any()
    np.testing.assert_array_equal(whole.losses[rows], part.losses)


def test_textual_losses_exit_where_the_token_losses_do_under_a_decaying_threshold(cache):
    """A decaying threshold moves the exits of the textual losses as it moves those of the token losses."""
    from calibrate.exits import Decay

    small = cache.subset(np.arange(30))
    conf, lam, decay = small.arrays["softmax_gap"], np.linspace(1.0, 0.0, 6), Decay(max_len=24, tau=2.0)
    token = calibrate.proxy_losses(small, conf, lam, decay=decay)
    text = calibrate.proxy_losses(small, conf, lam, consistency="rouge_l", decay=decay)
    np.testing.assert_allclose(text.avg_layers, token.avg_layers)
    assert not np.allclose(text.avg_layers, calibrate.proxy_losses(small, conf, lam).avg_layers)
    np.testing.assert_array_equal(text.losses > 0, token.losses > 0)  # a text differs where a token does


def test_loss_table_refuses_average_exit_layers_below_the_first_layer():
    """Exit layers are 1-based: an average below 1 (e.g. 0-based layers) is refused, 1 and NaN are taken."""
    losses, grid = np.zeros((2, 2)), [1.0, 0.5]
    for bad in ([0.5, 1.0], [2.0, 0.0]):
        with pytest.raises(ValueError, match=r"avg_layers must be exit layers in \[1, 12\] or NaN"):
            calibrate.LossTable(losses, grid, avg_layers=bad, n_layers=12)
    assert calibrate.LossTable(losses, grid, avg_layers=[1.0, np.nan], n_layers=12).avg_layers[0] == 1.0


def test_loss_table_risk_is_the_mean_loss_of_each_column():
    table = calibrate.user_losses([[0.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]], [0.9, 0.1])
    np.testing.assert_allclose(table.risks, [0.2, 0.6])  # not the median (0, 1), nor a mean over rows
    np.testing.assert_allclose(table.subset([0, 4]).risks, [0.5, 0.5])


def test_a_loss_table_subset_drops_the_average_layers_of_rows_it_no_longer_holds():
    cache = calibrate.synthetic_cache(200, seed=0)
    table = calibrate.proxy_losses(cache, cache.arrays["softmax_max"], [0.9, 0.5, 0.1])
    part = table.subset(np.arange(20))
    assert table.avg_layers is not None and part.avg_layers is None  # they were the 200 sequences' averages
    assert calibrate.certify(part, delta=0.9, epsilon=0.1).expected_layers is None
    assert part.n_layers == table.n_layers and np.array_equal(part.losses, table.losses[:20])
    # Repeated rows counted as independent draws: 60 examples x 20 copies certified what 60 do not support
    with pytest.raises(ValueError, match=r"must not repeat an example \(a copy would count as another draw\)"):
        table.subset(np.repeat(np.arange(60), 20))
    with pytest.raises(ValueError, match=r"must lie in \[0, n_examples=200\), got -1..-1"):
        table.subset([-1])
    assert table.subset(np.arange(200) < 20) == part  # a boolean mask


def test_a_train_cache_sharing_sequences_of_a_cache_without_text_is_warned_of():
    cache = calibrate.synthetic_cache(200, n_layers=6, seed=0)
    arrays = {name: np.asarray(cache.arrays[name]) for name in ("full_tokens", "topk_ids", "topk_logprobs", "hidden")}
    bare = calibrate.LayerCache.from_arrays(**arrays, lengths=cache.lengths, vocab_size=cache.vocab_size)
    assert not bare.sequences["prompt"].fillna("").any()  # no text to compare: the full-model tokens tell them apart
    with pytest.warns(UserWarning, match="100 calibration sequences also occur in train_cache .*the same full-model"):
        calibrate.fit(bare, delta=0.2, epsilon=0.1, measure="classifier", train_cache=bare.subset(np.arange(100)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.fit(bare.subset(np.arange(100, 200)), measure="classifier", train_cache=bare.subset(np.arange(100)))


def test_risk_losses_refuse_a_cache_without_references():
    cache = calibrate.synthetic_cache(20, n_layers=4, seed=0, references=False)
    conf = cache.arrays["softmax_gap"]
    with pytest.raises(ValueError, match=r"consistency='risk_rouge_l' compares with references, but 20 sequences"):
        calibrate.proxy_losses(cache, conf, [0.9, 0.1], consistency="risk_rouge_l")


def test_a_calibration_cache_without_the_train_caches_features_is_refused_before_training(monkeypatch):
    """train_cache with hidden states, the calibration cache without: the measure trained, then failed with
    "features='hidden' needs a cache with a 'hidden' array", a features= the caller never passed."""
    import measures.learned

    train = calibrate.synthetic_cache(200, seed=0).split([0.3, 0.7], seed=0)[0]
    cal = calibrate.synthetic_cache(200, seed=0, store_hidden=False).split([0.3, 0.7], seed=0)[1]
    monkeypatch.setattr(measures.learned, "train_measure", lambda *a, **k: pytest.fail("trained before the check"))
    advice = {"classifier": r", or pass measure_options=\{'features': 'topk'\}$", "halting_geometric": "=True$"}
    for measure, then in advice.items():
        with pytest.raises(ValueError, match=rf"measure='{measure}' scores 'hidden' features .* lacks: .*{then}"):
            calibrate.fit(cal, measure=measure, train_cache=train)
