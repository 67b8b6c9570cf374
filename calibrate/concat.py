"""Joining caches along the sequence axis, and the metadata comparison that decides whether two caches (or a
cache and a certificate) describe the same model run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from calibrate._cache_files import _first_repeat
from calibrate.cache import LayerCache, _from_arrays

__all__ = ["concat_caches"]


#: Metadata describing one part of a cache (an extraction batch, a worker's shard), dropped when joining.
_PART_KEYS = ("shard", "sharding")
#: Metadata that may differ between the parts of one cache: the above, where each part ran, and the
#: generator settings of a synthetic part (its seed and size are its own).
_MAY_DIFFER = (*_PART_KEYS, "software", "synthetic")


def _loaded_by_name(key: str, a: Mapping, b: Mapping) -> bool:
    """Whether metadata ``key`` only names where the model or tokenizer was loaded from (a path as typed,
    which differs between machines and spellings) while both ``a`` and ``b`` identify the model by its
    weights (``heads["model_digest"]``): then the names may differ."""
    return key in ("model", "tokenizer") and all((m.get("heads") or {}).get("model_digest") for m in (a, b))


def _heads_difference(a, b, *, states_only: bool = False) -> list[str]:
    """The keys two exit-heads descriptions (:meth:`~calibrate.ExitHeads.describe`) disagree on, in ``a``'s order,
    among those both record (a description written by another library version has other keys); with ``states_only``, not
    ``"generation"``: what reads hidden states alone (a learned measure's training) does not depend on it."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return [] if a == b else ["heads"]
    return [k for k in a if k in b and a[k] != b[k] and not (states_only and k == "generation")]  # a's order


def _meta_difference(mine: Mapping, theirs: Mapping, may_differ: Sequence[str]) -> tuple[str, object, object] | None:
    """Where two parts' metadata disagree, e.g. ``("'generation' -> 'max_new_tokens'", 99, 32)``, or None: every key
    but those in ``may_differ`` and the names of a model both identify by its weights (:func:`_loaded_by_name`)."""
    for key in sorted(set(mine) | set(theirs)):
        if key not in may_differ and mine.get(key) != theirs.get(key) and not _loaded_by_name(key, mine, theirs):
            return _first_difference((key,), mine.get(key), theirs.get(key))
    return None


def _first_difference(keys: tuple, a, b) -> tuple[str, object, object]:
    """The first nested key where two metadata values differ, e.g. ``'generation' -> 'max_new_tokens'``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference((*keys, key), a.get(key), b.get(key))
    return " -> ".join(map(repr, keys)), a, b


def concat_caches(caches: Sequence[LayerCache], *, meta: dict | None = None) -> LayerCache:
    """Concatenate caches along the sequence axis.

    Parameters
    ----------
    caches : sequence of LayerCache
        At least one; all with the same fields, layer count, top-k, vocabulary size, hidden size and
        vocab, and distinct sequence ids.
    meta : dict, optional
        Metadata of the result. By default the caches' metadata must agree (model, generation settings,
        exit heads, ...; only where each part ran, its shard entries and a synthetic part's generator
        settings may differ) and the result takes that of ``caches[0]``. Pass ``meta`` to join parts
        that differ on purpose (e.g. re-headed with other adapters) and say what the whole is.

    Returns
    -------
    LayerCache
        The sequences of ``caches[0]``, then ``caches[1]``, ...; with ``meta``, or the metadata of
        ``caches[0]`` without its ``"shard"`` and ``"sharding"`` entries (which describe one part).

    Raises
    ------
    ValueError
        When the caches do not match (the message names the first difference) or ids repeat.
    TypeError
        When an element is not a LayerCache, or ``meta`` is not a dict.

    Examples
    --------
    >>> from calibrate import concat_caches, synthetic_cache
    >>> cache = synthetic_cache(6, n_layers=4, seed=0)
    >>> a, b = cache.split([0.5, 0.5], seed=0)
    >>> concat_caches([a, b]).n_sequences
    6
    >>> other = synthetic_cache(3, n_layers=4, seed=1)
    >>> other = other.with_meta({**other.user_meta, "model": "gpt2"})
    >>> concat_caches([a, other])
    Traceback (most recent call last):
    ...
    ValueError: caches[1] differs from caches[0] in 'model': 'gpt2' != 'synthetic' (another model or settings?); pass
    meta= to join them anyway
    """
    caches = list(caches)
    if not caches:
        raise ValueError("caches must hold at least one LayerCache, got none")
    for i, c in enumerate(caches):
        if not isinstance(c, LayerCache):
            raise TypeError(f"caches[{i}] must be a LayerCache, got {type(c).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
    first = caches[0]
    for i, c in enumerate(caches[1:], start=1):
        for attr in ("n_layers", "top_k", "vocab_size", "hidden_size"):
            if getattr(c, attr) != getattr(first, attr):
                raise ValueError(f"caches[{i}] has {attr}={getattr(c, attr)} but caches[0] has {getattr(first, attr)}")
        if set(c.arrays) != set(first.arrays):
            raise ValueError(f"caches[{i}] has the fields {sorted(c.arrays)} but caches[0] has {sorted(first.arrays)}")
        if c.vocab != first.vocab:
            raise ValueError(f"caches[{i}] has another vocab than caches[0]")
        difference = None if meta is not None else _meta_difference(c.user_meta, first.user_meta, _MAY_DIFFER)
        if difference is not None:
            path, a, b = difference
            raise ValueError(
                f"caches[{i}] differs from caches[0] in {path}: {a!r:.120} != {b!r:.120} (another model or "
                "settings?); pass meta= to join them anyway"
            )
    if meta is None:
        meta = {k: v for k, v in first.user_meta.items() if k not in _PART_KEYS}
    if len(caches) == 1:
        return first.with_meta(meta)

    def cat(name):
        return np.concatenate([c.arrays[name] for c in caches])

    tables = [c.sequences for c in caches]

    def column(col):
        return [None if (col == "reference" and not isinstance(v, str)) else v for t in tables for v in t[col].tolist()]

    scores = {
        name: cat(name) for name in first.arrays if name not in ("full_tokens", "topk_ids", "topk_logprobs", "hidden")
    }
    ids = column("id")
    dup = _first_repeat(ids)
    if dup is not None:
        owners = [i for i, t in enumerate(tables) if dup in set(t["id"])]
        raise ValueError(
            f"sequence id {dup!r} occurs in caches{owners}; ids must be unique across the caches: give each part "
            "its own ids (LayerCache.from_arrays(..., ids=...))"
        )
    return _from_arrays(  # each part was checked when it was made
        copy=True,
        full_tokens=cat("full_tokens"),
        topk_ids=cat("topk_ids"),
        topk_logprobs=cat("topk_logprobs") if "topk_logprobs" in first.arrays else None,
        lengths=np.concatenate([c.lengths for c in caches]),
        scores=scores or None,
        hidden=cat("hidden") if "hidden" in first.arrays else None,
        prompts=column("prompt"),
        outputs=column("output"),
        references=column("reference"),
        ids=ids,
        vocab=first.vocab,
        vocab_size=first.vocab_size,
        meta=meta,
    )
