"""Atomic writes: a new file or directory appears whole, with the permissions a plain write would give, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def umask_mode(directory: bool) -> int:
    """The mode ``open`` (0o666) or ``mkdir`` (0o777) gives under the process umask.

    :mod:`tempfile` creates private files (0o600) and directories (0o700); what is published gets this mode
    instead, so a cache or certificate is as readable as any file its owner writes.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on any failure it is removed.

    The temporary name is unique (concurrent writers do not collide); a missing parent directory raises
    FileNotFoundError before anything is written.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
