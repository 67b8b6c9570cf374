"""Keep torch's thread setting across the parallel numba kernels (the exit sweep, the FFF descent)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count after a parallel numba kernel.

    Numba's OpenMP threading layer sets the process-wide OpenMP thread count when it launches, which torch
    reads as its own: a caller's ``torch.set_num_threads(1)`` would silently become 2 after ``fit`` or an
    FFF forward pass. torch is never imported here; it is only consulted if the caller already imported it.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forked() -> bool:
    """Whether this process was forked from another Python process: its parallel numba kernels must not run (GNU
    OpenMP aborts a forked child that starts a parallel region after the parent did), the serial ones must."""
    return _forked
