"""Every ``>>>`` example in the library's docstrings runs and prints what it shows."""

import doctest
import importlib
import inspect
import pkgutil
import re

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


def _public_callables(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        yield obj
        if inspect.isclass(obj):
            yield from (v for k, v in vars(obj).items() if not k.startswith("_") and callable(v))


def test_tolerance_letters_named():
    """DESIGN section 1: every function taking ``delta`` and ``epsilon`` says that LTT and MAPIE use other letters
    (a MAPIE user would read ``delta`` as the failure probability)."""
    silent, checked = [], 0
    for name in _modules():
        for obj in _public_callables(importlib.import_module(name)):
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue
            if "delta" in params and "epsilon" in params:
                checked += 1
                if not {"LTT", "Learn-Then-Test"} & set(re.findall(r"LTT|Learn-Then-Test", inspect.getdoc(obj) or "")):
                    silent.append(f"{name}.{obj.__qualname__}")
    assert checked > 8 and not silent
