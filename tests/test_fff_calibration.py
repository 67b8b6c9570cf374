"""Certified evaluation depth of fast feedforward layers (knob ``fff_depth``)."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import calibrate
from calibrate import fff
from calibrate._format import level
from calibrate.losses import LossTable


def _classifier(seed: int = 0, depth: int = 6) -> nn.Module:
    """A random classifier whose tree's deeper levels write less (as refinements), so depth trades accuracy."""
    torch.manual_seed(seed)
    tree = fff.FFF(16, 5, depth)
    with torch.no_grad():
        for level in range(depth + 1):
            tree.w_out[2**level - 1 : 2 ** (level + 1) - 1] *= 0.6**level
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), tree).eval()


def test_certify_picks_the_hand_computable_depth():
    """Depths 5..3 never change the label, depth 2 changes half: fixed-sequence stops at depth 3."""
    n = 400
    losses = np.zeros((n, 6))
    losses[: n // 2, 3:] = 1.0
    table = LossTable(losses, np.arange(5, -1, -1.0), "decoded", "label")
    cert = calibrate.certify(table, delta=0.1, epsilon=0.05, knob="fff_depth")
    assert cert.lambda_hat == 3.0 and cert.certified == (True, True, True, False, False, False)
    assert "certified evaluation depth 3: 4 neurons per path of each tree" in cert.summary()
    assert "trees shallower than 3 run whole" in cert.summary()
    root = calibrate.certify(np.zeros((n, 2)), [1.0, 0.0], delta=0.1, epsilon=0.05, knob="fff_depth")
    # was "1 neurons ... shallower than 0 run whole"
    assert (
        "certified evaluation depth 0: 1 neuron per path of each tree (a tree of depth D evaluates D + 1 when whole)"
        in root.summary()
    )
    with pytest.raises(ValueError, match=r"an fff_depth grid holds whole depths >= 0, got \[1.9, 1.8\]"):
        calibrate.certify(np.zeros((n, 2)), [1.9, 1.8], knob="fff_depth")
    with pytest.raises(ValueError, match=r"a token_keep grid holds 1 / speed-up, in \(0, 1\]"):
        calibrate.certify(np.zeros((n, 2)), [2.0, 1.0], knob="token_keep")


def test_fit_equals_labels_at_each_depth_and_apply_runs_it():
    model = _classifier()
    x = torch.randn(3000, 12)
    cert = fff.fit(model, x, delta=0.2, epsilon=0.05)
    assert cert.knob == "fff_depth" and cert.lambdas == tuple(float(k) for k in range(6, -1, -1))
    assert cert.model == fff.model_id(model) and cert.consistency == "label" and cert.max_new_tokens is None
    with torch.no_grad():
        full = model(x).argmax(1)
        for k, risk in zip(range(6, -1, -1), cert.risks):
            if risk == risk:  # tested
                with fff.at_depth(model, k):
                    assert risk == pytest.approx((model(x).argmax(1) != full).float().mean().item())
    assert cert.risks[0] == 0.0 and any(r > 0 for r in cert.risks if r == r)
    assert cert.lambda_hat is not None and cert.lambda_hat < 6  # shallower than the full tree certified
    layer = fff.fff_layers(model)[0]
    assert layer.eval_depth is None  # at_depth restored it
    fff.apply(model, cert)
    assert layer.eval_depth == int(cert.lambda_hat)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:7]), model[2](model[1](model[0](x[:7])), depth=int(cert.lambda_hat)))


def test_at_depth_is_seen_by_its_own_thread_only():
    """fff.fit / at_depth on a model another thread is serving must not change that thread's outputs."""
    import threading

    model = _classifier()
    x = torch.randn(200, 12)
    with torch.no_grad():
        full, shallow = model(x), model[2](model[1](model[0](x)), depth=0)
    assert not torch.equal(full, shallow)
    inside, served = threading.Event(), threading.Event()
    seen = {}

    def calibrating():
        with torch.no_grad(), fff.at_depth(model, 0):
            inside.set()
            seen["calibration"] = model(x)
            served.wait(timeout=30)  # still inside the block while the other thread runs the model

    thread = threading.Thread(target=calibrating)
    thread.start()
    assert inside.wait(timeout=30)
    with torch.no_grad():
        seen["served"] = model(x)  # was depth 0: the block had set every layer's eval_depth
    served.set()
    thread.join()
    torch.testing.assert_close(seen["served"], full)
    torch.testing.assert_close(seen["calibration"], shallow)


def test_eval_depth_set_inside_at_depth_outlives_the_block_and_is_checked():
    model = _classifier()
    layer = fff.fff_layers(model)[0]
    with fff.at_depth(model, 1):
        layer.eval_depth = 4  # e.g. fff.apply inside the block: kept (was reset to None at the block's end)
        assert layer.eval_depth == 1  # the block's depth wins inside it
    assert layer.eval_depth == 4
    with pytest.raises(ValueError, match=r"depth must be an int in 0..6"):
        layer.eval_depth = 7  # was accepted, and failed at the next forward
    with pytest.raises(TypeError, match="depth must be an int"):
        layer.eval_depth = 2.0
    assert layer.eval_depth == 4


def test_modules_pickled_before_eval_depth_was_a_property_load():
    import pickle

    model = _classifier()
    layer = fff.fff_layers(model)[0]
    layer.eval_depth = 3
    state = layer.__dict__
    state["eval_depth"] = state.pop("_eval_depth")  # what torch.save(model) held before
    back = pickle.loads(pickle.dumps(model))
    assert fff.fff_layers(back)[0].eval_depth == 3  # was AttributeError: no attribute 'eval_depth'
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(back(x), back[2](back[1](back[0](x)), depth=3))


def test_an_at_depth_block_finished_in_another_thread_warns():
    import threading

    model = _classifier()

    def blocks():
        with fff.at_depth(model, 2):
            yield

    gen = blocks()
    next(gen)  # entered here
    caught = []

    def finish():
        import warnings

        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            gen.close()  # was ValueError: <Token ...> was created in a different Context
        caught.extend(w)

    thread = threading.Thread(target=finish)
    thread.start()
    thread.join()
    assert [str(w.message)[:58] for w in caught] == ["an fff.at_depth block ended in another thread than the one"]


def test_fit_checks_its_risk_options_before_the_model_runs(monkeypatch):
    model = _classifier()
    monkeypatch.setattr(fff.calibration, "depth_losses", lambda *a, **k: pytest.fail("the model ran first"))
    for kwargs, match in [({"delta": 0}, "delta"), ({"method": "crc", "bound": "wsr"}, "leave bound unset")]:
        with pytest.raises(ValueError, match=match):
            fff.fit(model, torch.randn(50, 12), **kwargs)


def test_risk_label_probes_the_model_in_eval_mode():
    model = nn.Sequential(_classifier(seed=3), nn.BatchNorm1d(5)).train()  # BatchNorm: one example fails in training
    x = torch.randn(300, 12)
    labels = model.eval()(x).argmax(dim=-1).numpy()
    model.train()
    # was "Expected more than 1 value per channel"
    fff.fit(model, x, delta=0.3, consistency="risk_label", references=labels)
    assert model.training and int(model[1].num_batches_tracked) == 0  # no statistics updated


def test_one_logit_classifiers_are_refused_not_certified_at_depth_zero():
    torch.manual_seed(0)
    binary = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), fff.FFF(16, 1, 4)).eval()  # BCE-with-logits style
    x = torch.randn(300, 12)
    with pytest.raises(ValueError, match=r"n_classes >= 2 .* got shape \(300, 1\); for a one-logit binary"):
        fff.fit(binary, x, delta=0.05)  # every argmax was 0: zero risk at every depth
    with pytest.raises(ValueError, match=r"n_classes >= 2"):
        fff.fit(binary, x, delta=0.05, references=np.zeros(300, dtype=int))
    flat = nn.Sequential(binary, nn.Flatten(0))
    with pytest.raises(ValueError, match=r"got shape \(300,\)"):
        fff.fit(flat, x, delta=0.05)


def test_refuses_other_knobs_and_models_and_bad_depths():
    model = _classifier()
    cert = fff.fit(model, torch.randn(500, 12), delta=0.3, epsilon=0.1)
    with pytest.raises(ValueError, match="made for the model"):
        fff.apply(_classifier(seed=1), cert)
    import dataclasses

    keep = dataclasses.replace(cert, knob="token_keep", lambdas=(1.0, 0.5), lambda_hat=0.5, risks=(0.0, 0.0),
                               p_values=(0.01, 0.01), certified=(True, True), avg_layers=None)
    with pytest.raises(ValueError, match="knob 'token_keep'"):
        fff.apply(model, keep)
    with pytest.raises(ValueError, match=r"a token_keep grid holds 1 / speed-up, in \(0, 1\], got \[6.0, 5.0"):
        dataclasses.replace(cert, knob="token_keep")  # depths are no keep fractions
    with pytest.raises(ValueError, match="depth must be an int in 0..6"):
        with fff.at_depth(model, 7):
            pass
    with pytest.raises(ValueError, match="depths must decrease"):
        fff.fit(model, torch.randn(50, 12), depths=[3, 4])
    x = torch.randn(50, 12)  # unsigned depths are ints too (np.diff of them wraps around)
    unsigned = fff.depth_losses(model, x, depths=np.array([5, 2, 0], dtype=np.uint8))
    np.testing.assert_array_equal(unsigned.losses, fff.depth_losses(model, x, depths=[5, 2, 0]).losses)
    with pytest.raises(ValueError, match="FFF layers"):
        fff.fit(nn.Linear(3, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"needs references=, one int label per input \(50\)"):
        fff.fit(model, torch.randn(50, 12), consistency="risk_label")
    wrong = [(np.zeros(49, int), r"shape \(49,\)"), (np.zeros((50, 12)), r"shape \(50, 12\)"), ([0] * 3, "3 labels")]
    for bad, given in wrong:
        with pytest.raises(ValueError, match=rf"references must hold one int label per input \(50\), got {given}$"):
            fff.fit(model, torch.randn(50, 12), consistency="risk_label", references=bad)  # "needs references=" before


def test_trees_of_different_depths_start_from_the_full_model():
    torch.manual_seed(0)
    model = nn.Sequential(fff.FFF(12, 12, 3), nn.Tanh(), fff.FFF(12, 5, 8)).eval()
    x = torch.randn(300, 12)
    table = fff.depth_losses(model, x)
    assert table.lambdas.tolist() == list(range(8, -1, -1)) and table.risks[0] == 0  # depth 8: every tree whole
    with torch.no_grad(), fff.at_depth(model, 5):
        assert (model[0].eval_depth, model[2].eval_depth) == (3, 5)  # the depth-3 tree runs whole
        capped = model(x)
        assert torch.equal(capped, model[2](model[1](model[0](x, depth=3)), depth=5))
    anonymous = calibrate.certify(table, delta=0.5, knob="fff_depth")  # losses certified by hand: no model recorded
    with pytest.raises(
        ValueError, match=r"names no model, .*dataclasses.replace\(certificate, model=calibrate.fff.model_id"
    ):
        fff.apply(model, anonymous)
    cert = dataclasses.replace(anonymous, model=fff.model_id(model))
    fff.apply(model, dataclasses.replace(cert, lambda_hat=5.0))
    assert (model[0].eval_depth, model[2].eval_depth) == (3, 5)


def test_a_model_left_in_training_mode_is_calibrated_in_eval_mode():
    model = _classifier(seed=4)
    x = torch.randn(400, 12)
    expected = fff.depth_losses(model, x).losses
    noisy = nn.Sequential(nn.Dropout(0.5), model).train()  # dropout active: the full tree disagreed with itself
    noisy[1][0].eval()  # a frozen part (a BatchNorm, say) of a model in training
    np.testing.assert_array_equal(fff.depth_losses(noisy, x).losses, expected)
    assert noisy.training and noisy[1].training and not noisy[1][0].training  # every module's mode is restored


def test_audit_reports_held_out_risk_at_every_depth():
    model = _classifier(seed=2)
    cert = fff.fit(model, torch.randn(2000, 12), delta=0.2, epsilon=0.05)
    held = torch.randn(1000, 12)
    report = fff.audit(cert, model, held)
    table = fff.depth_losses(model, held)
    np.testing.assert_allclose(report.risks, table.risks)
    assert report.risk == pytest.approx(table.risks[cert.index]) and report.n == 1000
    assert "evaluation depth" in report.summary()
    ax = report.plot().axes[0]
    assert ax.lines[1].get_xdata().tolist() == list(cert.lambdas)
    shallow = _classifier(seed=2, depth=3)
    ticks = fff.audit(fff.fit(shallow, torch.randn(500, 12), delta=0.5), shallow, held).plot().axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)  # whole depths 0..3, no 2.5


def test_risk_label_counts_only_new_mistakes():
    model = _classifier(seed=3)
    x = torch.randn(800, 12)
    with torch.no_grad():
        full = model(x).argmax(1).numpy()
    refs = full.copy()
    refs[:400] = (refs[:400] + 1) % 5  # the full model is wrong on the first half
    table = fff.depth_losses(model, x, depths=[6, 2], consistency="risk_label", references=refs)
    with torch.no_grad(), fff.at_depth(model, 2):
        shallow = model(x).argmax(1).numpy()
    assert table.losses[:400].sum() == 0
    np.testing.assert_array_equal(table.losses[400:, 1], (shallow[400:] != full[400:]).astype(float))
    for bad in (refs + 5, refs - 5):  # labels no output can be: the risk was 0 at every depth
        with pytest.raises(ValueError, match=r"int labels in \[0, 5\) \(the model's outputs\).*range"):
            fff.depth_losses(model, x, depths=[6, 2], consistency="risk_label", references=bad)


@pytest.mark.slow
def test_certified_depth_is_valid_over_calibration_draws():
    """Monte-Carlo: calibration sets drawn from a pool whose per-depth risk is known; the certified depth's
    true risk exceeds delta in at most about epsilon of the draws."""
    model = _classifier(seed=4, depth=8)
    pool = fff.depth_losses(model, torch.randn(40000, 12))  # the "population": true risk per depth
    true_risk = pool.risks
    delta, epsilon, n, trials = 0.1, 0.1, 300, 400
    rng = np.random.default_rng(0)
    violations = 0
    for _ in range(trials):
        draw = pool.subset(rng.choice(pool.n, size=n, replace=False))
        cert = calibrate.certify(draw, delta=delta, epsilon=epsilon, knob="fff_depth")
        if cert.index is not None and true_risk[cert.index] > delta:
            violations += 1
    assert true_risk[0] == 0 and true_risk[-1] > delta  # the knob matters on this model
    assert violations / trials <= epsilon + 3 * np.sqrt(epsilon * (1 - epsilon) / trials)


def test_cli_fff_fit_and_audit_equal_the_functions(tmp_path, capsys):
    from calibrate.cli import main

    tree = _classifier(seed=5)[2]
    tree.save(tmp_path / "fff.safetensors")
    g = np.random.default_rng(0)
    cal, held = g.normal(size=(1500, 16)).astype(np.float32), g.normal(size=(600, 16)).astype(np.float32)
    np.save(tmp_path / "cal.npy", cal)
    np.save(tmp_path / "held.npy", held)
    out = tmp_path / "cert.json"
    argv = ["fff-fit", "--model", str(tmp_path / "fff.safetensors"), "--inputs", str(tmp_path / "cal.npy")]
    assert main([*argv, "--max-new-tokens", "5"]) == 2  # was accepted and ignored: a classifier decodes nothing
    assert "--max-new-tokens is for a language model" in capsys.readouterr().err
    assert main([*argv, "--delta", "0.2", "-o", str(out)]) == 0
    direct = fff.fit(tree, torch.from_numpy(cal), delta=0.2)
    assert calibrate.Certificate.from_json(out) == direct and "fff_depth" in capsys.readouterr().out
    figure = tmp_path / "audit.png"
    code = main(
        [
            "audit",
            str(out),
            "--model",
            str(tmp_path / "fff.safetensors"),
            "--inputs",
            str(tmp_path / "held.npy"),
            "--figure",
            str(figure),
        ]
    )
    report = fff.audit(direct, tree, torch.from_numpy(held))
    assert code == (0 if report.within_tolerance else 1) and figure.stat().st_size > 0
    assert f"held-out risk {level(report.risk, '.4f')}" in capsys.readouterr().out
    np.save(tmp_path / "bad.npy", cal[:, :5])
    assert main(["fff-fit", "--model", str(tmp_path / "fff.safetensors"), "--inputs", str(tmp_path / "bad.npy")]) == 2
    assert "(n, 16)" in capsys.readouterr().err


def test_cli_classifier_uses_batch_size_device_and_dtype(tmp_path, capsys, monkeypatch):
    from calibrate.cli import main

    _classifier(seed=5)[2].save(tmp_path / "fff.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32))
    np.save(tmp_path / "held.npy", np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32))
    seen = {}

    def spy(name):
        real = getattr(fff, name)

        def call(*args, **kwargs):
            seen[name] = args, kwargs
            return real(*args, **kwargs)

        return call

    for name in ("fit", "audit"):
        monkeypatch.setattr(fff, name, spy(name))
    common = ["--model", str(tmp_path / "fff.safetensors"), "--inputs", str(tmp_path / "x.npy")]
    options = ["--batch-size", "7", "--device", "cpu", "--dtype", "float64"]
    assert main(["fff-fit", *common, *options, "-o", str(tmp_path / "cert.json")]) == 0
    assert main(["audit", str(tmp_path / "cert.json"), *common, *options]) == 2  # the calibration inputs again
    assert "the inputs are the certificate's calibration inputs" in capsys.readouterr().err
    held_out = [*common[:3], str(tmp_path / "held.npy")]
    assert main(["audit", str(tmp_path / "cert.json"), *held_out, *options]) in (0, 1)
    (model, inputs, *_), fit_options = seen["fit"]
    (_, audited, held), audit_options = seen["audit"]
    assert fit_options["batch_size"] == audit_options["batch_size"] == 7
    for m, x in ((model, inputs), (audited, held)):
        assert m.w_in.dtype == x.dtype == torch.float64 and m.w_in.device.type == x.device.type == "cpu"
    capsys.readouterr()
    for device, match in (("cuda:99", "device 'cuda:99' is not available"), ("bogus", "device must name")):
        assert main(["fff-fit", *common, "--device", device]) == 2
        assert match in capsys.readouterr().err


def test_depth_grid_must_start_at_most_at_the_full_tree_and_decrease_strictly():
    model = _classifier(depth=3)
    x = torch.randn(20, 12)
    for bad in ([4, 2, 0], [2, 2, 1], [3, 1, 1]):
        with pytest.raises(ValueError, match=r"depths must decrease strictly from at most 3 \(the full tree\) to >= 0"):
            fff.depth_losses(model, x, depths=bad)
    assert fff.depth_losses(model, x, depths=[3, 1]).lambdas.tolist() == [3.0, 1.0]


def test_model_id_names_every_tree_depth():
    torch.manual_seed(0)
    model = nn.Sequential(fff.FFF(12, 12, 3), nn.Tanh(), fff.FFF(12, 5, 8), fff.FFF(5, 5, 3))
    assert fff.model_id(model).startswith("fff/3x/D3-8/")


def test_audit_uses_the_certificate_grid_and_depth_losses_check_the_consistency():
    model = _classifier(seed=2, depth=4)
    cert = fff.fit(model, torch.randn(300, 12), delta=0.3, depths=[4, 2, 1])
    held = torch.randn(200, 12)
    report = fff.audit(cert, model, held)
    np.testing.assert_allclose(report.risks, fff.depth_losses(model, held, depths=[4, 2, 1]).risks)
    with pytest.raises(ValueError, match=r"consistency must be one of \('label', 'risk_label'\), got 'token'"):
        fff.depth_losses(model, held, consistency="token")
