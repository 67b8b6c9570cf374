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
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from calibrate._atomic import naming, temporary_dir
from calibrate._cache_checks import (
    _check_meta,
    _check_structure,
    _check_table,
    _check_values,
    _from_arrays_iv,
    _init_iv,
    _meta_iv,
    _split_iv,
    _subset_iv,
    _text_iv,
)
from calibrate._cache_files import (
    _ARRAY_DIR,
    _DERIVED_KEYS,
    _META_FILE,
    _TABLE_COLUMNS,
    _TABLE_FILE,
    _TEXT_COLUMNS,
    _VOCAB_FILE,
    FORMAT_VERSION,
    _cache_checksum,
    _check_meta_checksum,
    _commit,
    _commit_remote,
    _hash_array,
    _hash_strings,
    _hash_table,
    _library_version,
    _make_table,
    _meta_checksum,
    _open_array,
    _open_cache_iv,
    _read_array,
    _read_meta,
    _read_table,
    _read_vocab,
    _readonly,
    _save_iv,
    _write_array,
    _write_table,
)
from calibrate._storage import Remote
from calibrate._validation import caller_stacklevel
from measures.confidence import _saturation_layer1_iv

if TYPE_CHECKING:
    from calibrate.chunked import ChunkedCache

__all__ = ["FORMAT_VERSION", "LayerCache", "open_cache"]



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
        full_tokens: ArrayLike,
        topk_ids: ArrayLike,
        topk_logprobs: ArrayLike | None = None,
        lengths: ArrayLike | None = None,
        offsets: ArrayLike | None = None,
        scores: Mapping[str, ArrayLike] | None = None,
        hidden: ArrayLike | None = None,
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
            Full-model token at each generated position, sequences concatenated: the greedy token, the last
            layer's top-1 except where the generation config processes logits.
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
            lowercase identifiers other than the fixed fields. Stored as float32: a certificate is for the
            rule ``float32(score) >= lambda`` (``float32(0.9) < 0.9``: compare in float32 when deploying a
            score of your own). A built-in name (``softmax_gap``, ``softmax_max``, ``entropy``,
            ``state_saturation``) must hold that measure of the same model: the runtime recomputes it.
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
            the message names the parameter. When a stored ``state_saturation`` score is not 0 at layer 1.

        Warns
        -----
        UserWarning
            When the last layer's top-1 differs from ``full_tokens`` at more than 5% of tokens (the layer axis
            reversed or shifted by ``hidden_states[0]``, another head's top-k).

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
        cache = _from_arrays(
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
        if "state_saturation" in cache.arrays:  # refused for new caches; saved ones open, and refuse it when used
            _saturation_layer1_iv(cache.arrays["state_saturation"])
        _last_layer_warning(cache)
        return cache

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

    def subset(self, indices: ArrayLike) -> LayerCache:
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
        take, offsets = _token_rows(self._offsets, idx)
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
        return tuple(self.subset(part) for part in _split_indices(self.n_sequences, fractions, seed=seed))

    def decode(self, ids: ArrayLike) -> str:
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
        is left untouched (on object storage, up to the final server-side copy: see Notes), except a failure
        to flush the directory once the new cache is in place, whose OSError says so.

        Parameters
        ----------
        path : str or os.PathLike
            Target directory (its parent directories are created), or an fsspec URL
            (``memory://...``, ``s3://...`` with its fsspec package installed), or what ``save`` returned.
        overwrite : bool, default=False
            Replace an existing cache at ``path``. Only a cache directory (this library's ``meta.json``
            and files, and hidden files such as ``.DS_Store``; or a sharded cache's manifest and shards) or an
            empty directory is ever replaced.

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
            When writing or uploading fails (naming ``path``).

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
                try:
                    self._write_files(Path(tmp), meta)
                except OSError as exc:  # the local disk (TMPDIR) is full: named as such
                    raise naming(exc, tmp, f", the local copy of {target} to upload (TMPDIR)") from exc
                try:
                    _commit_remote(Path(tmp), target)
                except OSError as exc:  # a failed upload: named
                    raise naming(exc, target) from exc
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_dir(target)
        try:
            self._write_files(tmp, meta)
            _commit(tmp, target, overwrite)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise naming(exc, target) from exc
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


# --------------------------------------------------------------------------------------------------
# Opening a cache
# --------------------------------------------------------------------------------------------------


def open_cache(path: str | os.PathLike, *, verify: bool = True, chunks: int | None = None) -> LayerCache | ChunkedCache:
    """Read a cache written by :meth:`LayerCache.save` into memory and check it, or open it lazily.

    Parameters
    ----------
    path : str or os.PathLike
        The cache directory, or an fsspec URL (``file://``, ``memory://``; ``s3://``, ``gs://`` with their
        fsspec packages installed), or what :meth:`LayerCache.save` returned (or ``ChunkedCache.path`` holds).
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
        from calibrate.chunked import _open_chunked

        return _open_chunked(root, chunks, verify)
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
    ``overwrite`` renames another cache into place, or at a URL replaces its files, ``meta.json`` last; inode
    numbers are reused, and unstable on some mounts). None when it cannot be read."""
    try:
        meta = root / _META_FILE
        return meta.read_bytes() if isinstance(meta, Path) else meta.read_text("utf-8").encode()
    except (OSError, ValueError):  # ValueError: not UTF-8 (UnicodeDecodeError)
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


def _unpickle(cls, ids, prompts, outputs, references, arrays, offsets, vocab_size, meta, vocab, checksums):
    """What :meth:`LayerCache.__reduce__` pickles, rebuilt as :meth:`LayerCache._trusted` builds a cache (read-only
    again, so the checksums computed before, if any, still describe it)."""
    table = _make_table(ids, prompts, outputs, references, arrays["full_tokens"], offsets)
    cache = cls._trusted(table, arrays, offsets, vocab_size, meta, vocab)
    cache._checksums = checksums
    return cache


def _split_indices(n: int, fractions: Sequence[float], *, seed: int) -> tuple[np.ndarray, ...]:
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


def _token_rows(offsets: np.ndarray, idx: np.ndarray) -> tuple[slice | np.ndarray, np.ndarray]:
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


#: Share of tokens whose last layer's top-1 may differ from ``full_tokens`` before :meth:`LayerCache.from_arrays`
#: warns: a generation config that processes logits (repetition_penalty) changes a few greedy choices.
_LAST_LAYER_DISAGREEMENT = 0.05


def _last_layer_warning(cache: LayerCache) -> None:
    """Warn when the last layer's top-1 differs from ``full_tokens`` at many tokens: the arrays' layer axis is
    likely not the model's layers in order (every early-exit loss would be measured against the wrong layer)."""
    share = float(np.mean(cache.arrays["topk_ids"][:, -1, 0] != cache.arrays["full_tokens"]))
    if share > _LAST_LAYER_DISAGREEMENT:
        warnings.warn(
            f"the last layer's top-1 differs from full_tokens at {100 * share:.1f}% of tokens: full_tokens should be "
            "the greedy output, the last layer's argmax. Is the layer axis reversed, or shifted by the embedding "
            "entry (hidden_states[0])? Are the top-k of another head? (A generation config that processes logits, "
            "e.g. repetition_penalty, explains a few.) Losses count the last layer as full_tokens",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def _from_arrays(**kwargs) -> LayerCache:
    """:meth:`LayerCache.from_arrays`, also with ``copy=False`` (the cache then owns the arrays)."""
    cache = LayerCache._trusted(*_from_arrays_iv(**kwargs))
    cache.validate()
    return cache
