"""Frozen result objects whose arrays stay read-only, through pickle and copy too."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def construct(cls: type, data: dict) -> Any:
    """``cls(**data)``: what a pickled or copied result object is rebuilt with."""
    return cls(**data)


def read_only_arrays(obj: Any, *names: str) -> None:
    """Store the named fields of a frozen dataclass as read-only float arrays of its own."""
    for name in names:
        arr = np.array(getattr(obj, name), dtype=np.float64)
        arr.flags.writeable = False
        object.__setattr__(obj, name, arr)


class Rebuilt:
    """Mixin of frozen dataclasses: pickled and copied through the constructor, so that ``__post_init__`` makes
    the copy's arrays read-only again (NumPy unpickles arrays writable, and ``deepcopy`` skips ``__post_init__``)."""

    def __reduce__(self):
        return (construct, (type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}))
