"""Every ``>>>`` example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import calibrate
import measures


def _modules() -> list[str]:
    names = []
    for package in (calibrate, measures):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    return [n for n in names if not n.endswith("__main__")]


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0


def test_examples_exist():
    """The check above is not vacuous: the core modules carry examples."""
    attempted = sum(
        doctest.testmod(importlib.import_module(n), report=False).attempted
        for n in ("calibrate.exits", "calibrate.bounds")
    )
    assert attempted > 10
