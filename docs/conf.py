"""Sphinx configuration for the calm-calibrate documentation.

Build with ``python -m sphinx -W -b html docs docs/_build/html`` (after ``pip install ".[docs]"``).
The API pages come from the docstrings (autodoc + numpydoc) and the CLI page from
``calibrate.cli._parser()`` (sphinx-argparse), so neither can drift from the code. ``nitpicky`` makes
every unresolved cross-reference a warning, and the tests build with ``-W``.
"""

import importlib
import inspect
import os
import sys

# Document the source tree next to this file, not whatever copy happens to be installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from sphinx.util import logging  # noqa: E402
from sphinx.util.nodes import make_refnode  # noqa: E402

import calibrate  # noqa: E402

project = "calm-calibrate"
author = "calm-calibrate developers"
copyright = "calm-calibrate developers"
release = calibrate.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
    "sphinxarg.ext",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Every cross-reference must resolve. There is no intersphinx (the build runs offline), so names from
# other libraries stay plain text.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|scipy|pandas|sklearn|torch|transformers|importlib|zarr|pyarrow|matplotlib)(\..*)?"),
    # ``EarlyExitOutput.new_tokens`` refers to the ``sequences`` field, which numpydoc lists under
    # Attributes without a link target.
    ("py:attr", "sequences"),
]

# autodoc: the members of each module are its ``__all__``; signatures without type hints (the numpydoc
# Parameters sections give the types).
autodoc_default_options = {"members": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autosummary_generate = False

# numpydoc: no extra per-class member tables (autodoc lists the members). The validation checks catch
# malformed sections and documented parameters that the signature does not have.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks = {"GL06", "GL07", "PR02", "PR10", "SA04"}

myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"calm-calibrate {release}"


# ---------------------------------------------------------------------------------------------------
# Public aliases: docstrings write ``calibrate.fit``, ``calibrate.LayerCache.split`` or
# ``calibrate.runtime.RUNTIME_MEASURES``; each object is documented once, in its module's page. A
# reference to another name of a documented object resolves to that page.
# ---------------------------------------------------------------------------------------------------

_MISSING = object()
_LIBRARY = ("calibrate", "measures")


def _lookup(dotted: str):
    """The Python object that ``dotted`` names, or ``_MISSING``.

    Each step tries the attribute first, as Python does (``calibrate.fit`` is the function), then the
    submodule of that name (so that ``calibrate.fit.fit`` is found too).
    """
    parts = dotted.split(".")

    def walk(obj, i):
        if i == len(parts):
            return obj
        candidates = []
        if obj is not None:
            try:
                candidates.append(
                    inspect.getattr_static(obj, parts[i]) if inspect.isclass(obj) else getattr(obj, parts[i])
                )
            except (AttributeError, ImportError):  # ImportError: a lazy name whose extra is not installed
                pass
        if obj is None or inspect.ismodule(obj):
            try:
                candidates.append(importlib.import_module(".".join(parts[: i + 1])))
            except ImportError:
                pass
        for candidate in candidates:
            found = walk(candidate, i + 1)
            if found is not _MISSING:
                return found
        return _MISSING

    return walk(None, 0)


def _documented(domain) -> dict:
    """``id(object) -> name`` for every object of the library that a page documents."""
    index = {}
    for name, entry in domain.objects.items():
        if name.split(".")[0] in _LIBRARY and not entry.aliased:
            obj = sys.modules.get(name, _MISSING) if entry.objtype == "module" else _lookup(name)
            if obj is not _MISSING:
                index.setdefault(id(obj), name)
    return index


def _resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        candidates += [f"{module}.{cls}.{target}"] if cls else []
        candidates += [f"{module}.{target}"]
    domain = env.get_domain("py")
    if not hasattr(app, "_calm_documented"):
        app._calm_documented = _documented(domain)
    for candidate in candidates:
        if candidate.split(".")[0] not in _LIBRARY:
            continue
        obj = _lookup(candidate)
        name = None if obj is _MISSING else app._calm_documented.get(id(obj))
        # the same object under the same last name (ids alone could match an interned constant)
        if name is not None and name.rsplit(".", 1)[-1] == candidate.rsplit(".", 1)[-1]:
            entry = domain.objects[name]
            return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)
    return None


# ---------------------------------------------------------------------------------------------------
# Re-exported constants: ``calibrate.runtime.RUNTIME_MEASURES`` is documented by a ``#:`` comment in
# the private module that defines it. autodoc looks for the comment only in the module it documents:
# ``automodule`` skips such a constant, and an explicit ``autodata`` shows the docstring of ``tuple``.
# The API pages list them with ``autodata``, and this takes the defining module's comment.
# ---------------------------------------------------------------------------------------------------


def _defining_comment(name: str, obj) -> list[str] | None:
    """The ``#:`` comment on ``name`` in the library module that binds ``obj`` to it, if any."""
    from sphinx.pycode import ModuleAnalyzer

    for modname, module in list(sys.modules.items()):
        if modname.split(".")[0] not in ("calibrate", "measures") or getattr(module, name, _MISSING) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", name))
        except Exception:  # a module without source
            continue
        if comment:
            return list(comment)
    return None


def _reexported_constant_doc(app, what, name, obj, options, lines):
    if what != "data" or name.split(".")[0] not in ("calibrate", "measures"):
        return
    text = "\n".join(lines).strip()
    if text and text != (inspect.getdoc(type(obj)) or "").strip():
        return  # documented where autodoc looked
    comment = _defining_comment(name.rsplit(".", 1)[-1], obj)
    if comment is None:
        logging.getLogger(__name__).warning("%s has no #: comment where it is defined", name)
    else:
        lines[:] = comment


def setup(app):
    app.connect("missing-reference", _resolve_alias)
    # before numpydoc reformats the docstring
    app.connect("autodoc-process-docstring", _reexported_constant_doc, priority=400)
