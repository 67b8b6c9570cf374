"""The notebooks are committed without outputs (the suite itself executes them, with nbmake)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == {
        "quickstart", "confidence_measures", "auditing", "token_elimination", "fast_feedforward"
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_no_progress_warning_in_a_kernel_without_ipywidgets():
    """tqdm.auto warned "IProgress not found. Please update jupyter and ipywidgets" in a Jupyter kernel without
    ipywidgets (in none of the extras), even for a call with progress=False, or on loading transformers."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("transformers")
    cells = [
        "import warnings\nwarnings.simplefilter('default')",
        "import calibrate\nimport transformers  # which loads tqdm.auto too",
        "cache = calibrate.synthetic_cache(60, seed=0)",
        "cert = calibrate.fit(cache, delta=0.2, epsilon=0.1, consistency='rouge_l', progress=False)",
        "study = calibrate.validity(cache, trials=2, progress=True)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    said = [o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []) if o.get("name") == "stderr"]
    assert any("validity" in s for s in said)  # the bar asked for is shown (as text)
    assert not any("IProgress" in s or "Warning" in s for s in said), said
