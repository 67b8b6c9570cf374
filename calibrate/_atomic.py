"""Atomic writes: a new file or directory appears whole, with the permissions a plain write would give, or not at all.

"Not at all" holds when the writing process fails (an exception, Ctrl-C, a kill): the target keeps its old
content. It also holds after a power loss or an operating-system crash: what is renamed into place is
fsynced first, and the directory holding it after (where the platform allows: not Windows' directories). A
cache replaced by another (``overwrite=True``) is renamed aside first: a crash between the two renames leaves
it at ``.NAME.old-<hex>`` beside the path, which :func:`calibrate.open_cache` then names.

Temporary names sit beside the target (``.NAME.<8 hex>.tmp``, so a rename publishes them) and are created
with the mode a plain ``open`` (0o666) or ``mkdir`` (0o777) gets under the process umask, which the kernel
applies: :mod:`tempfile` would make them private (0o600/0o700), and reading the umask means setting it,
which races with other threads. A file written over an existing one keeps that file's mode, as a plain write
does; a symbolic link at the target is replaced by the file, not written through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path


def _create_beside(target: Path, create: Callable[[Path], None]) -> Path:
    """``create`` a new, uniquely named temporary path beside ``target``; FileNotFoundError without its parent."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            create(tmp)
        except FileExistsError:
            continue
        except OSError as exc:  # name the path asked for, not the temporary one the caller never typed
            raise type(exc)(exc.errno, f"cannot write {target} ({exc.strerror} in {target.parent})") from None
        return tmp
    raise FileExistsError(f"no free temporary name beside {target}")


#: fsync errors that say the file system cannot flush (not that flushing failed): ignored.
_CANNOT_FLUSH = {errno.EINVAL, errno.EBADF}
_CANNOT_FLUSH |= {getattr(errno, name) for name in ("ENOTSUP", "EOPNOTSUPP") if hasattr(errno, name)}


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush ``path`` to the disk. A directory that cannot be opened (Windows) or a file system that cannot
    flush (EINVAL, ENOTSUP) is skipped; a failed flush (EIO, ENOSPC) raises, before anything is published."""
    if directory:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
    else:  # Windows flushes only files open for writing; a umask may have left them read-only (POSIX flushes those)
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
        except PermissionError:
            fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_FLUSH:
            raise
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (a directory written beside its target) before its rename."""
    for where, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(where, name))
        _fsync(where, directory=True)


def sync_dir(path: Path) -> None:
    """Flush the directory ``path`` (after a rename in it: the new entry)."""
    _fsync(path, directory=True)


def temporary_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` to write into, then rename to ``target``."""
    return _create_beside(target, os.mkdir)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on any failure it is removed.

    The temporary name is unique (concurrent writers do not collide); a missing parent directory raises
    FileNotFoundError before anything is written. An OSError of the write (disk full, an I/O error) names
    ``path``.
    """
    path = Path(path)
    tmp = _create_beside(path, lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        try:
            old = os.lstat(path)
            kept = stat.S_ISREG(old.st_mode)
        except OSError:
            kept = False
        mode = stat.S_IMODE(old.st_mode) if kept else tmp.stat().st_mode & 0o777  # else what open() gives
        yield tmp
        os.chmod(tmp, mode)  # also for writers that create the file anew (safetensors makes it 0o600)
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise naming(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    published_sync(path)


def naming(exc: OSError, path: str | os.PathLike, what: str = "") -> OSError:
    """``exc`` itself when its message names ``path``, else the same error class (and errno) saying ``cannot write
    <path><what> (<reason>: <file>)``: a disk-full error, or an upload's access denied, otherwise names no path."""
    if str(path) in str(exc):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        reason += f": {exc.filename}"
    message = f"cannot write {path}{what} ({reason})"
    try:
        return type(exc)(message) if exc.errno is None else type(exc)(exc.errno, message)
    except Exception:  # noqa: BLE001 - a subclass that takes other arguments
        return OSError(exc.errno, message)


def published_sync(path: Path) -> None:
    """Flush the directory of ``path``, just renamed into place; an error says the new content is there."""
    try:
        sync_dir(path.parent)
    except OSError as exc:
        raise type(exc)(
            exc.errno,
            f"{path} was written, but flushing its directory failed ({exc.strerror or exc}): the new content is in "
            "place and may not survive a power loss",
        ) from exc


def finite_tensors_iv(tensors: dict, path: str | os.PathLike) -> None:
    """ValueError naming ``path``, the tensor and its first entry when a floating-point tensor holds NaN or inf
    (weights of a training run that diverged: heads or layers computing NaN)."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                at = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"{path}: tensor {name!r} holds {int(bad.sum())} non-finite values (first {tensor[at].item()} "
                    f"at index {at}): weights of a training run that diverged?"
                )


def atomic_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write ``tensors`` with ``metadata`` to the safetensors file ``path`` through :func:`atomic_file`; a failed
    write raises OSError naming ``path`` (safetensors raises its own error type, naming no file); non-finite
    weights are refused (:func:`finite_tensors_iv`)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    finite_tensors_iv(tensors, path)
    with atomic_file(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            raise OSError(f"cannot write {path}: {exc}") from None
