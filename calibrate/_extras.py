"""Optional dependencies: one clear ImportError naming the extra to install, before anything imports them."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

#: The modules each extra provides that the library imports (``pip install 'calm-calibrate[<extra>]'``).
EXTRAS = {
    "hf": ("torch", "transformers"),
    "real": ("gguf", "accelerate"),  # and [hf]: what transformers reads GGUF files with
    "dask": ("dask",),  # distributed too, but only for a client (it names itself when missing)
}


def require(feature: str, extra: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise an ImportError naming ``extra`` when one of ``modules`` (default: all the extra's) is not installed.

    ``feature`` is what needs them, as the user called it (``"calibrate.runtime"``).
    """
    missing = [name for name in modules or EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{feature} needs {', '.join(missing)}: pip install 'calm-calibrate[{extra}]'")


def lazy_getattr(
    package: str, names: Mapping[str, str], modules: Mapping[str, tuple[str, ...]] | None = None
) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that imports ``names[name]`` on the first use of ``name``.

    Before importing, :func:`require` checks the ``[hf]`` extra (or only the modules ``modules`` lists for that
    target module). Returns the target's attribute ``name``, or the target itself when it is the submodule
    ``package.name``.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target = names[name]
        require(f"{package}.{name}", "hf", (modules or {}).get(target))
        module = importlib.import_module(target)
        return module if module.__name__ == f"{package}.{name}" else getattr(module, name)

    return __getattr__
