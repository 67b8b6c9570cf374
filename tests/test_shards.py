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


def test_chunked_shards_equal_the_whole_cache(cache, tmp_path):
    pytest.importorskip("dask")
    _write_shards(tmp_path, cache, [30, 65])
    lazy = calibrate.open_cache(tmp_path, chunks=20)
    assert lazy.checksum == cache.checksum and lazy.n_tokens == cache.n_tokens
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
        (tmp_path / "manifest.json").write_text(json.dumps({"format": "calm-calibrate shards", "format_version": 1, "shards": shards}))
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
    first = extract_main(model_dir, prompts, out, shard=(0, 2), **kw)
    assert first.sequences["id"].tolist() == ["0", "1"] and first.user_meta["sharding"]["stop"] == 2
    with pytest.raises(ValueError, match="lists shard 'shard-00001-of-00002'"):
        calibrate.open_cache(out)  # the manifest is there, the second shard not yet
    argv = ["extract", "--model", str(model_dir), "--prompts", str(prompts), "-o", str(out), "--max-new-tokens", "4"]
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them: one shard per rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "--batch-size", "1"]) == 0
    joined = calibrate.open_cache(out)
    assert joined.checksum == whole.checksum
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
