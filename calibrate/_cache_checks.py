"""Checks of a layer cache's contents: the arguments of :meth:`~calibrate.cache.LayerCache.from_arrays` and of
the constructor, and the metadata, arrays and table of a cache being opened."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from calibrate._cache_files import (
    _DTYPES,
    _META_FILE,
    _NAME_RE,
    _RESERVED,
    _SCORE_DTYPE,
    _TABLE_COLUMNS,
    _VOCAB_FILE,
    _field_dtype,
    _make_table,
)
from calibrate._validation import int_at_least, seed_iv, short_repr
from measures._arrays import as_numpy
from measures.confidence import _MASS_TOL

#: Largest vocabulary whose ids fit the int32 id arrays.
_MAX_VOCAB_SIZE = np.iinfo(np.int32).max
#: Value ranges of the known precomputed measures (``measures.confidence.MEASURES``). Other score names
#: are accepted and only checked to be finite.
_SCORE_RANGES = {
    "softmax_gap": (0.0, 1.0),
    "softmax_max": (0.0, 1.0),
    "entropy": (0.0, 1.0),
    "state_saturation": (-1.0, 1.0),
}
#: Slack on the score ranges for float32 rounding (e.g. ``1 - H / log V`` at ``-1e-7``).
_SCORE_TOL = 1e-4
#: Tokens per block in the value checks, to bound temporaries.
_CHECK_BLOCK = 1 << 16


def _init_iv(sequences, arrays, vocab_size, meta, vocab) -> None:
    if not isinstance(sequences, pd.DataFrame):
        raise TypeError(f"sequences must be a pandas DataFrame, got {type(sequences).__name__}")
    missing = [c for c in _TABLE_COLUMNS if c not in sequences.columns]
    if missing:
        raise ValueError(f"sequences must have the columns {list(_TABLE_COLUMNS)}, missing {missing}")
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping of names to arrays, got {type(arrays).__name__}")
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"arrays[{name!r}] must be a numpy array, got {type(a).__name__}")
    _vocab_size_iv(vocab_size)
    if meta is not None:
        _meta_iv(meta)
    if vocab is not None:
        _vocab_iv(vocab)


def _vocab_size_iv(vocab_size, name: str = "vocab_size") -> int:
    int_at_least(vocab_size, name)
    if vocab_size > _MAX_VOCAB_SIZE:
        raise ValueError(
            f"{name} must be at most 2**31 - 1 = {_MAX_VOCAB_SIZE} (token ids are stored as int32), "
            f"got {short_repr(vocab_size)}"
        )
    return int(vocab_size)


def _meta_iv(meta) -> dict:
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"meta must be JSON-serialisable (str keys; str, finite number, bool, None, list, dict values): {exc}"
        ) from exc
    meta_keys_iv(meta, "meta")
    return meta


def meta_keys_iv(meta: Mapping, where: str) -> None:
    """TypeError naming ``where`` when a key of the metadata the library reads has the wrong type (fit failed on
    them after all its work: an AttributeError, or an error naming another field)."""
    generation = meta.get("generation")
    config = generation.get("model_generation_config") if isinstance(generation, Mapping) else None
    read = (
        ("['model']", meta.get("model"), str),
        ("['heads']", meta.get("heads"), Mapping),
        ("['generation']", generation, Mapping),
        ("['generation']['model_generation_config']", config, Mapping),
    )
    for key, value, kind in read:
        if value is not None and not isinstance(value, kind):
            name = "dict" if kind is Mapping else kind.__name__
            raise TypeError(f"{where}{key} must be a {name} or None, got {short_repr(value)}")


def _vocab_iv(vocab) -> list[str]:
    if isinstance(vocab, (str, bytes)) or not isinstance(vocab, Sequence):
        raise TypeError(f"vocab must be a sequence of str, got {type(vocab).__name__}")
    vocab = list(vocab)
    for i, piece in enumerate(vocab):
        if not isinstance(piece, str):
            raise TypeError(f"vocab must hold str, got {type(piece).__name__} at index {i}")
    return vocab


def _text_iv(name: str, values, n: int, *, default: str | None, allow_missing: bool = False) -> list:
    if values is None:
        return [default] * n
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of str (one per sequence), got a single {type(values).__name__}")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} must have one entry per sequence (n_sequences={n}), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if allow_missing and (v is None or (not isinstance(v, str) and bool(pd.isna(v)))):
            out.append(None)
        elif isinstance(v, str):
            out.append(v)
        else:
            kinds = "str or None" if allow_missing else "str"
            raise TypeError(f"{name} must hold {kinds}, got {type(v).__name__} at index {i}")
    try:
        "".join(v for v in out if v is not None).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} must be valid unicode text (no lone surrogates): {exc}") from exc
    return out


def _int_array(name: str, x, ndim: int, shape_doc: str) -> np.ndarray:
    a = as_numpy(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        if a.size == 0 and a.dtype.kind == "f":
            return a.astype(np.int64)
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return a


def _float_array(name: str, x, ndim: int, shape_doc: str, dtype: np.dtype, copy: bool) -> np.ndarray:
    a = as_numpy(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold floats, got dtype {a.dtype}")
    try:
        with np.errstate(over="raise"):
            out = a.astype(dtype, copy=copy, order="C")
    except FloatingPointError:
        limit = np.finfo(dtype).max
        at = _first(np.flatnonzero((np.abs(a) > limit).ravel() & np.isfinite(a).ravel()), a.shape)
        raise ValueError(
            f"{name} holds finite values beyond the {np.dtype(dtype).name} range (|x| > {limit:g}), first at index "
            f"{at}, and the cache stores {name} as {np.dtype(dtype).name}: they would become inf"
        ) from None
    return np.ascontiguousarray(out)


def _ids_to_int32(name: str, a: np.ndarray, vocab_size: int, copy: bool) -> np.ndarray:
    if a.size:
        lo, hi = a.min(), a.max()
        if lo < 0 or hi >= vocab_size:
            bad = _first(np.flatnonzero(((a < 0) | (a >= vocab_size)).ravel()), a.shape)
            value = a[bad]
            raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got {value} at index {bad}")
    return np.ascontiguousarray(a.astype(np.int32, copy=copy))


def _first(flat_idx: np.ndarray, shape) -> tuple:
    return tuple(int(i) for i in np.unravel_index(int(flat_idx[0]), shape))


def _from_arrays_iv(
    *,
    copy: bool,
    full_tokens,
    topk_ids,
    topk_logprobs=None,
    lengths=None,
    offsets=None,
    scores=None,
    hidden=None,
    prompts=None,
    outputs=None,
    references=None,
    ids=None,
    vocab=None,
    vocab_size=None,
    model=None,
    meta=None,
) -> tuple:
    """The inputs of ``from_arrays``, validated and normalised into the arguments of ``LayerCache._trusted``
    (``copy=False`` lets the cache own the arrays)."""
    full = _int_array("full_tokens", full_tokens, 1, "(n_tokens,)")
    top = _int_array("topk_ids", topk_ids, 3, "(n_tokens, n_layers, top_k)")
    n_tokens = full.shape[0]
    if top.shape[0] != n_tokens:
        raise ValueError(f"topk_ids must have n_tokens={n_tokens} rows like full_tokens, got shape {top.shape}")
    if top.shape[1] < 1 or top.shape[2] < 1:
        raise ValueError(f"topk_ids needs at least one layer and one rank, got shape {top.shape}")
    n_layers, k = top.shape[1], top.shape[2]

    # Sequences: exactly one of lengths / offsets.
    if (lengths is None) == (offsets is None):
        raise ValueError("give exactly one of lengths= and offsets=")
    if lengths is not None:
        lens = _int_array("lengths", lengths, 1, "(n_sequences,)").astype(np.int64)
        if lens.size and lens.min() < 1:
            raise ValueError(f"lengths must be >= 1 (every sequence needs a generated token), got {lens.min()}")
        offs = np.zeros(lens.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        if np.any(offs[1:] <= offs[:-1]):  # lengths >= 1: a sum past the int64 range wrapped to a lower one
            raise ValueError(f"lengths must sum to n_tokens={n_tokens} (rows of full_tokens), got more than 2**63")
        if offs[-1] != n_tokens:
            raise ValueError(f"lengths must sum to n_tokens={n_tokens} (rows of full_tokens), got {offs[-1]}")
    else:
        offs = _int_array("offsets", offsets, 1, "(n_sequences + 1,)").astype(np.int64)
        if offs.size < 1 or offs[0] != 0 or offs[-1] != n_tokens:
            raise ValueError(
                f"offsets must start at 0 and end at n_tokens={n_tokens}, got "
                f"{offs[:1].tolist()}...{offs[-1:].tolist()}"
            )
        if np.any(offs[1:] <= offs[:-1]):  # not np.diff, which wraps: [0, 2**63 - 1, -2, 3] passed
            raise ValueError("offsets must be strictly increasing (every sequence needs a generated token)")
    n = offs.size - 1
    if n == 0:
        raise ValueError("the cache is empty: full_tokens/lengths describe 0 sequences; a cache needs at least one")

    # Vocabulary.
    if vocab is not None:
        vocab = _vocab_iv(vocab)
    if vocab_size is None:
        if vocab is not None:
            vocab_size = len(vocab)
        else:
            largest = int(max(full.max(initial=0), top.max(initial=0)))
            vocab_size = _vocab_size_iv(
                largest + 1, "vocab_size (default: 1 + the largest id of full_tokens, topk_ids)"
            )
    vocab_size = _vocab_size_iv(vocab_size)
    if vocab is not None and len(vocab) != vocab_size:
        raise ValueError(f"vocab must have vocab_size={vocab_size} entries, got {len(vocab)}")

    arrays = {
        "full_tokens": _ids_to_int32("full_tokens", full, vocab_size, copy),
        "topk_ids": _ids_to_int32("topk_ids", top, vocab_size, copy),
    }
    if topk_logprobs is not None:
        lp = _float_array(
            "topk_logprobs", topk_logprobs, 3, "(n_tokens, n_layers, top_k)", _DTYPES["topk_logprobs"], copy
        )
        if lp.shape != top.shape:
            raise ValueError(f"topk_logprobs must have the shape of topk_ids {top.shape}, got {lp.shape}")
        arrays["topk_logprobs"] = lp
    if hidden is not None:
        hid = _float_array("hidden", hidden, 3, "(n_tokens, n_layers, hidden_size)", _DTYPES["hidden"], copy)
        if hid.shape[:2] != (n_tokens, n_layers) or hid.shape[2] < 1:
            raise ValueError(f"hidden must have shape ({n_tokens}, {n_layers}, hidden_size), got {hid.shape}")
        arrays["hidden"] = hid
    if scores is not None:
        if not isinstance(scores, Mapping):
            raise TypeError(f"scores must be a dict of name -> (n_tokens, n_layers) array, got {type(scores).__name__}")
        for name, values in scores.items():
            if not isinstance(name, str) or not _NAME_RE.match(name) or name in _DTYPES or name in _RESERVED:
                raise ValueError(
                    f"scores names must be lowercase identifiers (e.g. 'softmax_gap') other than "
                    f"{sorted(_DTYPES) + list(_RESERVED)}, got {name!r}"
                )
            arr = _float_array(f"scores[{name!r}]", values, 2, "(n_tokens, n_layers)", _SCORE_DTYPE, copy)
            if arr.shape != (n_tokens, n_layers):
                raise ValueError(f"scores[{name!r}] must have shape ({n_tokens}, {n_layers}), got {arr.shape}")
            arrays[name] = arr

    # Table.
    prompts = _text_iv("prompts", prompts, n, default="")
    if outputs is None and vocab is not None:
        pieces = np.array(vocab, dtype=object)[arrays["full_tokens"]]
        outputs = ["".join(pieces[offs[s] : offs[s + 1]]) for s in range(n)]
    outputs = _text_iv("outputs", outputs, n, default="")
    references = _text_iv("references", references, n, default=None, allow_missing=True)
    if ids is None:
        ids = [str(i) for i in range(n)]
    ids = _text_iv("ids", ids, n, default="")
    table = _make_table(ids, prompts, outputs, references, arrays["full_tokens"], offs)

    user_meta = _meta_iv(meta) if meta is not None else {}
    for key, value in (("n_layers", n_layers), ("top_k", k), ("vocab_size", vocab_size), ("n_sequences", n)):
        if key in user_meta and user_meta[key] != value:
            raise ValueError(f"meta[{key!r}]={user_meta[key]!r} contradicts the arrays ({key}={value})")
    if model is not None:
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        user_meta["model"] = model
    return table, arrays, offs, vocab_size, user_meta, vocab


def _check_meta(root: Path, meta: dict, arrays: dict, offsets: np.ndarray, vocab) -> int:
    """Check a saved cache's ``vocab_size``, structure and recorded sizes against its (zarr) arrays, unread.

    Returns the vocabulary size.
    """
    vocab_size = meta.get("vocab_size")
    try:
        _vocab_size_iv(vocab_size, "'vocab_size'")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{root / _META_FILE}: {exc}") from None
    if vocab is not None and len(vocab) != vocab_size:
        raise ValueError(
            f"{root / _VOCAB_FILE} holds {len(vocab)} entries but {_META_FILE} says vocab_size={vocab_size}"
        )
    _check_structure(arrays, offsets, vocab_size, vocab)
    top = arrays["topk_ids"].shape
    for key, value in (
        ("n_sequences", len(offsets) - 1),
        ("n_tokens", int(offsets[-1])),
        ("n_layers", top[1]),
        ("top_k", top[2]),
        ("hidden_size", int(arrays["hidden"].shape[2]) if "hidden" in arrays else None),
    ):
        if key in meta and meta[key] != value:
            raise ValueError(f"{root / _META_FILE}: {key!r} is {meta[key]!r} but the arrays give {value!r}")
    return vocab_size


def _check_structure(arrays, offsets, vocab_size, vocab) -> None:
    """Shapes, dtypes and offsets (cheap); values are checked by ``_check_values``."""
    for name in ("full_tokens", "topk_ids"):
        if name not in arrays:
            raise ValueError(f"the cache needs the array {name!r}")
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size < 2:
        raise ValueError("the cache is empty: it has 0 sequences; a cache needs at least one")
    n_tokens = arrays["full_tokens"].shape[0] if arrays["full_tokens"].ndim == 1 else -1
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(offsets[1:] <= offsets[:-1]):  # np.diff would wrap
        raise ValueError(
            f"inconsistent offsets: they must start at 0, increase strictly and end at n_tokens={n_tokens} "
            f"(rows of 'full_tokens'), got first={offsets[0]}, last={offsets[-1]}"
        )
    top = arrays["topk_ids"]
    if top.ndim != 3 or top.shape[0] != n_tokens or 0 in top.shape:
        raise ValueError(f"array 'topk_ids' must have shape ({n_tokens}, n_layers, top_k), got {top.shape}")
    n_layers = top.shape[1]
    for name, a in arrays.items():
        if not _NAME_RE.match(name) or name in _RESERVED:
            raise ValueError(f"array names must be lowercase identifiers other than {list(_RESERVED)}, got {name!r}")
        expected = _field_dtype(name)
        if a.dtype != expected:
            got = a.dtype.name + ("" if a.dtype.isnative else " in non-native byte order")
            raise ValueError(f"array {name!r} must have dtype {expected.name}, got {got}")
        if name in ("topk_ids", "topk_logprobs"):
            shape_ok = a.shape == top.shape
            doc = str(top.shape)
        elif name == "full_tokens":
            shape_ok, doc = True, ""
        elif name == "hidden":
            shape_ok = a.ndim == 3 and a.shape[:2] == (n_tokens, n_layers) and a.shape[2] >= 1
            doc = f"({n_tokens}, {n_layers}, hidden_size)"
        else:
            shape_ok = a.shape == (n_tokens, n_layers)
            doc = str((n_tokens, n_layers))
        if not shape_ok:
            raise ValueError(f"array {name!r} must have shape {doc}, got {a.shape}")
    if vocab is not None and len(vocab) != vocab_size:
        raise ValueError(f"vocab must have vocab_size={vocab_size} entries, got {len(vocab)}")


def _blocks(n: int):
    for lo in range(0, n, _CHECK_BLOCK):
        yield lo, min(n, lo + _CHECK_BLOCK)


def _check_finite(name: str, a: np.ndarray) -> None:
    """Refuse NaN or infinite values, naming the first (``isfinite`` in row blocks: min/max of float16 is slow)."""
    if a.size and not all(np.isfinite(a[lo:hi]).all() for lo, hi in _blocks(a.shape[0])):
        bad = _first(np.flatnonzero(~np.isfinite(a).ravel()), a.shape)
        raise ValueError(f"array {name!r} must be finite, got {a[bad]} at index {bad}")


def _check_values(arrays, vocab_size: int) -> None:
    """Value ranges: ids in the vocabulary and distinct, log-probs finite/<= 0/sorted, scores in range.

    Each array is checked on its own, so ``arrays`` may hold any of a cache's arrays (e.g. one chunk of one).
    """
    for name in ("full_tokens", "topk_ids"):
        if name not in arrays:
            continue
        a = arrays[name]
        if a.min() < 0 or a.max() >= vocab_size:
            bad = _first(np.flatnonzero(((a < 0) | (a >= vocab_size)).ravel()), a.shape)
            raise ValueError(f"array {name!r} must lie in [0, vocab_size={vocab_size}), got {a[bad]} at index {bad}")
    top = arrays.get("topk_ids")
    if top is not None and top.shape[2] > 1:
        for lo, hi in _blocks(top.shape[0]):
            block = top[lo:hi]
            if top.shape[2] == 2:
                dup = block[..., 0] == block[..., 1]
            else:
                s = np.sort(block, axis=-1)
                dup = np.any(s[..., 1:] == s[..., :-1], axis=-1)
            if dup.any():
                t, i = _first(np.flatnonzero(dup), dup.shape)
                raise ValueError(
                    f"array 'topk_ids' must hold distinct ids per token and layer, got {block[t, i].tolist()} "
                    f"at token {lo + t}, layer index {i}"
                )
    if "topk_logprobs" in arrays:
        lp = arrays["topk_logprobs"]
        _check_finite("topk_logprobs", lp)
        if lp.max() > 0:
            bad = _first(np.flatnonzero((lp > 0).ravel()), lp.shape)
            raise ValueError(
                f"array 'topk_logprobs' must be <= 0 (log-probabilities, not logits), got {lp[bad]} at index {bad}"
            )
        for lo, hi in _blocks(lp.shape[0]):
            block = lp[lo:hi]
            rising = np.any(block[:, :, 1:] > block[:, :, :-1], axis=-1)
            if rising.any():
                t, i = _first(np.flatnonzero(rising), rising.shape)
                raise ValueError(
                    f"array 'topk_logprobs' must be sorted descending along top_k, got "
                    f"{lp[lo + t, i].tolist()} at token {lo + t}, layer index {i}"
                )
            mass = np.exp(block.astype(np.float64)).sum(axis=-1)
            if (mass > 1.0 + _MASS_TOL).any():  # e.g. a log_softmax over another axis: sorted, <= 0, no softmax
                t, i = _first(np.flatnonzero(mass > 1.0 + _MASS_TOL), mass.shape)
                raise ValueError(
                    f"array 'topk_logprobs' must be log-probabilities of one softmax per token and layer (their exp "
                    f"sums to at most 1), got a sum of {mass[t, i]:.6g} at token {lo + t}, layer index {i}"
                )
    for name, a in arrays.items():
        if name in ("full_tokens", "topk_ids", "topk_logprobs"):
            continue
        _check_finite(name, a)
        if name in _SCORE_RANGES:
            lo, hi = _SCORE_RANGES[name]
            if a.min() < lo - _SCORE_TOL or a.max() > hi + _SCORE_TOL:
                bad = _first(np.flatnonzero(((a < lo - _SCORE_TOL) | (a > hi + _SCORE_TOL)).ravel()), a.shape)
                raise ValueError(f"array {name!r} must lie in [{lo}, {hi}], got {a[bad]} at index {bad}")


def _check_table(table: pd.DataFrame, offsets: np.ndarray) -> None:
    """The table's ``n_tokens`` and ``offset`` columns against the offsets (its columns, row count, unique ids
    and present texts are already checked where every table is made: :func:`_make_table`, :func:`_read_table`)."""
    if not np.array_equal(table["n_tokens"].to_numpy(), np.diff(offsets)):
        raise ValueError("table 'sequences': column 'n_tokens' disagrees with the offsets")
    if not np.array_equal(table["offset"].to_numpy(), offsets[:-1]):
        raise ValueError("table 'sequences': column 'offset' disagrees with the offsets")


def _subset_iv(indices, n: int, unit: str = "sequence") -> np.ndarray:
    """``indices`` (ints or a boolean mask) as distinct int64 indices in ``[0, n)``, naming ``unit`` (a cache's
    sequences, a loss table's examples) in the messages."""
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"a boolean mask must have shape (n_{unit}s,) = ({n},), got {idx.shape}")
        idx = np.flatnonzero(idx)
    elif idx.size == 0 and idx.dtype.kind == "f":
        idx = idx.astype(np.int64)
    elif idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
    idx = idx.astype(np.int64).ravel()
    if idx.size == 0:
        raise ValueError(f"indices select no {unit}; at least one is needed")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in [0, n_{unit}s={n}), got {idx.min()}..{idx.max()}")
    if np.unique(idx).size != idx.size:
        why = "sequence ids must stay unique" if unit == "sequence" else "a copy would count as another draw"
        raise ValueError(f"indices must not repeat {'an' if unit[0] in 'aeiou' else 'a'} {unit} ({why})")
    return idx


def _split_iv(fractions, seed) -> tuple[np.ndarray, int]:
    try:
        fr = np.asarray(fractions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"fractions must be a sequence of floats, got {fractions!r}") from exc
    if fr.ndim != 1 or fr.size == 0:
        raise ValueError(f"fractions must be a non-empty 1-d sequence, got {fractions!r}")
    if not np.all(np.isfinite(fr)) or np.any(fr <= 0) or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be positive and sum to 1, got {fr.tolist()} (sum {fr.sum()})")
    return fr, seed_iv(seed)
