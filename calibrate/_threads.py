"""Running the compiled numba kernels (the exit sweep, the FFF descent, the compensated sums) safely anywhere.

Cached where the install can be written to, parallel unless that would abort the process (a forked child,
another thread in a parallel kernel), and without changing torch's thread count.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

import numba


def njit(**options) -> Callable[[Callable], Callable]:
    """``numba.njit(cache=True, **options)``, or without ``cache`` where numba cannot write its cache.

    On a read-only install whose user has no writable cache directory (a read-only container, an arbitrary
    UID) numba refuses ``cache=True`` at decoration, so ``import calibrate`` failed; the kernel then compiles
    on its first call in each process instead.
    """

    def decorate(function: Callable) -> Callable:
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available for file ..."
            return numba.njit(**options)(function)

    return decorate


def serial(kernel: Callable, **options) -> Callable:
    """``kernel`` (made by :func:`njit` with ``parallel=True``) compiled without threads, not cached (the cache would
    load the parallel one); the plain function under ``NUMBA_DISABLE_JIT=1``, where ``njit`` returns it as is."""
    return numba.njit(parallel=False, **options)(getattr(kernel, "py_func", kernel))


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


#: Held by the thread running a parallel numba kernel: numba's workqueue threading layer (the one every install has;
#: OpenMP and TBB need their runtimes) aborts the process when two threads enter parallel regions at once.
_PARALLEL = threading.Lock()


@contextlib.contextmanager
def parallel_allowed() -> Iterator[bool]:
    """Yield whether this call may run a parallel numba kernel (else its serial build), keeping torch's threads.

    Not in a forked child (see :func:`forked`), and not while another thread runs one: that thread keeps the
    cores, this one runs serially (compiled on its first use, 1-2 s).
    """
    parallel = not forked() and _PARALLEL.acquire(blocking=False)
    try:
        with keep_torch_threads():
            yield parallel
    finally:
        if parallel:
            _PARALLEL.release()


def forked() -> bool:
    """Whether this process was forked from another Python process: its parallel numba kernels must not run (GNU
    OpenMP aborts a forked child that starts a parallel region after the parent did), the serial ones must."""
    return _forked
