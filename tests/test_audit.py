"""audit() and validity(): held-out numbers, figures and errors."""

import copy
import dataclasses
import pickle
import re
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import calibrate
from measures.confidence import confidence


@pytest.fixture(scope="module")
def split():
    cache = calibrate.synthetic_cache(600, n_layers=8, max_tokens=20, seed=5)
    return cache.split([0.5, 0.5], seed=0)


@pytest.fixture(scope="module")
def cert(split):
    return calibrate.fit(split[0], delta=0.15, epsilon=0.05, consistency="rouge_l")


def test_audit_matches_a_direct_computation(split, cert):
    dev, test = split
    report = calibrate.audit(cert, test)
    direct = calibrate.proxy_losses(test, test.arrays["softmax_gap"], cert.lambdas, consistency="rouge_l")
    np.testing.assert_allclose(report.risks, direct.risks)
    np.testing.assert_allclose(report.avg_layers, direct.avg_layers)
    assert report.risk == direct.risks[cert.index]
    assert report.within_tolerance == (report.risk <= 0.15)
    frame = report.to_frame()
    assert {"risk", "test_risk", "test_avg_layers", "selected"} <= set(frame.columns)
    assert "AuditReport(n=300" in repr(report)


def test_audit_of_full_model_certificate_costs_nothing(split, cert):
    full = dataclasses.replace(cert, lambda_hat=None, certified=(False,) * len(cert.lambdas))
    report = calibrate.audit(full, split[1])
    assert report.risk == 0.0 and report.layers == split[1].n_layers and report.layer_savings == 0.0


def test_audit_figure_marks_delta_and_lambda_hat(split, cert):
    fig = calibrate.audit(cert, split[1]).plot()
    risk_ax, layers_ax, trade_ax = fig.axes
    labels = [line.get_label() for line in risk_ax.get_lines()]
    assert any(label.startswith("delta") for label in labels)
    assert any(label.startswith("lambda_hat") for label in labels)
    delta_line = next(line for line in risk_ax.get_lines() if line.get_label().startswith("delta"))
    assert np.allclose(delta_line.get_ydata(), 0.15)
    assert layers_ax.get_ylabel() == "average exit layer"
    assert trade_ax.get_xlabel() == "average exit layer"
    assert risk_ax.get_ylabel() == trade_ax.get_ylabel() == "risk: 1 - ROUGE-L vs full model"  # not "risk (rouge_l)"
    # the grid in tested order, evenly spaced (the default grid crowds near 1), labelled with its lambdas
    hat = next(line for line in risk_ax.get_lines() if line.get_label().startswith("lambda_hat"))
    assert hat.get_xdata()[0] == cert.index
    ticks = risk_ax.get_xticks().astype(int)
    assert [t.get_text() for t in risk_ax.get_xticklabels()] == [f"{cert.lambdas[i]:.4g}" for i in ticks]
    marked = next(line for line in risk_ax.get_lines() if line.get_label().startswith("certified"))
    assert marked.get_label() == f"certified ({sum(cert.certified)} of {len(cert.lambdas)})"
    np.testing.assert_array_equal(marked.get_xdata(), np.flatnonzero(cert.certified))
    calibration = next(line for line in risk_ax.get_lines() if line.get_label().startswith("calibration"))
    assert calibration.get_linestyle() == "--"  # the held-out curve on top would hide a solid one
    assert fig._suptitle.get_text() == "softmax_gap / rouge_l (proxy mode), epsilon = 0.05"
    full = dataclasses.replace(cert, lambda_hat=None, certified=(False,) * len(cert.lambdas))
    full_fig = calibrate.audit(full, split[1]).plot()
    assert full_fig._suptitle.get_text().endswith("; certified: full model only")
    assert not any(line.get_label().startswith(("certified", "lambda_hat")) for line in full_fig.axes[0].get_lines())


def test_every_loss_has_a_readable_axis_label():
    from calibrate.audit import _LOSS_LABELS
    from calibrate.losses import CONSISTENCIES

    fff_losses = ("label", "risk_label")  # calibrate.fff.calibration.CONSISTENCIES (imports torch)
    assert set(_LOSS_LABELS) == {*CONSISTENCIES, *fff_losses}


def test_audit_figure_of_a_short_grid_draws_points_and_wants_a_figure(split):
    one = calibrate.fit(split[0], delta=0.15, epsilon=0.05, lambdas=[0.9])
    report = calibrate.audit(one, split[1])
    risk_ax = report.plot().axes[0]
    held_out = next(line for line in risk_ax.get_lines() if line.get_label().startswith("held-out"))
    assert held_out.get_marker() == "o"  # a one-value grid: a line without markers draws nothing
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    advice = r"make subfigures first and your Axes in one of them \(left, right = plt.figure\(\).subfigures\(1, 2\)"
    with pytest.raises(TypeError, match=r"fig must be a matplotlib Figure, SubFigure or None, got Axes .*" + advice):
        report.plot(ax)  # it said "pass its .figure", which the next check refuses
    with pytest.raises(ValueError, match="fig already holds 1 Axes, which the panels would cover: .*" + advice):
        report.plot(ax.figure)  # they were drawn over it
    left, right = plt.figure().subfigures(1, 2)  # the advice, followed
    mine = left.subplots()
    report.plot(fig=right)
    assert left.axes == [mine] and len(right.axes) == 3
    assert len(report.plot(plt.figure()).axes) == 3  # the three panels go into the given figure
    parent = plt.figure(layout="constrained")
    left, right = parent.subfigures(1, 2)
    report.plot(left)
    assert len(left.axes) == 3 and parent.get_layout_engine() is not None  # not replaced by tight_layout
    plt.close("all")
    single = calibrate.audit(one, split[1].subset([0]))
    assert single.summary().startswith("Audit on 1 held-out sequence (teacher-forced proxy losses) at")


def test_audit_warns_of_outputs_longer_than_the_certificates_budget(split):
    """A test cache extracted with a larger max_new_tokens was audited without a word (the runtime warns)."""
    dev, test = (part.with_meta({"generation": {"max_new_tokens": 20}}) for part in split)
    cert = calibrate.fit(dev, delta=0.15, epsilon=0.05, progress=False)
    assert cert.max_new_tokens == 20 and cert.lambda_hat is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.audit(cert, test)  # the same budget
    longer = split[1].with_meta({"generation": {"max_new_tokens": 40}})
    with pytest.warns(UserWarning, match="auditing outputs of up to max_new_tokens=40 new tokens.* at most 20") as w:
        calibrate.audit(cert, longer)
    assert w[0].filename == __file__
    # Shorter outputs: their token loss is another quantity (the summary said "deploy with max_new_tokens <= that")
    assert "(deploy with max_new_tokens = that: shorter outputs are not certified)" in cert.summary()
    short = np.flatnonzero(split[1].lengths <= 10)
    shorter = split[1].subset(short).with_meta({"generation": {"max_new_tokens": 10}})
    with pytest.warns(UserWarning, match=r"at most 20: .* says nothing about outputs cut shorter \(their token loss"):
        calibrate.audit(cert, shorter)
    sequence = calibrate.fit(dev, delta=0.5, epsilon=0.05, consistency="sequence", progress=False)
    assert sequence.lambda_hat is not None and "(deploy with max_new_tokens <= that)" in sequence.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.audit(sequence, shorter)  # a mismatch in a cut output is one in the whole: its risk only falls
    with pytest.warns(UserWarning, match="says nothing about longer outputs"):
        calibrate.audit(sequence, longer)


def test_reports_hold_read_only_arrays(split, cert):
    report = calibrate.audit(cert, split[1])
    study = calibrate.validity(split[0], trials=3, seed=0, progress=False)
    table = calibrate.proxy_losses(split[0], split[0].arrays["softmax_gap"], [0.9, 0.5])
    for copied in (lambda obj: obj, copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        rep, stu, tab = copied(report), copied(study), copied(table)  # copies as read-only as the originals
        np.testing.assert_array_equal(rep.risks, report.risks)
        assert tab == table and stu.violation_rate == study.violation_rate
        arrays = (rep.risks, rep.avg_layers, stu.test_risks, stu.lambda_hats, stu.naive_test_risks, tab.losses)
        for arr in (*arrays, tab.lambdas, tab.avg_layers):
            with pytest.raises(ValueError, match="read-only"):
                arr[0] = 1.0


def test_audit_refuses_other_certificates(split, cert):
    with pytest.raises(ValueError, match="exit-threshold certificate"):
        calibrate.audit(calibrate.certify(np.zeros((50, 2)), [0.9, 0.5]), split[1])
    other = calibrate.synthetic_cache(20, n_layers=5, seed=1)
    with pytest.raises(ValueError, match="layers"):
        calibrate.audit(cert, other)
    broken = dataclasses.replace(cert, measure="classifier", measure_state=None)
    with pytest.raises(ValueError, match="measure_state"):
        calibrate.audit(broken, split[1])
    with pytest.raises(ValueError, match=r"mode='decoded'.*calibrate.audit_decoded"):
        calibrate.audit(dataclasses.replace(cert, mode="decoded"), split[1])
    with pytest.raises(ValueError, match="other model than the certificate"):
        calibrate.audit(dataclasses.replace(cert, model="another-model"), split[1])
    test = split[1]
    names = ("full_tokens", "topk_ids", "topk_logprobs")
    adapted = calibrate.LayerCache.from_arrays(
        **{name: test.arrays[name] for name in names}, lengths=test.lengths, meta={"heads": {"kind": "adapters"}}
    )
    with pytest.raises(ValueError, match=r"other heads than the certificate .*'adapters'.*'logit_lens'"):
        calibrate.audit(dataclasses.replace(cert, model=None, heads={"kind": "logit_lens"}), adapted)


def test_a_model_loaded_by_another_path_is_the_same_model(split, cert):
    heads = {"kind": "logit_lens", "model_digest": "d1"}
    test = split[1].with_meta({**split[1].user_meta, "model": "/abs/model", "heads": heads})
    made = dataclasses.replace(cert, model="model", heads=heads)
    assert calibrate.audit(made, test).n == test.n_sequences  # was "other model" for the path spelled otherwise
    with pytest.raises(
        ValueError, match=r"'heads' -> 'model_digest' is 'd1' in the cache, 'd2' in the certificate \(.*--dtype"
    ):
        calibrate.audit(dataclasses.replace(made, heads={**heads, "model_digest": "d2"}), test)
    nameless = test.with_meta({**test.user_meta, "heads": None})
    with pytest.raises(ValueError, match="'model' is '/abs/model' in the cache, 'model' in the certificate"):
        calibrate.audit(dataclasses.replace(made, heads=None), nameless)  # no digest: the name is all there is


@pytest.mark.parametrize(("measure", "top_k"), [("entropy", 2), ("softmax_gap", 1)])
def test_a_confidence_bound_from_the_top_k_is_audited_on_caches_of_its_kind(measure, top_k):
    """Without a stored array the entropy confidence (and the gap from the top 1) is a bound from the top k,
    another number than the stored exact one: fit records it and audit refuses a cache of the other kind."""
    synthetic = calibrate.synthetic_cache(400, n_layers=4, top_k=top_k, seed=0)
    arrays = {name: synthetic.arrays[name] for name in ("full_tokens", "topk_ids", "topk_logprobs")}
    bare = calibrate.LayerCache.from_arrays(**arrays, lengths=synthetic.lengths, vocab_size=synthetic.vocab_size)
    exact = np.minimum(confidence(bare, measure) + 0.05, 1.0)  # as from full logits: at least the bound
    full = calibrate.LayerCache.from_arrays(
        **arrays, scores={measure: exact}, lengths=synthetic.lengths, vocab_size=synthetic.vocab_size
    )
    (cal, test), (exact_cal, exact_test) = bare.split([0.5, 0.5], seed=0), full.split([0.5, 0.5], seed=0)
    bound, exact = calibrate.fit(cal, measure=measure, delta=0.2), calibrate.fit(exact_cal, measure=measure, delta=0.2)
    assert bound.measure_state == {"from_topk": top_k} and exact.measure_state is None
    bound = calibrate.Certificate.from_json(bound.to_json())
    assert calibrate.audit(bound, test).n == calibrate.audit(exact, exact_test).n == test.n_sequences
    with pytest.raises(ValueError, match=rf"a bound from the top-{top_k} .*the test cache's would be its exact value"):
        calibrate.audit(bound, exact_test)  # was audited silently on the other confidence
    with pytest.raises(ValueError, match=r"its exact value .*, the test cache's would be a bound"):
        calibrate.audit(exact, test)
    with pytest.raises(ValueError, match="made before calm-calibrate recorded where its confidence came from"):
        calibrate.audit(dataclasses.replace(bound, measure_state=None), test)  # as an earlier version wrote it


def test_heads_metadata_with_lists_matches_the_certificate_copy(split):
    heads = {"kind": "adapters", "adapters": {"layers": [1, 2, 3], "rank": 8}, "model_digest": "d1"}
    cal, test = (part.with_meta({**part.user_meta, "heads": heads}) for part in split)
    cert = calibrate.fit(cal)  # holds the heads read-only: tuples in mappings
    for made in (cert, calibrate.Certificate.from_json(cert.to_json())):
        assert calibrate.audit(made, test).n == test.n_sequences  # was "other heads": (1, 2, 3) != [1, 2, 3]


def test_audit_refuses_the_calibration_cache_and_non_certificates(split, cert):
    with pytest.raises(ValueError, match="the test cache is the calibration cache itself"):
        calibrate.audit(cert, split[0])  # an in-sample "audit" said "within delta"
    with pytest.raises(TypeError, match="cert must be a calibrate.Certificate, got dict"):
        calibrate.audit(cert.to_dict(), split[1])


def test_reports_without_a_layer_count_and_report_equality(split, cert):
    token_keep = calibrate.certify(np.zeros((100, 3)), lambdas=[1, 0.5, 0.25], knob="token_keep")
    report = calibrate.AuditReport(token_keep, 10, np.zeros(3), np.full(3, np.nan), 0.0, np.nan)
    assert np.isnan(report.layer_savings)  # documented NaN; was a TypeError
    a, b = calibrate.audit(cert, split[1]), calibrate.audit(cert, split[1])
    assert a == a and a != b and len({a, b}) == 2  # identity, not an ambiguous array comparison


def test_audit_refuses_a_chunked_cache_with_a_hint(split, cert, tmp_path):
    pytest.importorskip("dask")
    split[1].save(tmp_path / "test")
    with pytest.raises(TypeError, match=r"LayerCache in memory, got ChunkedCache .*take"):
        calibrate.audit(cert, calibrate.open_cache(tmp_path / "test", chunks=3))


def test_validity_report_and_figure(split):
    study = calibrate.validity(split[0], trials=20, seed=3, measure="state_saturation", progress=False)
    assert study.trials == 20 and study.test_risks.shape == (20,)
    assert study.violation_rate == np.mean(study.test_risks > study.delta)
    assert study.full_model_rate == np.mean(np.isnan(study.lambda_hats))
    certified = ~np.isnan(study.lambda_hats)
    assert np.all(study.test_risks[~certified] == 0)
    again = calibrate.validity(split[0], trials=20, seed=3, measure="state_saturation", progress=False)
    np.testing.assert_array_equal(study.test_risks, again.test_risks)  # seeded splits
    fig = study.plot()
    assert "epsilon" in fig.axes[0].get_title()
    one = calibrate.validity(split[0], trials=1, progress=False)
    assert "1 random split:" in one.summary() and one.plot().axes[0].get_title().startswith("1 random split,")


def test_validity_with_classifier_keeps_training_sequences_out(split):
    dev = split[0]
    study = calibrate.validity(dev, trials=5, seed=0, measure="classifier", train_fraction=0.4, progress=False)
    train, _ = dev.split([0.4, 0.6], seed=0)
    assert study.trials == 5
    assert study.n_cal + study.n_test == dev.n_sequences - train.n_sequences
    plain = calibrate.validity(dev, trials=5, seed=0, progress=False)
    assert plain.n_cal + plain.n_test == dev.n_sequences
    kwargs = dict(trials=5, seed=0, measure="classifier", train_fraction=0.4, progress=False)
    tuned = calibrate.validity(dev, measure_options={"C": 0.001}, **kwargs)  # was TypeError: unknown options
    assert tuned.n_cal == study.n_cal and not np.array_equal(tuned.test_risks, study.test_risks)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"trials": 0}, "trials"), ({"cal_fraction": 1.0}, "cal_fraction"), ({"cal_fraction": 0.001}, "empty")],
)
def test_validity_bad_input(split, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate.validity(split[0], progress=False, **kwargs)


def test_validity_names_bad_arguments_before_any_work(split, tmp_path):
    pytest.importorskip("dask")  # a chunked cache below
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        calibrate.validity(split[0], seed=-1, progress=False)
    with pytest.raises(TypeError, match=r"unknown options \['mode'\]: its own are \('trials', 'cal_fraction',"):
        calibrate.validity(split[0], mode="decoded", progress=False)
    with pytest.raises(ValueError, match="leave bound unset"):
        calibrate.validity(split[0], method="crc", bound="wsr", measure="vibes", progress=False)
    with pytest.raises(ValueError, match="delta"):
        calibrate.validity(split[0], delta=2.0, measure="vibes", progress=False)
    split[0].save(tmp_path / "dev")
    with pytest.raises(TypeError, match="cache must be a calibrate.LayerCache in memory, got ChunkedCache"):
        calibrate.validity(calibrate.open_cache(tmp_path / "dev", chunks=50), progress=False)


@pytest.mark.parametrize(
    "options, budget",
    [
        ({"measure": "softmax_gap", "measure_options": {"C": 0.1}}, None),  # options of a measure that learns nothing
        ({"consistency": "vibes"}, None),
        ({"lambdas": [0.5, 0.9]}, None),
        ({}, 4),  # the recorded token budget is below the longest sequence
    ],
)
def test_validity_refuses_what_fit_refuses_with_the_same_message(split, options, budget):
    cache = split[0] if budget is None else split[0].with_meta({"generation": {"max_new_tokens": budget}})
    with pytest.raises((ValueError, TypeError)) as by_fit:
        calibrate.fit(cache, **options)
    with pytest.raises(type(by_fit.value), match=re.escape(str(by_fit.value))):
        calibrate.validity(cache, trials=2, progress=False, **options)


def test_held_out_numbers_are_never_printed_below_what_they_are():
    """A held-out risk of 0.10004 printed as 0.1000 next to "ABOVE delta = 0.1"; epsilon = 1/3 as 0.333333."""
    import matplotlib.pyplot as plt

    from calibrate.audit import _held_out_report

    cert = calibrate.certify(np.zeros((200, 2)), [1.0, 0.5], delta=0.1, epsilon=1 / 3, knob="token_keep")
    report = _held_out_report(cert, 50, [0.0, 0.10004])
    assert "held-out risk 0.1001 (ABOVE delta = 0.1)" in report.summary() and "risk=0.1001," in repr(report)
    assert "epsilon = 0.333334" in report.plot().axes[0].get_title()
    assert "held-out risk 0.0784 " in _held_out_report(cert, 50, [0.0, 0.07834]).summary()  # rounded up
    close = dataclasses.replace(cert, delta=0.10002)  # 0.1001 printed beside "within delta = 0.10002"
    assert "held-out risk 0.10001 (within delta = 0.10002)" in _held_out_report(close, 50, [0.0, 0.10001]).summary()
    plt.close("all")


def test_knob_figures_of_hand_made_certificates_name_no_none():
    from calibrate.audit import _held_out_report

    cert = calibrate.certify(np.zeros((200, 3)), [1.0, 0.5, 0.25], delta=0.1, knob="token_keep")
    ax = _held_out_report(cert, 50, [0.0, 0.01, 0.02]).plot().axes[0]
    title = "Token elimination (user calibration, decoded held-out)\nepsilon = 0.05"  # how each curve came about
    assert ax.get_ylabel() == "risk" and ax.get_title() == title
    failed = calibrate.certify(np.full((200, 3), 0.5), [1.0, 0.5, 0.25], delta=0.1, knob="token_keep")
    fig = _held_out_report(failed, 50, [0.5, 0.5, 0.5]).plot()
    ax = fig.axes[0]
    assert ax.get_title().endswith("\nepsilon = 0.05; certified: full model only") and ax.get_ylim()[0] <= 0.0
    fig.canvas.draw()  # the title within the figure (one line was cut at both ends, "full model only" with it)
    box = ax.title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    import matplotlib.pyplot as plt

    plt.close("all")


def test_certify_fit_and_validity_leave_the_warnings_filters_alone(split, monkeypatch):
    """warnings.catch_warnings is not thread-safe (Python 3.11): two validity studies in a thread pool silenced every
    warning of the process for good. Their caveats are reported without it, once per call."""
    entered = []

    class Spy(warnings.catch_warnings):
        def __enter__(self):
            where = sys._getframe(1).f_code.co_filename
            if Path(calibrate.__file__).parent in Path(where).parents:  # pandas has its own: not ours to judge
                entered.append(where)
            return super().__enter__()

    monkeypatch.setattr(warnings, "catch_warnings", Spy)
    bumpy = np.eye(6)[::-1].repeat(100, axis=0)  # losses that fall along the grid: CRC's caveat
    with pytest.warns(UserWarning, match="needs monotone losses") as caught:
        assert (
            "carries no guarantee" in calibrate.certify(bumpy, np.linspace(1, 0.5, 6), delta=0.5, method="crc").reason
        )
        calibrate.fit(split[0], delta=0.15, method="crc")
        calibrate.validity(split[0], trials=3, method="crc", progress=False)
    assert entered == []
    assert [w.filename for w in caught] == [__file__] * 3  # each said once, at the caller's line
    assert "warnings over 3 trials" in str(caught[2].message)


def test_a_full_model_audit_has_no_risk_even_where_the_safest_grid_value_has_some(split):
    """The full model is an explicit hypothesis, not the first grid value: on a grid starting at 0.3 (held-out
    risk above 0.05 there) a certificate for the full model still audits at risk 0 and every layer."""
    dev, test = split
    cert = calibrate.fit(dev, delta=0.15, epsilon=0.05, lambdas=[0.3, 0.2, 0.1])
    full = dataclasses.replace(cert, lambda_hat=None, certified=(False,) * 3)
    report = calibrate.audit(full, test)
    assert report.risks[0] > 0.05
    assert report.risk == 0.0 and report.layers == test.n_layers and report.within_tolerance


def test_tolerance_and_violation_rates_at_exactly_delta(split, cert):
    """A held-out risk equal to delta is within the tolerance (risk <= delta); a violation is risk > delta."""
    from calibrate.audit import AuditReport, ValidityReport

    risks = np.zeros(len(cert.lambdas))
    risks[cert.index] = cert.delta
    report = AuditReport(cert, 10, risks, np.full(risks.size, 4.0), cert.delta, 4.0, "proxy")
    assert report.within_tolerance
    study = ValidityReport(
        0.25, 0.05, np.array([0.25, 0.3, 0.0, 0.1]), np.array([0.5, 0.4, np.nan, 0.6]),
        np.array([0.25, 0.5, 0.25, 0.0]), 80, 20,
    )
    assert study.violation_rate == 0.25 and study.naive_violation_rate == 0.25


@pytest.mark.filterwarnings("ignore:.*conformal risk control's guarantee")  # token losses of this cache: not monotone
def test_validity_of_crc_holds_the_mean_held_out_risk_against_delta():
    """Conformal risk control bounds the expected risk only: its violation rate is far above epsilon by design, so
    the report (summary, repr, plot) puts the mean held-out risk against delta instead."""
    study = calibrate.validity(
        calibrate.synthetic_cache(600, seed=0), trials=40, delta=0.2, epsilon=0.05, method="crc", progress=False
    )
    assert study.method == "crc" and study.expectation_guarantee
    assert study.violation_rate > 0.2  # what the old report printed next to epsilon = 0.05
    assert study.mean_test_risk == pytest.approx(np.mean(study.test_risks)) and study.mean_test_risk <= 0.2 + 0.01
    assert "mean held-out risk" in study.summary() and "epsilon" not in study.summary()
    assert "method='crc'" in repr(study) and " violation_rate" not in repr(study)
    assert "E[risk] <= delta" in study.plot().axes[0].get_title()
    ltt = calibrate.validity(calibrate.synthetic_cache(300, seed=0), trials=5, progress=False)
    assert ltt.method == "fixed_sequence" and not ltt.expectation_guarantee and "epsilon = 0.05" in ltt.summary()
    assert "noise" not in ltt.summary() and ltt.violation_rate <= 0.05
    # Tight certificates (true risks just below delta) put up to half the held-out estimates above delta: a rate
    # above epsilon is said to be of estimates (it was set against epsilon as if of true risks)
    noisy = dataclasses.replace(ltt, test_risks=np.array([0.09, 0.11, 0.09, 0.11, 0.09]), delta=0.1)
    assert noisy.violation_rate == 0.4
    assert "violation rate 0.400 (epsilon = 0.05; held-out risks of 60 sequences, whose noise" in noisy.summary()
    # Shares of many trials: 1 of 400 full-model-only trials printed as "0%", a violation as "0.2% > delta"
    many = dataclasses.replace(ltt, test_risks=np.r_[0.2, np.zeros(399)], naive_test_risks=np.zeros(400),
                               lambda_hats=np.r_[np.nan, np.full(399, 0.5)], delta=0.1)  # fmt: skip
    assert "full model only in 1 of 400 trials" in many.summary() and "violation rate 0.003 " in many.summary()
    legend = [t.get_text() for t in many.plot().axes[0].get_legend().get_texts()]
    assert legend[0] == "certified (1 > delta)" and legend[1] == "naive: calibration risk <= delta (0 > delta)"
    small = calibrate.synthetic_cache(300, seed=0)
    holm = calibrate.validity(small, trials=2, method=calibrate.fwer.Holm(), progress=False)
    assert holm.method == "holm"  # the name a certificate records (was the object)


def test_validity_scores_held_out_rows_and_the_naive_rule_takes_the_fastest_passing_threshold():
    """The naive rule (empirical risk <= delta) picks the fastest threshold that passes, so on each split its
    held-out risk is at least the certified one's; scored on the calibration rows instead, or taking the safest
    passing threshold, its violation rate would be 0 here."""
    study = calibrate.validity(
        calibrate.synthetic_cache(300, seed=0), trials=20, delta=0.1, epsilon=0.05, progress=False
    )
    assert study.naive_violation_rate >= 0.2 and study.violation_rate <= 0.05
    ok = ~np.isnan(study.lambda_hats)
    assert np.all(study.naive_test_risks[ok] >= study.test_risks[ok] - 1e-12)


def test_audit_report_fields_and_frame_columns_are_the_held_out_values_at_lambda_hat(split, cert):
    """risk and layers are the held-out values at the certified grid value; to_frame's test columns hold them."""
    report = calibrate.audit(cert, split[1])
    assert report.risk == report.risks[cert.index] and report.layers == report.avg_layers[cert.index]
    assert 1.0 <= report.layers < split[1].n_layers and len(set(report.avg_layers.tolist())) > 1
    frame = report.to_frame()
    np.testing.assert_array_equal(frame["test_risk"], report.risks)
    np.testing.assert_array_equal(frame["test_avg_layers"], report.avg_layers)
    assert frame.index[frame["selected"]].tolist() == [cert.index]


def test_validity_scores_each_trial_on_its_held_out_rows_only():
    """With one held-out sequence per split and 0/1 sequence losses, every held-out risk is 0 or 1 (a mean over
    calibration rows, or over a test set that overlaps them, would not be)."""
    cache = calibrate.synthetic_cache(300, seed=0)
    study = calibrate.validity(cache, trials=30, cal_fraction=299 / 300, consistency="sequence", progress=False)
    assert (study.n_cal, study.n_test) == (299, 1)
    certified = ~np.isnan(study.lambda_hats)
    assert certified.all() and np.isin(study.test_risks, [0.0, 1.0]).all()
    assert np.isin(study.naive_test_risks, [0.0, 1.0]).all()
    assert 0 < study.violation_rate < 1  # some single held-out sequences differ, some do not


def test_validity_naive_rule_accepts_a_calibration_risk_of_exactly_delta(monkeypatch):
    """The naive rule is "calibration risk <= delta": a grid value whose risk equals delta is the naive choice."""
    fit_module = sys.modules["calibrate.fit"]
    table = calibrate.user_losses(np.tile([0.0, 0.25, 1.0], (40, 1)), [0.9, 0.5, 0.1])
    monkeypatch.setattr(fit_module, "_proxy_table", lambda cache, seed, **kwargs: (table,))
    study = calibrate.validity(calibrate.synthetic_cache(40, seed=0), trials=3, delta=0.25, progress=False)
    np.testing.assert_array_equal(study.naive_test_risks, [0.25] * 3)
    assert study.naive_violation_rate == 0.0


def test_audit_of_a_decaying_threshold_certificate_uses_its_decay(split):
    """A certificate fitted with a decaying threshold is audited with the same decay, not with a constant one."""
    from calibrate.exits import Decay

    dev, test = split
    cert = calibrate.fit(dev, delta=0.15, epsilon=0.05, decay=2.0)
    report = calibrate.audit(cert, test)
    conf = confidence(test, cert.measure)
    direct = calibrate.proxy_losses(test, conf, cert.lambdas, decay=Decay(**cert.decay))
    np.testing.assert_array_equal(report.risks, direct.risks)
    assert not np.array_equal(report.risks, calibrate.proxy_losses(test, conf, cert.lambdas).risks)


def test_audit_summary_says_above_delta_when_the_held_out_risk_exceeds_it(split, cert):
    """The summary's verdict follows within_tolerance: "within" at risk <= delta, "ABOVE" past it."""
    from calibrate.audit import AuditReport

    risks, layers = np.zeros(len(cert.lambdas)), np.full(len(cert.lambdas), 4.0)
    above = AuditReport(cert, 1, risks, layers, cert.delta + 0.01, 4.0, "proxy")
    assert "(ABOVE delta = 0.15)" in above.summary() and "within_tolerance=False" in repr(above)
    assert "1 held-out sequence (teacher-forced proxy losses)" in above.summary()
    at = AuditReport(cert, 2, risks, layers, cert.delta, 4.0, "proxy")
    assert "(within delta = 0.15)" in at.summary() and "average layers 4.00 of 8 (saves 50.0%)" in at.summary()


def test_audit_scores_textual_losses_with_the_decode_given(split, cert):
    """decode= reaches the textual losses: the audit equals proxy losses decoded the same way, not the default."""
    dev, test = split
    conf = confidence(test, cert.measure)

    def decode(ids):
        return " ".join(str(i % 5) for i in ids)  # a coarser text: some differing tokens read the same

    report = calibrate.audit(cert, test, decode=decode)
    direct = calibrate.proxy_losses(test, conf, cert.lambdas, consistency="rouge_l", decode=decode)
    np.testing.assert_array_equal(report.risks, direct.risks)
    assert not np.array_equal(report.risks, calibrate.audit(cert, test).risks)
