"""Where a cache lives: a local directory, or a directory in any fsspec file system (``memory://``, ``s3://``).

Readers take a root that supports ``root / name``, ``.exists()``, ``.is_dir()``, ``.is_file()``,
``.read_text(encoding)``, ``.open("rb")`` and ``str()``: a :class:`pathlib.Path` for local paths (also
``file://`` URLs), a :class:`Remote` for the other protocols. ``str()`` of a ``Remote`` is its URL, which
zarr opens by itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def location(path: str | os.PathLike | Remote) -> Path | Remote:
    """A local :class:`~pathlib.Path` for paths and ``file://`` URLs, a :class:`Remote` for other URLs (and for a
    :class:`Remote`, which ``save`` returns and ``ChunkedCache.path`` holds)."""
    if isinstance(path, Remote):
        return path
    if isinstance(path, os.PathLike) or "://" not in path:
        return Path(path)
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with the [dask] and [test] extras
        raise ImportError(f"opening {path!r} needs fsspec: pip install 'calm-calibrate[dask]'") from exc
    from fsspec.implementations.local import LocalFileSystem

    fs, inner = fsspec.core.url_to_fs(path)  # raises ImportError naming the package a protocol needs
    if isinstance(fs, LocalFileSystem):
        return Path(inner)
    return Remote(fs, inner.rstrip("/"))


def zarr_store(where: Path | Remote, *, read_only: bool = True) -> Any:
    """What zarr opens the array at ``where`` with: a local store for a local path (zarr reads a str as a URL, and
    ``run::a`` as a chain of file systems), the URL of a remote one."""
    if isinstance(where, Path):
        from zarr.storage import LocalStore

        return LocalStore(where, read_only=read_only)
    return str(where)


@dataclass(frozen=True)
class Remote:
    """A path in an fsspec file system, with the part of the :class:`pathlib.Path` API the readers use."""

    fs: Any
    path: str

    def __truediv__(self, name: str) -> Remote:
        return Remote(self.fs, f"{self.path}/{name}")

    def __str__(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def open(self, mode: str = "rb"):
        return self.fs.open(self.path, mode)

    def read_text(self, encoding: str) -> str:
        with self.fs.open(self.path, "rb") as f:
            return f.read().decode(encoding)

    def resolve(self) -> Remote:
        return self

    def upload(self, local: Path, *, last: str) -> None:
        """Copy the local directory ``local`` here, file by file, the file named ``last`` after all others.

        A reader finds no ``last`` (``meta.json``) until everything else is in place, so an interrupted
        upload reads as an incomplete cache, never as a valid one; a failed upload is removed.
        """
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
        try:
            for file in files:
                remote = f"{self.path}/{file.relative_to(local).as_posix()}"
                self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(file), remote)
        except BaseException:
            if self.fs.exists(self.path):  # best effort: leave no half-written directory behind
                self.fs.rm(self.path, recursive=True)
            raise

    def copy_to(self, other: Remote, *, last: str) -> None:
        """Copy this directory to ``other`` in the same file system (server-side), ``last`` after all others."""
        files = sorted(self.fs.find(self.path))
        files.sort(key=lambda f: f == f"{self.path}/{last}")
        for file in files:
            remote = other.path + file[len(self.path) :]
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.copy(file, remote)

    def remove(self, *, first: str) -> None:
        """Delete this directory, the file named ``first`` before everything else (the reverse of upload)."""
        if self.fs.exists(f"{self.path}/{first}"):
            self.fs.rm_file(f"{self.path}/{first}")
        self.fs.rm(self.path, recursive=True)
