"""The on-disk layout of a layer cache (:mod:`calibrate.cache` describes it): file names and dtypes, the
sequences table, checksums, and writing and reading the files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from calibrate._atomic import published_sync, sync_tree
from calibrate._storage import Remote, location, zarr_store
from calibrate._validation import caller_stacklevel, parse_json

#: Version of the on-disk layout written by :meth:`LayerCache.save`.
FORMAT_VERSION = 1

_META_FILE = "meta.json"
_TABLE_FILE = "sequences.parquet"
_VOCAB_FILE = "vocab.json"
_ARRAY_DIR = "arrays"

#: Canonical dtypes of the fixed fields; every other array is a (T, L) float32 score.
_DTYPES = {
    "full_tokens": np.dtype("<i4"),
    "topk_ids": np.dtype("<i4"),
    "topk_logprobs": np.dtype("<f4"),
    "hidden": np.dtype("<f2"),
}
_SCORE_DTYPE = np.dtype("<f4")
_DIMS = {
    "full_tokens": ("token",),
    "topk_ids": ("token", "layer", "rank"),
    "topk_logprobs": ("token", "layer", "rank"),
    "hidden": ("token", "layer", "hidden"),
}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: Names of the table and vocab entries of ``meta["fields"]``; no array may use them.
_RESERVED = ("sequences", "vocab")
_TABLE_COLUMNS = ("id", "prompt", "output", "output_ids", "reference", "n_tokens", "offset")
#: Keys of ``meta`` that the cache derives from its contents; user values for them are not kept.
_DERIVED_KEYS = (
    "format_version",
    "library",
    "library_version",
    "n_sequences",
    "n_tokens",
    "n_layers",
    "top_k",
    "vocab_size",
    "hidden_size",
    "fields",
    "checksum",
    "meta_checksum",
)
#: Uncompressed bytes per zarr chunk (at most); chunks never exceed _MAX_CHUNK_TOKENS tokens.
_CHUNK_BYTES = 64 << 20
_MAX_CHUNK_TOKENS = 1 << 16


def _field_dtype(name: str) -> np.dtype:
    """The dtype an array field is stored in: ``_DTYPES``'s, else float32 (a precomputed score)."""
    return _DTYPES.get(name, _SCORE_DTYPE)


# --------------------------------------------------------------------------------------------------
# The sequences table; where to write and what to open
# --------------------------------------------------------------------------------------------------


def _exists_error(target) -> FileExistsError:
    """What writing over an existing ``target`` without ``overwrite`` raises (API and command line)."""
    return FileExistsError(f"{target} exists; pass overwrite=True (--overwrite on the command line) to replace it")


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view of an array whose memory the cache owns.

    The owner is made read-only as well, so that no view of it can be made writeable again; callers'
    arrays never get here (the constructors copy them).
    """
    owner = a if a.base is None else a.base
    if isinstance(owner, np.ndarray):
        owner.flags.writeable = False
    view = a.view()
    view.flags.writeable = False
    return view


#: The text columns of a sequences table, in :func:`_make_table`'s order.
_TEXT_COLUMNS = ("id", "prompt", "output", "reference")


def _first_repeat(ids: Sequence[str]) -> str | None:
    """The first id that occurs a second time, or None."""
    seen: set[str] = set()
    return next((i for i in ids if i in seen or seen.add(i)), None)


def _make_table(ids, prompts, outputs, references, full_tokens, offsets) -> pd.DataFrame:
    """The canonical in-memory sequences table (same dtypes whichever way the cache was built)."""
    lengths = np.diff(offsets)
    full_tokens = _readonly(full_tokens)  # so the per-sequence views are read-only too
    output_ids = np.split(full_tokens, offsets[1:-1]) if len(ids) > 1 else [full_tokens]
    dup = _first_repeat(ids)
    if dup is not None:
        raise ValueError(f"ids must be unique, got {dup!r} twice")
    return pd.DataFrame(
        {
            "id": pd.Series(ids, dtype="str"),
            "prompt": pd.Series(prompts, dtype="str"),
            "output": pd.Series(outputs, dtype="str"),
            "output_ids": pd.Series(output_ids, dtype=object),
            "reference": pd.Series(references, dtype="str"),
            "n_tokens": pd.Series(lengths, dtype=np.int64),
            "offset": pd.Series(offsets[:-1], dtype=np.int64),
        }
    )


def _save_iv(path, overwrite) -> Path | Remote:
    if not isinstance(path, (str, os.PathLike, Remote)):  # a Remote: what save returns for a URL
        raise TypeError(f"path must be a str or os.PathLike (or what save returned), got {type(path).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    if not (str(path) if isinstance(path, Remote) else os.fspath(path)):
        raise ValueError("path must name a directory, got ''")
    target = location(path)
    if isinstance(target, Path):
        target = target.absolute()
        if target.resolve() == Path.cwd().resolve():  # "." or Path(""): saving would replace the directory we run in
            raise ValueError(f"path must name a directory other than the working directory, got {os.fspath(path)!r}")
        blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ValueError(f"cannot save to {target}: {blocking} is a file, not a directory")
    if os.path.lexists(target) if isinstance(target, Path) else target.exists():
        if not overwrite:
            raise _exists_error(target)
        if isinstance(target, Path) and target.is_symlink():
            raise ValueError(f"refusing to overwrite {target}: it is a symbolic link (save to where it points instead)")
        if not _replaceable(target):
            raise ValueError(
                f"refusing to overwrite {target}: it is not a layer cache directory (a readable {_META_FILE} of "
                f"calm-calibrate beside {_TABLE_FILE}, {_VOCAB_FILE} and {_ARRAY_DIR}/ with the arrays it lists, "
                "nothing else, or a shard manifest and its shards) nor empty; delete a damaged cache yourself"
            )
    return target


def _entries(directory: Path | Remote) -> dict[str, str] | None:
    """``{name: "file" | "directory"}`` of a directory's entries; None when it is no directory (or a symlink)."""
    if isinstance(directory, Remote):  # detail: s3fs and gcsfs list bare names by default
        if not directory.is_dir():
            return None
        listing = directory.fs.ls(directory.path, detail=True)
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["type"] for entry in listing}
    if not directory.is_dir() or directory.is_symlink():
        return None
    return {entry.name: "directory" if entry.is_dir() else "file" for entry in directory.iterdir()}


def _replaceable(target: Path | Remote) -> bool:
    """An empty directory, or a cache directory: what :meth:`LayerCache.save` writes (in ``arrays/`` only the
    arrays its ``meta.json`` lists) and hidden files (``.DS_Store``), with a ``meta.json`` of this library, or
    a sharded cache (its manifest and the cache directories it lists).
    Never a symlink, nor another tool's directory that happens to hold a ``meta.json``, nor one whose
    ``meta.json`` cannot be read (whose it is is unknown), nor one holding files of the user's."""
    entries = _entries(target)
    if entries is None:
        return False
    if not entries:
        return True
    visible = {name for name, kind in entries.items() if not _hidden(name, kind)}
    if _META_FILE not in visible and "manifest.json" in visible:  # a sharded cache: its manifest and its shards
        from calibrate.shards import MANIFEST_FILE, _read_manifest

        try:
            names = _read_manifest(target)
        except (OSError, ValueError):
            return False
        return visible == {MANIFEST_FILE, *names} and all(_replaceable(target / name) for name in names)
    if _META_FILE not in visible or not visible <= {_META_FILE, _TABLE_FILE, _VOCAB_FILE, _ARRAY_DIR}:
        return False
    try:
        meta = _load_json(target / _META_FILE, "utf-8")
    except (OSError, ValueError):  # _load_json turns a UnicodeDecodeError into a ValueError
        return False  # saves publish by rename, so never a meta.json of ours cut short: unknown, kept
    if not isinstance(meta, dict) or meta.get("library") != "calm-calibrate":
        return False
    if _ARRAY_DIR not in visible:
        return True
    arrays = _entries(target / _ARRAY_DIR)
    fields = meta.get("fields")
    ours = {spec.get("path") for spec in fields.values() if isinstance(spec, dict)} if isinstance(fields, dict) else ()
    return arrays is not None and all(
        _hidden(name, kind) or f"{_ARRAY_DIR}/{name}" in ours for name, kind in arrays.items()
    )


def _hidden(name: str, kind: str) -> bool:
    """A hidden file (``.DS_Store``), which a cache directory may hold beside its own files."""
    return name.startswith(".") and kind == "file"


def _open_cache_iv(path, verify) -> Path | Remote:
    if not isinstance(path, (str, os.PathLike, Remote)):  # a Remote: what save returns for a URL
        raise TypeError(f"path must be a str or os.PathLike (or what save returned), got {type(path).__name__}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {verify!r}")
    root = location(path)
    if not root.exists():
        left = sorted(_old_copies(root)) if isinstance(root, Path) else []
        raise FileNotFoundError(
            f"no layer cache at {root}"
            + (f"; an overwrite interrupted between its two renames left the old cache at {left[-1]}: rename it "
               "back to use it" if left else "")
        )  # fmt: skip
    if not root.is_dir():
        raise ValueError(f"{root} is not a layer cache directory")
    return root


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def _cache_checksum(vocab_size, field_checksums: dict[str, str]) -> str:
    """The cache's checksum from its fields' checksums (what ``meta.json`` records as ``checksum``)."""
    payload = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "fields": field_checksums}
    return _digest(json.dumps(payload, sort_keys=True).encode())


def _meta_checksum(meta: dict) -> str:
    """Checksum of a ``meta.json``'s own keys (model, generation settings, ...: all but :data:`_DERIVED_KEYS`)."""
    own = {key: value for key, value in meta.items() if key not in _DERIVED_KEYS}
    return _digest(json.dumps(own, sort_keys=True).encode())


def _check_meta_checksum(root, meta: dict) -> None:
    """Refuse a ``meta.json`` whose own keys were edited after saving; warn when it has no ``meta_checksum``."""
    if "meta_checksum" not in meta:
        warnings.warn(
            f"{root / _META_FILE} has no meta_checksum (a cache written before calm-calibrate recorded one, or the "
            "key was removed): its model and generation settings are not checked; cache.save(new_path) records one",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    elif meta["meta_checksum"] != _meta_checksum(meta):
        raise ValueError(
            f"checksum mismatch in {root / _META_FILE}: its metadata (model, generation settings, ...) was edited "
            "after the cache was written. To keep the edit, save it anew: calibrate.open_cache(path, verify=False)"
            ".save(new_path); else undo it (metadata is changed with cache.with_meta(...) and saved)"
        )


def _array_hasher(dtype, shape) -> Any:
    """A blake2b hasher primed with an array's dtype and shape; feed it the C-order bytes."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{np.dtype(dtype).str}|{list(shape)}|".encode())
    return h


def _hash_array(a: np.ndarray) -> str:
    h = _array_hasher(a.dtype, a.shape)
    h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def _hash_strings(values, h=None) -> str:
    """Hash a sequence of str or None: a null mask, the utf-8 lengths, then the bytes."""
    own = h is None
    h = h or hashlib.blake2b(digest_size=32)
    missing = np.array([v is None for v in values], dtype=np.uint8)
    encoded = [b"" if v is None else v.encode("utf-8", "surrogatepass") for v in values]
    h.update(missing.tobytes())
    h.update(np.fromiter(map(len, encoded), dtype="<i8", count=len(encoded)).tobytes())
    h.update(b"".join(encoded))
    return h.hexdigest() if own else ""


def _hash_table(table: pd.DataFrame, offsets: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=32)
    for col in ("id", "prompt", "output", "reference"):
        h.update(col.encode() + b"|")
        values = table[col].to_numpy(dtype=object)
        _hash_strings([None if not isinstance(v, str) else v for v in values], h)
    h.update(b"offsets|")
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    return h.hexdigest()


def _library_version() -> str:
    import calibrate

    return str(getattr(calibrate, "__version__", "unknown"))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _chunk_tokens(a: np.ndarray) -> int:
    per_token = max(1, a[:1].nbytes if a.shape[0] else a.itemsize)
    return int(max(1, min(_MAX_CHUNK_TOKENS, _CHUNK_BYTES // per_token, a.shape[0])))


def _write_array(where: Path, name: str, a: np.ndarray) -> None:
    import zarr

    chunks = (_chunk_tokens(a),) + a.shape[1:]
    # Fill values no valid cache holds (-1 id, NaN float), so a chunk that went missing cannot read
    # back as plausible data.
    fill = -1 if a.dtype.kind == "i" else float("nan")
    dims = _DIMS.get(name, ("token", "layer"))
    # Blosc/lz4 with byte shuffle: several times faster than the default zstd at a similar size.
    compressor = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    z = zarr.create_array(
        store=zarr_store(where, read_only=False), shape=a.shape, dtype=a.dtype, chunks=chunks, fill_value=fill,
        dimension_names=dims, compressors=compressor, zarr_format=3,
    )
    z[...] = a


def _write_table(file: Path, table: pd.DataFrame, offsets: np.ndarray, full_tokens: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def strings(col):
        values = table[col].to_numpy(dtype=object)
        return pa.array([v if isinstance(v, str) else None for v in values], pa.large_string())

    out = pa.table(
        {
            "id": strings("id"),
            "prompt": strings("prompt"),
            "output": strings("output"),
            "output_ids": pa.LargeListArray.from_arrays(
                pa.array(offsets, pa.int64()), pa.array(full_tokens, pa.int32())
            ),
            "reference": strings("reference"),
            "n_tokens": pa.array(np.diff(offsets), pa.int64()),
            "offset": pa.array(offsets[:-1], pa.int64()),
        }
    )
    pq.write_table(out, file, compression="zstd")


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    sync_tree(tmp)  # on the disk before it is published
    if not os.path.lexists(target):
        try:
            os.rename(tmp, target)
        except OSError as exc:  # another save published its cache since the check
            if os.path.lexists(target):
                raise _exists_error(target) from exc
            raise
    elif not overwrite:  # appeared while we were writing
        raise _exists_error(target)
    else:
        old: Path | None = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another overwrite moved it aside meanwhile
            old = None
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if not os.path.lexists(target):
                if old is not None:
                    os.rename(old, target)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # another save published its cache meanwhile: that one stays
            raise FileExistsError(
                f"another save put its cache at {target} while this one replaced it: that cache is there now, and "
                "this one was not written"
            ) from exc
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
    try:
        published_sync(target)
    finally:
        if overwrite:  # once committed: this one's old cache, and any an interrupted overwrite of the same name left
            for leftover in _old_copies(target):  # (not for every batch an extraction writes into its shard_dir)
                shutil.rmtree(leftover, ignore_errors=True)


def _old_copies(target: Path) -> list[Path]:
    """Caches that overwrites of ``target`` renamed aside (``.<name>.old-<hex>``) and did not delete yet."""
    stale = re.compile(rf"\.{re.escape(target.name)}\.old-[0-9a-f]{{32}}")
    try:
        return [p for p in target.parent.iterdir() if stale.fullmatch(p.name)]
    except OSError:
        return []


def _commit_remote(local: Path, target: Remote) -> None:
    """Upload the cache written at ``local`` to ``target``; an old cache there is replaced only once the new
    one is uploaded in full beside it (object storage has no rename)."""
    if not target.exists():
        target.upload(local, last=_META_FILE)  # removes what it wrote on failure
        return
    parent, _, name = target.path.rpartition("/")
    staged = Remote(target.fs, f"{parent}/.{name}.{uuid.uuid4().hex}.tmp")
    staged.upload(local, last=_META_FILE)  # a failure here leaves the old cache untouched
    try:
        target.remove(first=_META_FILE)
    except BaseException as exc:  # its meta.json may be gone: what is left need not open
        what = f"deleting the old cache at {target} failed part way, so what is left of it may not open"
        _name_staged(exc, what, staged)
    try:
        staged.copy_to(target, last=_META_FILE)
    except BaseException as exc:
        _name_staged(exc, f"the old cache at {target} was deleted but copying the new one into place failed", staged)
    try:
        staged.remove(first=_META_FILE)
    except Exception as exc:  # noqa: BLE001 - the new cache is in place: say so
        raise OSError(
            f"the new cache is in place at {target}, but removing its staged copy {staged} failed "
            f"({type(exc).__name__}: {exc}): delete it"
        ) from exc


def _name_staged(exc: BaseException, what: str, staged: Remote) -> NoReturn:
    """Re-raise ``exc`` (caught in :func:`_commit_remote`) saying where the complete new cache lies: an error as an
    OSError, an interrupt (Ctrl-C) as itself with a note (it named nothing, the old cache half deleted)."""
    message = f"{what}; the new cache is complete at {staged}"
    if isinstance(exc, Exception):
        raise OSError(f"{message}: {type(exc).__name__}: {exc}") from exc
    exc.add_note(message)
    raise exc


def _load_json(file: Path | Remote, encoding: str) -> Any:
    """The JSON in ``file``; ValueError naming it when it is not text in ``encoding``, not JSON, or nested too deep."""
    try:
        text = file.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    return parse_json(text, str(file))


def _newer(version) -> bool:
    return type(version) is int and version > FORMAT_VERSION


def _read_meta(root: Path) -> dict:
    file = root / _META_FILE
    if not file.is_file():
        raise ValueError(f"{root} is not a layer cache: {_META_FILE} is missing")
    meta = _load_json(file, "utf-8")
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not True, not 1.0
        raise ValueError(
            f"{file}: unsupported format_version {version!r}; this library (calm-calibrate {_library_version()}) "
            f"reads format_version {FORMAT_VERSION}"
            + (": the cache was written by a newer calm-calibrate, upgrade it" if _newer(version) else "")
        )
    if not isinstance(meta.get("checksum"), str):
        raise ValueError(f"{file}: 'checksum' must be the cache's checksum (a string), got {meta.get('checksum')!r}")
    fields = meta.get("fields")
    if not isinstance(fields, dict) or not all(isinstance(v, dict) for v in fields.values()):
        raise ValueError(f"{file}: 'fields' must map field names to descriptions")
    if "sequences" not in fields:
        raise ValueError(f"{file}: 'fields' must describe the table 'sequences'")
    for name, spec in fields.items():
        kind = spec.get("kind") if isinstance(spec.get("kind"), str) else None
        expected = {"array": f"{_ARRAY_DIR}/{name}", "table": _TABLE_FILE, "vocab": _VOCAB_FILE}.get(kind)
        valid_name = {
            "array": bool(_NAME_RE.match(name)) and name not in _RESERVED,
            "table": name == "sequences",
            "vocab": name == "vocab",
        }
        if expected is None or not valid_name[kind] or spec.get("path") != expected:
            raise ValueError(f"{file}: field {name!r} has an invalid description {spec!r}")
    return meta


def _open_array(root: Path | Remote, name: str, spec: dict) -> Any:
    """The zarr array ``name`` of the cache at ``root``, its dtype, shape and chunk files checked.

    The dtype must be the field's canonical dtype both in the zarr metadata and in ``spec`` (its entry in
    ``meta.json``); values are not read.

    Raises
    ------
    ValueError
        Naming the array and its path: a missing or unreadable ``zarr.json``, a wrong dtype or shape,
        missing chunk files.
    """
    import zarr

    where = root / _ARRAY_DIR / name
    if not (where / "zarr.json").is_file():
        v2 = (where / ".zarray").is_file()
        raise ValueError(
            f"array {name!r} is listed in {_META_FILE} but {where}/zarr.json is missing"
            + (" (it holds a zarr v2 array, .zarray; caches store zarr v3 arrays)" if v2 else "")
        )
    try:
        z = zarr.open_array(store=zarr_store(where), mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable array
        raise ValueError(f"cannot open array {name!r} at {where}: {type(exc).__name__}: {exc}") from exc
    expected = _field_dtype(name)
    if np.dtype(z.dtype) != expected:
        raise ValueError(f"array {name!r} at {where} must have dtype {expected.name}, got {np.dtype(z.dtype).name}")
    if spec.get("dtype") != expected.name:
        raise ValueError(
            f"{root / _META_FILE} lists array {name!r} with dtype {spec.get('dtype')!r}, but it must be (and is) "
            f"{expected.name}"
        )
    if list(z.shape) != spec.get("shape"):
        raise ValueError(
            f"array {name!r} at {where} has shape {list(z.shape)} but {_META_FILE} says {spec.get('shape')}"
        )
    _chunk_files_iv(z, name, where)
    return z


def _chunk_files_iv(z, name: str, where: Path | Remote) -> None:
    """Refuse a zarr array (``name`` at ``where``) some of whose chunk files are missing (zarr reads fill values).

    The files are counted first: zarr's own count walks the whole chunk grid, which an edited ``zarr.json``
    can make astronomically large (an hour for 2**32 chunks of a few stored ones).
    """
    files = sum(len(f) for _, _, f in os.walk(where)) if isinstance(where, Path) else len(where.fs.find(where.path))
    if z.nchunks >= files:  # one of the files is zarr.json
        raise ValueError(
            f"array {name!r} at {where} is missing {z.nchunks - files + 1} chunk file(s) (or more): its grid has "
            f"{z.nchunks} chunks, its directory {files - 1} file(s) beside zarr.json"
        )
    if z.nchunks_initialized != z.nchunks:
        raise ValueError(f"array {name!r} at {where} is missing {z.nchunks - z.nchunks_initialized} chunk file(s)")


def _read_array(root: Path | Remote, name: str, z) -> np.ndarray:
    """The values of array ``name``, opened (and checked) by :func:`_open_array` as ``z``, in memory.

    A corrupted chunk raises ValueError naming the array.
    """
    where = root / _ARRAY_DIR / name
    try:
        a = np.ascontiguousarray(z[...])
    except Exception as exc:  # noqa: BLE001 - decompression errors of corrupted chunks vary by codec
        raise ValueError(
            f"cannot read array {name!r} at {where} (corrupted chunk?): {type(exc).__name__}: {exc}"
        ) from exc
    return a


def _read_vocab(root: Path, spec: dict | None) -> list[str] | None:
    if spec is None:
        return None
    file = root / _VOCAB_FILE
    if not file.is_file():
        raise ValueError(f"the vocab is listed in {_META_FILE} but {file} is missing")
    vocab = _load_json(file, "ascii")
    if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
        raise ValueError(f"{file} must hold a JSON list of strings")
    return vocab


def _read_table(root: Path, spec: dict | None, full_tokens: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = root / _TABLE_FILE
    if spec is None or not file.is_file():
        raise ValueError(f"{root} is not a complete layer cache: {file} is missing")
    try:
        with file.open("rb") as f:
            t = pq.read_table(f)
    except Exception as exc:  # noqa: BLE001 - arrow raises several types for corrupted files
        raise ValueError(f"cannot read {file}: {type(exc).__name__}: {exc}") from exc
    missing = [c for c in _TABLE_COLUMNS if c not in t.column_names]
    if missing:
        raise ValueError(f"{file} must have the columns {list(_TABLE_COLUMNS)}, missing {missing}")
    types = {c: t.schema.field(c).type for c in _TABLE_COLUMNS}
    for col in ("id", "prompt", "output", "reference"):
        if not (pa.types.is_string(types[col]) or pa.types.is_large_string(types[col])):
            raise ValueError(f"{file}: column {col!r} must hold strings, got {types[col]}")
    for col in ("n_tokens", "offset"):
        if not pa.types.is_integer(types[col]):
            raise ValueError(f"{file}: column {col!r} must hold integers, got {types[col]}")
    out_type = types["output_ids"]
    is_list = pa.types.is_list(out_type) or pa.types.is_large_list(out_type)
    if not is_list or not pa.types.is_integer(out_type.value_type):
        raise ValueError(f"{file}: column 'output_ids' must hold lists of integers, got {out_type}")

    lengths = t.column("n_tokens").to_numpy().astype(np.int64)
    starts = t.column("offset").to_numpy().astype(np.int64)
    if lengths.size == 0:
        raise ValueError(f"{file}: the cache is empty (0 sequences)")
    offsets = np.concatenate([starts, starts[-1:] + lengths[-1:]])
    n_tokens = full_tokens.shape[0]
    consecutive = np.array_equal(np.diff(offsets), lengths) and not np.any(offsets[1:] <= offsets[:-1])  # no wrap
    if starts[0] != 0 or np.any(lengths < 1) or not consecutive or offsets[-1] != n_tokens:
        raise ValueError(
            f"{file}: inconsistent offsets: columns 'offset' and 'n_tokens' must describe consecutive "
            f"non-empty sequences covering the n_tokens={n_tokens} rows of 'full_tokens'"
        )
    lists = t.column("output_ids").combine_chunks()
    list_offsets = np.asarray(lists.offsets).astype(np.int64)
    values = np.asarray(lists.flatten())
    if not (np.array_equal(list_offsets - list_offsets[0], offsets) and np.array_equal(values, full_tokens)):
        raise ValueError(f"{file}: column 'output_ids' does not match the array 'full_tokens'")
    for col in ("id", "prompt", "output"):
        if t.column(col).null_count:
            raise ValueError(f"{file}: column {col!r} must not have missing values")
    ids = t.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ValueError(f"{file}: column 'id' must be unique")
    table = _make_table(
        ids,
        t.column("prompt").to_pylist(),
        t.column("output").to_pylist(),
        t.column("reference").to_pylist(),
        full_tokens,
        offsets,
    )
    return table, offsets
