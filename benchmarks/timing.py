"""What the benchmark scripts share: timing calls side by side, and checking their arguments.

Not a benchmark itself. The scripts import it as ``from timing import ...`` (Python puts a script's own
folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

Key = TypeVar("Key")


def _synchronize() -> None:
    """Wait for queued work on every GPU, when torch is loaded and a GPU is in use (timings would stop early;
    ``torch.cuda.synchronize()`` alone waits for the current device, not the ``--device cuda:1`` one)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def side_by_side(
    runs: Mapping[Key, Callable[[], object]], repeat: int, warmup: bool = True
) -> tuple[dict[Key, float], dict[Key, object]]:
    """Best wall-clock seconds of each callable, all called in turn for ``repeat`` rounds.

    Calling every run once per round, rather than one run ``repeat`` times and then the next, makes a
    slow drift of the machine (another process, thermal limits) hit all runs alike, so their ratios stay
    meaningful. With ``warmup`` every run is first called once untimed (imports, compiled kernels, the
    allocator). Returns the best time of each run in seconds and each run's last output.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    outputs = {name: fn() for name, fn in runs.items()} if warmup else {}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, fn in runs.items():
            _synchronize()
            start = time.perf_counter()
            outputs[name] = fn()
            _synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def positive_int(text: str) -> int:
    """``argparse`` type of counts that must be >= 1 (tokens, repeats, batch sizes)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def device_arg(text: str) -> str:
    """``argparse`` type of ``--device``: a torch device this machine has (``cuda`` without a GPU is refused)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("no CUDA device is available here (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device type {device.type!r} is not benchmarked (cpu or cuda)")
    return text
