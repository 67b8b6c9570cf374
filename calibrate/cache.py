"""The layer cache: what every layer of a model predicted for every generated token.

One cache holds one model run over a set of prompts: the greedy full-model outputs and, for every
generated token and every layer, the layer's own top-k prediction (ids and log-probabilities), optional
precomputed confidence measures and optional hidden states. Arrays are **token-major** and the
sequences are stored CSR-style: the tokens of sequence ``s`` are rows ``offsets[s]:offsets[s + 1]``.

On disk a cache is one directory::

    <cache>/
      meta.json              format_version, model, generation settings, shapes, per-field checksums,
                             a checksum of the metadata itself
      sequences.parquet      one row per sequence: id, prompt, output, output_ids, reference,
                             n_tokens, offset
      vocab.json             optional: JSON list of token strings (id -> text piece)
      arrays/<name>/         one zarr v3 array per field, chunked along the token axis
                             (full_tokens, topk_ids, topk_logprobs, hidden, softmax_gap, ...)

Chunks hold up to 65,536 tokens and 64 MiB (uncompressed), Blosc/lz4-compressed, with fill values
no valid cache holds (-1 ids, NaN floats). Each zarr array can be opened on its own
(``zarr.open_array("<cache>/arrays/topk_ids")``, or ``dask.array.from_zarr`` for data that do not fit
in memory). Nothing is pickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from calibrate._atomic import sync_dir, sync_tree, temporary_dir
from calibrate._storage import Remote, location, zarr_store
from calibrate._validation import caller_stacklevel, int_at_least, parse_json, seed_iv, short_repr
from measures._arrays import as_numpy

__all__ = ["FORMAT_VERSION", "LayerCache", "concat_caches", "open_cache"]

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
#: Largest vocabulary whose ids fit the int32 id arrays.
_MAX_VOCAB_SIZE = np.iinfo(np.int32).max
_DIMS = {
    "full_tokens": ("token",),
    "topk_ids": ("token", "layer", "rank"),
    "topk_logprobs": ("token", "layer", "rank"),
    "hidden": ("token", "layer", "hidden"),
}
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
#: Tokens per block in the value checks, to bound temporaries.
_CHECK_BLOCK = 1 << 16


def _field_dtype(name: str) -> np.dtype:
    """The dtype an array field is stored in: ``_DTYPES``'s, else float32 (a precomputed score)."""
    return _DTYPES.get(name, _SCORE_DTYPE)


# --------------------------------------------------------------------------------------------------
# The cache object
# --------------------------------------------------------------------------------------------------


class LayerCache:
    """Per-layer predictions of a model for every generated token, token-major, CSR over sequences.

    Build one with :meth:`from_arrays` (numpy arrays from any framework) or :func:`open_cache` (a
    directory written by :meth:`save`); the constructor is low level and does not copy its inputs.
    A cache is immutable: its arrays are read-only and :attr:`sequences` returns a copy.

    Parameters
    ----------
    sequences : pandas.DataFrame
        One row per sequence with columns ``id`` (str, unique), ``prompt`` (str), ``output`` (str),
        ``output_ids`` (int32 arrays: the full-model tokens of the sequence), ``reference``
        (str or missing), ``n_tokens`` (int64, >= 1) and ``offset`` (int64).
    arrays : mapping of str to numpy.ndarray
        Token-major fields, ``T`` tokens, ``L`` layers, top ``k``, hidden size ``d``:

        - ``"full_tokens"`` (T,) int32: the full-model token at each position (required),
        - ``"topk_ids"`` (T, L, k) int32: each layer's top-k token ids, best first, distinct (required),
        - ``"topk_logprobs"`` (T, L, k) float32: their log-probabilities, <= 0, sorted descending,
        - ``"hidden"`` (T, L, d) float16: hidden states,
        - any other name, (T, L) float32: a precomputed confidence measure, finite; the known measures
          ``softmax_gap``, ``softmax_max``, ``entropy`` lie in [0, 1] and ``state_saturation`` in [-1, 1].
    vocab_size : int
        Size of the model's vocabulary, at most ``2**31 - 1``; every token id lies in ``[0, vocab_size)``.
    meta : dict, optional
        JSON-serialisable metadata (model, revision, tokenizer, generation settings, ...).
    vocab : sequence of str, optional
        ``vocab[i]`` is the text of token ``i``; ``len(vocab) == vocab_size``.

    Raises
    ------
    ValueError
        When a field has the wrong shape, dtype or values; the message names the field.

    See Also
    --------
    open_cache : Read a cache written by :meth:`save`.

    Notes
    -----
    Layers are numbered 1..L in the docs and 0..L-1 in the arrays; ``topk_ids[:, L - 1, 0]`` is the
    full model's own prediction, which equals ``full_tokens`` for greedy decoding.

    Examples
    --------
    >>> import numpy as np
    >>> from calibrate.cache import LayerCache
    >>> cache = LayerCache.from_arrays(
    ...     full_tokens=[5, 6, 7],
    ...     topk_ids=np.array([[[5, 1]], [[6, 2]], [[7, 3]]]),
    ...     lengths=[2, 1],
    ...     vocab=["a", "b", "c", "d", "e", " f", " g", " h"],
    ... )
    >>> cache.n_sequences, cache.n_tokens, cache.n_layers, cache.top_k
    (2, 3, 1, 2)
    >>> cache.sequences["output"].tolist()
    [' f g', ' h']
    """

    def __init__(
        self,
        sequences: pd.DataFrame,
        arrays: Mapping[str, np.ndarray],
        *,
        vocab_size: int,
        meta: Mapping[str, Any] | None = None,
        vocab: Sequence[str] | None = None,
    ) -> None:
        _init_iv(sequences, arrays, vocab_size, meta, vocab)
        arrays = {name: np.array(a, copy=True) for name, a in arrays.items()}  # the cache owns its arrays
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(np.asarray(sequences["n_tokens"], dtype=np.int64), out=offsets[1:])
        _check_structure(arrays, offsets, vocab_size, vocab)
        n = len(sequences)
        table = _make_table(
            _text_iv("sequences['id']", sequences["id"].tolist(), n, default=""),
            _text_iv("sequences['prompt']", sequences["prompt"].tolist(), n, default=""),
            _text_iv("sequences['output']", sequences["output"].tolist(), n, default=""),
            _text_iv("sequences['reference']", sequences["reference"].tolist(), n, default=None, allow_missing=True),
            arrays["full_tokens"],
            offsets,
        )
        self._setup(table, arrays, offsets, int(vocab_size), _meta_iv(meta or {}), vocab)
        _check_table(sequences[list(_TABLE_COLUMNS)], offsets)
        self.validate()

    def __reduce__(self):
        """Pickle and copy by value, rebuilt read-only (unpickled arrays are writable, and an edit would leave the
        checksum describing other data)."""
        t = self._table
        texts = [[None if not isinstance(v, str) else v for v in t[col].tolist()] for col in _TEXT_COLUMNS]
        arrays = dict(self._arrays)
        state = (*texts, arrays, self._offsets, self._vocab_size, self._user_meta, self._vocab, self._checksums)
        return (_unpickle, (type(self), *state))

    @classmethod
    def _trusted(cls, sequences, arrays, offsets, vocab_size, meta, vocab) -> LayerCache:
        """Build without checking values: the inputs come from a validated cache."""
        self = cls.__new__(cls)
        self._setup(sequences, arrays, offsets, vocab_size, meta, vocab)
        return self

    def _setup(self, sequences, arrays, offsets, vocab_size, meta, vocab) -> None:
        self._arrays = {name: _readonly(a) for name, a in arrays.items()}
        self._table = sequences
        self._offsets = _readonly(np.ascontiguousarray(offsets, dtype=np.int64))
        self._vocab_size = vocab_size
        self._user_meta = {k: copy.deepcopy(v) for k, v in meta.items() if k not in _DERIVED_KEYS}
        for key, default in (("model", None), ("revision", None), ("tokenizer", None), ("generation", {})):
            self._user_meta.setdefault(key, default)
        self._vocab = None if vocab is None else tuple(vocab)
        self._vocab_array = None
        self._checksums: dict[str, str] | None = None
        self._sequence_index = None
        self._positions = None

    # ---- construction from arrays ---------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        *,
        full_tokens,
        topk_ids,
        topk_logprobs=None,
        lengths=None,
        offsets=None,
        scores: Mapping[str, Any] | None = None,
        hidden=None,
        prompts: Sequence[str] | None = None,
        outputs: Sequence[str] | None = None,
        references: Sequence[str | None] | None = None,
        ids: Sequence[str] | None = None,
        vocab: Sequence[str] | None = None,
        vocab_size: int | None = None,
        model: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> LayerCache:
        """Build a cache from token-major numpy arrays (from any framework), copying and validating.

        Parameters
        ----------
        full_tokens : array-like of int, shape (n_tokens,)
            Full-model token at each generated position, sequences concatenated.
        topk_ids : array-like of int, shape (n_tokens, n_layers, top_k)
            Each layer's top-k token ids, best first, distinct along the last axis.
        topk_logprobs : array-like of float, shape (n_tokens, n_layers, top_k), optional
            Their log-probabilities: finite, <= 0, sorted descending.
        lengths : array-like of int, shape (n_sequences,), optional
            Generated tokens per sequence (each >= 1). Give exactly one of ``lengths`` and ``offsets``.
        offsets : array-like of int, shape (n_sequences + 1,), optional
            CSR offsets: ``offsets[0] == 0``, strictly increasing, ``offsets[-1] == n_tokens``.
        scores : dict of str to array-like, optional
            Precomputed measures, each (n_tokens, n_layers), e.g. ``{"softmax_gap": ...}``. Names are
            lowercase identifiers other than the fixed fields.
        hidden : array-like of float, shape (n_tokens, n_layers, hidden_size), optional
            Hidden states; stored as float16 (values must stay finite after the cast).
        prompts, outputs : sequence of str, shape (n_sequences,), optional
            Prompt and full-model output texts. ``prompts`` default to ``""``; ``outputs`` default to
            decoding ``full_tokens`` with ``vocab`` (``""`` without one).
        references : sequence of str or None, shape (n_sequences,), optional
            Reference texts; None (or NA) marks a missing one. Default: all missing.
        ids : sequence of str, shape (n_sequences,), optional
            Unique sequence ids. Default: ``"0"``, ``"1"``, ...
        vocab : sequence of str, optional
            Token strings: ``vocab[i]`` is the text that token ``i`` contributes when decoding.
        vocab_size : int, optional
            Vocabulary size of the model, at most ``2**31 - 1`` (ids are stored as int32). Default:
            ``len(vocab)``, or 1 + the largest id when there is no vocab (a lower bound: pass the model's
            size, the entropy approximation depends on it).
        model : str, optional
            Model name, stored as ``meta["model"]``.
        meta : dict, optional
            JSON-serialisable metadata (revision, tokenizer, generation settings, ...). Keys the cache
            derives from its contents are recomputed (``n_tokens``, ``hidden_size``, ``checksum``,
            ``fields``, ...); ``n_layers``, ``top_k``, ``vocab_size`` and ``n_sequences`` that contradict the
            arrays raise ValueError (a sign of mixed-up inputs).

        Returns
        -------
        LayerCache
            A cache that owns copies of the inputs in the canonical dtypes (int32 ids, float32
            log-probabilities and scores, float16 hidden states).

        Raises
        ------
        TypeError
            When an input has the wrong kind (floats for ids, non-str texts, non-JSON meta).
        ValueError
            When shapes disagree, values are out of range, NaN or infinite, or there is no sequence;
            the message names the parameter.

        Examples
        --------
        >>> import numpy as np
        >>> from calibrate.cache import LayerCache
        >>> rng = np.random.default_rng(0)
        >>> ids = rng.permutation(50)[:24].reshape(6, 2, 2)
        >>> cache = LayerCache.from_arrays(
        ...     full_tokens=ids[:, -1, 0], topk_ids=ids, offsets=[0, 4, 6], vocab_size=50
        ... )
        >>> cache.lengths.tolist(), cache.positions.tolist()
        ([4, 2], [0, 1, 2, 3, 0, 1])
        """
        return _from_arrays(
            copy=True,
            full_tokens=full_tokens,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            lengths=lengths,
            offsets=offsets,
            scores=scores,
            hidden=hidden,
            prompts=prompts,
            outputs=outputs,
            references=references,
            ids=ids,
            vocab=vocab,
            vocab_size=vocab_size,
            model=model,
            meta=meta,
        )

    # ---- read-only views ------------------------------------------------------------------------

    @property
    def sequences(self) -> pd.DataFrame:
        """One row per sequence (a copy; changing it does not change the cache, with or without pandas'
        copy-on-write)."""
        return self._table.copy()

    @property
    def arrays(self) -> Mapping[str, np.ndarray]:
        """Token-major fields by name (a read-only mapping of read-only arrays)."""
        return MappingProxyType(self._arrays)

    @property
    def vocab(self) -> list[str] | None:
        """Token strings (``vocab[i]`` is the text of token ``i``), or None."""
        return None if self._vocab is None else list(self._vocab)

    @property
    def user_meta(self) -> dict:
        """The metadata given by the writer (model, revision, tokenizer, generation, ...), without the
        derived keys of :attr:`meta` (shapes, checksums, versions); reading it hashes nothing. A copy:
        changing it changes nothing in the cache."""
        return copy.deepcopy(self._user_meta)

    def with_meta(self, meta: dict) -> LayerCache:
        """The same data with the writer's metadata replaced by ``meta`` (JSON-serialisable, as for
        :meth:`from_arrays`; derived keys in it are ignored)."""
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        meta = _meta_iv(meta)
        return LayerCache._trusted(self._table, self._arrays, self._offsets, self._vocab_size, meta, self._vocab)

    @property
    def meta(self) -> dict:
        """Metadata: the user's keys plus shapes, ``format_version``, per-field checksums, ``checksum``.

        The first access hashes every field (see :attr:`checksum`).
        """
        fields = {}
        checksums = self._field_checksums()
        for name, a in self._arrays.items():
            fields[name] = {
                "kind": "array",
                "path": f"{_ARRAY_DIR}/{name}",
                "dtype": a.dtype.name,
                "shape": list(a.shape),
                "checksum": checksums[name],
            }
        fields["sequences"] = {
            "kind": "table",
            "path": _TABLE_FILE,
            "rows": self.n_sequences,
            "checksum": checksums["sequences"],
        }
        if self._vocab is not None:
            fields["vocab"] = {
                "kind": "vocab",
                "path": _VOCAB_FILE,
                "size": len(self._vocab),
                "checksum": checksums["vocab"],
            }
        meta = json.loads(json.dumps(self._user_meta))
        meta.update(
            meta_checksum=_meta_checksum(meta),
            format_version=FORMAT_VERSION,
            library="calm-calibrate",
            library_version=_library_version(),
            n_sequences=self.n_sequences,
            n_tokens=self.n_tokens,
            n_layers=self.n_layers,
            top_k=self.top_k,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            fields=fields,
            checksum=self.checksum,
        )
        return meta

    @property
    def n_sequences(self) -> int:
        """Number of sequences."""
        return int(self._offsets.size - 1)

    @property
    def n_tokens(self) -> int:
        """Total number of generated tokens ``T``."""
        return int(self._offsets[-1])

    @property
    def n_layers(self) -> int:
        """Number of layers ``L``."""
        return int(self._arrays["topk_ids"].shape[1])

    @property
    def top_k(self) -> int:
        """Number of stored predictions per layer ``k``."""
        return int(self._arrays["topk_ids"].shape[2])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the model."""
        return self._vocab_size

    @property
    def hidden_size(self) -> int | None:
        """Hidden size ``d``, or None when the cache stores no hidden states."""
        hidden = self._arrays.get("hidden")
        return None if hidden is None else int(hidden.shape[2])

    @property
    def offsets(self) -> np.ndarray:
        """CSR offsets, int64 (n_sequences + 1,): sequence ``s`` owns tokens ``offsets[s]:offsets[s+1]``."""
        return self._offsets

    @property
    def lengths(self) -> np.ndarray:
        """Generated tokens per sequence, int64 (n_sequences,)."""
        return _readonly(np.diff(self._offsets))

    @property
    def sequence_index(self) -> np.ndarray:
        """Sequence of each token, int64 (n_tokens,)."""
        if self._sequence_index is None:
            index = np.repeat(np.arange(self.n_sequences, dtype=np.int64), np.diff(self._offsets))
            self._sequence_index = _readonly(index)
        return self._sequence_index

    @property
    def positions(self) -> np.ndarray:
        """0-based position of each token inside its sequence, int64 (n_tokens,)."""
        if self._positions is None:
            starts = np.repeat(self._offsets[:-1], np.diff(self._offsets))
            self._positions = _readonly(np.arange(self.n_tokens, dtype=np.int64) - starts)
        return self._positions

    @property
    def checksum(self) -> str:
        """Content checksum (hex blake2b) over every field, the table, the vocab and ``vocab_size``.

        It identifies the data, not the file: the same content saved twice, or opened again, has the
        same checksum; free-form metadata (model name, settings) is not part of it (``meta.json`` records
        a ``meta_checksum`` of its own, verified at open).
        """
        return _cache_checksum(self._vocab_size, self._field_checksums())

    def has(self, name: str) -> bool:
        """Whether the cache stores the field ``name`` (e.g. ``"hidden"`` or ``"softmax_gap"``)."""
        return name in self._arrays

    def __repr__(self) -> str:
        return (
            f"LayerCache(n_sequences={self.n_sequences}, n_tokens={self.n_tokens}, n_layers={self.n_layers}, "
            f"top_k={self.top_k}, vocab_size={self.vocab_size}, fields={sorted(self._arrays)}, "
            f"model={self._user_meta.get('model')!r})"
        )

    # ---- checks ---------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check shapes, dtypes, value ranges and the table against the arrays.

        Raises
        ------
        ValueError
            Naming the field at fault: missing required arrays, shapes that disagree, ids outside
            ``[0, vocab_size)`` or repeated within a top-k, log-probabilities that are NaN, infinite,
            positive or not sorted descending, scores outside their range, a table inconsistent with
            the offsets, or no sequence at all.
        """
        _check_structure(self._arrays, self._offsets, self._vocab_size, self._vocab)
        _check_values(self._arrays, self._vocab_size)
        _check_table(self._table, self._offsets)

    def _field_checksums(self) -> dict[str, str]:
        if self._checksums is None:
            jobs = {name: (_hash_array, a) for name, a in self._arrays.items()}
            jobs["sequences"] = (_hash_table, self._table, self._offsets)
            if self._vocab is not None:
                jobs["vocab"] = (_hash_strings, self._vocab)
            # hashlib releases the GIL on large buffers: hash the fields in parallel.
            with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
                futures = {name: pool.submit(fn, *args) for name, (fn, *args) in jobs.items()}
                self._checksums = {name: f.result() for name, f in futures.items()}
        return dict(self._checksums)

    # ---- derived caches -------------------------------------------------------------------------

    def subset(self, indices) -> LayerCache:
        """The cache restricted to some sequences, in the order given.

        Parameters
        ----------
        indices : array-like of int, or of bool with shape (n_sequences,)
            Sequence indices in ``[0, n_sequences)`` without repeats, or a boolean mask.

        Returns
        -------
        LayerCache
            A new cache; contiguous increasing selections share memory with this one.

        Raises
        ------
        ValueError
            When an index is out of range or repeated, or the selection is empty.
        """
        idx = _subset_iv(indices, self.n_sequences)
        take, offsets = token_rows(self._offsets, idx)
        arrays = {name: a[take] for name, a in self._arrays.items()}
        old = self._table
        table = _make_table(
            ids=old["id"].to_numpy()[idx].tolist(),
            prompts=old["prompt"].to_numpy()[idx].tolist(),
            outputs=old["output"].to_numpy()[idx].tolist(),
            references=[None if pd.isna(r) else r for r in old["reference"].to_numpy()[idx].tolist()],
            full_tokens=arrays["full_tokens"],
            offsets=offsets,
        )
        return LayerCache._trusted(table, arrays, offsets, self._vocab_size, self._user_meta, self._vocab)

    def split(self, fractions: Sequence[float], *, seed: int) -> tuple[LayerCache, ...]:
        """Split by sequence (never by token) into disjoint parts that cover the cache.

        Parameters
        ----------
        fractions : sequence of float
            Positive fractions summing to 1, one per part, e.g. ``[0.5, 0.5]``.
        seed : int
            Seed of the permutation (``numpy.random.default_rng(seed).permutation``); the same seed
            gives the same split.

        Returns
        -------
        tuple of LayerCache
            One cache per fraction. Part ``j`` takes the sequences at permuted positions
            ``round(n * sum(fractions[:j]))`` to ``round(n * sum(fractions[:j+1]))``, kept in their
            original order.

        Raises
        ------
        ValueError
            When the fractions are not positive, do not sum to 1, or leave a part without sequences.

        Notes
        -----
        Calibration data must be exchangeable with deployment data and disjoint from the data used
        to choose or train the confidence measure; split before fitting anything.

        Examples
        --------
        >>> from calibrate.synthetic import synthetic_cache
        >>> cache = synthetic_cache(10, n_layers=4, store_hidden=False, seed=0)
        >>> train, cal = cache.split([0.3, 0.7], seed=1)
        >>> train.n_sequences, cal.n_sequences
        (3, 7)
        >>> sorted(set(train.sequences["id"]) | set(cal.sequences["id"])) == sorted(cache.sequences["id"])
        True
        """
        return tuple(self.subset(part) for part in split_indices(self.n_sequences, fractions, seed=seed))

    def decode(self, ids) -> str:
        """Join the vocab pieces of ``ids``: ``"".join(vocab[i] for i in ids)``.

        Raises
        ------
        ValueError
            When the cache has no vocab or an id is outside ``[0, vocab_size)``.
        """
        if self._vocab is None:
            raise ValueError(
                "this cache has no vocab: pass vocab= to LayerCache.from_arrays, or decode with the "
                "model's tokenizer"
            )
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        ids = ids.ravel()
        if ids.min() < 0 or ids.max() >= self._vocab_size:
            raise ValueError(f"ids must lie in [0, vocab_size={self._vocab_size}), got {ids.min()}..{ids.max()}")
        if self._vocab_array is None:
            self._vocab_array = np.array(self._vocab, dtype=object)
        return "".join(self._vocab_array[ids])

    # ---- writing --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path | Remote:
        """Write the cache to a directory, atomically.

        Everything is written into a temporary directory beside ``path`` and renamed into place at
        the end; on any failure the temporary directory is removed and an existing cache at ``path``
        is left untouched (on object storage, up to the final server-side copy: see Notes).

        Parameters
        ----------
        path : str or os.PathLike
            Target directory (its parent directories are created), or an fsspec URL
            (``memory://...``, ``s3://...`` with its fsspec package installed).
        overwrite : bool, default=False
            Replace an existing cache at ``path``. Only a cache directory (this library's ``meta.json``
            and files, and hidden files such as ``.DS_Store``) or an empty directory is ever replaced.

        Returns
        -------
        pathlib.Path or calibrate._storage.Remote
            The target directory (``str()`` of a remote one is its URL).

        Raises
        ------
        FileExistsError
            When ``path`` exists and ``overwrite`` is False.
        ValueError
            When ``overwrite`` is True but ``path`` is not a cache directory (refusing to delete it).
        OSError
            When writing or uploading fails.

        Notes
        -----
        Replacing an existing cache renames it aside, renames the new one into place and then deletes
        the old one, so ``path`` is missing for the moment between the two renames (a crash there leaves the
        old cache at ``.<name>.old-<hex>`` beside it, which :func:`open_cache` names). Every file is flushed
        to the disk (fsync) before the rename: the write is atomic with respect to errors in this process and
        to power loss.
        Object storage has no rename: the cache is written locally, then uploaded with ``meta.json``
        last, so an interrupted upload reads as an incomplete cache, never as a valid one. To replace a
        cache, the new one is first uploaded beside it (to ``.<name>.<random>.tmp``; a failed upload is
        removed and the old cache left untouched); then the old one is deleted, ``meta.json`` first, and
        the new one copied into place server-side, ``meta.json`` last. Should that copy fail, ``path``
        holds an incomplete cache and the OSError names the temporary directory holding the new one.
        """
        target = _save_iv(path, overwrite)
        meta = self.meta  # hashes every field (cached on the object)
        if isinstance(target, Remote):
            with tempfile.TemporaryDirectory(prefix="calibrate-upload-") as tmp:
                self._write_files(Path(tmp), meta)
                _commit_remote(Path(tmp), target)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_dir(target)
        try:
            self._write_files(tmp, meta)
            _commit(tmp, target, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _write_files(self, where: Path, meta: dict) -> None:
        for name, a in self._arrays.items():
            _write_array(where / _ARRAY_DIR / name, name, a)
        _write_table(where / _TABLE_FILE, self._table, self._offsets, self._arrays["full_tokens"])
        if self._vocab is not None:
            (where / _VOCAB_FILE).write_text(json.dumps(list(self._vocab), ensure_ascii=True), encoding="ascii")
        (where / _META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=True) + "\n", encoding="ascii")


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
    ValueError: caches[1] differs from caches[0] in 'model': 'gpt2' != 'synthetic' (another model or settings?); pass meta= to join them anyway
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
    return LayerCache.from_arrays(
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


# --------------------------------------------------------------------------------------------------
# Opening a cache
# --------------------------------------------------------------------------------------------------


def open_cache(path: str | os.PathLike, *, verify: bool = True, chunks: int | None = None):
    """Read a cache written by :meth:`LayerCache.save` into memory and check it, or open it lazily.

    Parameters
    ----------
    path : str or os.PathLike
        The cache directory, or an fsspec URL (``file://``, ``memory://``; ``s3://``, ``gs://`` with their
        fsspec packages installed).
    verify : bool, default=True
        Recompute the blake2b checksum of every field and compare it with ``meta.json`` (with ``chunks``:
        of every array, streamed chunk by chunk), and that of ``meta.json``'s own metadata (model,
        generation settings, ...). Shapes, dtypes, value ranges and the table are checked
        either way (with ``chunks``: values as each partition is read). In memory the cache's
        ``checksum`` is always recomputed; lazily without ``verify`` it is the one ``meta.json`` records,
        unchecked, and so is the ``cache_checksum`` of a certificate fitted on it.
    chunks : int, optional
        Open lazily in partitions of this many whole sequences (:class:`calibrate.chunked.ChunkedCache`:
        nothing per-token is loaded; :func:`calibrate.fit` then runs per partition on Dask).

    Returns
    -------
    LayerCache or ChunkedCache
        The cache with numpy arrays in memory, or the lazily opened one when ``chunks`` is given.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist (it names the ``.<name>.old-<hex>`` cache an interrupted overwrite left).
    ImportError
        With ``chunks``, when Dask (the ``[dask]`` extra) is not installed.
    ValueError
        When the cache is incomplete or corrupted. The message names the file or field: a missing
        ``meta.json``/``sequences.parquet``/array, an unsupported ``format_version``, a wrong dtype or
        shape, missing or unreadable chunks, ``"checksum mismatch in array 'topk_ids'"``, NaN or
        out-of-range values, or offsets inconsistent with the arrays. Also when another cache was saved
        over ``path`` while it was read (open it again).

    Notes
    -----
    Without ``chunks`` the whole cache is loaded into memory. Each array is a standalone zarr v3 array
    (``<path>/arrays/<name>``); ``chunks=n`` reads them lazily, ``n`` sequences at a time, and
    :meth:`calibrate.chunked.ChunkedCache.arrays` gives them as ``dask.array`` objects.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from calibrate.cache import open_cache
    >>> from calibrate.synthetic import synthetic_cache
    >>> cache = synthetic_cache(20, n_layers=4, seed=0)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = cache.save(pathlib.Path(d) / "cache")
    ...     again = open_cache(path)
    >>> again.checksum == cache.checksum
    True
    """
    root = _open_cache_iv(path, verify)
    from calibrate.shards import is_sharded, open_sharded

    if is_sharded(root):
        return open_sharded(root, verify=verify, chunks=chunks)
    if chunks is not None:
        from calibrate.chunked import open_chunked

        return open_chunked(root, chunks, verify)
    before = _identity(root)
    replaced = f"{root} was replaced (saved again with overwrite=True) while it was being read: open it again"
    try:
        cache = _open_in_memory(root, verify)
    except (ValueError, OSError) as exc:
        if _identity(root) != before:  # its files came from two caches: the old one and its replacement
            raise ValueError(replaced) from exc
        raise
    if _identity(root) != before:  # unverified, a mix of the two could pass
        raise ValueError(replaced)
    return cache


def _identity(root) -> bytes | None:
    """Which cache ``root`` holds now: its ``meta.json``, which records every field's checksum (a save with
    ``overwrite`` renames another cache into place; inode numbers are reused, and unstable on some mounts)."""
    try:
        return (root / _META_FILE).read_bytes() if isinstance(root, Path) else None
    except OSError:
        return None


def _open_checked(
    root: Path | Remote,
) -> tuple[dict, dict, np.ndarray, pd.DataFrame, np.ndarray, list[str] | None, int]:
    """The unsharded cache at ``root``, its structure checked before any array but ``full_tokens`` is read.

    Returns ``meta.json``, every array opened (zarr arrays: dtype, shape and chunk files checked, values
    unread), the values of ``full_tokens``, the sequence table, the offsets, the vocab and ``vocab_size``.
    A shape that disagrees with the others is refused before gigabytes of the rest are decompressed.
    """
    meta = _read_meta(root)
    fields = meta["fields"]
    for name in ("full_tokens", "topk_ids"):
        if name not in fields or fields[name].get("kind") != "array":
            raise ValueError(f"{root / _META_FILE}: required array {name!r} is not listed in 'fields'")
    stored = {name: _open_array(root, name, spec) for name, spec in fields.items() if spec.get("kind") == "array"}
    full_tokens = _read_array(root, "full_tokens", stored["full_tokens"])
    table, offsets = _read_table(root, fields.get("sequences"), full_tokens)
    vocab = _read_vocab(root, fields.get("vocab"))
    vocab_size = _check_meta(root, meta, stored, offsets, vocab)
    return meta, stored, full_tokens, table, offsets, vocab, vocab_size


def _open_in_memory(root, verify: bool):
    """:func:`open_cache` of an unsharded cache into memory."""
    meta, stored, full_tokens, table, offsets, vocab, vocab_size = _open_checked(root)
    fields = meta["fields"]
    arrays = {name: full_tokens if name == "full_tokens" else _read_array(root, name, z) for name, z in stored.items()}
    cache = LayerCache._trusted(table, arrays, offsets, vocab_size, meta, vocab)
    if verify:
        computed = cache._field_checksums()
        for name, spec in fields.items():
            if computed.get(name) != spec.get("checksum"):
                raise ValueError(
                    f"checksum mismatch in {spec['kind']} {name!r} ({root / spec['path']}): the cache was modified "
                    "or corrupted after it was written"
                )
        if cache.checksum != meta.get("checksum"):
            raise ValueError(f"checksum mismatch in {root / _META_FILE}: the field list or vocab_size was edited")
        _check_meta_checksum(root, meta)
    _check_values(arrays, vocab_size)
    _check_table(table, offsets)
    return cache


# --------------------------------------------------------------------------------------------------
# Input validation helpers
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
        return json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"meta must be JSON-serialisable (str keys; str, finite number, bool, None, list, dict values): {exc}"
        ) from exc


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


def _from_arrays(
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
) -> LayerCache:
    """Validate and normalise the inputs of ``from_arrays``; ``copy=False`` lets the cache own them."""
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
        if offs[-1] != n_tokens:
            raise ValueError(f"lengths must sum to n_tokens={n_tokens} (rows of full_tokens), got {offs[-1]}")
    else:
        offs = _int_array("offsets", offsets, 1, "(n_sequences + 1,)").astype(np.int64)
        if offs.size < 1 or offs[0] != 0 or offs[-1] != n_tokens:
            raise ValueError(
                f"offsets must start at 0 and end at n_tokens={n_tokens}, got "
                f"{offs[:1].tolist()}...{offs[-1:].tolist()}"
            )
        if np.any(np.diff(offs) < 1):
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
    cache = LayerCache._trusted(table, arrays, offs, vocab_size, user_meta, vocab)
    cache.validate()
    return cache


#: The text columns of a sequences table, in :func:`_make_table`'s order.
_TEXT_COLUMNS = ("id", "prompt", "output", "reference")


def _unpickle(cls, ids, prompts, outputs, references, arrays, offsets, vocab_size, meta, vocab, checksums):
    """What :meth:`LayerCache.__reduce__` pickles, rebuilt as :meth:`LayerCache._trusted` builds a cache (read-only
    again, so the checksums computed before, if any, still describe it)."""
    table = _make_table(ids, prompts, outputs, references, arrays["full_tokens"], offsets)
    cache = cls._trusted(table, arrays, offsets, vocab_size, meta, vocab)
    cache._checksums = checksums
    return cache


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
        raise ValueError(f"{root / _VOCAB_FILE} holds {len(vocab)} entries but {_META_FILE} says vocab_size={vocab_size}")
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
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 1):
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
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        bad = _first(np.flatnonzero(~np.isfinite(a).ravel()), a.shape)
        raise ValueError(f"array {name!r} must be finite, got {a[bad]} at index {bad}")


def _check_values(arrays, vocab_size: int) -> None:
    """Value ranges: ids in the vocabulary and distinct, log-probs finite/<= 0/sorted, scores in range."""
    for name in ("full_tokens", "topk_ids"):
        a = arrays[name]
        if a.min() < 0 or a.max() >= vocab_size:
            bad = _first(np.flatnonzero(((a < 0) | (a >= vocab_size)).ravel()), a.shape)
            raise ValueError(f"array {name!r} must lie in [0, vocab_size={vocab_size}), got {a[bad]} at index {bad}")
    top = arrays["topk_ids"]
    if top.shape[2] > 1:
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
        if lp.shape[2] > 1:
            for lo, hi in _blocks(lp.shape[0]):
                rising = np.any(lp[lo:hi, :, 1:] > lp[lo:hi, :, :-1], axis=-1)
                if rising.any():
                    t, i = _first(np.flatnonzero(rising), rising.shape)
                    raise ValueError(
                        f"array 'topk_logprobs' must be sorted descending along top_k, got "
                        f"{lp[lo + t, i].tolist()} at token {lo + t}, layer index {i}"
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


def split_indices(n: int, fractions: Sequence[float], *, seed: int) -> tuple[np.ndarray, ...]:
    """The sequence indices of :meth:`LayerCache.split`'s parts: one sorted int64 array per fraction.

    Part ``j`` holds the positions ``round(n * sum(fractions[:j]))`` to ``round(n * sum(fractions[:j+1]))``
    of ``numpy.random.default_rng(seed).permutation(n)``, sorted. In-memory and chunked caches split
    through this one function, so the same seed gives the same sequences.

    Raises
    ------
    ValueError
        When the fractions are not positive, do not sum to 1, or leave a part without sequences.
    """
    fractions, seed = _split_iv(fractions, seed)
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.rint(np.cumsum(fractions) * n).astype(np.int64)
    cuts[-1] = n
    parts = np.split(perm, cuts[:-1])
    for j, part in enumerate(parts):
        if part.size == 0:
            raise ValueError(
                f"split: part {j} of fractions={fractions.tolist()} gets no sequence out of "
                f"n_sequences={n}; use fewer or larger fractions"
            )
    return tuple(np.sort(part) for part in parts)


def token_rows(offsets: np.ndarray, idx: np.ndarray) -> tuple[slice | np.ndarray, np.ndarray]:
    """``(rows, new_offsets)``: the token rows of sequences ``idx`` (in that order) and their offsets.

    ``rows`` is a slice when the selection is contiguous and increasing (arrays indexed by it stay views).
    """
    lengths = np.diff(offsets)[idx]
    new = np.zeros(idx.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    lo = int(offsets[idx[0]])
    if np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return slice(lo, lo + int(new[-1])), new
    return np.repeat(offsets[idx] - new[:-1], lengths) + np.arange(new[-1]), new


def _in_memory_iv(cache, name: str) -> LayerCache:
    """``cache`` if it is a :class:`LayerCache`; TypeError naming ``name`` (with the way from a chunked one)."""
    if not isinstance(cache, LayerCache):
        raise TypeError(
            f"{name} must be a calibrate.LayerCache in memory, got {type(cache).__name__} (read the sequences "
            "of a chunked cache with cache.take(indices), or open it with open_cache(path))"
        )
    return cache


def _subset_iv(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"a boolean mask must have shape (n_sequences,) = ({n},), got {idx.shape}")
        idx = np.flatnonzero(idx)
    elif idx.size == 0 and idx.dtype.kind == "f":
        idx = idx.astype(np.int64)
    elif idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
    idx = idx.astype(np.int64).ravel()
    if idx.size == 0:
        raise ValueError("indices select no sequence; a cache needs at least one")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices must lie in [0, n_sequences={n}), got {idx.min()}..{idx.max()}")
    if np.unique(idx).size != idx.size:
        raise ValueError("indices must not repeat a sequence (sequence ids must stay unique)")
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


def _save_iv(path, overwrite) -> Path | Remote:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    if not os.fspath(path):
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
                f"refusing to overwrite {target}: it is not a layer cache directory (a {_META_FILE} of "
                f"calm-calibrate beside {_TABLE_FILE}, {_VOCAB_FILE} and {_ARRAY_DIR}/, nothing else) nor empty"
            )
    return target


def _replaceable(target: Path | Remote) -> bool:
    """An empty directory, or a cache directory: what :meth:`LayerCache.save` writes and hidden files
    (``.DS_Store``), with a ``meta.json`` of this library (or a damaged one). Never a symlink, nor another
    tool's directory that happens to hold a ``meta.json``."""
    if isinstance(target, Remote):
        if not target.is_dir():
            return False
        entries = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["type"] for entry in target.fs.ls(target.path)}
    elif not target.is_dir() or target.is_symlink():
        return False
    else:
        entries = {entry.name: "directory" if entry.is_dir() else "file" for entry in target.iterdir()}
    names = {name for name, kind in entries.items() if not (name.startswith(".") and kind == "file")}
    if not entries:
        return True
    if _META_FILE not in names or not names <= {_META_FILE, _TABLE_FILE, _VOCAB_FILE, _ARRAY_DIR}:
        return False
    try:
        meta = _load_json(target / _META_FILE, "utf-8")
    except (OSError, ValueError):  # _load_json turns a UnicodeDecodeError into a ValueError
        return True  # our file names, a meta.json cut short (a crash while it was written): a cache
    return isinstance(meta, dict) and meta.get("library") == "calm-calibrate"


def _open_cache_iv(path, verify) -> Path | Remote:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
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
        os.rename(tmp, target)
    elif not overwrite:  # appeared while we were writing
        raise _exists_error(target)
    else:
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
    sync_dir(target.parent)
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
    target.remove(first=_META_FILE)
    try:
        staged.copy_to(target, last=_META_FILE)
    except Exception as exc:
        raise OSError(
            f"the old cache at {target} was deleted but copying the new one into place failed; the new cache "
            f"is complete at {staged}: {type(exc).__name__}: {exc}"
        ) from exc
    staged.remove(first=_META_FILE)


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
    consecutive = np.array_equal(np.diff(offsets), lengths)
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
