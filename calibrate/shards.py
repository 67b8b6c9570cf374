"""Caches written in shards by separate workers, joined by a manifest without copying.

``calibrate extract --shard i/N`` (or each rank under ``torchrun``) extracts the ``i``-th of ``N``
contiguous slices of the prompts into a complete cache ``OUTPUT/shard-0000i-of-0000N`` and writes the
manifest ``OUTPUT/manifest.json`` listing all ``N`` shards (every worker writes the same manifest). Each
shard resumes on its own after a crash. :func:`calibrate.open_cache` on ``OUTPUT`` reads the shards as
one cache: in memory, or lazily with ``chunks`` (partitions never cross a shard). It refuses shards of
different models, tokenizers or generation settings, and a manifest with a missing or corrupt shard,
naming the shard. The joined cache's checksum is the checksum of the same data in one cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from calibrate._atomic import atomic_file
from calibrate._cache_files import (
    _array_hasher,
    _cache_checksum,
    _hash_strings,
    _hash_table,
    _load_json,
    _meta_checksum,
    _read_vocab,
)
from calibrate._storage import Remote, location
from calibrate._validation import int_at_least, int_in
from calibrate.cache import LayerCache, open_cache
from calibrate.concat import _MAY_DIFFER, _meta_difference, concat_caches

if TYPE_CHECKING:
    from calibrate.chunked import ChunkedCache

__all__ = ["MANIFEST_FILE", "shard_name", "parse_shard", "shard_bounds", "write_manifest", "is_sharded", "open_sharded"]

#: The manifest's file name inside the output directory.
MANIFEST_FILE = "manifest.json"
_FORMAT = "calm-calibrate shards"
_VERSION = 1
#: Metadata that may differ between shards of one cache: what parts of a cache may differ in, and what each
#: shard derives from its own contents.
_PER_SHARD_KEYS = (*_MAY_DIFFER, "library", "library_version", "n_sequences", "n_tokens", "checksum", "meta_checksum")


def shard_name(index: int, count: int) -> str:
    """The directory name of shard ``index`` (0-based) of ``count``: ``shard-00002-of-00008``.

    Parameters
    ----------
    index : int
        The shard, 0-based (not checked against ``count``).
    count : int
        Number of shards.

    Returns
    -------
    str
        ``shard-<index>-of-<count>``, both zero-padded to five digits.

    Raises
    ------
    TypeError
        When ``index`` or ``count`` is not an int.
    ValueError
        When ``index`` is negative or ``count`` below 1.

    Examples
    --------
    >>> from calibrate.shards import shard_name
    >>> [shard_name(i, 3) for i in range(3)]
    ['shard-00000-of-00003', 'shard-00001-of-00003', 'shard-00002-of-00003']
    """
    return f"shard-{int_at_least(index, 'index', 0):05d}-of-{int_at_least(count, 'count'):05d}"


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` (0-based ``i < N``) as ``(i, N)``.

    Parameters
    ----------
    spec : str
        ``"i/N"`` with non-negative integers ``i < N``; spaces around either number are allowed.

    Returns
    -------
    index, count : int
        ``i`` and ``N``.

    Raises
    ------
    ValueError
        When ``spec`` is not of that form.

    Examples
    --------
    >>> from calibrate.shards import parse_shard
    >>> parse_shard("1/4"), parse_shard(" 3 / 8 ")
    ((1, 4), (3, 8))
    >>> parse_shard("4/4")
    Traceback (most recent call last):
    ...
    ValueError: a shard is written i/N with 0 <= i < N (e.g. 0/4), got '4/4'
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if match is None or not int(match[1]) < int(match[2]):
        raise ValueError(f"a shard is written i/N with 0 <= i < N (e.g. 0/4), got {spec!r}")
    return int(match[1]), int(match[2])


def shard_bounds(n: int, index: int, count: int, *, batch_size: int = 1) -> tuple[int, int]:
    """The prompts ``[start, stop)`` of shard ``index`` of ``count`` over ``n`` prompts.

    Shards are contiguous runs of whole batches of ``batch_size`` prompts (their batch counts differ by
    <= 1), so each batch holds the prompts it holds in one unsharded extraction: the same padding and
    batch size give the same float results, and the joined cache the same checksum.

    Parameters
    ----------
    n : int
        Number of prompts of the whole run.
    index : int
        The shard, in ``[0, count)``.
    count : int
        Number of shards, at most the number of batches ``ceil(n / batch_size)``.
    batch_size : int, default=1
        Prompts per batch, >= 1.

    Returns
    -------
    start, stop : int
        The shard's prompts ``prompts[start:stop]``, with ``0 <= start < stop <= n``.

    Raises
    ------
    TypeError
        When ``n``, ``index``, ``count`` or ``batch_size`` is not an int (a bool or a float included).
    ValueError
        When ``index`` lies outside ``[0, count)``, ``n``, ``count`` or ``batch_size`` is below 1, or there are
        fewer batches than shards.

    Examples
    --------
    >>> from calibrate.shards import shard_bounds
    >>> [shard_bounds(10, i, 3) for i in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    >>> [shard_bounds(10, i, 2, batch_size=4) for i in range(2)]   # 3 batches: [0, 4), [4, 8), [8, 10)
    [(0, 4), (4, 10)]
    """
    n, count, batch_size = int_at_least(n, "n"), int_at_least(count, "count"), int_at_least(batch_size, "batch_size")
    index = int_in(index, "shard index", 0, count - 1, f" (0-based, of {count} shards)")
    n_batches = -(-n // batch_size)
    if count > n_batches:
        raise ValueError(
            f"{count} shards for {n} prompts in {n_batches} batches of {batch_size}: every shard needs at least "
            "one batch; use fewer shards or a smaller batch size"
        )
    return min(n, index * n_batches // count * batch_size), min(n, (index + 1) * n_batches // count * batch_size)


def _prompts_digest(prompts, references) -> str:
    """Identify the whole prompt list (every shard of a run records the same digest)."""
    payload = json.dumps({"prompts": list(prompts), "references": None if references is None else list(references)})
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _token_ids_digest(token_ids: list[list[int]]) -> str:
    """Identify how the whole prompt list tokenises (shards of one prompt list by another tokenizer differ here)."""
    return hashlib.blake2b(json.dumps(token_ids).encode(), digest_size=16).hexdigest()


def _check_manifest(root: str | os.PathLike, count: int) -> bool:
    """Whether ``root`` holds the manifest of ``count`` shards already (False: none yet).

    Raises
    ------
    ValueError
        When ``root`` holds a manifest of another shard count, or a single cache (checked before a worker
        extracts anything).
    """
    file = Path(root) / MANIFEST_FILE
    if (Path(root) / "meta.json").is_file():
        raise ValueError(
            f"{root} holds a single cache (meta.json): sharded extraction writes its shards and manifest into a "
            "directory of its own; choose another output"
        )
    if not file.is_file():
        return False
    found = _load(file).get("shards")
    if found != [shard_name(i, count) for i in range(count)]:
        n = len(found) if isinstance(found, list) else 0
        detail = f"{n} shards, not {count}" if n != count else f"other shards than this run's {count}: {found!r:.120}"
        raise ValueError(f"{file} lists {detail}: another run wrote into {root}")
    return True


def write_manifest(root: str | os.PathLike, count: int) -> Path:
    """Write ``root/manifest.json`` listing the ``count`` shards, atomically (the same file from every worker).

    Parameters
    ----------
    root : str or os.PathLike
        The sharded cache's local directory (created if missing); shard ``i`` is ``root / shard_name(i, count)``.
    count : int
        Number of shards.

    Returns
    -------
    Path
        The manifest file. When ``root`` holds the same manifest already it is left as it is.

    Raises
    ------
    ValueError
        When ``root`` already holds a manifest of another shard count, or a single cache (``meta.json``), or is
        a URL (other than ``file://``).
    """
    where = location(root)
    if isinstance(where, Remote):  # Path() made "s3://b/c" the local directory "s3:/b/c"
        raise ValueError(
            f"write_manifest writes a local directory, got the URL {os.fspath(root)!r}: write the shards and their "
            "manifest locally, then upload the directory (open_cache reads it there)"
        )
    root = where
    manifest = {"format": _FORMAT, "format_version": _VERSION, "shards": [shard_name(i, count) for i in range(count)]}
    file = root / MANIFEST_FILE
    if _check_manifest(root, count):
        return file
    root.mkdir(parents=True, exist_ok=True)
    with atomic_file(file) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1), encoding="ascii")
    return file


def is_sharded(root: Path | Remote) -> bool:
    """Whether ``root`` holds a manifest; ValueError when it also holds a single cache (which one is meant?).

    Parameters
    ----------
    root : Path or Remote
        A cache directory, local or an fsspec location (``calibrate._storage.Remote``).

    Returns
    -------
    bool
        True when ``root / MANIFEST_FILE`` is a file.

    Raises
    ------
    ValueError
        When ``root`` holds both a manifest and a single cache's ``meta.json``.
    """
    if not (root / MANIFEST_FILE).is_file():
        return False
    if (root / "meta.json").is_file():
        raise ValueError(
            f"{root} holds both a single cache (meta.json) and a shard manifest ({MANIFEST_FILE}): remove the one "
            "that does not belong there"
        )
    return True


def open_sharded(root: Path | Remote, *, verify: bool, chunks: int | None) -> LayerCache | ChunkedCache:
    """Open the shards listed in ``root/manifest.json`` as one cache (see :func:`calibrate.open_cache`).

    Returns
    -------
    LayerCache or ChunkedCache
        The shards' sequences in shard order: in memory, or lazily in partitions of ``chunks``.
    """

    names = _read_manifest(root)
    roots = [root / name for name in names]
    for name, where in zip(names, roots):
        if not where.is_dir():
            raise ValueError(
                f"{root / MANIFEST_FILE} lists shard {name!r} but {where} is missing (not written yet, or failed?)"
            )
        if is_sharded(where):  # opened in memory, it recursed (a link to '.': 40 levels deep)
            raise ValueError(
                f"shard {name!r} of {root} is itself a sharded cache ({where / MANIFEST_FILE}); shards nest one level"
            )
    if chunks is None:
        parts = [
            _in_shard(name, lambda w=where: open_cache(str(w), verify=verify))  # a Remote's str is its URL
            for name, where in zip(names, roots)
        ]
        _check_compatible(root, names, [p.meta for p in parts])
        return concat_caches(parts)

    from calibrate._progress import tqdm
    from calibrate.chunked import ChunkedCache, _chunks_iv, _read_lazily

    _chunks_iv(chunks)
    heads = [_in_shard(name, lambda w=where: _read_lazily(w, verify=False)) for name, where in zip(names, roots)]
    metas = [meta for meta, _, _ in heads]
    _check_compatible(root, names, metas)
    table = pd.concat([t for _, t, _ in heads], ignore_index=True)
    if not table["id"].is_unique:
        raise ValueError(
            f"the shards of {root} repeat sequence ids (e.g. {table['id'][table['id'].duplicated()].iloc[0]!r})"
        )
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(o) for _, _, o in heads]))])
    table["offset"] = offsets[:-1]  # each shard's column counts from its own start
    # One pass over the arrays: each shard's own checksum (with verify) and the joined cache's.
    fields = {name: dict(spec) for name, spec in metas[0]["fields"].items()}
    joint = {}
    for name, spec in fields.items():
        if spec.get("kind") == "array":
            spec["shape"] = [int(offsets[-1]), *spec["shape"][1:]]
            joint[name] = _array_hasher(spec["dtype"], spec["shape"])
    for name, where in tqdm(list(zip(names, roots)), desc="read shards", unit="shard", disable=len(names) < 4):
        _in_shard(name, lambda w=where: _read_lazily(w, verify=verify, joint=joint))
    checksums = {name: h.hexdigest() for name, h in joint.items()}
    checksums["sequences"] = _hash_table(table, offsets)
    if "vocab" in fields:
        checksums["vocab"] = _hash_strings(tuple(_read_vocab(roots[0], fields["vocab"])))
    for name, value in checksums.items():
        fields[name]["checksum"] = value
    fields["sequences"]["rows"] = len(table)
    meta = {k: v for k, v in metas[0].items() if k not in ("shard", "sharding")}
    meta.update(meta_checksum=_meta_checksum(meta))  # without shard 0's own "shard" entries
    meta.update(fields=fields, checksum=_cache_checksum(metas[0]["vocab_size"], checksums))
    meta.update(n_sequences=len(table), n_tokens=int(offsets[-1]))
    starts = np.cumsum([0] + [len(t) for _, t, _ in heads[:-1]])
    sources = tuple((where.resolve(), int(s), m["checksum"]) for where, s, m in zip(roots, starts, metas))
    return ChunkedCache(root.resolve(), int(chunks), meta, table, offsets, sources)


def _in_shard(name: str, fn):
    """Run ``fn``, prefixing a ValueError with the shard it concerns."""
    try:
        return fn()
    except ValueError as exc:
        raise ValueError(f"shard {name!r}: {exc}") from exc


def _load(file: Path | Remote) -> dict:
    data = _load_json(file, "ascii")
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def _read_manifest(root: Path | Remote) -> list[str]:
    file = root / MANIFEST_FILE
    manifest = _load(file)
    if manifest.get("format") != _FORMAT or manifest.get("format_version") != _VERSION:
        raise ValueError(
            f"{file} is not a calm-calibrate shard manifest of format_version {_VERSION} (it says format "
            f"{manifest.get('format')!r}, format_version {manifest.get('format_version')!r})"
        )
    names = manifest.get("shards")
    valid = re.compile(r"shard-\d{5}-of-\d{5}")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and valid.fullmatch(n) for n in names):
        raise ValueError(f"{file}: 'shards' must list shard directory names like 'shard-00000-of-00002'")
    expected = [shard_name(i, len(names)) for i in range(len(names))]
    if names != expected:  # write_manifest lists every shard of the count, in order: an edit would drop or reorder
        raise ValueError(f"{file}: 'shards' must list {expected[0]!r} to {expected[-1]!r} in order, got {names!r:.200}")
    return names


def _check_slices(root, names: list[str], metas: list[dict]) -> None:
    """Shards that record their slice of the prompt list (``start``, ``stop``, ``n_prompts``; older versions
    record none) tile it in order, one sequence per prompt: no prompt missing (shards of versions that bounded the
    shards otherwise), none twice."""
    slices = [meta.get("sharding") or {} for meta in metas]
    if not all(isinstance(s.get(k), int) for s in slices for k in ("start", "stop", "n_prompts")):
        return
    n_prompts, end = slices[0]["n_prompts"], 0
    for name, meta, s in zip(names, metas, slices):
        if s["n_prompts"] != n_prompts or s["start"] != end or meta.get("n_sequences") != s["stop"] - s["start"]:
            raise ValueError(
                f"shard {name!r} of {root} holds prompts [{s['start']}, {s['stop']}) of {s['n_prompts']} in "
                f"{meta.get('n_sequences')} sequences, but the shards before it end at prompt {end} of {n_prompts}: "
                "the shards do not tile the prompt list (written with other shard bounds?); extract it again"
            )
        end = s["stop"]
    if end != n_prompts:
        raise ValueError(f"the shards of {root} end at prompt {end} of {n_prompts}: the last prompts are missing")


def _check_compatible(root, names: list[str], metas: list[dict]) -> None:
    """Every shard comes from the same model, tokenizer, settings and prompt list, in its place."""
    first = metas[0]
    tokenised = None  # (shard, digest of the prompt list's token ids) of the first shard that records one
    for i, (name, meta) in enumerate(zip(names, metas)):
        difference = _meta_difference(meta, first, (*_PER_SHARD_KEYS, "fields"))  # fields: compared below
        if difference is not None:
            path, mine, theirs = difference
            raise ValueError(
                f"shard {name!r} of {root} differs from shard {names[0]!r} in {path}: "
                f"{mine!r:.120} != {theirs!r:.120} (written by another model, tokenizer or settings?)"
            )
        for field, spec in first["fields"].items():
            other = meta["fields"].get(field)
            same = other is not None and other.get("kind") == spec.get("kind")
            if same and spec.get("kind") == "array":
                same = other.get("dtype") == spec.get("dtype") and other["shape"][1:] == spec["shape"][1:]
            if same and field == "vocab":
                same = other.get("checksum") == spec.get("checksum")
            if not same:
                raise ValueError(f"shard {name!r} of {root} differs from shard {names[0]!r} in field {field!r}")
        if set(meta["fields"]) != set(first["fields"]):
            raise ValueError(
                f"shard {name!r} of {root} has the fields {sorted(meta['fields'])}, not {sorted(first['fields'])}"
            )
        sharding = meta.get("sharding")
        if (sharding is None) != (first.get("sharding") is None):  # a plain cache among shards: its prompts unknown
            raise ValueError(
                f"shard {name!r} of {root} {'has no' if sharding is None else 'has a'} 'sharding' record in its meta, "
                f"shard {names[0]!r} {'has' if sharding is None else 'has none'}: they were not written by one "
                "sharded extraction"
            )
        if sharding is not None and not isinstance(sharding, dict):
            raise ValueError(f"shard {name!r} of {root}: its meta's 'sharding' must be a mapping, got {sharding!r:.80}")
        if sharding is not None:
            expected = {"index": i, "count": len(names)}
            if {k: sharding.get(k) for k in expected} != expected:
                raise ValueError(
                    f"shard {name!r} of {root} says it is shard {sharding.get('index')} of {sharding.get('count')}"
                )
            if sharding.get("prompts") != (first.get("sharding") or {}).get("prompts"):
                raise ValueError(f"shard {name!r} of {root} was extracted from another prompt list than {names[0]!r}")
            digest = sharding.get("prompt_ids")  # None: a shard of an older version
            if digest is not None and tokenised is not None and digest != tokenised[1]:
                raise ValueError(
                    f"shard {name!r} of {root} tokenised the prompt list otherwise than {tokenised[0]!r} (another "
                    "tokenizer, or other tokenizer settings)"
                )
            tokenised = tokenised or (None if digest is None else (name, digest))
    _check_slices(root, names, metas)
