"""LayerCache: construction and validation, zarr/parquet round trip, atomic save, corruption, splits."""

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import calibrate
import calibrate.cache as cache_module
import measures
from calibrate.cache import FORMAT_VERSION, LayerCache, open_cache

V = 40


def _arrays(lengths=(5, 3, 7, 1), n_layers=3, k=3, seed=0):
    """Valid raw inputs: distinct top-k ids, sorted log-probs, last layer's top-1 = full token."""
    rng = np.random.default_rng(seed)
    n_tokens = int(sum(lengths))
    keys = rng.random((n_tokens, n_layers, V))
    ids = np.argsort(keys, axis=-1)[..., :k]  # distinct per (token, layer)
    logits = -np.sort(rng.exponential(size=(n_tokens, n_layers, k)), axis=-1).cumsum(axis=-1)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True) + 1.0)
    return dict(
        full_tokens=ids[:, -1, 0].copy(),
        topk_ids=ids,
        topk_logprobs=logprobs,
        lengths=list(lengths),
        scores={
            "softmax_gap": rng.random((n_tokens, n_layers)),
            "state_saturation": np.pad(rng.uniform(-1, 1, (n_tokens, n_layers - 1)), ((0, 0), (1, 0))),  # layer 1: 0
        },
        hidden=rng.normal(size=(n_tokens, n_layers, 4)),
        prompts=[f"prompt {i} é" for i in range(len(lengths))],
        references=["ref a", None, "ref c", ""],
        vocab=[f" t{i}" for i in range(V)],
        model="tiny-model",
        meta={"revision": "abc123", "generation": {"max_new_tokens": 8}},
    )


@pytest.fixture
def cache():
    return LayerCache.from_arrays(**_arrays())


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------


def test_a_last_layer_that_is_not_the_full_model_is_warned_of():
    """Layers in reverse order (arrays from another framework): the last layer agreed with full_tokens on 8% of
    tokens, and fit certified exiting every token at layer 1 with risk 0 (losses count layer L as full_tokens)."""
    raw = _arrays(lengths=(40, 30, 50, 20))
    reversed_layers = {**raw, "topk_ids": raw["topk_ids"][:, ::-1], "topk_logprobs": raw["topk_logprobs"][:, ::-1]}
    reversed_layers.pop("scores"), reversed_layers.pop("hidden")
    with pytest.warns(UserWarning, match=r"last layer's top-1 differs from full_tokens at \d+\.\d% .* reversed"):
        LayerCache.from_arrays(**reversed_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerCache.from_arrays(**raw)
        calibrate.synthetic_cache(50, seed=0)
        few = raw["full_tokens"].copy()
        few[:5] = (few[:5] + 1) % V  # a few processed choices (repetition_penalty): 5 of 140 tokens
        LayerCache.from_arrays(**{**raw, "full_tokens": few})


def test_a_saved_cache_with_a_wrong_layer1_saturation_opens_and_refuses_that_measure(tmp_path, monkeypatch):
    """The layer-1 check refused the whole saved cache on opening (every other measure lost with it); it refuses
    new caches and the measure where it is used."""
    raw = _arrays(lengths=(8, 7, 8, 6))
    raw["scores"] = {**raw["scores"], "state_saturation": np.full((29, 3), 0.5)}  # cos with hidden_states[0]
    path = cache_module._from_arrays(copy=True, **raw).save(tmp_path / "cache")  # as an older version saved it
    for opened in (open_cache(path), open_cache(path, chunks=2)):
        calibrate.fit(opened, delta=0.5, epsilon=0.1, measure="softmax_gap", progress=False)
    import calibrate.chunked as chunked

    monkeypatch.setattr(chunked, "_partition_losses", lambda *a: pytest.fail("a task ran before the check"))
    for opened in (open_cache(path), open_cache(path, chunks=2)):
        with pytest.raises(ValueError, match=r"stored 'state_saturation' must be 0 at layer 1 .* under another name"):
            calibrate.fit(opened, delta=0.5, epsilon=0.1, measure="state_saturation", progress=False)


def test_pickled_and_copied_caches_stay_read_only_and_equal(cache):
    """Unpickled arrays were writable: an edit then saved a cache under the old checksum, which open_cache refused."""
    import copy
    import pickle

    class Mine(LayerCache):
        pass

    mine = Mine._trusted(cache.sequences, cache.arrays, cache.offsets, cache.vocab_size, cache.user_meta, cache.vocab)
    assert type(copy.deepcopy(mine)) is Mine
    checksum = cache.checksum  # computed once, carried along (read-only arrays: it still describes them)
    assert pickle.loads(pickle.dumps(cache))._checksums == cache._checksums
    for back in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)):
        assert back.checksum == checksum and back.user_meta == cache.user_meta and back.vocab == cache.vocab
        assert back.sequences.drop(columns="output_ids").equals(cache.sequences.drop(columns="output_ids"))
        for a in (back.arrays["topk_ids"], back.arrays["hidden"], back.sequences["output_ids"][0], back.offsets):
            with pytest.raises(ValueError, match="read-only"):
                a[0] = 0


def test_big_endian_arrays_and_bfloat16_tensors_make_the_same_cache(cache):
    """Arrays read in another byte order give the same cache; bfloat16 tensors failed inside numpy."""
    raw = _arrays()
    swapped = {k: (np.asarray(v).astype(np.asarray(v).dtype.newbyteorder(">")) if k in ("full_tokens", "topk_ids",
               "topk_logprobs", "hidden") else v) for k, v in raw.items()}  # fmt: skip
    swapped["scores"] = {k: v.astype(">f8") for k, v in raw["scores"].items()}
    assert LayerCache.from_arrays(**swapped).checksum == cache.checksum
    torch = pytest.importorskip("torch")
    hidden = torch.tensor(raw["hidden"], dtype=torch.bfloat16, requires_grad=True)
    scores = {k: torch.tensor(v, dtype=torch.bfloat16) for k, v in raw["scores"].items()}
    tensors = LayerCache.from_arrays(**{**raw, "hidden": hidden, "scores": scores})
    np.testing.assert_array_equal(tensors.arrays["hidden"], hidden.detach().float().numpy().astype(np.float16))
    np.testing.assert_array_equal(tensors.arrays["softmax_gap"], scores["softmax_gap"].float().numpy())


def test_from_arrays_shapes_properties_and_canonical_dtypes(cache):
    raw = _arrays()
    assert (cache.n_sequences, cache.n_tokens, cache.n_layers, cache.top_k, cache.vocab_size) == (4, 16, 3, 3, V)
    assert cache.hidden_size == 4
    assert cache.offsets.tolist() == [0, 5, 8, 15, 16]
    assert cache.lengths.tolist() == [5, 3, 7, 1]
    assert cache.sequence_index.tolist() == [0] * 5 + [1] * 3 + [2] * 7 + [3]
    assert cache.positions.tolist() == list(range(5)) + list(range(3)) + list(range(7)) + [0]
    assert cache.arrays["full_tokens"].dtype == np.int32
    assert cache.arrays["topk_ids"].dtype == np.int32
    assert cache.arrays["topk_logprobs"].dtype == np.float32
    assert cache.arrays["hidden"].dtype == np.float16
    assert cache.arrays["softmax_gap"].dtype == np.float32
    np.testing.assert_array_equal(cache.arrays["topk_ids"], raw["topk_ids"])
    np.testing.assert_allclose(cache.arrays["topk_logprobs"], raw["topk_logprobs"], rtol=1e-6)
    assert cache.has("hidden") and cache.has("softmax_gap") and not cache.has("entropy")
    assert cache.meta["model"] == "tiny-model" and cache.meta["revision"] == "abc123"
    assert cache.meta["format_version"] == FORMAT_VERSION
    assert cache.meta["generation"] == {"max_new_tokens": 8}


def test_sequences_table(cache):
    seq = cache.sequences
    assert list(seq.columns) == ["id", "prompt", "output", "output_ids", "reference", "n_tokens", "offset"]
    assert seq["id"].tolist() == ["0", "1", "2", "3"]
    assert seq["prompt"].tolist()[0] == "prompt 0 é"
    assert seq["reference"].isna().tolist() == [False, True, False, False]
    assert seq["reference"].iloc[3] == ""
    full = cache.arrays["full_tokens"]
    for s in range(4):
        lo, hi = cache.offsets[s], cache.offsets[s + 1]
        np.testing.assert_array_equal(seq["output_ids"].iloc[s], full[lo:hi])
        # outputs default to decoding the full tokens with the vocab
        assert seq["output"].iloc[s] == "".join(f" t{i}" for i in full[lo:hi])
    assert seq["n_tokens"].tolist() == [5, 3, 7, 1] and seq["offset"].tolist() == [0, 5, 8, 15]


def test_from_arrays_copies_and_cache_is_immutable():
    raw = _arrays()
    cache = LayerCache.from_arrays(**raw)
    before = cache.arrays["topk_ids"].copy()
    raw["topk_ids"][:] = 0
    raw["full_tokens"][:] = 0
    np.testing.assert_array_equal(cache.arrays["topk_ids"], before)
    with pytest.raises(ValueError, match="read-only"):
        cache.arrays["topk_ids"][0, 0, 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        cache.sequences["output_ids"].iloc[0][0] = 1
    with pytest.raises(TypeError):
        cache.arrays["entropy"] = np.zeros((16, 3))
    seq = cache.sequences
    seq.loc[0, "prompt"] = "changed"
    assert cache.sequences["prompt"].iloc[0] == "prompt 0 é"
    checksum = cache.checksum
    for get in (lambda c: c.arrays["topk_ids"], lambda c: c.offsets, lambda c: c.positions, lambda c: c.lengths):
        for c in (cache, cache.subset([1, 2]), cache.subset([2, 0])):  # views and copies alike
            with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
                get(c).flags.writeable = True  # used to succeed, then writes changed the cache
    assert cache.checksum == checksum


def test_init_copies_the_arrays_and_meta_is_the_caches_own():
    raw = _arrays()
    built = LayerCache.from_arrays(**{**raw, "meta": {"generation": {"temperature": 0.0}}})
    arrays = {name: np.array(a) for name, a in built.arrays.items()}
    cache = LayerCache(built.sequences, arrays, vocab_size=built.vocab_size, meta=built.user_meta, vocab=built.vocab)
    arrays["topk_ids"][:] = 0  # the caller's array, still writeable: the cache holds a copy
    assert cache.checksum == built.checksum
    cache.user_meta["generation"]["temperature"] = 1.5  # a copy
    assert cache.user_meta["generation"] == {"temperature": 0.0}
    assert cache.subset([0]).user_meta["generation"] == {"temperature": 0.0}

def test_offsets_equal_lengths_and_minimal_inputs():
    raw = _arrays()
    a = LayerCache.from_arrays(full_tokens=raw["full_tokens"], topk_ids=raw["topk_ids"], lengths=[5, 3, 7, 1])
    b = LayerCache.from_arrays(full_tokens=raw["full_tokens"], topk_ids=raw["topk_ids"], offsets=[0, 5, 8, 15, 16])
    assert a.checksum == b.checksum
    assert a.vocab is None and a.vocab_size == int(raw["topk_ids"].max()) + 1  # inferred lower bound
    assert a.sequences["output"].tolist() == [""] * 4
    assert a.sequences["reference"].isna().all()
    with pytest.raises(ValueError, match="no vocab"):
        a.decode([1, 2])


def test_lengths_and_offsets_that_wrap_around_int64_are_refused():
    """They passed (the cumsum or np.diff wrapped to the right values), then fit and save crashed the process."""
    raw = _arrays()
    raw["full_tokens"], raw["topk_ids"] = raw["full_tokens"][:3], raw["topk_ids"][:3]
    three = {"full_tokens": raw["full_tokens"], "topk_ids": raw["topk_ids"]}
    with pytest.raises(ValueError, match="lengths must sum to n_tokens=3 .*got more than 2\\*\\*63"):
        LayerCache.from_arrays(**three, lengths=[2**63 - 1, 2**63 - 1, 5])
    with pytest.raises(ValueError, match="offsets must be strictly increasing"):
        LayerCache.from_arrays(**three, offsets=[0, 2**63 - 1, -2, 3])


def _bad(**changes):
    raw = _arrays()
    raw.update(changes)
    return raw


def _with(name, fn):
    raw = _arrays()
    raw[name] = fn(np.array(raw[name], dtype=float if name == "topk_logprobs" else None))
    return raw


def _set(a, index, value):
    a = a.copy()
    a[index] = value
    return a


@pytest.mark.parametrize(
    "raw, error, match",
    [
        (_with("topk_ids", lambda a: _set(a, (2, 1, 0), V)), ValueError, r"topk_ids must lie in \[0, vocab_size=40\)"),
        (_with("topk_ids", lambda a: _set(a, (2, 1, 2), -1)), ValueError, "topk_ids"),
        (_with("full_tokens", lambda a: _set(a, 3, V + 5)), ValueError, "full_tokens"),
        (_with("topk_ids", lambda a: _set(a, (4, 0, 1), a[4, 0, 0])), ValueError, "distinct"),
        (_with("topk_logprobs", lambda a: _set(a, (1, 1, 1), np.nan)), ValueError, "'topk_logprobs' must be finite"),
        (_with("topk_logprobs", lambda a: _set(a, (1, 1, 2), -np.inf)), ValueError, "'topk_logprobs' must be finite"),
        (_with("topk_logprobs", lambda a: _set(a, (0, 0, 0), 0.5)), ValueError, r"topk_logprobs' must be <= 0"),
        (_with("topk_logprobs", lambda a: a[..., ::-1]), ValueError, "sorted descending"),
        # sorted and <= 0, but no softmax (e.g. taken over another axis): fit failed far from the input
        (_with("topk_logprobs", lambda a: np.minimum(a * 0.01, 0.0)), ValueError, r"at most 1\), got a sum"),
        (_with("topk_logprobs", lambda a: a[:, :2]), ValueError, "topk_logprobs must have the shape"),
        (_with("topk_logprobs", lambda a: _set(a, (0, 0, 2), -1e50)), ValueError, "finite"),  # float32 overflow
        (_with("topk_ids", lambda a: a.astype(float)), TypeError, "topk_ids must hold integers"),
        (_with("full_tokens", lambda a: a[:-1]), ValueError, "n_tokens"),
        (_bad(lengths=[5, 3, 7, 2]), ValueError, "lengths must sum"),
        (_bad(lengths=[5, 3, 8, 0]), ValueError, "lengths must be >= 1"),
        (_bad(offsets=[0, 5, 8, 15, 16]), ValueError, "exactly one of lengths= and offsets="),
        (_bad(lengths=None, offsets=[0, 5, 5, 15, 16]), ValueError, "strictly increasing"),
        (_bad(scores={"softmax_gap": np.full((16, 3), 1.5)}), ValueError, r"'softmax_gap' must lie in \[0.0, 1.0\]"),
        (_bad(scores={"entropy": np.full((16, 3), np.nan)}), ValueError, "'entropy' must be finite"),
        # a cosine of layer 1 with the embedding output (hidden_states[0]): the runtime scores layer 1 as 0
        (_bad(scores={"state_saturation": np.full((16, 3), 0.5)}), ValueError,
         r"'state_saturation' must be 0 at layer 1 .* got 0.5 at token 0: .*hidden_states\[0\], the embedding"),
        (_bad(scores={"my_score": np.zeros((16, 2))}), ValueError, r"scores\['my_score'\] must have shape"),
        (_bad(scores={"vocab": np.zeros((16, 3))}), ValueError, "scores names"),
        (_bad(scores={"Bad Name": np.zeros((16, 3))}), ValueError, "scores names"),
        (_bad(hidden=np.full((16, 3, 4), 1e6)), ValueError, r"hidden holds finite values beyond the float16 range "
         r"\(\|x\| > 65504\), first at index \(0, 0, 0\)"),  # was "'hidden' must be finite"
        (_bad(scores={"entropy": np.full((16, 3), 1e39)}), ValueError,
         r"scores\['entropy'\] holds finite values beyond"),
        (_bad(hidden=np.full((16, 3, 4), np.inf)), ValueError, "'hidden' must be finite"),
        (_bad(hidden=np.zeros((16, 2, 4))), ValueError, "hidden must have shape"),
        (_bad(vocab=["a"] * (V - 1), vocab_size=V), ValueError, "vocab must have vocab_size=40 entries"),
        (_bad(vocab=["a"] * (V - 1) + [3]), TypeError, "vocab must hold str"),
        (_bad(ids=["a", "b", "a", "c"]), ValueError, "ids must be unique"),
        (_bad(references=["x"]), ValueError, "references must have one entry per sequence"),
        (_bad(prompts=[1, 2, 3, 4]), TypeError, "prompts must hold str"),
        (_bad(prompts="one"), TypeError, "prompts must be a sequence"),
        (_bad(meta={"when": object()}), TypeError, "JSON-serialisable"),
        (_bad(meta={"n_layers": 7}), ValueError, "contradicts"),
    ],
)
def test_from_arrays_rejects_invalid_input_naming_the_field(raw, error, match):
    with pytest.raises(error, match=match):
        LayerCache.from_arrays(**raw)


def test_empty_cache_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        LayerCache.from_arrays(
            full_tokens=np.zeros(0, dtype=np.int32),
            topk_ids=np.zeros((0, 2, 1), dtype=np.int32),
            lengths=[],
            vocab_size=5,
        )


def test_vocab_size_given_larger_than_ids_and_unicode_vocab_round_trip(tmp_path):
    raw = _arrays()
    raw["vocab"] = [f"\u00e9{i}\U0001f600" for i in range(V)] + ["\ud800"] * 10  # lone surrogate is kept
    cache = LayerCache.from_arrays(**raw, vocab_size=V + 10)
    assert cache.vocab_size == V + 10
    again = open_cache(cache.save(tmp_path / "c"))
    assert again.vocab == cache.vocab and again.checksum == cache.checksum


@pytest.mark.parametrize("big", [2**31, 2**32 + 5, 2**63 + 1])
def test_ids_that_do_not_fit_int32_are_rejected_not_wrapped(big):
    """int32 storage would wrap 2**32 + 5 to 5, a valid-looking id."""
    ids = np.array([big], dtype=np.uint64)
    with pytest.raises(
        ValueError, match=r"vocab_size \(default: 1 \+ the largest id of full_tokens, topk_ids\) must be at most"
    ):
        LayerCache.from_arrays(full_tokens=ids, topk_ids=ids.reshape(1, 1, 1), lengths=[1])
    with pytest.raises(ValueError, match=r"^vocab_size must be at most 2\*\*31 - 1 = 2147483647 .* got 2147483648"):
        LayerCache.from_arrays(full_tokens=[3], topk_ids=[[[3]]], lengths=[1], vocab_size=2**31)
    with pytest.raises(ValueError, match=r"must be at most 2\*\*31 - 1 = 2147483647 .* got an int of 16610 bits$"):
        LayerCache.from_arrays(full_tokens=[3], topk_ids=[[[3]]], lengths=[1], vocab_size=10**5000)  # was: int->str
    largest = LayerCache.from_arrays(full_tokens=[2**31 - 2], topk_ids=[[[2**31 - 2]]], lengths=[1])
    assert largest.vocab_size == 2**31 - 1 and largest.arrays["full_tokens"].tolist() == [2**31 - 2]


# --------------------------------------------------------------------------------------------------
# Positions and offsets against a plain loop
# --------------------------------------------------------------------------------------------------


def _reference_index(lengths):
    seq, pos = [], []
    for s, n in enumerate(lengths):
        for t in range(n):
            seq.append(s)
            pos.append(t)
    return seq, pos


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=12))
def test_sequence_index_and_positions_match_a_loop(lengths):
    n_tokens = sum(lengths)
    ids = np.stack([np.arange(n_tokens) % 7, (np.arange(n_tokens) + 1) % 7], axis=1)[:, None, :]
    cache = LayerCache.from_arrays(full_tokens=ids[:, 0, 0], topk_ids=ids, lengths=lengths, vocab_size=7)
    seq, pos = _reference_index(lengths)
    assert cache.sequence_index.tolist() == seq
    assert cache.positions.tolist() == pos
    assert cache.offsets.tolist() == [0, *np.cumsum(lengths).tolist()]


# --------------------------------------------------------------------------------------------------
# Save / open
# --------------------------------------------------------------------------------------------------


def _assert_same(a, b):
    assert set(a.arrays) == set(b.arrays)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
        assert a.arrays[name].dtype == b.arrays[name].dtype
    pd.testing.assert_frame_equal(a.sequences.drop(columns="output_ids"), b.sequences.drop(columns="output_ids"))
    for x, y in zip(a.sequences["output_ids"], b.sequences["output_ids"]):
        np.testing.assert_array_equal(x, y)
    assert a.vocab == b.vocab and a.vocab_size == b.vocab_size
    assert a.checksum == b.checksum


def test_round_trip_and_on_disk_layout(cache, tmp_path):
    path = cache.save(tmp_path / "cache")
    assert path == (tmp_path / "cache").absolute()
    names = sorted(p.name for p in path.iterdir())
    assert names == ["arrays", "meta.json", "sequences.parquet", "vocab.json"]
    assert sorted(p.name for p in (path / "arrays").iterdir()) == sorted(cache.arrays)
    for name in cache.arrays:
        spec = json.loads((path / "arrays" / name / "zarr.json").read_text())
        assert spec["zarr_format"] == 3 and spec["node_type"] == "array"
        z = zarr.open_array(str(path / "arrays" / name), mode="r")
        assert z.chunks[1:] == z.shape[1:]  # chunked along the token axis only
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["fields"]["topk_ids"]["dtype"] == "int32"
    assert meta["checksum"] == cache.checksum
    assert pq.read_table(path / "sequences.parquet").num_rows == 4
    assert json.loads((path / "vocab.json").read_text()) == cache.vocab
    again = open_cache(path)
    _assert_same(cache, again)
    assert again.meta["revision"] == "abc123" and again.meta["model"] == "tiny-model"
    assert again.meta == cache.meta


@pytest.mark.parametrize("name", ["run::a", "team::exp1::v2"])
def test_paths_holding_double_colons_save_and_open(cache, tmp_path, name):
    """zarr read the str 'run::a' as chained fsspec URLs: saving failed (FileNotFoundError .../.run/zarr.json)."""
    path = cache.save(tmp_path / name)
    assert path.name == name and not (tmp_path / ".run").exists()
    _assert_same(cache, open_cache(path))
    _assert_same(cache, open_cache(str(path)))
    pytest.importorskip("dask")
    lazy = open_cache(path, chunks=2)
    np.testing.assert_array_equal(lazy.take([0, 3]).arrays["topk_ids"], cache.subset([0, 3]).arrays["topk_ids"])


def test_large_cache_is_chunked_and_read_back(tmp_path):
    n_tokens = 150_000
    ids = np.stack([np.arange(n_tokens) % 50, (np.arange(n_tokens) + 1) % 50], axis=1)[:, None, :]
    cache = LayerCache.from_arrays(
        full_tokens=ids[:, 0, 0], topk_ids=ids, lengths=[100] * 1500, vocab_size=50
    )
    path = cache.save(tmp_path / "big")
    z = zarr.open_array(str(path / "arrays" / "topk_ids"), mode="r")
    assert z.chunks == (65536, 1, 2) and z.nchunks == 3
    _assert_same(cache, open_cache(path))


@pytest.mark.parametrize("module", ["cache", "_cache_files", "_cache_checks"])
def test_no_pickle_in_the_cache_modules(module):
    source = (Path(cache_module.__file__).parent / f"{module}.py").read_text()
    assert "import pickle" not in source and "allow_pickle=True" not in source


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names file descriptors through /proc")
def test_a_saved_cache_is_on_the_disk_before_it_is_published(cache, tmp_path, monkeypatch):
    """Nothing was fsynced: after a power loss a just-renamed cache could hold empty files."""
    events = []
    fsync, rename = os.fsync, os.rename

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_rename(a, b):
        events.append(("rename", str(a), str(b)))
        rename(a, b)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "rename", logged_rename)
    path = cache.save(tmp_path / "cache")
    published = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(path))
    tmp = events[published][1]
    synced = {e[1] for e in events[:published] if e[0] == "fsync"}
    written = {str(p).replace(str(path), tmp) for p in path.rglob("*")} | {tmp}
    assert written <= synced  # every file and directory, before the rename
    assert ("fsync", str(path.parent)) in events[published:]  # then the new entry



def test_a_save_writes_into_a_temporary_directory_of_its_own(cache, tmp_path, monkeypatch):
    """A directory of the same temporary name (another writer's, or left by a killed one) is skipped, not shared."""
    import secrets

    stale = tmp_path / ".cache.00000000.tmp"
    stale.mkdir()
    (stale / "meta.json").write_text("another writer's")
    names = iter(["00000000", "00000001"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    path = cache.save(tmp_path / "cache")
    _assert_same(cache, open_cache(path))
    assert (stale / "meta.json").read_text() == "another writer's"
    assert sorted(p.name for p in stale.iterdir()) == ["meta.json"]

@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("saves", [1, 2])
def test_a_cache_replaced_while_it_is_read_says_so(cache, tmp_path, monkeypatch, verify, saves):
    """Its files came from the old cache and the new one: the error blamed a corrupted chunk or a checksum (two
    saves in a row can give the directory its inode number back: the contents are compared)."""
    from calibrate.synthetic import synthetic_cache

    path = cache.save(tmp_path / "cache")
    others = [synthetic_cache(30, n_layers=3, seed=s) for s in range(1, saves + 1)]
    other = others[-1]
    read_vocab = cache_module._read_vocab

    def overwritten_meanwhile(root, spec):
        for each in others:  # another process saves over it now
            each.save(root, overwrite=True)
        return read_vocab(root, spec)

    monkeypatch.setattr(cache_module, "_read_vocab", overwritten_meanwhile)
    with pytest.raises(
        ValueError, match=r"cache was replaced \(saved again with overwrite=True\) while it was being read"
    ):
        open_cache(path, verify=verify)
    monkeypatch.setattr(cache_module, "_read_vocab", read_vocab)
    assert open_cache(path).checksum == other.checksum  # opened again


def test_an_overwrite_interrupted_between_its_renames_names_the_old_cache(cache, tmp_path):
    path = cache.save(tmp_path / "cache")
    aside = tmp_path / f".cache.old-{'ab' * 16}"
    path.rename(aside)  # a crash right after the first rename
    with pytest.raises(
        FileNotFoundError,
        match=r"no layer cache at .*cache; an overwrite interrupted .* left the old cache at .*\.cache\.old-abab",
    ):
        open_cache(path)
    aside.rename(path)  # the advice
    assert open_cache(path).checksum == cache.checksum


def test_log_probabilities_of_half_precision_logits_are_taken():
    """The softmax of bfloat16 logits rounds its top-k mass up to about 1.005: such caches were refused, and caches
    saved before the mass was checked no longer opened."""
    import torch

    raw = _arrays()
    logits = torch.from_numpy(raw["topk_logprobs"] * 12.0).to(torch.bfloat16)
    logprobs = torch.log_softmax(logits, dim=-1).float().numpy()
    assert np.exp(logprobs.astype(np.float64)).sum(-1).max() > 1.001
    taken = LayerCache.from_arrays(**{**raw, "topk_logprobs": logprobs, "scores": None})
    # ... and scored: the measures refused a mass above 1.001 that the cache took.
    for measure in ("softmax_gap", "softmax_max", "entropy"):
        assert np.isfinite(measures.confidence(taken, measure)).all()
    assert calibrate.fit(taken, delta=0.5, epsilon=0.1).measure == "softmax_gap"


def test_an_overwrite_that_loses_a_race_names_the_other_save(cache, tmp_path, monkeypatch):
    """Another save published its cache between this overwrite's two renames: a raw rename error, which said the
    old cache could not be put back (the other writer's cache was there)."""
    import calibrate._cache_files as files
    from calibrate.synthetic import synthetic_cache

    path = cache.save(tmp_path / "cache")
    other = synthetic_cache(6, n_layers=3, seed=9)
    rename = os.rename

    def racing(src, dst):
        if str(src).endswith(".tmp") and not os.path.lexists(dst):  # between the renames: the other writer
            monkeypatch.setattr(files.os, "rename", rename)
            other.save(dst)
        rename(src, dst)

    monkeypatch.setattr(files.os, "rename", racing)
    with pytest.raises(FileExistsError, match="another save put its cache at .*cache while this one replaced it"):
        synthetic_cache(5, n_layers=3, seed=8).save(path, overwrite=True)
    assert open_cache(path).checksum == other.checksum  # the other writer's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no old copy, no temporary directory
    monkeypatch.setattr(files.os, "rename", racing)  # a first save loses the race: "Directory not empty"
    with pytest.raises(FileExistsError, match=r"new exists; pass overwrite=True"):
        synthetic_cache(5, n_layers=3, seed=8).save(tmp_path / "new")
    assert open_cache(tmp_path / "new").checksum == other.checksum


@pytest.mark.parametrize("code, published", [(errno.EIO, False), (errno.ENOSPC, False), (errno.EINVAL, True)])
def test_a_failed_flush_is_an_error_and_publishes_nothing(cache, tmp_path, monkeypatch, code, published):
    """Every fsync error was swallowed: a cache whose data did not reach the disk was published."""
    def failing(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing)
    if published:  # a file system that cannot flush: written as before
        cache.save(tmp_path / "cache")
    else:
        with pytest.raises(OSError, match=os.strerror(code)):
            cache.save(tmp_path / "cache")
    assert (tmp_path / "cache").exists() == published and not list(tmp_path.glob(".*tmp"))


def test_a_failed_write_names_the_cache(cache, tmp_path, monkeypatch):
    """A disk-full error while writing a cache (or uploading it) named no path: '[Errno 28] No space left on
    device', after minutes of extraction."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(pq, "write_table", full)
        with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'cache'} \(No space left on device\)") as info:
            cache.save(tmp_path / "cache")
        assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []
        staging = r"cannot write .*calibrate-upload-\w+, the local copy of memory:/+calibrate-test/full to upload"
        with pytest.raises(OSError, match=rf"{staging} \(TMPDIR\) \(No space left on device\)"):
            cache.save("memory://calibrate-test/full")  # the local disk is full, not the remote storage
    from fsspec.implementations.memory import MemoryFileSystem

    def denied(*args, **kwargs):  # as s3fs translates AccessDenied: no errno
        raise PermissionError("Access Denied")

    with monkeypatch.context() as patch:
        patch.setattr(MemoryFileSystem, "put_file", denied)
        with pytest.raises(PermissionError, match=r"cannot write memory:/+calibrate-test/denied \(Access Denied\)"):
            cache.save("memory://calibrate-test/denied")
    from calibrate._storage import Remote

    url = cache.save("memory://calibrate-test/staged")
    remove = Remote.remove

    def failing_staged(self, *args, **kwargs):
        if self.path.endswith(".tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return remove(self, *args, **kwargs)

    new = calibrate.synthetic_cache(5, n_layers=3, seed=9)
    with monkeypatch.context() as patch:
        patch.setattr(Remote, "remove", failing_staged)
        with pytest.raises(OSError, match=r"the new cache is in place at memory:/+calibrate-test/staged, but removing"):
            new.save(url, overwrite=True)  # it said "cannot write" after writing it
    assert open_cache(url).checksum == new.checksum


def test_a_failed_flush_after_publishing_says_the_new_cache_is_in_place(cache, tmp_path, monkeypatch):
    """The directory's flush after the rename failed: the error said nothing of the new cache in place (save
    promises the old one untouched on failure) and its old copy was left beside it."""
    import calibrate._atomic as atomic
    from calibrate.synthetic import synthetic_cache

    path = synthetic_cache(5, n_layers=3, seed=9).save(tmp_path / "cache")

    def failing(directory):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic, "sync_dir", failing)
    with pytest.raises(OSError, match=rf"{path} was written, but flushing its directory failed .*new content is in"):
        cache.save(path, overwrite=True)
    with pytest.raises(OSError, match=rf"{tmp_path / 'c.json'} was written, but flushing its directory failed"):
        calibrate.certify(np.zeros((100, 2)), [1.0, 0.5]).to_json(tmp_path / "c.json")
    monkeypatch.undo()
    assert open_cache(path).checksum == cache.checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "cache"]  # no old copy left beside it


def test_files_a_umask_left_read_only_are_flushed_read_only(cache, tmp_path, monkeypatch):
    """Files are opened for writing to flush them (Windows needs it); under a umask such as 0o222 that is refused
    (as root it is not, so the refusal is simulated here)."""
    real_open, modes = os.open, []

    def no_writing(path, flags, *args):
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        modes.append(flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_writing)
    path = cache.save(tmp_path / "cache")
    monkeypatch.setattr(os, "open", real_open)
    assert open_cache(path).checksum == cache.checksum and modes and set(modes) == {os.O_RDONLY}


def test_save_refuses_existing_path_unless_overwrite(cache, tmp_path):
    target = tmp_path / "c"
    cache.save(target)
    other = cache.subset([0, 1])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(target)
    assert open_cache(target).n_sequences == 4  # untouched
    other.save(target, overwrite=True)
    assert open_cache(target).n_sequences == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp or backup dirs left


def test_save_refuses_an_empty_path(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path must name a directory, got ''"):
        cache.save("", overwrite=True)  # was the working directory itself (replaced when empty)
    for here in (".", Path(""), tmp_path):
        with pytest.raises(ValueError, match="a directory other than the working directory"):
            cache.save(here, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_a_directory_that_is_not_a_cache(cache, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a layer cache"):
        cache.save(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    (precious / "meta.json").write_text("{}")  # some other tool's meta.json: still not a cache
    with pytest.raises(ValueError, match="not a layer cache"):
        cache.save(precious, overwrite=True)
    cache.save(tmp_path / "kept")
    (tmp_path / "kept" / "notes.txt").write_text("keep me too")  # a cache someone added a file to
    with pytest.raises(ValueError, match="not a layer cache"):
        cache.save(tmp_path / "kept", overwrite=True)
    assert (precious / "notes.txt").exists() and (tmp_path / "kept" / "notes.txt").exists()
    (tmp_path / "kept" / "notes.txt").unlink()
    (tmp_path / "kept" / ".DS_Store").write_text("x")  # hidden files do not make a cache something else
    cache.save(tmp_path / "kept", overwrite=True)  # ours
    assert open_cache(tmp_path / "kept").checksum == cache.checksum
    (tmp_path / "kept" / "arrays" / ".DS_Store").write_text("x")
    cache.save(tmp_path / "kept", overwrite=True)
    (tmp_path / "kept" / "arrays" / "my_scores.npy").write_text("keep me")  # arrays/ held a file of the user's: deleted
    with pytest.raises(ValueError, match="not a layer cache"):
        cache.save(tmp_path / "kept", overwrite=True)
    assert (tmp_path / "kept" / "arrays" / "my_scores.npy").read_text() == "keep me"
    # a meta.json that cannot be read: whose directory it is is unknown (saves publish by rename, so it is no
    # meta.json of ours cut short by a crash): kept, with everything beside it (another tool's arrays/ was deleted)
    (tmp_path / "kept" / "arrays" / "theirs.npy").write_text("keep me")
    for damaged in ('{"forma', "[" * 100_000 + "]" * 100_000, "name: run-7\n"):  # the second was a RecursionError
        (tmp_path / "kept" / "meta.json").write_text(damaged)
        with pytest.raises(ValueError, match="not a layer cache directory .*readable meta.json.* delete a damaged"):
            cache.save(tmp_path / "kept", overwrite=True)
        assert (tmp_path / "kept" / "arrays" / "theirs.npy").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a layer cache"):
        cache.save(tmp_path / "file", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    cache.save(empty, overwrite=True)
    assert open_cache(empty).n_sequences == 4
    with pytest.raises(ValueError, match=r"cannot save to .*: .*file is a file, not a directory"):  # was "File exists"
        cache.save(tmp_path / "file" / "c")
    (tmp_path / "link").symlink_to(empty)
    with pytest.raises(ValueError, match="it is a symbolic link"):  # was "not a layer cache directory"
        cache.save(tmp_path / "link", overwrite=True)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_no_trace_and_keeps_existing_cache(cache, tmp_path, monkeypatch, existing):
    target = tmp_path / "c"
    if existing:
        cache.save(target)
        old = open_cache(target).checksum

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "_write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        cache.subset([1, 2]).save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c"] if existing else [])
    if existing:
        assert open_cache(target).checksum == old


def test_failed_rename_restores_the_old_cache(cache, tmp_path, monkeypatch):
    target = tmp_path / "c"
    cache.save(target)
    real_rename = os.rename
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new cache into place
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="rename failed"):
        cache.subset([0]).save(target, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert open_cache(target).n_sequences == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_an_old_cache_an_interrupted_overwrite_left_goes_at_the_next_save(cache, tmp_path, monkeypatch):
    target = tmp_path / "c"
    cache.save(target)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        cache.subset([0]).save(target, overwrite=True)  # the new cache is in place, the old one not yet deleted
    monkeypatch.undo()
    assert open_cache(target).n_sequences == 1 and len(list(tmp_path.glob(".c.old-*"))) == 1
    others = [".c[1].old-" + "a" * 32, ".c.old-x.k3j4h5g6.tmp", ".c.old-mine", ".cc.old-" + "b" * 32]
    for name in others:  # other caches' leftovers and temporaries, and names no save writes
        (tmp_path / name).mkdir()
    cache.save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", *others])
    bracket = tmp_path / "c[1]"  # glob characters in the name are no pattern
    cache.save(bracket)
    (tmp_path / (".c[1].old-" + "f" * 32)).mkdir()
    cache.save(bracket, overwrite=True)
    assert not (tmp_path / (".c[1].old-" + "a" * 32)).exists() and not (tmp_path / (".c[1].old-" + "f" * 32)).exists()
    assert (tmp_path / ".c.old-mine").exists()


# --------------------------------------------------------------------------------------------------
# Corruption detected by open_cache
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(cache, tmp_path):
    return cache.save(tmp_path / "cache")


def _chunk_files(path, name):
    return sorted(p for p in (path / "arrays" / name / "c").rglob("*") if p.is_file())


def test_flipped_bytes_in_a_chunk_file(saved):
    chunk = _chunk_files(saved, "topk_ids")[0]
    data = bytearray(chunk.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="topk_ids"):
        open_cache(saved)


def test_valid_but_modified_array_is_a_checksum_mismatch(saved):
    z = zarr.open_array(str(saved / "arrays" / "topk_logprobs"), mode="r+")
    values = z[...]
    values[0, 0] -= 0.5  # still valid log-probabilities
    z[...] = values
    with pytest.raises(ValueError, match="checksum mismatch in array 'topk_logprobs'"):
        open_cache(saved)
    assert open_cache(saved, verify=False).arrays["topk_logprobs"][0, 0, 0] == values[0, 0, 0]


def test_nan_and_out_of_range_values_on_disk(saved):
    z = zarr.open_array(str(saved / "arrays" / "topk_logprobs"), mode="r+")
    values = z[...]
    values[3, 1, 2] = np.nan
    z[...] = values
    with pytest.raises(ValueError, match="checksum mismatch in array 'topk_logprobs'"):
        open_cache(saved)
    with pytest.raises(ValueError, match="'topk_logprobs' must be finite"):
        open_cache(saved, verify=False)
    z = zarr.open_array(str(saved / "arrays" / "topk_ids"), mode="r+")
    ids = z[...]
    ids[0, 0, 0] = V + 1
    z[...] = ids
    with pytest.raises(ValueError, match=r"'topk_ids' must lie in \[0, vocab_size=40\)"):
        open_cache(saved, verify=False)


def test_missing_chunk_file(saved):
    _chunk_files(saved, "softmax_gap")[0].unlink()
    with pytest.raises(ValueError, match="array 'softmax_gap' .* missing 1 chunk"):
        open_cache(saved, verify=False)


@pytest.mark.parametrize(
    "relative, match",
    [
        ("sequences.parquet", "sequences.parquet is missing"),
        ("meta.json", "meta.json is missing"),
        ("vocab.json", "vocab.json is missing"),
        ("arrays/topk_logprobs/zarr.json", "array 'topk_logprobs' is listed in meta.json"),
        ("arrays/hidden", "array 'hidden' is listed in meta.json"),
    ],
)
def test_missing_file(saved, relative, match):
    target = saved / relative
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ValueError, match=match):
        open_cache(saved)


def test_a_zarr_v2_array_is_named_as_such(saved):
    where = saved / "arrays" / "topk_ids"
    values = zarr.open_array(str(where), mode="r")[...]
    shutil.rmtree(where)
    zarr.create_array(store=str(where), data=values, zarr_format=2)
    with pytest.raises(ValueError, match=r"topk_ids/zarr.json is missing \(it holds a zarr v2 array, .zarray; caches"):
        open_cache(saved)


def test_wrong_dtype_on_disk(saved):
    where = saved / "arrays" / "topk_ids"
    values = zarr.open_array(str(where), mode="r")[...]
    shutil.rmtree(where)
    zarr.create_array(store=str(where), data=values.astype(np.int64))
    with pytest.raises(ValueError, match="array 'topk_ids' .* must have dtype int32, got int64"):
        open_cache(saved)


def _rewrite_table(path, fn):
    table = pq.read_table(path / "sequences.parquet")
    pq.write_table(fn(table), path / "sequences.parquet")


def test_changed_parquet_is_a_checksum_mismatch(saved):
    def change(table):
        prompts = table.column("prompt").to_pylist()
        prompts[2] = "a different prompt"
        return table.set_column(table.schema.get_field_index("prompt"), "prompt", [prompts])

    _rewrite_table(saved, change)
    with pytest.raises(ValueError, match="checksum mismatch in table 'sequences'"):
        open_cache(saved)
    assert open_cache(saved, verify=False).sequences["prompt"].iloc[2] == "a different prompt"


@pytest.mark.parametrize(
    "column, values, match",
    [
        ("offset", [0, 5, 9, 15], "inconsistent offsets"),
        ("n_tokens", [5, 3, 7, 2], "inconsistent offsets"),
        ("n_tokens", [5, 3, 8, 0], "inconsistent offsets"),
    ],
)
def test_inconsistent_offsets_in_parquet(saved, column, values, match):
    import pyarrow as pa

    def change(table):
        return table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.int64()))

    _rewrite_table(saved, change)
    with pytest.raises(ValueError, match=match):
        open_cache(saved, verify=False)


def test_output_ids_must_match_full_tokens(saved):
    import pyarrow as pa

    def change(table):
        lists = table.column("output_ids").to_pylist()
        lists[0][0] = (lists[0][0] + 1) % V
        column = pa.array(lists, pa.large_list(pa.int32()))
        return table.set_column(table.schema.get_field_index("output_ids"), "output_ids", column)

    _rewrite_table(saved, change)
    with pytest.raises(ValueError, match="'output_ids' does not match the array 'full_tokens'"):
        open_cache(saved)


def _edit_meta(path, fn):
    meta = json.loads((path / "meta.json").read_text())
    fn(meta)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format_version=2),
         r"unsupported format_version 2; .*written by a newer calm-calibrate, upgrade"),
        (lambda m: m.update(format_version=True), "unsupported format_version True"),
        (lambda m: m.update(format_version=1.0), "unsupported format_version 1.0"),
        (lambda m: m.pop("checksum"), "'checksum' must be the cache's checksum"),
        (lambda m: m.update(n_layers=5), "'n_layers' is 5"),
        (lambda m: m["fields"]["topk_ids"].update(path="../../etc"), "invalid description"),
        (lambda m: m["fields"].pop("topk_logprobs"), r"checksum mismatch in .*meta.json"),
        (lambda m: m.update(vocab_size=V + 1), r"vocab.json holds 40 entries but meta.json says vocab_size=41"),
        (lambda m: m["fields"]["full_tokens"].update(shape=[3]), "has shape"),
        (lambda m: m["generation"].update(max_new_tokens=99), r"meta.json: its metadata .* was edited"),
        (lambda m: m.update(model="another/model"), r"meta.json: its metadata .* was edited"),
    ],
)
def test_edited_meta(saved, edit, match):
    _edit_meta(saved, edit)
    with pytest.raises(ValueError, match=match):
        open_cache(saved)
    if match.startswith(("unsupported", "'checksum'")):  # read before anything else: lazily and unverified too
        pytest.importorskip("dask")
        with pytest.raises(ValueError, match=match):
            open_cache(saved, verify=False, chunks=2)


def test_metadata_changes_go_through_with_meta(saved):
    cache = open_cache(saved)
    changed = cache.with_meta({"generation": {"max_new_tokens": 99}, "note": "x"})
    changed.save(saved, overwrite=True)
    again = open_cache(saved)
    assert again.user_meta["generation"] == {"max_new_tokens": 99} and again.checksum == cache.checksum
    _edit_meta(saved, lambda m: m.update(meta_checksum=None, note="z"))  # a present checksum must match
    with pytest.raises(ValueError, match=r"its metadata .* was edited.*open_cache\(path, verify=False\).save\("):
        open_cache(saved)
    open_cache(saved, verify=False).save(saved.parent / "kept")  # the advice, followed
    assert open_cache(saved.parent / "kept").user_meta["note"] == "z"
    _edit_meta(saved, lambda m: m.pop("meta_checksum"))  # a cache written before the metadata had a checksum
    with pytest.warns(UserWarning, match=r"meta.json has no meta_checksum .* not checked; cache.save\(new_path\)") as w:
        assert open_cache(saved).user_meta["note"] == "z"  # loads, but says that its metadata is unchecked
    assert w[0].filename == __file__  # the caller's line, not the library's
    changed.save(saved, overwrite=True)
    _edit_meta(saved, lambda m: m.update(note="y"))
    assert open_cache(saved, verify=False).user_meta["note"] == "y"


def test_edited_vocab_and_bad_json(saved):
    vocab = json.loads((saved / "vocab.json").read_text())
    vocab[3] = " changed"
    (saved / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="checksum mismatch in vocab 'vocab'"):
        open_cache(saved)
    (saved / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        open_cache(saved)


def test_open_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_cache(tmp_path / "nothing")
    with pytest.raises(ValueError, match="meta.json is missing"):
        open_cache(tmp_path)


# --------------------------------------------------------------------------------------------------
# Checksum, subset, split, decode
# --------------------------------------------------------------------------------------------------


def test_checksum_tracks_content_not_metadata():
    base = LayerCache.from_arrays(**_arrays())
    renamed = LayerCache.from_arrays(**{**_arrays(), "model": "other", "meta": {"note": "x"}})
    assert renamed.checksum == base.checksum
    for change in (
        {"references": ["ref a", None, "ref c", "new"]},
        {"references": ["ref a", "", "ref c", ""]},  # missing is not the empty string
        {"prompts": ["p"] * 4},
        {"ids": ["a", "b", "c", "d"]},
        {"vocab_size": V + 1, "vocab": None},
        {"hidden": None},
    ):
        other = LayerCache.from_arrays(**{**_arrays(), **change})
        assert other.checksum != base.checksum, change
    raw = _arrays()
    raw["topk_logprobs"][0, 0, 2] -= 1e-3
    assert LayerCache.from_arrays(**raw).checksum != base.checksum


def test_subset_keeps_order_and_whole_sequences(cache):
    sub = cache.subset([2, 0])
    assert sub.sequences["id"].tolist() == ["2", "0"]
    assert sub.lengths.tolist() == [7, 5]
    for name, a in cache.arrays.items():
        np.testing.assert_array_equal(sub.arrays[name], np.concatenate([a[8:15], a[0:5]]))
    assert sub.sequences["reference"].tolist() == ["ref c", "ref a"]
    contiguous = cache.subset([1, 2])
    assert np.shares_memory(contiguous.arrays["topk_ids"], cache.arrays["topk_ids"])
    masked = cache.subset(np.array([False, True, True, False]))
    assert masked.checksum == contiguous.checksum
    sub.validate()


@pytest.mark.parametrize(
    "indices, error, match",
    [([4], ValueError, r"\[0, n_sequences=4\)"), ([-1], ValueError, "n_sequences"), ([1, 1], ValueError, "repeat"),
     ([], ValueError, "no sequence"), ([0.5], TypeError, "integers"), ([True, False], ValueError, "mask")],
)
def test_subset_rejects_bad_indices(cache, indices, error, match):
    with pytest.raises(error, match=match):
        cache.subset(np.array(indices))


def test_split_is_by_sequence_disjoint_covering_and_seeded():
    raw = _arrays(lengths=tuple(range(1, 41)), n_layers=2, k=2)
    raw.update(prompts=None, references=None)
    cache = LayerCache.from_arrays(**raw)
    parts = cache.split([0.5, 0.25, 0.25], seed=3)
    assert [p.n_sequences for p in parts] == [20, 10, 10]
    ids = [p.sequences["id"].tolist() for p in parts]
    assert sum(map(len, ids)) == 40 and len(set().union(*map(set, ids))) == 40  # disjoint and covering
    by_id = {cache.sequences["id"].iloc[s]: s for s in range(40)}
    for part in parts:
        assert [by_id[i] for i in part.sequences["id"]] == sorted(by_id[i] for i in part.sequences["id"])
        for j, sid in enumerate(part.sequences["id"]):  # every sequence moves whole
            s = by_id[sid]
            lo, hi = cache.offsets[s], cache.offsets[s + 1]
            plo, phi = part.offsets[j], part.offsets[j + 1]
            np.testing.assert_array_equal(part.arrays["topk_ids"][plo:phi], cache.arrays["topk_ids"][lo:hi])
    again = cache.split([0.5, 0.25, 0.25], seed=3)
    assert [p.checksum for p in again] == [p.checksum for p in parts]
    other = cache.split([0.5, 0.25, 0.25], seed=4)
    assert other[0].sequences["id"].tolist() != ids[0]


@pytest.mark.parametrize(
    "fractions, seed, match",
    [([0.5, 0.6], 0, "sum to 1"), ([1.2, -0.2], 0, "positive"), ([0.99, 0.01], 0, "gets no sequence"),
     ([], 0, "non-empty")],
)
def test_split_rejects_bad_arguments(cache, fractions, seed, match):
    with pytest.raises(ValueError, match=match):
        cache.split(fractions, seed=seed)


def test_decode(cache):
    assert cache.decode([1, 0, 39]) == " t1 t0 t39"
    assert cache.decode(np.array([], dtype=np.int64)) == ""
    with pytest.raises(ValueError, match=r"\[0, vocab_size=40\)"):
        cache.decode([40])


def test_low_level_constructor_validates(cache):
    rebuilt = LayerCache(cache.sequences, dict(cache.arrays), vocab_size=V, meta=cache.meta, vocab=cache.vocab)
    assert rebuilt.checksum == cache.checksum
    seq = cache.sequences
    seq["id"] = ["x", "x", "y", "z"]
    with pytest.raises(ValueError, match="unique"):
        LayerCache(seq, dict(cache.arrays), vocab_size=V)
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size=10\)"):
        LayerCache(cache.sequences, dict(cache.arrays), vocab_size=10)


def test_with_meta_replaces_the_writers_metadata_only():
    from calibrate.synthetic import synthetic_cache

    cache = synthetic_cache(20, seed=3)
    other = cache.with_meta({"model": "m", "generation": {"max_new_tokens": 7}, "checksum": "ignored"})
    assert other.user_meta["model"] == "m" and other.user_meta["generation"] == {"max_new_tokens": 7}
    assert "checksum" not in other.user_meta
    assert other.checksum == cache.checksum  # same content
    assert cache.user_meta["model"] == "synthetic"
    with pytest.raises(TypeError, match="meta must be a dict"):
        cache.with_meta([("model", "m")])
    for bad in ({"x": np.float32(1)}, {"temperature": float("nan")}):  # refused up front, not at save
        with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
            cache.with_meta(bad)
    import calibrate

    opened = LayerCache._trusted(cache._table, cache._arrays, cache._offsets, cache.vocab_size,
                                 {**cache.user_meta, "generation": "greedy"}, cache._vocab)  # as open_cache takes it
    with pytest.raises(TypeError, match=r"the cache's meta\['generation'\] must be a dict"):
        calibrate.fit(opened)  # an AttributeError after the losses
    with pytest.raises(TypeError, match=r"the test cache's meta\['generation'\] must be a dict"):
        calibrate.audit(calibrate.fit(cache), opened)
    for bad, match in [  # keys the library reads: fit died on them after its work (an AttributeError, another name)
        ({"generation": "greedy"}, r"meta\['generation'\] must be a dict or None, got 'greedy'"),
        ({"generation": {"model_generation_config": "x"}}, r"\['model_generation_config'\] must be a dict"),
        ({"model": 123}, r"meta\['model'\] must be a str or None, got 123"),
        ({"heads": "mine"}, r"meta\['heads'\] must be a dict or None"),
    ]:
        with pytest.raises(TypeError, match=match):
            cache.with_meta(bad)
    given = {"generation": {"t": 1}}
    replaced = cache.with_meta(given)
    given["generation"]["t"] = 2
    assert replaced.user_meta["generation"] == {"t": 1}


def test_saved_files_get_the_umask_mode_not_tempfile_private(tmp_path, umask_022, monkeypatch):
    import calibrate
    from calibrate.shards import write_manifest

    cache = calibrate.synthetic_cache(10, n_layers=3, seed=0)
    # Reading the umask means setting it (to 0, briefly): other threads' files would be world-writable.
    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("the process umask was changed"))
    path = cache.save(tmp_path / "cache")
    assert path.stat().st_mode & 0o777 == 0o755  # mkdtemp made it 0o700: nobody else could open the cache
    assert all(p.stat().st_mode & 0o777 in (0o644, 0o755) for p in path.rglob("*"))
    cache.save(path, overwrite=True)
    assert path.stat().st_mode & 0o777 == 0o755
    calibrate.fit(cache).to_json(tmp_path / "cert.json")
    write_manifest(tmp_path / "shards", 2)
    for file in (tmp_path / "cert.json", tmp_path / "shards" / "manifest.json"):
        assert file.stat().st_mode & 0o777 == umask_022
    assert not list(tmp_path.rglob(".*tmp"))


# Checks of the low-level constructor and of open_cache that only a hand-made mutant showed no test reached.


def _arrays_with(arrays, **changes):
    out = dict(arrays)
    for name, value in changes.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def _edited_array(name, fn):
    return lambda c: _arrays_with(c.arrays, **{name: fn(np.array(c.arrays[name]))})


def _negative_id(a):
    a[0, 0, 0] = -1
    return a


@pytest.mark.parametrize(
    "arrays, match",
    [
        (_edited_array("topk_ids", lambda a: a.astype(np.int64)), "array 'topk_ids' must have dtype int32, got int64"),
        (lambda c: _arrays_with(c.arrays, vocab=np.zeros((16, 3), np.float32)),
         "array names must be lowercase identifiers"),
        (_edited_array("hidden", lambda a: a[:, :2]), r"array 'hidden' must have shape \(16, 3, hidden_size\)"),
        (_edited_array("softmax_gap", lambda a: a[:, :2]), r"array 'softmax_gap' must have shape \(16, 3\)"),
        (lambda c: _arrays_with(c.arrays, topk_ids=np.zeros((16, 0, 3), np.int32), topk_logprobs=None, hidden=None,
                         softmax_gap=None, state_saturation=None),
         r"'topk_ids' must have shape \(16, n_layers, top_k\)"),
        (_edited_array("topk_ids", _negative_id), r"array 'topk_ids' must lie in \[0, vocab_size=40\), got -1"),
        (None, "vocab must have vocab_size=40 entries, got 39"),
        ("n_tokens", "must increase strictly|inconsistent offsets"),
        ("float_n_tokens", "column 'n_tokens' disagrees with the offsets"),
        ("offset", "column 'offset' disagrees with the offsets"),
        ("columns", r"sequences must have the columns .*missing \['offset'\]"),
        (lambda c: _arrays_with(c.arrays, full_tokens=None), "the cache needs the array 'full_tokens'"),
        (lambda c: _arrays_with(c.arrays, topk_ids=None), "the cache needs the array 'topk_ids'"),
    ],
)
def test_low_level_constructor_refuses(cache, arrays, match):
    """LayerCache(sequences, arrays, ...) refuses what from_arrays would; only one of its checks had a test."""
    seq, vocab = cache.sequences, cache.vocab
    if arrays is None:
        vocab = vocab[:-1]
    elif arrays == "n_tokens":
        seq["n_tokens"] = [5, 0, 10, 1]
    elif arrays == "float_n_tokens":
        seq["n_tokens"] = [5.5, 3, 7, 1]
    elif arrays == "offset":
        seq["offset"] = [0, 5, 9, 15]
    elif arrays == "columns":
        seq = seq.drop(columns="offset")
    arrays = dict(cache.arrays) if isinstance(arrays, (str, type(None))) else arrays(cache)
    with pytest.raises(ValueError, match=match):
        LayerCache(seq, arrays, vocab_size=V, vocab=vocab)


def test_from_arrays_refuses_hidden_size_zero():
    raw = _arrays()
    raw["hidden"] = np.zeros((16, 3, 0))
    with pytest.raises(ValueError, match=r"hidden must have shape \(16, 3, hidden_size\)"):
        LayerCache.from_arrays(**raw)


def _set_column(table, name, array):
    return table.set_column(table.schema.get_field_index(name), name, array)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: _set_column(t, "prompt", pa.array(range(4), pa.int64())), "column 'prompt' must hold strings"),
        (lambda t: _set_column(t, "output", pa.array(["a", None, "c", "d"], pa.large_string())),
         r"sequences.parquet: column 'output' must not have missing values"),
        (lambda t: _set_column(t, "id", pa.array(["a", "a", "c", "d"], pa.large_string())),
         r"sequences.parquet: column 'id' must be unique"),
        (lambda t: _set_column(_set_column(t, "offset", pa.array([1, 5, 8, 15], pa.int64())), "n_tokens",
                               pa.array([4, 3, 7, 1], pa.int64())), "inconsistent offsets"),
        (lambda t: _set_column(t, "output_ids", pa.array([["x"]] * 4, pa.large_list(pa.large_string()))),
         "column 'output_ids' must hold lists of integers"),
    ],
)
def test_edited_parquet_is_refused_naming_the_column(saved, change, match):
    _rewrite_table(saved, change)
    with pytest.raises(ValueError, match=match):
        open_cache(saved, verify=False)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["fields"].pop("sequences"), "'fields' must describe the table 'sequences'"),
        (lambda m: m["fields"].pop("topk_ids"), "required array 'topk_ids' is not listed in 'fields'"),
        (lambda m: m["fields"]["topk_ids"].update(dtype="int64"), "lists array 'topk_ids' with dtype 'int64'"),
    ],
)
def test_edited_meta_is_refused_by_its_own_check(saved, edit, match):
    _edit_meta(saved, edit)
    with pytest.raises(ValueError, match=match):
        open_cache(saved, verify=False)


def test_negative_id_on_disk_is_refused_unverified(saved):
    where = saved / "arrays" / "topk_ids"
    values = zarr.open_array(str(where), mode="r")[...]
    values[0, 0, 0] = -1
    zarr.open_array(str(where), mode="r+")[...] = values
    with pytest.raises(ValueError, match=r"array 'topk_ids' must lie in \[0, vocab_size=40\), got -1"):
        open_cache(saved, verify=False)


def test_missing_chunk_file_beside_a_stray_file_is_refused(saved):
    """A stray file makes the file count pass; the initialised-chunk count must still notice the missing chunk."""
    where = saved / "arrays" / "topk_ids"
    chunks = sorted(p for p in (where / "c").rglob("*") if p.is_file())
    chunks[-1].unlink()
    (where / "notes.txt").write_text("stray")
    with pytest.raises(ValueError, match=r"array 'topk_ids' at .* is missing 1 chunk file"):
        open_cache(saved, verify=False)
