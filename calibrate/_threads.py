"""Keep torch's thread setting across the parallel numba kernels (the exit sweep, the FFF descent)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_inside = 0  # kernels running now, in any thread
_saved: int | None = None  # torch's thread count when the first of them started


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count after a parallel numba kernel.

    Numba's OpenMP threading layer sets the process-wide OpenMP thread count when it launches, which torch
    reads as its own: a caller's ``torch.set_num_threads(1)`` would silently become 2 after ``fit`` or an
    FFF forward pass. torch is never imported here; it is only consulted if the caller already imported it.
    Kernels in several threads at once share one saved value, taken when the first starts and restored when the
    last ends (a second thread would otherwise save what the first one's launch had set).
    """
    global _inside, _saved
    with _lock:
        if _inside == 0:
            torch = sys.modules.get("torch")
            _saved = torch.get_num_threads() if torch is not None else None
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            torch = sys.modules.get("torch")
            if _inside == 0 and _saved is not None and torch is not None and torch.get_num_threads() != _saved:
                torch.set_num_threads(_saved)


_forked = False


def _after_fork_in_child() -> None:
    global _forked, _lock, _inside
    _forked = True
    _lock, _inside = threading.Lock(), 0  # another thread of the parent may have held them


os.register_at_fork(after_in_child=_after_fork_in_child)


def forked() -> bool:
    """Whether this process was forked from another Python process: its parallel numba kernels must not run (GNU
    OpenMP aborts a forked child that starts a parallel region after the parent did), the serial ones must."""
    return _forked
