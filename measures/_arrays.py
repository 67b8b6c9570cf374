"""Arrays as the compiled and vectorised code reads them: numpy, native byte order, a float it computes in.

Shared by :mod:`measures` and :mod:`calibrate` (which imports :mod:`measures`, never the other way round).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(values: Any) -> np.ndarray:
    """``values`` as a numpy array in native byte order; a torch tensor detached and on the CPU first, bfloat16 as
    float32 (exact).

    torch is never imported here: a tensor straight from a model (on a GPU, requiring grad, bfloat16) is
    recognised by its type's module. Big-endian data (read from HDF5, FITS, ``np.frombuffer(..., ">f8")``) is
    converted, since a dtype comparison such as ``dtype == np.float64`` is False for it.
    """
    if type(values).__module__.split(".")[0] == "torch" and hasattr(values, "detach"):
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            values = values.float()
        return values.numpy()
    arr = np.asarray(values)
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def working_float(dtype: np.dtype) -> type:
    """The float a real array of ``dtype`` is computed in: float32 for floats of at most 4 bytes (float16 fits
    float32 exactly), float64 for everything else (integers, which float32 rounds above 2**24; float64; long
    double, rounded)."""
    dtype = np.dtype(dtype)
    return np.float32 if dtype.kind == "f" and dtype.itemsize <= 4 else np.float64


def cache_array(cache: Any, name: str, n_tokens: int, trailing: str = "") -> Any:
    """The cache's array ``name``, checked to be of shape ``(n_tokens, n_layers)``, or ``(n_tokens, n_layers, m)`` when
    ``trailing`` names the last axis (``"k"``, ``"d"``); not loaded (a chunked array stays one)."""
    array, n_layers = cache.arrays[name], int(cache.n_layers)
    shape = np.shape(array)
    if len(shape) != 2 + bool(trailing) or shape[:2] != (n_tokens, n_layers):
        axes = f"(n_tokens, n_layers{', ' + trailing if trailing else ''})"
        raise ValueError(
            f"cache array {name!r} must have shape {axes}, got {shape} (n_tokens={n_tokens}, n_layers={n_layers})"
        )
    return array
