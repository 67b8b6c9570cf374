"""Caches read lazily in partitions of whole sequences, and proxy-mode loss tables computed on Dask.

``calibrate.open_cache(path, chunks=n)`` returns a :class:`ChunkedCache`: only ``meta.json``, the
sequence table, the offsets and the output token ids (``full_tokens``, to check the table) are read; the
per-layer arrays stay on disk. Its partitions hold ``n``
sequences each (the exit simulation and the losses are per sequence, so a partition boundary never cuts a
sequence). :meth:`ChunkedCache.loss_table` computes one task per partition, each reading its slices of
the zarr arrays it needs (the tokens and the measure, not the hidden states; every array for a learned
measure) into an in-memory
:class:`~calibrate.LayerCache` and running the same code as the in-memory path; only the ``n x K`` losses (and
per-partition exit-layer sums) come back. With a
``dask.distributed.Client`` the tasks run on its workers (retried on failure); without one, one after
another in this process (each task's exit simulation is itself parallel; run workers with one thread
each, as the compiled kernels use every core they are given). :func:`calibrate.fit` accepts a ``ChunkedCache``
(and ``client=``) and returns
the same certificate, field for field, as on the same cache in memory; a learned measure trains on the
client (:meth:`ChunkedCache.take` reads its training split) and travels to the tasks as its JSON state.

Needs the ``[dask]`` extra (``dask``, ``distributed``) for the Dask parts; opening a cache does not.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from calibrate._extras import require
from calibrate._storage import Remote, zarr_store
from calibrate._validation import int_at_least
from measures.learned import LEARNED_MEASURES

if TYPE_CHECKING:
    from dask.distributed import Client

    from calibrate.cache import LayerCache
    from calibrate.exits import Decay
    from calibrate.losses import LossTable

__all__ = ["ChunkedCache"]


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class ChunkedCache:
    """A saved cache opened lazily, in partitions of ``chunks`` whole sequences.

    Two opens of a cache are different objects: they compare (and hash) by identity, as
    :class:`~calibrate.LayerCache` does.

    Attributes
    ----------
    path : Path or calibrate._storage.Remote
        The cache directory (``str()`` of a remote one is its fsspec URL).
    chunks : int
        Sequences per partition.
    meta : dict
        ``meta.json``.
    sequences : pandas.DataFrame
        The sequence table (one row per sequence).
    offsets : ndarray of int64, shape (n_sequences + 1,)
        Token offsets of the sequences.
    sources : tuple of (Path or Remote, int, str)
        The cache directories holding the arrays, the first sequence of each and the checksum its
        ``meta.json`` recorded when opened: one for a plain cache, one per shard for a sharded one
        (:mod:`calibrate.shards`). Partitions never cross them; reading one refuses a directory saved over
        since (another checksum).
    """

    path: Path | Remote
    chunks: int
    _meta: dict
    _table: pd.DataFrame
    _offsets: np.ndarray
    sources: tuple[tuple[Path | Remote, int, str], ...]
    #: Checksum of ``vocab.json`` as read when opened, where it may differ from the one ``meta.json`` records
    #: (opened with ``verify=False``, which accepts it as the in-memory open does); None: the recorded one.
    _vocab_checksum: str | None = None

    def __post_init__(self) -> None:
        offsets = np.array(self._offsets, dtype=np.int64)  # its own read-only copy, as LayerCache's
        offsets.flags.writeable = False
        object.__setattr__(self, "_offsets", offsets)

    @property
    def meta(self) -> dict:
        """``meta.json`` (a copy: changing it changes nothing in the cache)."""
        return copy.deepcopy(self._meta)

    @property
    def sequences(self) -> pd.DataFrame:
        """The sequence table, one row per sequence (a copy: changing it changes nothing in the cache)."""
        return self._table.copy()  # deep: pandas 2 without copy-on-write shares a shallow copy's columns

    @property
    def offsets(self) -> np.ndarray:
        """Token offsets of the sequences, int64 ``(n_sequences + 1,)``, read-only."""
        return self._offsets

    # ---- sizes ------------------------------------------------------------------------------------------
    @property
    def n_sequences(self) -> int:
        """Number of sequences."""
        return len(self._offsets) - 1

    @property
    def n_tokens(self) -> int:
        """Number of generated tokens, all sequences together."""
        return int(self._offsets[-1])

    @property
    def n_layers(self) -> int:
        """Number of layers ``L`` (the last is the full model)."""
        return int(self._meta["fields"]["topk_ids"]["shape"][1])

    @property
    def top_k(self) -> int:
        """Number of stored predictions per layer ``k``."""
        return int(self._meta["fields"]["topk_ids"]["shape"][2])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the model."""
        return int(self._meta["vocab_size"])

    def has(self, name: str) -> bool:
        """Whether the cache stores the array ``name`` (e.g. ``"hidden"`` or ``"softmax_gap"``)."""
        return name in self._array_specs()

    @property
    def checksum(self) -> str:
        """The checksum recorded when the cache was written (verified at open with ``verify=True``)."""
        return self._meta["checksum"]

    @property
    def user_meta(self) -> dict:
        """The writer's metadata (model, generation, ...), as :attr:`calibrate.LayerCache.user_meta`."""
        from calibrate._cache_files import _DERIVED_KEYS

        return {k: copy.deepcopy(v) for k, v in self._meta.items() if k not in _DERIVED_KEYS}

    @property
    def partitions(self) -> list[tuple[int, int]]:
        """``(first, stop)`` sequence ranges of the partitions, in order (none crosses a shard)."""
        return [p for _, first, end, _ in self._spans() for p in _ranges(first, end, self.chunks)]

    def _spans(self) -> list[tuple[Path | Remote, int, int, str]]:
        """``(directory, first, stop, checksum)`` of each source: its sequence range and recorded checksum."""
        ends = [first for _, first, _ in self.sources[1:]] + [self.n_sequences]
        return [(root, first, end, checksum) for (root, first, checksum), end in zip(self.sources, ends)]

    def __repr__(self) -> str:
        return (
            f"ChunkedCache({str(self.path)!r}, sequences={self.n_sequences}, tokens={self.n_tokens}, "
            f"layers={self.n_layers}, partitions={len(self.partitions)} of {self.chunks} sequences)"
        )

    # ---- reading ----------------------------------------------------------------------------------------
    def arrays(self) -> dict:
        """Every per-token array as a ``dask.array`` over the zarr store, one chunk per partition.

        Each chunk is read as :meth:`load` reads it (by the same function, when computed): checked against
        ``meta.json``, its values checked (ids in the vocabulary, scores in range; a missing chunk file is
        named where the fill values zarr reads for it fail these checks) and refused when the cache was saved
        over since it was opened. Computing a chunk raises the ValueError :meth:`load` raises for it.
        """
        import dask
        import dask.array as da

        from calibrate._cache_files import _field_dtype

        specs, vocab_size = self._array_specs(), int(self._meta["vocab_size"])
        parts: dict[str, list] = {name: [] for name in specs}
        for root, first, end, checksum in self._spans():
            _unchanged(root, checksum)
            base = int(self._offsets[first])
            for name, spec in specs.items():
                for a, b in _ranges(first, end, self.chunks):
                    lo, hi = int(self._offsets[a]) - base, int(self._offsets[b]) - base
                    read = dask.delayed(_read_part, pure=True)(root, {name: spec}, a, b, lo, hi, checksum, vocab_size)
                    block = read[name]
                    shape = (hi - lo, *spec["shape"][1:])
                    parts[name].append(da.from_delayed(block, shape=shape, dtype=_field_dtype(name)))
        return {name: p[0] if len(p) == 1 else da.concatenate(p) for name, p in parts.items()}

    def load(self, first: int, stop: int) -> LayerCache:
        """Sequences ``[first, stop)`` as an in-memory :class:`~calibrate.LayerCache` (values checked)."""
        return self._load(first, stop, self._table.iloc[first:stop], tuple(self._array_specs()), vocab=self._vocab())

    def take(self, indices: ArrayLike) -> LayerCache:
        """Some sequences, in increasing order, as one in-memory :class:`~calibrate.LayerCache`.

        The partitions holding some of them are read one after another into arrays of the selection's
        size, so memory holds one partition plus the selection (e.g. a learned measure's training split).

        Parameters
        ----------
        indices : array-like of int
            Sequence indices in ``[0, n_sequences)`` without repeats (sorted here).

        Returns
        -------
        LayerCache
            Equal to ``open_cache(path).subset(sorted(indices))``.
        """
        from calibrate._cache_checks import _subset_iv
        from calibrate._cache_files import _field_dtype, _make_table
        from calibrate.cache import LayerCache

        idx = np.sort(_subset_iv(indices, self.n_sequences))
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(np.diff(self._offsets)[idx], out=offsets[1:])
        specs = self._array_specs()
        arrays = {
            name: np.empty((int(offsets[-1]), *spec["shape"][1:]), dtype=_field_dtype(name))
            for name, spec in specs.items()
        }
        done = 0
        for first, stop in self.partitions:
            keep = idx[(idx >= first) & (idx < stop)] - first
            if keep.size:
                part = self._load(first, stop, self._table.iloc[first:stop].iloc[keep], tuple(specs), keep)
                for name, a in part.arrays.items():
                    arrays[name][done : done + a.shape[0]] = a
                done += part.n_tokens
        old = self._table.iloc[idx]
        table = _make_table(
            ids=old["id"].tolist(),
            prompts=old["prompt"].tolist(),
            outputs=old["output"].tolist(),
            references=[None if pd.isna(r) else r for r in old["reference"].tolist()],
            full_tokens=arrays["full_tokens"],
            offsets=offsets,
        )
        return LayerCache._trusted(table, arrays, offsets, int(self._meta["vocab_size"]), self._meta, self._vocab())

    def split(self, fractions: Sequence[float], *, seed: int) -> tuple[LayerCache, ...]:
        """Split by sequence as :meth:`LayerCache.split <calibrate.LayerCache.split>` does (the same parts for the
        same seed), each part read into memory with :meth:`take`.

        For parts that fit in memory (a calibration and a held-out split for :func:`calibrate.audit`); a cache
        too big for that is better extracted as separate calibration and test caches.

        Parameters
        ----------
        fractions : sequence of float
            Positive fractions summing to 1, one per part.
        seed : int
            Seed of the permutation.

        Returns
        -------
        tuple of LayerCache
            Equal to ``open_cache(path).split(fractions, seed=seed)``.
        """
        from calibrate.cache import _split_indices

        return tuple(self.take(part) for part in _split_indices(self.n_sequences, fractions, seed=seed))

    def _load(self, first: int, stop: int, table: pd.DataFrame, fields: tuple[str, ...], keep=None, *, vocab=None):
        """:meth:`load` of some arrays only, with the sequences' rows of the table given (a task gets its rows).

        ``keep``: the sequences to keep, as sorted indices from ``first`` (``table`` holds only their rows).
        ``vocab``: the part's vocab (:meth:`_vocab`, read once by the caller: reading and hashing it per part cost
        more than a token loss), or None where it is not used.
        """
        from calibrate.cache import LayerCache, _token_rows

        if not 0 <= first < stop <= self.n_sequences:
            raise ValueError(f"sequence range [{first}, {stop}) is outside [0, {self.n_sequences})")
        root, start, end, checksum = next(span for span in self._spans() if span[1] <= first < span[2])
        if stop > end:
            raise ValueError(
                f"sequence range [{first}, {stop}) crosses the end of a shard at {end}; load the parts apart"
            )
        lo, hi = int(self._offsets[first]), int(self._offsets[stop])
        base = int(self._offsets[start])  # token offset of the shard's first sequence
        specs = {name: self._array_specs()[name] for name in fields}
        offsets = self._offsets[first : stop + 1] - lo
        rows = None
        if keep is not None:
            rows, offsets = _token_rows(offsets, np.asarray(keep, dtype=np.int64))
        vocab_size = int(self._meta["vocab_size"])
        arrays = _read_part(root, specs, first, stop, lo - base, hi - base, checksum, vocab_size, rows)
        table = table.reset_index(drop=True)
        table["offset"] = offsets[:-1]  # the part's own token offsets, as its arrays are sliced
        return LayerCache._trusted(table, arrays, offsets, int(self._meta["vocab_size"]), self._meta, vocab)

    def _array_specs(self) -> dict:
        return {name: spec for name, spec in self._meta["fields"].items() if spec.get("kind") == "array"}

    def _fields_for(self, measure: str) -> tuple[str, ...]:
        """The arrays a partition's losses read: tokens and the measure (stored, or what it is computed from)."""
        stored = self._array_specs()
        if measure in LEARNED_MEASURES:  # its features: hidden states, or top-k log-probs
            return tuple(stored)
        source = measure if measure in stored else "hidden" if measure == "state_saturation" else "topk_logprobs"
        return tuple(name for name in stored if name in ("full_tokens", "topk_ids", source))

    def _vocab(self):
        """The vocab, read again and refused if it is not the one the cache was opened with."""
        from calibrate._cache_files import _hash_strings, _read_vocab

        root, spec = self.sources[0][0], self._meta["fields"].get("vocab")
        vocab = _read_vocab(root, spec)
        if vocab is None:
            return None
        opened = spec.get("checksum") if self._vocab_checksum is None else self._vocab_checksum
        if _hash_strings(tuple(vocab)) != opened:
            raise ValueError(
                f"{root / 'vocab.json'} changed after the cache was opened (its checksum is not the one it had "
                "then); open the cache again"
            )
        return vocab

    # ---- losses -----------------------------------------------------------------------------------------
    def loss_table(
        self,
        *,
        measure: str = "softmax_gap",
        consistency: str = "token",
        lambdas: ArrayLike | None = None,
        decay: Decay | None = None,
        measure_state: dict | None = None,
        sequences: ArrayLike | None = None,
        client: Client | None = None,
        retries: int = 2,
        decode: Callable[[Sequence[int]], str] | None = None,
        progress: bool = False,
    ) -> LossTable:
        """The proxy-mode :class:`~calibrate.LossTable` of the cache, one Dask task per partition.

        Parameters
        ----------
        measure : str, default="softmax_gap"
            A confidence measure computed from the cache (:data:`measures.confidence.MEASURES`), a score the
            cache stores, or a learned one (:data:`measures.learned.LEARNED_MEASURES`) given by its trained
            ``measure_state``.
        consistency, lambdas, decay
            As in :func:`calibrate.fit` (``decay`` a :class:`~calibrate.Decay` or None).
        measure_state : dict, optional
            A learned measure's JSON state (``train_measure(...).to_dict()``); required for a learned
            measure, refused for the others. Each worker rebuilds the measure from it.
        sequences : array-like of int, optional
            The sequences to compute (indices without repeats, e.g. the calibration split), taken in
            increasing order whatever the order given; default: all.
        client : dask.distributed.Client, optional
            Run the tasks on its workers (they must see the cache at ``path``); default: one after
            another in this process.
        retries : int, default=2
            Times a failed task is retried on the workers (with a client).
        decode : callable, optional
            Token ids -> text for the textual losses, as in :func:`calibrate.losses.proxy_losses` (default: the
            cache's vocab, where its joined pieces give the output texts); sent to every worker.
        progress : bool, default=False
            Show a progress bar over the partitions (as they finish).

        Returns
        -------
        LossTable
            Equal to the in-memory ``proxy_losses`` on the same sequences.
        """
        import dask

        from calibrate._cache_checks import _subset_iv
        from calibrate._progress import tqdm
        from calibrate.exits import _lambdas_iv, default_lambdas
        from calibrate.fit import _measure_iv
        from calibrate.losses import _TOKEN_LEVEL, LossTable, _consistency_iv, _partial_pieces_iv, _text_iv
        from measures.confidence import confidence

        _measure_iv(measure, self._array_specs())
        if (measure in LEARNED_MEASURES) != (measure_state is not None):
            raise ValueError(
                f"measure_state is required for the learned measures {LEARNED_MEASURES} (train one with "
                f"measures.learned.train_measure) and refused for the others; got measure={measure!r} and "
                f"measure_state={'None' if measure_state is None else 'a dict'}"
            )
        if consistency in _TOKEN_LEVEL:  # never decodes: not refused, not shipped to every worker
            decode = None
        _client_iv(client, decode)
        int_at_least(retries, "retries", 0)
        lam = _lambdas_iv(default_lambdas(decay=decay is not None) if lambdas is None else lambdas)
        if sequences is None:
            idx = np.arange(self.n_sequences)
        else:
            try:
                idx = np.sort(_subset_iv(sequences, self.n_sequences))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"sequences: {exc}") from exc
        _consistency_iv(consistency, self._table.iloc[idx])  # here, not once per task on the workers
        vocab = None  # read and checked once, here; one copy per worker; token losses read none
        if consistency not in _TOKEN_LEVEL:  # here: the workers' parts carry no output texts
            _text_iv(vocab := self._vocab(), self._table.iloc[idx], consistency, decode)
            vocab = None if vocab is None else dask.delayed(vocab, pure=True, traverse=False)
        # One copy per worker of everything but the table; each task gets its own rows of the columns it reads.
        cache = dask.delayed(dataclasses.replace(self, _table=self._table.iloc[:0]), pure=True, traverse=False)
        state = None if measure_state is None else dask.delayed(measure_state, pure=True, traverse=False)
        if decode is not None:  # one copy per worker (a tokenizer's decode pickles to megabytes), not one per task
            decode = dask.delayed(decode, pure=True, traverse=False)
        columns, fields = _columns_for(consistency), self._fields_for(measure)
        # The measure's checks (a learned one's layers and widths, a stored score's values) on one sequence here,
        # not in every task (each retried)
        first = int(idx[0])
        probe = self._load(first, first + 1, self._table.iloc[first : first + 1], fields)
        if measure_state is None:
            confidence(probe, measure)
        else:
            from measures.learned import measure_from_state

            measure_from_state(measure, measure_state).predict_confidence(probe)
        tasks = []
        for a, b in self.partitions:
            keep = idx[(idx >= a) & (idx < b)] - a
            if keep.size == 0:
                continue
            whole = keep.size == b - a
            rows = self._table.iloc[a:b].iloc[keep][columns]
            tasks.append(
                dask.delayed(_partition_losses, pure=True)(
                    cache, a, b, rows, fields, measure, consistency, lam, decay, None if whole else keep, state, decode,
                    vocab,
                )
            )
        bar = tqdm(total=len(tasks), desc=f"{consistency} losses", unit="partition", disable=not progress)
        with bar:
            if client is None:
                parts = []
                for task in tasks:
                    parts.append(task.compute(scheduler="synchronous"))
                    bar.update()
            else:
                from distributed import as_completed

                futures = client.compute(tasks, retries=retries)
                try:
                    for future in as_completed(futures):
                        if future.status == "error":  # at once, not once every other partition is done
                            future.result()
                        bar.update()
                    parts = client.gather(futures)
                except BaseException:  # a failed partition, Ctrl-C: the cluster stops computing for nobody
                    client.cancel(futures)
                    del futures  # a traceback kept by a notebook must not hold the keys
                    raise
        partial = [ids for losses, ids in parts if losses is None]  # as the whole cache's check in memory
        if partial:
            _partial_pieces_iv(np.unique(np.concatenate(partial)))
        losses = np.concatenate([p[0] for p in parts], axis=0)
        layer_sums = np.sum([p[1] for p in parts], axis=0)  # integer-valued: exact in any order
        n_tokens = int(np.diff(self._offsets)[idx].sum())
        return LossTable(losses, lam, "proxy", consistency, layer_sums / n_tokens, self.n_layers, decay)


def _client_iv(client, decode=None) -> None:
    """Refuse a ``client`` that is not a Dask client (e.g. the scheduler's address), and a ``decode`` that cannot
    travel to its workers, before any work."""
    if client is None:
        return
    if not (callable(getattr(client, "compute", None)) and callable(getattr(client, "gather", None))):
        raise TypeError(
            f"client must be a dask.distributed.Client or None, got {type(client).__name__} (for a scheduler "
            "address: client=distributed.Client('tcp://host:8786'))"
        )
    if decode is not None:
        import cloudpickle  # how Dask sends a function to its workers

        try:
            cloudpickle.dumps(decode)
        except Exception as exc:
            raise TypeError(
                f"decode must be serialisable by cloudpickle to reach the Dask workers, but this "
                f"{type(decode).__name__} is not ({type(exc).__name__}: {exc}); calibrate.tokenizer_decode(tokenizer) "
                "is"
            ) from None


def _ranges(first: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(stop, s + step)) for s in range(first, stop, step)]


def _columns_for(consistency: str) -> list[str]:
    """The columns of the sequence table that a partition's losses read (the texts only for a risk).

    Prompts, outputs and output ids, most of the table's size, never travel to the workers.
    """
    return ["id", "n_tokens", "offset"] + (["reference"] if consistency.startswith("risk_") else [])


def _partition_losses(
    cache: ChunkedCache, first, stop, rows, fields, measure, consistency, lam, decay, keep, state, decode, vocab
):
    """One partition's losses ``(n_p, K)`` and per-lambda sums of exit layers ``(K,)`` (integers); ``(None,
    ids)`` where a textual loss without ``decode`` would join the vocab pieces of partial characters ``ids``.

    ``rows`` holds only the table columns of :func:`_columns_for` for the sequences ``keep`` (sorted indices
    from ``first``; None: all): the partition's cache is internal to the task. ``state``: a learned
    measure's JSON state, or None. ``vocab``: the cache's vocab as the client read and checked it (None for a
    token-level loss).
    """
    from calibrate.losses import _TOKEN_LEVEL, _partial_piece_ids, proxy_losses
    from measures.confidence import confidence
    from measures.learned import measure_from_state

    part = cache._load(first, stop, rows, fields, keep, vocab=vocab)
    if decode is None and consistency not in _TOKEN_LEVEL and part.vocab is not None:
        found = _partial_piece_ids(part.vocab, np.asarray(part.arrays["topk_ids"])[:, :, 0])
        if found.size:  # the client names every partition's ids at once (an error here would be retried)
            return None, found
    conf = confidence(part, measure) if state is None else measure_from_state(measure, state).predict_confidence(part)
    table = proxy_losses(part, conf, lam, consistency=consistency, decay=decay, decode=decode)
    return table.losses, np.round(table.avg_layers * part.n_tokens)  # avg = exact integer sum / tokens


def _unchanged(root: Path | Remote, checksum: str) -> None:
    """Refuse a cache directory whose ``meta.json`` no longer records ``checksum`` (saved over since it was opened)."""
    from calibrate._cache_files import _read_meta

    now = _read_meta(root).get("checksum")
    if now != checksum:
        raise ValueError(
            f"the cache at {root} changed after it was opened (meta.json records checksum {now!r}, it was "
            f"{checksum!r}): a cache was saved over it; open it again"
        )


def _read_part(
    root: Path | Remote, specs: dict, first: int, stop: int, lo: int, hi: int, checksum: str, vocab_size: int, rows=None
) -> dict:
    """The arrays of ``specs`` of sequences ``[first, stop)``, tokens ``[lo, hi)`` of the cache directory ``root``,
    read and checked: :meth:`ChunkedCache.load` and every chunk of :meth:`ChunkedCache.arrays` read through it.

    Parameters
    ----------
    root : Path or calibrate._storage.Remote
        The cache directory (a shard's, for a sharded cache) holding the arrays.
    specs : dict
        The arrays to read: name -> its entry in ``meta.json``'s ``fields``.
    first, stop : int
        The sequences read, counted in the whole cache (to name them in errors).
    lo, hi : int
        Their tokens, counted from the first token of ``root``.
    checksum : str
        The checksum ``root/meta.json`` recorded when the cache was opened (:func:`_read_checked`).
    vocab_size : int
        The vocabulary size the token ids are checked against.
    rows : ndarray of int, optional
        Token rows (from ``lo``) to keep before the values are checked; default: all.

    Returns
    -------
    dict
        Name -> ndarray.

    Raises
    ------
    ValueError
        An array that cannot be read or disagrees with ``meta.json``, a cache saved over since it was opened,
        a missing chunk file (zarr reads it as fill values), or values out of range (``_check_values``).
    """
    import zarr

    from calibrate._cache_checks import _check_values
    from calibrate._cache_files import _chunk_files_iv

    arrays = {name: _read_checked(root, name, spec, lo, hi, checksum) for name, spec in specs.items()}
    if rows is not None:
        arrays = {name: a[rows] for name, a in arrays.items()}
    try:
        _check_values(arrays, vocab_size)
    except ValueError as exc:  # chunk files deleted since opening read as fill values: name them instead
        for name, spec in specs.items():
            where = root / spec["path"]
            _chunk_files_iv(zarr.open_array(store=zarr_store(where), mode="r"), name, where)
        raise ValueError(
            f"sequences [{first}, {stop}) of {root} (token indices below count from its token {lo}): {exc}"
        ) from exc
    return arrays


def _read_checked(root: Path | Remote, name: str, spec: dict, lo: int, hi: int, checksum: str) -> np.ndarray:
    """:func:`_read_slice`, then refused if the cache was saved over since it was opened (also when the read
    failed: a cache saved over mid-read says so, not the reader's error)."""
    try:
        a = _read_slice(root, name, spec, lo, hi)
    except ValueError:
        _unchanged(root, checksum)
        raise
    _unchanged(root, checksum)
    return a


def _read_slice(root: Path | Remote, name: str, spec: dict, lo: int, hi: int) -> np.ndarray:
    """Tokens ``[lo, hi)`` of array ``name``, checked against its spec in ``meta.json``.

    The token count (first axis) is checked at open, per shard; here the dtype and the other axes.
    """
    import zarr

    from calibrate._cache_files import _field_dtype

    where = root / spec["path"]
    try:
        z = zarr.open_array(store=zarr_store(where), mode="r")
        a = np.ascontiguousarray(z[lo:hi])
    except Exception as exc:  # noqa: BLE001 - missing or corrupted chunks raise codec-specific errors
        raise ValueError(
            f"cannot read tokens {lo}:{hi} of array {name!r} at {where}: {type(exc).__name__}: {exc}"
        ) from exc
    expected = _field_dtype(name)
    if a.dtype != expected or list(z.shape[1:]) != spec.get("shape", [])[1:] or a.shape[0] != hi - lo:
        raise ValueError(
            f"array {name!r} at {where} has dtype {a.dtype} and shape {list(z.shape)}, but meta.json says "
            f"{spec.get('dtype')} and {spec.get('shape')}"
        )
    return a


def _open_chunked(root: Path | Remote, chunks: int, verify: bool) -> ChunkedCache:
    """:func:`calibrate.open_cache` with ``chunks``: metadata, table and offsets only (checked), arrays lazy."""
    from calibrate._cache_files import _hash_strings, _read_vocab

    _chunks_iv(chunks)
    meta, table, offsets = _read_lazily(root, verify)
    vocab_checksum = None  # verified: the one meta.json records
    if not verify and "vocab" in meta["fields"]:  # accepted unverified, as in memory: later reads compare with it
        vocab_checksum = _hash_strings(tuple(_read_vocab(root, meta["fields"]["vocab"])))
    sources = ((root.resolve(), 0, meta["checksum"]),)
    return ChunkedCache(root.resolve(), int(chunks), meta, table, offsets, sources, vocab_checksum)


def _chunks_iv(chunks) -> None:
    """Check ``open_cache``'s ``chunks`` (and that Dask, which a lazy cache computes with, is installed)."""
    int_at_least(chunks, "chunks")  # sequences per partition
    require("open_cache(chunks=...)", "dask")


def _read_lazily(root: Path | Remote, verify: bool, joint: dict | None = None) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """``meta.json``, the sequence table and the offsets of the cache at ``root``, checked; arrays stay on disk.

    With ``verify`` every array is streamed through its checksum. ``joint`` maps array names to hashers
    that are fed the same bytes (the checksum of several shards joined), which streams the arrays even
    without ``verify``.
    """
    from calibrate._cache_files import _cache_checksum, _check_meta_checksum, _hash_strings, _hash_table
    from calibrate.cache import _open_checked

    meta, stored, _, table, offsets, vocab, _ = _open_checked(root)  # as in memory, before values are read
    fields = meta["fields"]
    checksums = {}
    if verify:
        checksums["sequences"] = _hash_table(table, offsets)
        if vocab is not None:
            checksums["vocab"] = _hash_strings(tuple(vocab))
    for name, z in stored.items():
        where = root / fields[name]["path"]
        if verify or joint is not None:
            try:
                checksums[name] = _stream_hash(z, *([joint[name]] if joint is not None else []))
            except Exception as exc:  # noqa: BLE001 - corrupted chunks raise codec-specific errors
                raise ValueError(
                    f"cannot read array {name!r} at {where} (corrupted chunk?): {type(exc).__name__}: {exc}"
                ) from exc
    if not verify:
        return meta, table, offsets
    for name, value in checksums.items():
        if value != fields[name].get("checksum"):
            raise ValueError(
                f"checksum mismatch in {fields[name]['kind']} {name!r} ({root / fields[name]['path']}): modified or "
                "corrupted after it was written"
            )
    if _cache_checksum(meta.get("vocab_size"), checksums) != meta.get("checksum"):
        raise ValueError(f"checksum mismatch in {root / 'meta.json'}: the field list or vocab_size was edited")
    _check_meta_checksum(root, meta)
    return meta, table, offsets


def _stream_hash(z, *also) -> str:
    """The cache's checksum of a zarr array, read chunk by chunk along the first axis (bounded memory).

    Every hasher in ``also`` gets the same data bytes (not the header).
    """
    from calibrate._cache_files import _array_hasher

    h = _array_hasher(z.dtype, z.shape)
    step = max(1, int(z.chunks[0]))
    for lo in range(0, z.shape[0], step):
        data = memoryview(np.ascontiguousarray(z[lo : lo + step])).cast("B")
        for hasher in (h, *also):
            hasher.update(data)
    return h.hexdigest()
