"""Sharded caches: N workers each write a shard, a manifest joins them into one cache without copying."""

import functools
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

import calibrate
from calibrate.shards import is_sharded, parse_shard, shard_bounds, shard_name, write_manifest


def _write_shards(root, cache, cuts):
    bounds = [0, *cuts, cache.n_sequences]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        cache.subset(np.arange(a, b)).save(root / shard_name(i, len(bounds) - 1))
    write_manifest(root, len(bounds) - 1)


@pytest.fixture(scope="module")
def cache():
    return calibrate.synthetic_cache(90, n_layers=4, seed=5)


def test_shards_read_as_the_whole_cache(cache, tmp_path):
    _write_shards(tmp_path, cache, [30, 65])
    assert is_sharded(tmp_path)
    joined = calibrate.open_cache(tmp_path)
    assert joined.checksum == cache.checksum and joined.sequences["id"].tolist() == cache.sequences["id"].tolist()


def test_a_sharded_cache_is_replaced_by_an_overwrite_as_a_cache_is(cache, tmp_path):
    """It was refused as "not a layer cache directory ... delete a damaged cache yourself"."""
    _write_shards(tmp_path / "c", cache, [30])
    other = calibrate.synthetic_cache(20, n_layers=4, seed=6)
    other.save(tmp_path / "c", overwrite=True)
    assert calibrate.open_cache(tmp_path / "c").checksum == other.checksum
    _write_shards(tmp_path / "d", cache, [30])
    (tmp_path / "d" / "notes.txt").write_text("keep me")  # not the sharded cache's own: refused, kept
    with pytest.raises(ValueError, match="not a layer cache directory"):
        other.save(tmp_path / "d", overwrite=True)
    assert (tmp_path / "d" / "notes.txt").exists()


def test_chunked_shards_equal_the_whole_cache(cache, tmp_path):
    pytest.importorskip("dask")
    _write_shards(tmp_path, cache, [30, 65])
    lazy = calibrate.open_cache(tmp_path, chunks=20)
    assert lazy.checksum == cache.checksum and lazy.n_tokens == cache.n_tokens
    for key in ("fields", "meta_checksum", "n_sequences", "n_tokens", "checksum"):  # not shard 0's own rows
        assert lazy.meta[key] == cache.meta[key], key
    assert lazy.partitions == [(0, 20), (20, 30), (30, 50), (50, 65), (65, 85), (85, 90)]  # none crosses a shard
    pd.testing.assert_frame_equal(lazy.sequences, cache.sequences)  # 'offset' counts from the cache's start
    np.testing.assert_array_equal(lazy.arrays()["topk_ids"].compute(), cache.arrays["topk_ids"])
    part = lazy.load(30, 50)
    np.testing.assert_array_equal(part.arrays["softmax_gap"], cache.subset(np.arange(30, 50)).arrays["softmax_gap"])
    with pytest.raises(ValueError, match="crosses the end of a shard"):
        lazy.load(25, 40)
    kwargs = dict(delta=0.2, epsilon=0.1, consistency="rouge_l")
    assert calibrate.fit(lazy, **kwargs) == calibrate.fit(cache, **kwargs)
    assert calibrate.open_cache(tmp_path, chunks=20, verify=False).checksum == cache.checksum


def test_a_shard_that_is_itself_sharded_is_refused(cache, tmp_path):
    """In memory a nested manifest was followed (a link to '.' recursed 40 levels deep); lazily it was refused."""
    _write_shards(tmp_path / "inner", cache, [30])
    (tmp_path / "outer").mkdir()
    shutil.copytree(tmp_path / "inner", tmp_path / "outer" / shard_name(0, 1))
    write_manifest(tmp_path / "outer", 1)
    for chunks in (None, 20):
        if chunks is not None:
            pytest.importorskip("dask")
        with pytest.raises(ValueError, match=r"shard 'shard-00000-of-00001' of .*outer is itself a sharded cache"):
            calibrate.open_cache(tmp_path / "outer", chunks=chunks)


def test_synthetic_pieces_with_their_own_seeds_and_ids_join(tmp_path):
    pieces = [calibrate.synthetic_cache(n, n_layers=4, seed=i, first_id=10 * i) for i, n in enumerate((10, 7))]
    for i, piece in enumerate(pieces):
        piece.save(tmp_path / shard_name(i, 2))
    write_manifest(tmp_path, 2)
    joined = calibrate.open_cache(tmp_path)
    assert joined.sequences["id"].tolist() == [f"synthetic-{i}" for i in range(17)]
    np.testing.assert_array_equal(joined.arrays["softmax_gap"][-pieces[1].n_tokens :], pieces[1].arrays["softmax_gap"])


@pytest.mark.parametrize("chunks", [None, 16])
def test_a_missing_or_corrupt_shard_is_named(cache, tmp_path, chunks):
    _write_shards(tmp_path, cache, [45])
    second = tmp_path / shard_name(1, 2)
    chunk = next(p for p in (second / "arrays" / "entropy").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[::-1])
    with pytest.raises(ValueError, match="shard 'shard-00001-of-00002'.*entropy"):
        calibrate.open_cache(tmp_path, chunks=chunks)
    shutil.rmtree(second)
    with pytest.raises(ValueError, match="lists shard 'shard-00001-of-00002' but .* is missing"):
        calibrate.open_cache(tmp_path, chunks=chunks)


@pytest.mark.parametrize("chunks", [None, 16])
def test_shards_that_do_not_belong_together_are_refused(cache, tmp_path, chunks):
    _write_shards(tmp_path, cache, [45])
    second = tmp_path / shard_name(1, 2)
    other = cache.subset(np.arange(45, 90))
    other.with_meta({**other.user_meta, "model": "another-model"}).save(second, overwrite=True)
    with pytest.raises(ValueError, match="shard 'shard-00001-of-00002' .* differs .* in 'model'"):
        calibrate.open_cache(tmp_path, chunks=chunks)
    calibrate.synthetic_cache(45, n_layers=5, seed=5).save(second, overwrite=True)
    with pytest.raises(ValueError, match="shard-00001-of-00002"):
        calibrate.open_cache(tmp_path, chunks=chunks)
    cache.subset(np.arange(0, 45)).save(second, overwrite=True)  # the same ids twice
    with pytest.raises(ValueError, match="(?i)id"):
        calibrate.open_cache(tmp_path, chunks=chunks)


@pytest.mark.parametrize("chunks", [None, 16])
def test_shards_of_one_model_loaded_by_other_paths_join(cache, tmp_path, chunks):
    """Workers load the model from their own paths; the weights digest says it is the same model."""
    heads = {"kind": "logit_lens", "model_digest": "d1"}
    cuts = [0, 45, 90]
    for i, path in enumerate(["model", "/mnt/worker1/model"]):
        part = cache.subset(np.arange(cuts[i], cuts[i + 1]))
        part.with_meta({**part.user_meta, "model": path, "tokenizer": path, "heads": heads}).save(
            tmp_path / shard_name(i, 2)
        )
    write_manifest(tmp_path, 2)
    assert calibrate.open_cache(tmp_path, chunks=chunks).n_sequences == 90  # was "differs ... in 'model'"
    second = cache.subset(np.arange(45, 90))
    meta = {**second.user_meta, "model": "model", "heads": {**heads, "model_digest": "d2"}}
    second.with_meta(meta).save(tmp_path / shard_name(1, 2), overwrite=True)
    with pytest.raises(ValueError, match="differs .* in 'heads' -> 'model_digest'"):
        calibrate.open_cache(tmp_path, chunks=chunks)


def test_manifest_and_shard_specs(tmp_path):
    write_manifest(tmp_path, 3)
    write_manifest(tmp_path, 3)  # every worker writes the same manifest
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"][2] == "shard-00002-of-00003"
    with pytest.raises(ValueError, match="lists 3 shards, not 4"):
        write_manifest(tmp_path, 4)
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"not a calm-calibrate shard manifest .*it says format 'something else', "):
        calibrate.open_cache(tmp_path)
    for shards in (["shard-00000-of-00002"], ["shard-00001-of-00002", "shard-00000-of-00002"]):  # were opened
        (tmp_path / "manifest.json").write_text(
            json.dumps({"format": "calm-calibrate shards", "format_version": 1, "shards": shards})
        )
        with pytest.raises(ValueError, match=r"'shards' must list 'shard-00000-of-0000\d' to .* in order"):
            calibrate.open_cache(tmp_path)
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # was a RecursionError
    with pytest.raises(ValueError, match=r"manifest.json nests JSON deeper than 100 levels"):
        calibrate.open_cache(tmp_path)
    assert parse_shard("2/8") == (2, 8) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("8/8", "-1/4", "1", "a/b"):
        with pytest.raises(ValueError, match="i/N"):
            parse_shard(bad)
    assert [shard_bounds(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [shard_bounds(40, i, 4, batch_size=8) for i in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 40)]
    assert [shard_bounds(10, i, 2, batch_size=4) for i in range(2)] == [(0, 4), (4, 10)]  # whole batches
    with pytest.raises(ValueError, match="every shard needs at least one batch"):
        shard_bounds(2, 0, 3)
    with pytest.raises(ValueError, match="4 shards for 10 prompts in 3 batches of 4"):
        shard_bounds(10, 0, 4, batch_size=4)


def _piece(n, seed, first_id, *, vocab=None, scores=None, sharding=None):
    """A small cache built from arrays, as one worker's shard (``sharding``: what extract_main records)."""
    source = calibrate.synthetic_cache(n, n_layers=3, seed=seed, first_id=first_id)
    arrays = {name: source.arrays[name] for name in ("full_tokens", "topk_ids", "topk_logprobs")}
    meta = None if sharding is None else {"sharding": sharding}
    return calibrate.LayerCache.from_arrays(
        **arrays, lengths=source.lengths, ids=source.sequences["id"].tolist(), vocab=vocab or source.vocab,
        scores=scores, meta=meta, model="m",
    )  # fmt: skip


def _join(tmp_path, *pieces):
    for i, piece in enumerate(pieces):
        piece.save(tmp_path / shard_name(i, len(pieces)), overwrite=True)
    write_manifest(tmp_path, len(pieces))


@pytest.mark.parametrize("chunks", [None, 4])
def test_shards_with_another_vocab_or_other_fields_are_refused(tmp_path, chunks):
    """Shards of one model name, tokenizer and settings still differ in their vocabulary pieces or stored scores."""
    if chunks is not None:
        pytest.importorskip("dask")
    first = _piece(6, 0, 0)
    vocab = list(first.vocab)
    vocab[7] += "x"  # another tokenizer revision: the same size, one piece differs
    _join(tmp_path, first, _piece(5, 1, 10, vocab=vocab))
    with pytest.raises(ValueError, match=r"shard 'shard-00001-of-00002' of .* differs from .* in field 'vocab'"):
        calibrate.open_cache(tmp_path, chunks=chunks)
    scores = {"my_score": calibrate.synthetic_cache(5, n_layers=3, seed=1).arrays["softmax_max"]}
    _join(tmp_path, first, _piece(5, 1, 10, scores=scores))  # a score only the second shard stores
    with pytest.raises(ValueError, match=r"shard 'shard-00001-of-00002' of .* has the fields \['full_tokens', 'my_sc"):
        calibrate.open_cache(tmp_path, chunks=chunks)


@pytest.mark.parametrize("chunks", [None, 4])
def test_shards_must_say_they_are_their_place_of_one_prompt_list(tmp_path, chunks):
    if chunks is not None:
        pytest.importorskip("dask")

    def sharding(index, prompts="digest-a", count=2):
        return {"index": index, "count": count, "prompts": prompts}

    _join(tmp_path, _piece(6, 0, 0, sharding=sharding(0)), _piece(5, 1, 10, sharding=sharding(1)))
    joined = calibrate.open_cache(tmp_path, chunks=chunks)
    assert joined.n_sequences == 11 and "sharding" not in joined.user_meta  # it describes one shard, not the cache
    for second, match in [
        (sharding(0), r"shard 'shard-00001-of-00002' of .* says it is shard 0 of 2"),  # a copy of the first
        (sharding(1, count=3), r"shard 'shard-00001-of-00002' of .* says it is shard 1 of 3"),
        (sharding(1, prompts="digest-b"), r"shard 'shard-00001-of-00002' of .* was extracted from another prompt list"),
        (None, r"shard 'shard-00001-of-00002' of .* has no 'sharding' record .* shard 'shard-00000-of-00002' has"),
        ("x", r"shard 'shard-00001-of-00002' of .*: its meta's 'sharding' must be a mapping"),  # an AttributeError
    ]:
        _join(tmp_path, _piece(6, 0, 0, sharding=sharding(0)), _piece(5, 1, 10, sharding=second))
        with pytest.raises(ValueError, match=match):
            calibrate.open_cache(tmp_path, chunks=chunks)


@pytest.mark.parametrize("chunks", [None, 4])
def test_shards_that_do_not_tile_the_prompt_list_are_refused(tmp_path, chunks):
    """Shards of two versions' bounds ([0, 5) then [6, 11)) joined as the whole cache with prompt 5 missing."""
    if chunks is not None:
        pytest.importorskip("dask")

    def sharding(index, start, stop, n_prompts=11):
        return {"index": index, "count": 2, "prompts": "d", "start": start, "stop": stop, "n_prompts": n_prompts}

    def join(first, second):
        _join(tmp_path, _piece(first[1] - first[0], 0, 0, sharding=sharding(0, *first)),
              _piece(second[1] - second[0], 1, 10, sharding=sharding(1, *second)))  # fmt: skip
        return calibrate.open_cache(tmp_path, chunks=chunks)

    assert join((0, 6), (6, 11)).n_sequences == 11
    for first, second, match in [
        ((0, 5), (6, 11), r"shard 'shard-00001-of-00002' of .* holds prompts \[6, 11\) .* end at prompt 5 of 11"),
        ((0, 6), (5, 11), r"shard 'shard-00001-of-00002' .* holds prompts \[5, 11\)"),  # one prompt twice
        ((1, 6), (6, 11), r"shard 'shard-00000-of-00002' .* holds prompts \[1, 6\)"),
        ((0, 6), (6, 10), r"the shards of .* end at prompt 10 of 11: the last prompts are missing"),
    ]:
        with pytest.raises(ValueError, match=match):
            join(first, second)


@pytest.mark.parametrize("chunks", [None, 16])
def test_a_shard_with_valid_but_edited_values_is_a_checksum_mismatch(cache, tmp_path, chunks):
    """Decodable chunks of other values: only the shard's checksum tells, when verified (lazily too)."""
    zarr = pytest.importorskip("zarr")
    if chunks is not None:
        pytest.importorskip("dask")
    _write_shards(tmp_path, cache, [45])
    z = zarr.open_array(str(tmp_path / shard_name(1, 2) / "arrays" / "topk_logprobs"), mode="r+")
    values = z[...]
    values[0, 0] -= 0.5  # still valid log-probabilities
    z[...] = values
    with pytest.raises(ValueError, match=r"shard 'shard-00001-of-00002': .*checksum mismatch in array 'topk_logprobs'"):
        calibrate.open_cache(tmp_path, chunks=chunks)
    assert calibrate.open_cache(tmp_path, chunks=chunks, verify=False).n_sequences == cache.n_sequences


def test_manifests_of_another_format_version_or_no_shards_are_refused(tmp_path):
    calibrate.synthetic_cache(10, n_layers=3, seed=0).save(tmp_path / shard_name(0, 1))
    manifest = {"format": "calm-calibrate shards", "format_version": 1, "shards": [shard_name(0, 1)]}
    for edit, match in [
        ({"format_version": 2}, r"not a calm-calibrate shard manifest of format_version 1 .*format_version 2\)"),
        ({"shards": []}, r"'shards' must list shard directory names like 'shard-00000-of-00002'"),
        ({"shards": 5}, r"'shards' must list shard directory names"),
        ({"shards": ["shard-0-of-1"]}, r"'shards' must list shard directory names"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(ValueError, match=match):
            calibrate.open_cache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps([manifest]))
    with pytest.raises(ValueError, match=r"manifest.json must hold a JSON object"):
        calibrate.open_cache(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert calibrate.open_cache(tmp_path).n_sequences == 10


def test_a_manifest_listing_other_shards_is_another_runs(tmp_path):
    from calibrate.shards import _check_manifest

    assert not _check_manifest(tmp_path, 2)  # none yet
    manifest = {"format": "calm-calibrate shards", "format_version": 1}
    for shards, match in [
        ([shard_name(1, 2), shard_name(0, 2)], r"lists other shards than this run's 2: \['shard-00001-of-00002', "),
        (None, "lists 0 shards, not 2: another run wrote into"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "shards": shards}))
        with pytest.raises(ValueError, match=match):
            _check_manifest(tmp_path, 2)
        with pytest.raises(ValueError, match=match):
            write_manifest(tmp_path, 2)


def test_the_manifest_goes_into_a_directory_made_for_it(tmp_path):
    """A worker may finish its manifest first: the output directory need not exist yet."""
    path = write_manifest(tmp_path / "new" / "out", 2)
    assert path == tmp_path / "new" / "out" / "manifest.json"
    assert json.loads(path.read_text())["shards"] == [shard_name(0, 2), shard_name(1, 2)]
    # A URL wrote the local directory "memory:/b/out" and left the URL without a manifest
    pytest.importorskip("fsspec")
    with pytest.raises(ValueError, match="write_manifest writes a local directory, got the URL 'memory://b/out'"):
        write_manifest("memory://b/out", 2)
    assert write_manifest(f"file://{tmp_path / 'url'}", 2) == tmp_path / "url" / "manifest.json"


def test_shard_bounds_refuse_an_index_outside_the_shards():
    for index in (-1, 3, 4):  # every shard of 3 exists: shard 3 (or -1) would be an empty or a negative slice
        rule = r"shard index must be an int in 0..2 \(0-based, of 3 shards\)"
        with pytest.raises(ValueError, match=rf"{rule}, got {index}$"):
            shard_bounds(10, index, 3)


@pytest.mark.parametrize(
    ("batch_size", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_shard_bounds_refuse_a_batch_size_that_is_not_an_int_of_at_least_one(batch_size, error):
    # 0 divided by zero, -1 gave "-2 batches of -1", 2.5 and True were used as sizes
    with pytest.raises(error, match=rf"^batch_size must be an int >= 1, got {batch_size!r}"):
        shard_bounds(10, 0, 2, batch_size=batch_size)


def test_shard_bounds_and_names_refuse_counts_that_are_not_ints():
    """A float count gave float bounds (prompts[3.0:6.0] failed), a fractional index bounds overlapping the others."""
    for args, name in (((10, 1, 3.0), "count"), ((10, 1.5, 3), "shard index"), ((10.0, 1, 3), "n")):
        with pytest.raises(TypeError, match=rf"^{name} must be an int"):
            shard_bounds(*args)
    with pytest.raises(TypeError, match="^index must be an int >= 0, got 1.0"):
        shard_name(1.0, 3)
    with pytest.raises(ValueError, match="^count must be an int >= 1, got 0"):
        shard_bounds(10, 0, 0)


def test_as_many_shards_as_batches_give_each_shard_one_batch():
    assert [shard_bounds(3, i, 3) for i in range(3)] == [(0, 1), (1, 2), (2, 3)]
    assert [shard_bounds(10, i, 3, batch_size=4) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]


def test_the_prompt_digest_covers_prompts_references_and_their_order():
    from calibrate.shards import _prompts_digest

    digests = {
        _prompts_digest(["a", "b"], None),
        _prompts_digest(["a", "b"], ["x", "y"]),
        _prompts_digest(["a", "b"], ["x", "z"]),  # shards of one prompt list scored against other references
        _prompts_digest(["b", "a"], None),
    }
    assert len(digests) == 4 and _prompts_digest(["a", "b"], ["x", "y"]) == _prompts_digest(("a", "b"), ("x", "y"))


# --------------------------------------------------------------------------------------------------
# Sharded extraction from a model
# --------------------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
from _tiny_hf import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = ["w1 w2 w3 w4 w5", "w7", "w9 w10 w11", "w12 w13 w14 w15", "w20 w21"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return root / "model", root / "prompts.txt"


def test_sharded_extraction_equals_one_extraction(saved_model, tmp_path, monkeypatch):
    from calibrate.cli import main
    from calibrate.extraction import extract_main

    model_dir, prompts = saved_model
    kw = dict(max_new_tokens=4, batch_size=1, progress=False)
    whole = extract_main(model_dir, prompts, tmp_path / "whole", **kw)
    out = tmp_path / "sharded"
    (tmp_path / "sharded.shards" / "shard-00001-of-00002").mkdir(parents=True)  # the other shard's, running
    first = extract_main(model_dir, prompts, out, shard=(0, 2), **kw)
    assert sorted(p.name for p in (tmp_path / "sharded.shards").iterdir()) == ["shard-00001-of-00002"]
    assert first.sequences["id"].tolist() == ["0", "1"] and first.user_meta["sharding"]["stop"] == 2
    with pytest.raises(ValueError, match="lists shard 'shard-00001-of-00002'"):
        calibrate.open_cache(out)  # the manifest is there, the second shard not yet
    argv = ["extract", "--model", str(model_dir), "--prompts", str(prompts), "-o", str(out), "--max-new-tokens", "4"]
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them: one shard per rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--batch-size", "1"]) == 0
    joined = calibrate.open_cache(out)
    assert joined.checksum == whole.checksum
    assert not (tmp_path / "sharded.shards").exists()  # the batch directory it named, empty after the last shard
    assert "sharding" not in joined.user_meta and joined.user_meta["generation"] == whole.user_meta["generation"]
    other = tmp_path / "other"
    extract_main(model_dir, prompts, other, shard=(0, 2), **kw)
    extract_main(model_dir, prompts, other, shard=(1, 2), **{**kw, "max_new_tokens": 3})
    with pytest.raises(ValueError, match="differs .* in 'generation' -> 'max_new_tokens': 3 != 4"):
        calibrate.open_cache(other)
    with pytest.raises(FileExistsError, match="shard-00001-of-00002 exists"):  # not the old shard of other settings
        extract_main(model_dir, prompts, other, shard=(1, 2), **kw)
    with pytest.raises(ValueError, match="lists 2 shards, not 3"):
        extract_main(model_dir / "missing", prompts, other, shard=(0, 3), **kw)  # before loading any model
    with pytest.raises(ValueError, match="holds a single cache .*a directory of its own"):
        extract_main(model_dir / "missing", prompts, tmp_path / "whole", shard=(0, 2), **kw)  # it was written inside
    shutil.copy(other / "manifest.json", tmp_path / "whole")  # as an older version did: which does open_cache mean?
    with pytest.raises(ValueError, match=r"holds both a single cache \(meta.json\) and a shard manifest"):
        calibrate.open_cache(tmp_path / "whole")


def test_each_shard_resumes_on_its_own(saved_model, tmp_path, monkeypatch):
    import calibrate.extraction as extraction

    model_dir, prompts = saved_model
    kw = dict(max_new_tokens=4, batch_size=1, progress=False)
    out = tmp_path / "sharded"
    original, calls = extraction._extract_batch, []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(extraction, "_extract_batch", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        extraction.extract_main(model_dir, prompts, out, shard=(1, 2), **kw)
    assert not (out / shard_name(1, 2)).exists()
    calls.clear()
    monkeypatch.setattr(extraction, "_extract_batch", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    resumed = extraction.extract_main(model_dir, prompts, out, shard=(1, 2), **kw)
    assert calls == [1, 2]  # the shard's first batch was read back
    assert resumed.sequences["id"].tolist() == ["2", "3", "4"]
    calls.clear()
    again = extraction.extract_main(model_dir, prompts, out, shard=(1, 2), **kw)  # complete: nothing redone
    assert calls == [] and again.checksum == resumed.checksum


def test_a_finished_shard_of_other_weights_or_heads_is_not_reused(saved_model, tmp_path, capsys):
    from calibrate.cli import main
    from calibrate.extraction import extract_main
    from calibrate.heads import ExitHeads
    from calibrate.models import load_local

    model_dir, prompts = tmp_path / "model", saved_model[1]
    shutil.copytree(saved_model[0], model_dir)
    kw = dict(max_new_tokens=4, batch_size=1, top_k=8, store_hidden=False, progress=False)  # what the command passes
    out = tmp_path / "sharded"
    first = extract_main(model_dir, prompts, out, shard=(0, 2), **kw)
    assert extract_main(model_dir, prompts, out, shard=(0, 2), **kw).checksum == first.checksum  # kept
    defaults = dict(max_new_tokens=4, batch_size=1, progress=False)  # top_k, store_hidden left at extract's defaults
    assert extract_main(model_dir, prompts, out, shard=(0, 2), **defaults).checksum == first.checksum  # kept too
    copy = tmp_path / "copy"  # the same weights from another path (a worker's own copy): kept
    shutil.copytree(model_dir, copy)
    assert extract_main(copy, prompts, out, shard=(0, 2), **kw).checksum == first.checksum  # was "exists"
    numpy_ints = {**kw, "top_k": np.int64(8), "batch_size": np.int32(1)}  # crashed recording them after the work
    assert extract_main(model_dir, prompts, tmp_path / "np", shard=(0, 2), **numpy_ints).checksum == first.checksum
    heads = ExitHeads.from_model(load_local(model_dir)[0], adapters=True)
    with torch.no_grad():
        heads.adapter_bias.add_(0.5)
    with pytest.raises(FileExistsError, match=r"other heads \(kind 'adapters' now, the shard's 'logit_lens', "):
        extract_main(model_dir, prompts, out, shard=(0, 2), heads=heads, **kw)
    tiny_model("gpt2", seed=1).save_pretrained(model_dir)  # other weights saved to the same path
    stale = (
        r"shard-00000-of-00002 is a finished shard of the same prompts and settings but of other model weights "
        r"\(weights digest '\w+' now, the shard's '\w+'\): it is not reused; pass overwrite=True \(--overwrite"
    )
    with pytest.raises(FileExistsError, match=stale):  # as the unsharded path refuses to write over a cache
        extract_main(model_dir, prompts, out, shard=(0, 2), **kw)
    argv = ["extract", "--model", str(model_dir), "--prompts", str(prompts), "-o", str(out), "--shard", "0/2"]
    assert main([*argv, "--max-new-tokens", "4", "--batch-size", "1"]) == 2
    assert "is a finished shard of the same prompts and settings but of other model weights" in capsys.readouterr().err
    again = extract_main(model_dir, prompts, out, shard=(0, 2), overwrite=True, **kw)
    assert again.user_meta["sharding"]["weights"] != first.user_meta["sharding"]["weights"]
    assert not np.array_equal(again.arrays["topk_logprobs"], first.arrays["topk_logprobs"])
    assert extract_main(model_dir, prompts, out, shard=(0, 2), **kw).checksum == again.checksum  # kept again
    target = out / shard_name(0, 2)
    old = calibrate.open_cache(target)
    sharding = {k: v for k, v in old.user_meta["sharding"].items() if k != "weights"}  # as an older version wrote it
    old.with_meta({**old.user_meta, "sharding": sharding}).save(target, overwrite=True)
    assert "weights" not in extract_main(model_dir, prompts, out, shard=(0, 2), **kw).user_meta["sharding"]  # kept:
    # its heads' model_digest covers every weight (it was refused as "of other model weights")


def test_shards_sharing_a_shard_dir_use_their_own_subdirectories(saved_model, tmp_path):
    from calibrate.extraction import extract_main

    model_dir, prompts = saved_model
    kw = dict(max_new_tokens=4, batch_size=1, progress=False)
    common, out = tmp_path / "common", tmp_path / "sharded"
    extract_main(model_dir, prompts, out, shard=(0, 2), shard_dir=common, keep_shards=True, **kw)
    extract_main(model_dir, prompts, out, shard=(1, 2), shard_dir=common, **kw)  # deletes its own batches only
    assert [p.name for p in common.iterdir()] == [shard_name(0, 2)]
    assert sorted(p.name for p in (common / shard_name(0, 2)).iterdir()) == ["batch_00000", "batch_00001"]
    assert calibrate.open_cache(out).checksum == extract_main(model_dir, prompts, tmp_path / "whole", **kw).checksum


def test_a_shards_batches_go_beside_the_output_and_its_prompts_are_named_by_their_line(
    saved_model, tmp_path, monkeypatch
):
    """The batches of a shard went into the sharded output (shard-0000i-of-0000N.shards), which then could not be
    replaced once one was left there; a shard named a prompt by its place in the shard, not in the file."""
    from calibrate.extraction import extract_main

    model_dir, prompts = saved_model
    kw = dict(max_new_tokens=4, batch_size=1, progress=False)
    out = tmp_path / "sharded"
    extract_main(model_dir, prompts, out, shard=(0, 2), keep_shards=True, **kw)
    batches = tmp_path / "sharded.shards" / shard_name(0, 2)  # beside the output, as documented
    assert sorted(p.name for p in batches.iterdir()) == ["batch_00000", "batch_00001"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", shard_name(0, 2)]
    extract_main(model_dir, prompts, out, shard=(1, 2), **kw)
    extract_main(model_dir, prompts, out, overwrite=True, **kw)  # was "refusing to overwrite ...: not a layer cache"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # a worker run inside its output: "." has no name to put ".shards" after
    extract_main(model_dir, prompts, ".", shard=(0, 2), keep_shards=True, **kw)
    assert (tmp_path / "here.shards" / shard_name(0, 2) / "batch_00000").is_dir()
    long = tmp_path / "long.txt"
    long.write_text("\n".join([*PROMPTS, " ".join(["w1"] * 200)]) + "\n", encoding="utf-8")  # the last line
    with pytest.raises(ValueError, match=rf"prompt {len(PROMPTS)} \(200 tokens\)"):  # was its place in shard 1
        extract_main(model_dir, long, tmp_path / "again", shard=(1, 2), **kw)


def test_shards_tokenised_by_another_tokenizer_are_refused(saved_model, tmp_path, monkeypatch):
    """Same weights, same vocabulary pieces, a tokenizer that adds a BOS: the shards joined silently into a cache
    that matched neither extraction (the docs say shards of other tokenizers are refused)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from calibrate import shards
    from calibrate.extraction import extract_main

    model_dir, prompts = saved_model
    other = tmp_path / "model_bos"
    shutil.copytree(model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tokenizer.save_pretrained(other)
    kw = dict(max_new_tokens=4, batch_size=1, progress=False)
    out = tmp_path / "sharded"
    extract_main(model_dir, prompts, out, shard=(0, 2), **kw)
    extract_main(other, prompts, out, shard=(1, 2), **kw)
    for chunks in (None, 2):
        with pytest.raises(ValueError, match="shard-00001-of-00002' .* tokenised the prompt list otherwise"):
            calibrate.open_cache(out, chunks=chunks)
    mixed = tmp_path / "mixed"  # shard 0 of an older version, which recorded no tokenisation: the others still differ
    with monkeypatch.context() as patch:
        patch.setattr(shards, "_token_ids_digest", lambda token_ids: None)
        extract_main(model_dir, prompts, mixed, shard=(0, 3), **kw)
    extract_main(model_dir, prompts, mixed, shard=(1, 3), **kw)
    extract_main(other, prompts, mixed, shard=(2, 3), **kw)
    with pytest.raises(ValueError, match="shard-00002-of-00003' .* otherwise than 'shard-00001-of-00003'"):
        calibrate.open_cache(mixed)  # was joined: only shard 0's record was compared with
    with pytest.raises(FileExistsError, match="shard-00000-of-00002 exists"):  # its shard of the other tokenizer
        extract_main(other, prompts, out, shard=(0, 2), **kw)  # was kept


def test_a_shard_saved_meanwhile_by_another_run_of_it_is_kept(saved_model, tmp_path, monkeypatch):
    """Two runs of one shard (a requeued job): the slower failed after all its work with "exists; pass
    overwrite=True" for the very shard it computed. Another run's shard of other settings or heads is still refused,
    and so is any cache saved meanwhile at an unsharded output."""
    import calibrate.extraction as extraction
    from calibrate.heads import ExitHeads
    from calibrate.models import load_local

    model_dir, prompts = saved_model
    kw = dict(max_new_tokens=4, batch_size=1, progress=False)
    out, single, original = tmp_path / "sharded", tmp_path / "single", extraction.extract

    def other_run_finishes_meanwhile(shard, settings, where=model_dir):
        @functools.wraps(original)  # extract_main reads its signature
        def extract(*args, **kwargs):
            cache = original(*args, **kwargs)
            monkeypatch.setattr(extraction, "extract", original)
            extraction.extract_main(where, prompts, out if shard else single, shard=shard, **{**kw, **settings})
            return cache

        return extract

    local = shutil.copytree(model_dir, tmp_path / "node_local")  # the same weights, loaded from another path
    monkeypatch.setattr(extraction, "extract", other_run_finishes_meanwhile((0, 2), {}, local))
    kept = extraction.extract_main(model_dir, prompts, out, shard=(0, 2), **kw)
    assert kept.checksum == calibrate.open_cache(out / shard_name(0, 2)).checksum
    other = {"max_new_tokens": 3, "shard_dir": tmp_path / "elsewhere"}
    monkeypatch.setattr(extraction, "extract", other_run_finishes_meanwhile((1, 2), other))
    with pytest.raises(FileExistsError, match="shard-00001-of-00002 exists"):
        extraction.extract_main(model_dir, prompts, out, shard=(1, 2), **kw)
    heads = ExitHeads.from_model(load_local(model_dir)[0], adapters=True)  # this run's heads: other than the job's
    shutil.rmtree(out / shard_name(1, 2))  # start over: the job saves it meanwhile without adapters
    monkeypatch.setattr(extraction, "extract", other_run_finishes_meanwhile((1, 2), {"shard_dir": tmp_path / "e2"}))
    with pytest.raises(FileExistsError, match="of other heads"):  # was kept, unchecked
        extraction.extract_main(model_dir, prompts, out, shard=(1, 2), heads=heads, shard_dir=tmp_path / "e3", **kw)
    # unsharded: another run's cache saved meanwhile was returned as this run's
    monkeypatch.setattr(extraction, "extract", other_run_finishes_meanwhile(None, {"shard_dir": tmp_path / "e4"}))
    with pytest.raises(FileExistsError, match="single exists"):
        extraction.extract_main(model_dir, prompts, single, **kw)


@pytest.mark.slow
def test_torchrun_writes_one_shard_per_rank(saved_model, tmp_path):
    """A real ``torchrun`` of two ranks on this machine: each writes its shard, the joined cache is whole."""
    import socket
    import subprocess
    import sys

    model_dir, prompts = saved_model
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    arguments = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "4", "--batch-size", "1"]
    # Both runs in subprocesses with one thread each: float results depend on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=300, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    run([*torchrun, "-m", "calibrate", "extract", *arguments, "-o", str(tmp_path / "ranks")])
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir() if p.is_dir()) == [shard_name(0, 2), shard_name(1, 2)]
    run([sys.executable, "-m", "calibrate", "extract", *arguments, "-o", str(tmp_path / "whole")])
    assert calibrate.open_cache(tmp_path / "ranks").checksum == calibrate.open_cache(tmp_path / "whole").checksum
