"""Without an extra, what needs it fails with an ImportError naming the extra to install, not deep inside.

The extras are installed here, so their absence is simulated: ``importlib.util.find_spec`` answers None
for the hidden modules (as it does when a module is not installed).
"""

import importlib
import importlib.util
import sys

import pytest

import calibrate
from calibrate._extras import EXTRAS, require
from calibrate.cli import main


@pytest.fixture
def hide(monkeypatch):
    """``hide("torch", ...)``: those modules look uninstalled to ``find_spec`` from now on."""
    real = importlib.util.find_spec

    def hide(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    return hide


def test_require_names_what_is_missing_and_the_extra(hide):
    require("calibrate.runtime", "hf")  # installed here: nothing raised
    hide("transformers")
    with pytest.raises(
        ImportError, match=r"^calibrate.runtime needs transformers: pip install 'calm-calibrate\[hf\]'$"
    ):
        require("calibrate.runtime", "hf")
    assert set(EXTRAS) == {"hf", "real", "dask"}


@pytest.mark.parametrize("name", ["extract", "runtime", "smollm2"])
def test_lazy_names_of_calibrate(hide, monkeypatch, name):
    monkeypatch.delitem(vars(calibrate), name, raising=False)  # an imported submodule is an attribute (restored)
    hide("torch")
    with pytest.raises(ImportError, match=rf"calibrate.{name} needs torch: pip install 'calm-calibrate\[hf\]'"):
        getattr(calibrate, name)


@pytest.mark.parametrize("package", ["calibrate.runtime", "calibrate.fff"])
def test_torch_packages_imported_directly(hide, monkeypatch, package):
    pytest.importorskip("torch")
    monkeypatch.delitem(sys.modules, package, raising=False)  # restored afterwards, and so is
    monkeypatch.delitem(vars(calibrate), package.split(".")[1], raising=False)  # the attribute a new import sets
    hide("transformers")
    if package == "calibrate.fff":  # the layer and classifier certificates need torch alone
        importlib.import_module(package)
        monkeypatch.delitem(sys.modules, package)
    else:
        with pytest.raises(ImportError, match=rf"{package} needs transformers: pip install 'calm-calibrate\[hf\]'"):
            importlib.import_module(package)
    hide("torch")
    with pytest.raises(ImportError, match=rf"{package} needs torch: pip install 'calm-calibrate\[hf\]'"):
        importlib.import_module(package)


@pytest.mark.parametrize(
    "module",
    [
        "calibrate.models",
        "calibrate.heads",
        "calibrate.extraction",
        "calibrate.adapters",
        "calibrate.lat.decode",
        "calibrate.lat.calibration",
        "calibrate.lat.tuning",
        "calibrate.lat.scores",
    ],
)
def test_modules_needing_torch_imported_directly_name_the_extra(hide, monkeypatch, module):
    """They raised a bare ModuleNotFoundError: No module named 'torch'."""
    monkeypatch.delitem(sys.modules, module, raising=False)  # restored afterwards
    hide("torch")
    with pytest.raises(ImportError, match=rf"^{module} needs torch: pip install 'calm-calibrate\[hf\]'$"):
        importlib.import_module(module)


def test_token_elimination_without_torch(hide):
    from calibrate import lat

    assert lat.KeepSchedule  # numpy only: there without torch
    hide("transformers")
    assert lat.value_norms  # contribution scores need torch alone
    with pytest.raises(ImportError, match=r"calibrate.lat.generate needs transformers"):
        lat.generate
    hide("torch")
    with pytest.raises(ImportError, match=r"calibrate.lat.fit needs torch: pip install 'calm-calibrate\[hf\]'"):
        lat.fit


def test_lazy_cache_without_dask(tmp_path, hide, capsys):
    path = calibrate.synthetic_cache(20, n_layers=4, seed=0).save(tmp_path / "cache")
    hide("dask")
    with pytest.raises(ImportError, match=r"open_cache\(chunks=...\) needs dask: pip install 'calm-calibrate\[dask\]'"):
        calibrate.open_cache(path, chunks=5)
    assert main(["fit", str(path), "--chunks", "5"]) == 2  # a usage error, not a traceback
    assert "calibrate fit: error: open_cache(chunks=...) needs dask" in capsys.readouterr().err
