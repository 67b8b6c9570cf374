"""Optional dependencies: one clear ImportError naming the extra to install, before anything imports them."""

from __future__ import annotations

import importlib.util

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
