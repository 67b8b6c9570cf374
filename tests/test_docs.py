"""The documentation: the Sphinx build is clean with warnings as errors, the examples run, nothing is left out."""

import doctest
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import calibrate
import calibrate.cli
import measures

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: Public modules documented elsewhere than on a page of their own, and where.
ELSEWHERE = {
    "calibrate.fit": "calibrate.rst (fit and certify)",
    "calibrate.synthetic": "calibrate.rst (synthetic_cache)",
    "calibrate.cli": "cli.rst (generated from the parser)",
    "calibrate.runtime.decode": "calibrate.runtime.rst (re-exported by calibrate.runtime)",
}


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    cli = (tmp_path / "html" / "cli.html").read_text()
    for command in calibrate.cli._parser()._subparsers._group_actions[0].choices:
        assert f'id="calibrate-{command}"' in cli, f"the CLI page has no section for `calibrate {command}`"


def test_every_public_module_has_a_page():
    names = [
        info.name
        for package in (calibrate, measures)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    pages = {p.stem for p in (DOCS / "api").glob("*.rst")}
    missing = [name for name in names if name not in pages and name not in ELSEWHERE]
    assert not missing, f"no API page for {missing}: add docs/api/<module>.rst and list it in docs/api/index.rst"
    index = (DOCS / "api" / "index.rst").read_text().split()
    assert not [p for p in pages - {"index"} if p not in index], "an API page is missing from docs/api/index.rst"


def test_the_calibrate_page_lists_what_calibrate_exports():
    import re

    listed = set(re.findall(r"^   ~[\w.]+\.(\w+)$", (DOCS / "api" / "calibrate.rst").read_text(), flags=re.M))
    assert listed and not listed - set(calibrate.__all__), "the page says every name is importable from calibrate"
    assert all(hasattr(calibrate, name) for name in listed)
    text = " ".join((DOCS / "api" / "calibrate.rst").read_text().split())
    torch_names = re.search(r"These names need torch .*? on first use: (.*?)\. ", text).group(1)
    assert set(re.findall(r"``(\w+)``", torch_names)) == set(calibrate._LAZY)


def _documented_class(module, cls_name: str, cls) -> bool:
    """Whether ``module`` documents class ``cls``: defined there, or listed in its ``__all__`` from a private module
    beside it (``calibrate.runtime.decode`` re-exports ``EarlyExitOutput`` from ``calibrate.runtime._result``)."""
    if cls_name.startswith("_") or not inspect.isclass(cls):
        return False
    package, _, private = cls.__module__.rpartition(".")
    sibling = private.startswith("_") and package == module.__name__.rpartition(".")[0]
    return cls.__module__ == module.__name__ or (sibling and cls_name in getattr(module, "__all__", ()))


def test_public_methods_and_properties_have_docstrings():
    import importlib
    import inspect

    missing = []
    for package in (calibrate, measures):
        names = [package.__name__] + [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for name in names:
            if any(part.startswith("_") for part in name.split(".")):
                continue
            module = importlib.import_module(name)
            for cls_name, cls in vars(module).items():
                if not _documented_class(module, cls_name, cls):
                    continue
                for attr, value in vars(cls).items():
                    public = not attr.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
                    if public and not inspect.getdoc(value if isinstance(value, property) else getattr(cls, attr)):
                        missing.append(f"{name}.{cls_name}.{attr}")
    assert not missing, f"no docstring: {missing}"


@pytest.mark.parametrize("package", ["calibrate.lat", "calibrate.fff", "calibrate.runtime"])
def test_constants_named_in_exported_docstrings_are_exported_beside_them(package):
    """lat.fit's options named lat.CLASSIFIER_CONSISTENCIES, which calibrate.lat did not export."""
    import importlib
    import re

    module = importlib.import_module(package)
    missing = set()
    for name in module.__all__:
        doc = inspect.getdoc(getattr(module, name)) or ""
        for target in re.findall(r":data:`~?([A-Za-z_][A-Za-z0-9_]*)`", doc):
            if not hasattr(module, target):
                missing.add(f"{name}: {target}")
    assert not missing, f"{package} does not export: {sorted(missing)}"


@pytest.mark.parametrize("page", ["getting_started.md", "concepts.md"])
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files
    result = doctest.testfile(
        str(DOCS / page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in docs/{page} fail (run doctest on it)"
