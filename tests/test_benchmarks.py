"""The benchmark scripts' shared timing and argument checks, and the scripts themselves at toy sizes.

The scripts print ratios; what can be tested without timing anything is that they time every run in
turn, refuse arguments that would give a traceback or inf/nan, and that their same-result checks hold
(they assert them) on small inputs.
"""

import argparse
import functools
import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ("timing", "runtime", "lat", "fit_speed", "fff", "fff_digits", "measures_comparison", "proxy_vs_decoded")


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name, as ``python benchmarks/<name>.py`` would see its siblings."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in SCRIPTS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module
    for name in SCRIPTS:  # not left behind under names as common as "runtime" and "lat"
        sys.modules.pop(name, None)


def tiny(smollm2_like):
    """The benchmarks' SmolLM2-shaped model at a size a unit test affords (4 layers, d = 32)."""
    small = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    return functools.partial(smollm2_like, **small, num_key_value_heads=2, vocab_size=256)


def test_side_by_side_calls_every_run_in_turn(bench):
    timing = bench("timing")
    calls = []
    runs = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b", "c")}
    best, out = timing.side_by_side(runs, repeat=2)
    assert calls == ["a", "b", "c"] * 3  # one warm-up round, then two timed rounds in turn
    assert out == {"a": 7, "b": 8, "c": 9}  # each run's last output
    assert set(best) == {"a", "b", "c"} and all(0 <= t < 1 for t in best.values())
    calls.clear()
    timing.side_by_side(runs, repeat=1, warmup=False)
    assert calls == ["a", "b", "c"]
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        timing.side_by_side(runs, repeat=0)


def test_timings_wait_for_every_gpu(bench, monkeypatch):
    """torch.cuda.synchronize() waits for the current device only: with --device cuda:1 a timing stopped while
    its work was still queued."""
    timing = bench("timing")
    waited = []
    for name, value in (("is_available", lambda: True), ("is_initialized", lambda: True), ("device_count", lambda: 2)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    timing.side_by_side({"a": lambda: None}, repeat=1, warmup=False)
    assert waited == [0, 1, 0, 1]  # before and after the run


def test_argument_types(bench):
    timing = bench("timing")
    assert timing.positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1, got 0"):
        timing.positive_int("0")
    assert timing.device_arg("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError):
        timing.device_arg("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
            timing.device_arg("cuda")


@pytest.mark.parametrize(
    "script, argv",
    [
        ("runtime", ["--repeat", "0"]),
        ("runtime", ["--new", "0"]),
        ("fit_speed", ["--sequences", "0"]),
        ("fff", ["--tokens", "16", "0"]),
        ("lat", ["--prompts", "-5"]),
        ("fff_digits", ["--seeds", "0"]),  # printed NaN, then failed on an unrelated error
        ("measures_comparison", ["--sequences", "0"]),
        ("proxy_vs_decoded", ["--batch-size", "0"]),
    ],
)
def test_bad_arguments_are_usage_errors(bench, script, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench(script).main(argv)
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_runtime_benchmark(bench, monkeypatch, capsys):
    runtime = bench("runtime")
    monkeypatch.setattr(runtime, "smollm2_like", tiny(runtime.smollm2_like))
    runtime.main(["--batch", "1", "3", "--new", "3", "--prompt", "5", "--repeat", "1", "--exits", "2"])
    out = capsys.readouterr().out
    assert out.count("runtime full emits the tokens of HF generate") == 2  # asserted, batch 1 and 3
    rows = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    names = ["runtime full", "exit@2", "sat lam=1 (overhead)", "softmax_gap lam=1 (overhead)", "sat lam=0.9"]
    assert [next(n for n in names if row.startswith(n)) for row in rows if not row.startswith("run ")] == names * 2
    exit_rows = [row.split() for row in rows if row.startswith("exit@2")]
    assert all(float(row[2]) == 2.0 for row in exit_rows)  # mean exit layer of the tokens after the prompt pass


def test_runtime_ideal_ratio_charges_the_first_token_the_prompt_pass(bench):
    """Hand-computed on SmolLM2's shape (head = 8 layers, one layer's K/V = 1/16 layer): every row's first token
    comes from the prompt pass, which runs all 30 layers; it was charged as an exit at layer 8 (2.19, not 1.69)."""
    runtime = bench("runtime")
    cost = {"layer": 1.0, "head": 8.0, "kv": 0.0625}
    assert runtime.ideal_ratio(torch.full((2, 4), 8), cost, 30, False) == pytest.approx(152 / (38 + 3 * 17.375))
    rows = torch.tensor([[8, 8, 0, 0], [30, 30, 30, 30]])  # a row ending after 2 tokens; a never-exiting row
    full, early = 6 * 38, 38 + 17.375 + 4 * 38
    assert runtime.ideal_ratio(rows, cost, 30, False) == pytest.approx(full / early)
    softmax = (30 + 8 * 8) + 3 * (8 + 22 * 0.0625 + 8 * 8)  # a head at every layer tried, the prompt pass's too
    assert runtime.ideal_ratio(torch.full((1, 4), 8), cost, 30, True) == pytest.approx(152 / softmax)
    smollm2 = argparse.Namespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                                 vocab_size=49152)  # fmt: skip
    assert runtime.macs(smollm2) == {"layer": 3_538_944, "head": 28_311_552, "kv": 221_184}  # 8 layers, 1/16 layer


def test_lat_benchmark(bench, monkeypatch, capsys):
    lat = bench("lat")
    monkeypatch.setattr(lat, "smollm2_like", tiny(lat.smollm2_like))
    lat.main(["--prompts", "24", "--batch", "2", "--speedups", "2", "--new", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "lat s=1 emits the tokens of hf" in out and "lat s=2" in out


def test_fit_speed_benchmark(bench, capsys):
    argv = ["--sequences", "40", "--tokens", "6", "--layers", "5", "--repeat", "1", "--naive-repeat", "1"]
    bench("fit_speed").main(argv)
    out = capsys.readouterr().out
    assert "fit / np.max" in out and "same losses as the naive loop (asserted)" in out


def test_fff_benchmark(bench, capsys):
    argv = ["--tokens", "1", "70", "--depth", "3", "--width", "16", "--repeat", "1", "--threads", "1"]
    bench("fff").main(argv)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 70 |"))]
    assert len(rows) == 2
    assert all(float(row.rstrip(" |").rsplit("|", 1)[1]) < 1e-5 for row in rows)  # max diff vs the definition
