"""scripts/readme_results.py writes the demo's table into the README's marked block and nothing else."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUMMARY = {
    "model": "M",
    "n_train": 4,
    "n_cal": 10,
    "n_test": 5,
    "max_new_tokens": 6,
    "delta": 0.1,
    "epsilon": 0.05,
    "consistency": "rouge_l",
    "batch_size": 8,
    "threads": 2,
    "agreement_plain": [0.1] * 29 + [1.0],
    "agreement_adapters": [0.5] * 29 + [1.0],
    "table": [
        {
            "measure": "state_saturation",
            "lambda_hat": "0.9900",
            "cal_risk": 0.05,
            "test_risk": 0.07,
            "within_delta": True,
            "avg_layers": 21.5,
            "decoded_exit_layer": 22.25,
            "speedup": 1.31,
            "decoded_loss": 0.12,
        },
        {
            "measure": "softmax_gap",
            "lambda_hat": "full model",
            "cal_risk": 0.0,
            "test_risk": 0.0,
            "within_delta": True,
            "avg_layers": 30.0,
            "decoded_exit_layer": None,
            "speedup": None,
            "decoded_loss": None,
        },
    ],
}


def test_block_is_replaced_and_the_rest_kept(tmp_path):
    script = _script()
    summary, readme = tmp_path / "summary.json", tmp_path / "README.md"
    summary.write_text(json.dumps(SUMMARY))
    readme.write_text(f"intro\n{script.START}\nold table\n{script.END}\noutro\n")
    assert script.main([str(summary), str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{script.START}\n") and text.endswith(f"{script.END}\noutro\n")
    assert "old table" not in text
    assert "| state_saturation | 0.9900 | 0.050 | 0.070 | yes | 21.5 | 22.2 | 1.31x | 0.120 |" in text
    assert "| softmax_gap | full model | 0.000 | 0.000 | yes | 30.0 | – | – | – |" in text
    assert "layer 20 10% → 50%" in text and "batch 8 on 2 CPU threads" in text
    assert script.main([str(summary), str(readme)]) == 0 and readme.read_text() == text  # idempotent


def test_readme_has_the_block_and_missing_markers_fail(tmp_path):
    script = _script()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(script.START) == 1 and text.count(script.END) == 1
    (tmp_path / "README.md").write_text("no markers\n")
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    with pytest.raises(SystemExit, match="no <!-- demo-results:start -->"):
        script.main([str(tmp_path / "summary.json"), str(tmp_path / "README.md")])
