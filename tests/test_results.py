"""calibrate.results lists every result object, each frozen with its own repr, without importing torch."""

import dataclasses
import importlib
import inspect
import pkgutil
import subprocess
import sys
import typing

import pytest

import calibrate
import calibrate.results as results
import measures

#: Dataclasses public functions return that are inputs or data, not results of a computation.
NOT_RESULTS = {
    "ChunkedCache": "a saved cache opened lazily (open_cache(path, chunks=n)): data",
    "LayerCosts": "a cost model, input to the keep schedules",
    "SmolLM2Data": "the demo's data bundle",
    "Task": "a dataset description",
}


def _return_hint(obj, names: dict):
    """The return annotation of ``obj``, resolved in its module's namespace and then in ``names``.

    Only the return: parameter annotations may name classes their module imports under ``TYPE_CHECKING`` only
    (transformers' ``PreTrainedModel``), which ``typing.get_type_hints`` cannot resolve; so may a return
    annotation (``open_cache`` names ``ChunkedCache``), which ``names`` (the library's public names) resolves.
    """
    hint = inspect.get_annotations(obj).get("return")
    if isinstance(hint, str):  # ``from __future__ import annotations``
        hint = eval(hint, {**names, **vars(inspect.getmodule(obj))})
    return hint


def _returned_dataclasses() -> dict[str, type]:
    """Every dataclass named in the return annotation of a public function of a public module."""
    found, modules = {}, []
    for package in (calibrate, measures):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                modules.append(importlib.import_module(info.name))
    names = {name: getattr(m, name) for m in modules for name in getattr(m, "__all__", ())}
    for module in modules:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                hint = _return_hint(obj, names)
                for cls in typing.get_args(hint) or (hint,):
                    if dataclasses.is_dataclass(cls):
                        found[cls.__name__] = cls
    return found


def test_every_returned_dataclass_is_listed():
    returned = _returned_dataclasses()
    assert {"Certificate", "LossTable", "EarlyExitOutput"} <= set(returned)  # the walk reaches the torch modules
    assert set(returned) - set(NOT_RESULTS) == set(results.__all__)
    for name in results.__all__:
        assert getattr(results, name) is returned[name]


@pytest.mark.parametrize("name", results.__all__)
def test_result_is_frozen_with_its_own_repr(name):
    cls = getattr(results, name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert "__repr__" in vars(cls) and vars(cls)["__repr__"].__qualname__ == f"{name}.__repr__"  # not generated


def test_unknown_name():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        results.Nope  # noqa: B018


def test_import_needs_no_torch():
    code = "import sys, calibrate.results; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
