"""Chunked caches on Dask: the same certificate as in memory."""

import functools
import json
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest

import calibrate
from calibrate.chunked import ChunkedCache
from measures.confidence import confidence

pytest.importorskip("dask")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = calibrate.synthetic_cache(240, n_layers=6, seed=3)
    return cache, cache.save(tmp_path_factory.mktemp("chunked") / "cache")


def test_open_lazily_reads_no_token_array(saved, monkeypatch):
    cache, path = saved
    import calibrate.chunked as chunked

    calls = []
    monkeypatch.setattr(chunked, "_read_slice", lambda *a: calls.append(a))
    lazy = calibrate.open_cache(path, chunks=50, verify=False)
    assert isinstance(lazy, ChunkedCache) and not calls
    assert (lazy.n_sequences, lazy.n_tokens, lazy.n_layers) == (240, cache.n_tokens, 6)
    assert lazy.partitions[0] == (0, 50) and lazy.partitions[-1] == (200, 240)
    assert lazy.checksum == cache.checksum and lazy.user_meta == cache.user_meta


def test_what_a_lazy_cache_hands_out_are_copies(saved):
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=50)
    before = calibrate.fit(lazy, delta=0.2, epsilon=0.1, consistency="rouge_l", decay=0.5)
    table = lazy.sequences
    table["output"] = "x"  # an edit of the handed-out table changed the losses, not the checksum
    for cache in (lazy, calibrate.open_cache(path)):  # columns of their own (pandas 2 shares a shallow copy's)
        assert not np.shares_memory(cache.sequences["n_tokens"].to_numpy(), cache.sequences["n_tokens"].to_numpy())
    lazy.user_meta["generation"]["max_new_tokens"] = 4  # ... and the decay's N
    lazy.meta["fields"].clear()
    with pytest.raises(ValueError, match="read-only"):
        lazy.offsets[1] = 0
    assert calibrate.fit(lazy, delta=0.2, epsilon=0.1, consistency="rouge_l", decay=0.5) == before


def test_partitions_and_dask_arrays_equal_the_cache(saved):
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=64)
    part = lazy.load(64, 128)
    expected = cache.subset(np.arange(64, 128))
    for name in ("topk_ids", "softmax_gap", "hidden"):
        np.testing.assert_array_equal(part.arrays[name], expected.arrays[name])
    np.testing.assert_array_equal(part.offsets, expected.offsets)
    pd.testing.assert_frame_equal(part.sequences, expected.sequences)  # its own 'offset' column, not the cache's
    arrays = lazy.arrays()
    token_chunks = arrays["softmax_gap"].chunks[0]
    assert np.cumsum((0,) + token_chunks).tolist() == [int(cache.offsets[s]) for s in (0, 64, 128, 192, 240)]
    np.testing.assert_array_equal(arrays["softmax_gap"].compute(), cache.arrays["softmax_gap"])


@pytest.mark.parametrize(
    ("measure", "consistency"), [("softmax_gap", "token"), ("state_saturation", "rouge_l"), ("entropy", "risk_bleu")]
)
def test_fit_on_dask_equals_the_in_memory_certificate(saved, measure, consistency):
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=37)
    kwargs = dict(delta=0.2, epsilon=0.1, measure=measure, consistency=consistency)
    assert calibrate.fit(lazy, **kwargs) == calibrate.fit(cache, **kwargs)
    decay = calibrate.Decay(max_len=32, tau=2.0)
    assert calibrate.fit(lazy, decay=decay, **kwargs) == calibrate.fit(cache, decay=decay, **kwargs)


def test_a_bound_from_the_top_k_is_recorded_on_dask_as_in_memory(tmp_path, monkeypatch):
    cache = calibrate.synthetic_cache(60, n_layers=4, seed=0)
    names = ("full_tokens", "topk_ids", "topk_logprobs")
    bare = calibrate.LayerCache.from_arrays(
        **{name: cache.arrays[name] for name in names}, lengths=cache.lengths, vocab_size=cache.vocab_size
    )
    bare.save(tmp_path / "bare")
    lazy = calibrate.open_cache(tmp_path / "bare", chunks=16)
    assert (lazy.top_k, lazy.vocab_size, lazy.has("topk_logprobs"), lazy.has("entropy")) == (
        bare.top_k, bare.vocab_size, True, False
    )
    monkeypatch.setattr(type(lazy), "load", None)  # the record comes from the metadata: nothing read on the client
    cert = calibrate.fit(lazy, measure="entropy", delta=0.3)
    assert (
        cert == calibrate.fit(bare, measure="entropy", delta=0.3) and cert.measure_state == {"from_topk": cache.top_k}
    )


@pytest.mark.parametrize(("measure", "consistency"), [("classifier", "token"), ("halting_geometric", "rouge_l")])
def test_learned_measures_on_dask_equal_the_in_memory_certificate(saved, measure, consistency):
    """The same seeded training split, read into memory; the workers calibrate on the other sequences."""
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=37)
    kwargs = dict(delta=0.2, epsilon=0.1, measure=measure, consistency=consistency, train_fraction=0.4, seed=5)
    cert = calibrate.fit(lazy, **kwargs)
    assert cert == calibrate.fit(cache, **kwargs)
    assert cert.n_train == 96 and cert.measure_state is not None
    other = calibrate.synthetic_cache(50, n_layers=6, seed=4, first_id=1000)  # disjoint training sequences
    by_cache = dict(kwargs, train_cache=other)
    assert calibrate.fit(lazy, **by_cache).n_train == 50
    assert calibrate.fit(lazy, **by_cache) == calibrate.fit(cache, **by_cache)
    tuned = dict(kwargs, measure_options={"C": 0.01})
    assert calibrate.fit(lazy, **tuned) == calibrate.fit(cache, **tuned) != cert


def test_a_learned_measure_on_worker_processes(saved):
    """The trained measure travels to worker processes as its JSON state."""
    distributed = pytest.importorskip("distributed")
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=80)
    kwargs = dict(delta=0.2, epsilon=0.1, measure="classifier")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as lc:
        with distributed.Client(lc) as client:
            assert calibrate.fit(lazy, client=client, **kwargs) == calibrate.fit(cache, **kwargs)
            # A token loss never decodes: a decode the workers cannot receive was refused (in memory: ignored)
            locked = functools.partial(lambda lock, ids: "x", threading.Lock())
            assert calibrate.fit(lazy, client=client, decode=locked, **kwargs) == calibrate.fit(cache, **kwargs)


def test_split_gives_the_in_memory_split(saved):
    """A cache opened with chunks= had no split (AttributeError), though the README splits right after open_cache."""
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=37)
    for got, expected in zip(lazy.split([0.3, 0.7], seed=4), cache.split([0.3, 0.7], seed=4), strict=True):
        assert got.checksum == expected.checksum and list(got.sequences["id"]) == list(expected.sequences["id"])
    with pytest.raises(ValueError, match="fractions"):
        lazy.split([0.3, 0.3], seed=4)


def test_take_reads_some_sequences_into_memory(saved):
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=37)
    idx = [200, 3, 36, 37, 38, 111, 239]  # across partitions, unsorted
    got, expected = lazy.take(idx), cache.subset(sorted(idx))
    assert list(got.sequences["id"]) == list(expected.sequences["id"])
    np.testing.assert_array_equal(got.offsets, expected.offsets)
    for name in expected.arrays:
        np.testing.assert_array_equal(got.arrays[name], expected.arrays[name])
    with pytest.raises(ValueError, match="repeat"):
        lazy.take([3, 3])
    one = lazy.take([5]).arrays["hidden"]
    assert one.base.nbytes == one.nbytes  # its own memory: never a view that keeps a partition alive


def test_loss_table_of_some_sequences(saved):
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=50)
    keep = np.arange(5, 240, 3)
    got = lazy.loss_table(measure="entropy", consistency="token", sequences=keep)
    expected = calibrate.losses.proxy_losses(
        cache.subset(keep), confidence(cache.subset(keep), "entropy"), calibrate.default_lambdas()
    )
    np.testing.assert_array_equal(got.losses, expected.losses)
    np.testing.assert_array_equal(got.avg_layers, expected.avg_layers)
    with pytest.raises(ValueError, match="sequences: .*repeat"):
        lazy.loss_table(measure="entropy", sequences=[3, 3])
    with pytest.raises(ValueError, match="measure_state is required"):
        lazy.loss_table(measure="classifier")
    with pytest.raises(ValueError, match="measure_state is required"):
        lazy.loss_table(measure="entropy", measure_state={})


def test_tasks_carry_only_the_table_columns_they_read(saved, monkeypatch):
    """Prompts, outputs and output ids stay on the client; references travel only for a risk."""
    import calibrate.chunked as chunked

    seen, original = [], chunked._partition_losses

    def recorded(cache, first, stop, rows, *rest):
        seen.append(list(rows))
        return original(cache, first, stop, rows, *rest)

    monkeypatch.setattr(chunked, "_partition_losses", recorded)
    lazy = calibrate.open_cache(saved[1], chunks=100)
    lazy.loss_table(consistency="token")
    lazy.loss_table(consistency="risk_rouge_l")
    assert seen == [["id", "n_tokens", "offset"]] * 3 + [["id", "n_tokens", "offset", "reference"]] * 3


def test_fit_on_a_local_cluster_retries_a_failing_task(saved, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=60)
    flag = tmp_path / "failed-once"
    import calibrate.chunked as chunked

    original = chunked._partition_losses

    def flaky(part, first, *args):  # the first attempt on partition 60 fails
        if first == 60 and not flag.exists():
            flag.write_text("x")
            raise RuntimeError("deliberate failure")
        return original(part, first, *args)

    chunked._partition_losses = flaky
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
            with distributed.Client(lc) as client:
                cert = calibrate.fit(lazy, delta=0.2, epsilon=0.1, client=client, progress=True)
    finally:
        chunked._partition_losses = original
    assert flag.exists() and cert == calibrate.fit(cache, delta=0.2, epsilon=0.1)
    err = capsys.readouterr().err  # a bar over the partitions as they finish (was none: progress ignored)
    assert "token losses: 100%" in err and "| 4/4 [" in err


def test_a_failed_partition_cancels_the_rest_on_the_cluster(saved, tmp_path, monkeypatch):
    """The error came once every other partition had been computed for nobody; Ctrl-C (the same path) left the
    cluster computing them."""
    distributed = pytest.importorskip("distributed")
    import calibrate.chunked as chunked

    lazy = calibrate.open_cache(saved[1], chunks=24)  # 10 partitions
    log, original = tmp_path / "calls", chunked._partition_losses  # a file: the tasks reach the worker pickled

    def slow(cache, first, *rest):
        with open(log, "a") as f:
            f.write(f"{first}\n")
        if len(log.read_text().split()) == 1:
            raise RuntimeError("deliberate failure")
        time.sleep(0.3)
        return original(cache, first, *rest)

    monkeypatch.setattr(chunked, "_partition_losses", slow)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        with distributed.Client(lc) as client:
            with pytest.raises(RuntimeError, match="deliberate failure"):
                lazy.loss_table(consistency="token", client=client, retries=0)
            time.sleep(1.0)
    assert 1 <= len(log.read_text().split()) <= 3


def test_progress_bar_over_the_partitions(saved, capsys):
    _, path = saved
    lazy = calibrate.open_cache(path, chunks=50)
    calibrate.fit(lazy, delta=0.2, epsilon=0.1, consistency="rouge_l", progress=True)
    err = capsys.readouterr().err
    assert "rouge_l losses: 100%" in err and "| 5/5 [" in err
    calibrate.fit(lazy, delta=0.2, epsilon=0.1)  # proxy mode's default: quiet
    assert capsys.readouterr().err == ""


def test_functions_of_a_cache_in_memory_refuse_a_lazy_one_and_say_how_to_read_it(saved):
    """They failed on the lazy cache's arrays() method ("argument of type 'method' is not iterable")."""
    import measures
    from measures import oracles

    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=50)
    conf = confidence(cache, "softmax_max")
    calls = [
        lambda: confidence(lazy, "softmax_max"),
        lambda: calibrate.proxy_losses(lazy, conf, [0.9, 0.5]),
        lambda: measures.agreement(lazy),
        lambda: oracles.consistency_oracle(lazy),
        lambda: oracles.oracle_average_layers(lazy, delta=0.1),
        lambda: measures.ExitClassifier().fit(lazy),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"in memory.*cache.take\(indices\)"):
            call()


def test_bad_input(saved, monkeypatch):
    import measures.learned

    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=50)
    with pytest.raises(ValueError, match="measure must be one of"):
        calibrate.fit(lazy, measure="oracle")
    with pytest.raises(ValueError, match="train_cache is used only by the learned measures"):
        calibrate.fit(lazy, train_cache=cache)
    with pytest.raises(ValueError, match="train_cache is the calibration cache itself"):
        calibrate.fit(lazy, measure="classifier", train_cache=cache)
    with pytest.raises(TypeError, match="seed must be an int"):
        calibrate.fit(lazy, seed=0.5)
    with pytest.raises(ValueError, match="measure must be one of"):
        calibrate.fit(lazy, measure="oracle", train_cache=cache)
    with pytest.raises(TypeError, match="train_cache must be a calibrate.LayerCache in memory"):
        calibrate.fit(lazy, measure="classifier", train_cache=lazy)
    with pytest.raises(ValueError, match="chunks must be an int"):
        calibrate.open_cache(path, chunks=0)
    with pytest.raises(ValueError, match="client= runs a chunked cache"):
        calibrate.fit(cache, client=object())
    with monkeypatch.context() as m:
        m.setattr(measures.learned, "train_measure", lambda *a, **k: pytest.fail("trained before checking client"))
        with pytest.raises(TypeError, match=r"client must be a dask.distributed.Client or None, got str \(for a s"):
            calibrate.fit(lazy, measure="classifier", client="tcp://127.0.0.1:8786")
        # A decode the workers cannot receive (here: it holds a lock) failed inside Dask, after the training.
        client = type("Client", (), {"compute": lambda self: None, "gather": lambda self: None})()
        locked = functools.partial(lambda lock, ids: "x", threading.Lock())
        with pytest.raises(TypeError, match=r"decode must be serialisable by cloudpickle .* this partial is not"):
            calibrate.fit(lazy, measure="classifier", consistency="rouge_l", decode=locked, client=client)
    with pytest.raises(ValueError, match="retries must be an int >= 0"):
        lazy.loss_table(retries=-1)
    with pytest.raises(TypeError, match=r"retries must be an int >= 0, got 1.5 \(float\)"):
        lazy.loss_table(retries=1.5)
    with pytest.raises(TypeError, match=r"chunks must be an int >= 1, got 1.5 \(float\)"):
        calibrate.open_cache(path, chunks=1.5)
    with pytest.raises(ValueError, match="outside"):
        lazy.load(10, 300)


def test_cli_fit_with_chunks_and_a_scheduler(saved, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    from calibrate.cli import main

    cache, path = saved
    expected = calibrate.fit(cache, delta=0.2, epsilon=0.1, measure="state_saturation")
    argv = ["fit", str(path), "--delta", "0.2", "--epsilon", "0.1", "--measure", "state_saturation"]
    assert main([*argv, "--chunks", "50", "-o", str(tmp_path / "a.json")]) == 0
    assert calibrate.Certificate.from_json(tmp_path / "a.json") == expected
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        assert main([*argv, "--scheduler", lc.scheduler_address, "-o", str(tmp_path / "b.json")]) == 0
    assert calibrate.Certificate.from_json(tmp_path / "b.json") == expected
    capsys.readouterr()


def test_verify_catches_an_edited_table(saved, tmp_path):
    import pyarrow.parquet as pq

    cache, path = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    table = pq.read_table(copy / "sequences.parquet")
    refs = table.column("reference").to_pylist()
    refs[3] = "edited"
    pq.write_table(
        table.set_column(table.column_names.index("reference"), "reference", [refs]), copy / "sequences.parquet"
    )
    with pytest.raises(ValueError, match="checksum mismatch in table 'sequences'"):
        calibrate.open_cache(copy, chunks=50)
    assert calibrate.open_cache(copy, chunks=50, verify=False).n_sequences == 240


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _edit_json(file, edit):

    doc = json.loads(file.read_text())
    edit(doc)
    file.write_text(json.dumps(doc))


_CORRUPTIONS = {
    "garbage full_tokens chunk": (
        lambda d: (d / "arrays/full_tokens/c/0").write_bytes(b"garbage"),
        r"cannot read array 'full_tokens' at .*full_tokens \(corrupted chunk\?\)",
    ),
    "deleted full_tokens chunk": (
        lambda d: (d / "arrays/full_tokens/c/0").unlink(),
        "array 'full_tokens' at .*full_tokens is missing 1 chunk file",
    ),
    "missing full_tokens/zarr.json": (
        lambda d: (d / "arrays/full_tokens/zarr.json").unlink(),
        "array 'full_tokens' is listed in meta.json but .*full_tokens/zarr.json is missing",
    ),
    "truncated entropy/zarr.json": (
        lambda d: _truncate(d / "arrays/entropy/zarr.json"),
        "cannot open array 'entropy' at .*entropy: JSONDecodeError",
    ),
    "data_type edited in zarr.json": (
        lambda d: _edit_json(d / "arrays/full_tokens/zarr.json", lambda z: z.update(data_type="int64")),
        "array 'full_tokens' at .*full_tokens must have dtype int32, got int64",
    ),
    "float16 log-probs in meta.json": (
        lambda d: _edit_json(d / "meta.json", lambda m: m["fields"]["topk_logprobs"].update(dtype="float16")),
        r"meta.json lists array 'topk_logprobs' with dtype 'float16', but it must be \(and is\) float32",
    ),
    "n_layers edited in meta.json": (
        lambda d: _edit_json(d / "meta.json", lambda m: m.update(n_layers=7)),
        "meta.json: 'n_layers' is 7 but the arrays give 6",
    ),
    "vocab_size not an int in meta.json": (
        lambda d: _edit_json(d / "meta.json", lambda m: m.update(vocab_size="abc")),
        "meta.json: 'vocab_size' must be an int >= 1, got 'abc'",
    ),
    "vocab_size beyond int32 in meta.json": (
        lambda d: (
            (d / "vocab.json").unlink(),
            _edit_json(d / "meta.json", lambda m: (m["fields"].pop("vocab"), m.update(vocab_size=10**400))),
        ),
        r"meta.json: 'vocab_size' must be at most 2\*\*31 - 1",
    ),
    "a chunk grid of billions in zarr.json": (  # zarr's count of the chunk files walked the grid: hours
        lambda d: (
            _edit_json(d / "arrays/entropy/zarr.json", lambda z: (
                z.update(shape=[2**30, 6]), z["chunk_grid"]["configuration"].update(chunk_shape=[1, 1])
            )),
            _edit_json(d / "meta.json", lambda m: m["fields"]["entropy"].update(shape=[2**30, 6])),
        ),
        r"array 'entropy' at .*entropy is missing 6442450943 chunk file\(s\) \(or more\)",
    ),
    "an extra array of the wrong shape": (  # refused before it is read (the in-memory open decompressed it first)
        lambda d: (
            shutil.copytree(d / "arrays/entropy", d / "arrays/extra"),
            (d / "arrays/extra/c/0/0").write_bytes(b"garbage"),
            _edit_json(d / "arrays/extra/zarr.json", lambda z: z.update(shape=[z["shape"][0] - 1, 6])),
            _edit_json(d / "meta.json", lambda m: m["fields"].update(extra=dict(
                m["fields"]["entropy"], path="arrays/extra", shape=[m["n_tokens"] - 1, 6]
            ))),
        ),
        r"array 'extra' must have shape \(\d+, 6\), got \(\d+, 6\)",
    ),
    "a field's kind not a string in meta.json": (  # was "TypeError: unhashable type: 'list'"
        lambda d: _edit_json(d / "meta.json", lambda m: m["fields"]["entropy"].update(kind=["array"])),
        r"meta.json: field 'entropy' has an invalid description",
    ),
    "an integer of more digits than Python converts in meta.json": (  # the message lost the file's name
        lambda d: (d / "meta.json").write_text('{"vocab_size": ' + "9" * 5000 + "}"),
        r"meta.json is not valid JSON: Exceeds the limit",
    ),
    "meta.json nested deeper than JSON goes": (  # was a RecursionError
        lambda d: (d / "meta.json").write_text("[" * 100_000 + "]" * 100_000),
        r"meta.json nests JSON deeper than 100 levels",
    ),
    "vocab_size edited in meta.json": (
        lambda d: _edit_json(d / "meta.json", lambda m: m.update(vocab_size=100_000)),
        "vocab.json holds .* entries but meta.json says vocab_size=100000",
    ),
    "int8 hidden states in meta.json": (
        lambda d: _edit_json(d / "meta.json", lambda m: m["fields"]["hidden"].update(dtype="int8")),
        r"meta.json lists array 'hidden' with dtype 'int8', but it must be \(and is\) float16",
    ),
}


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("corruption", list(_CORRUPTIONS))
def test_lazy_open_names_the_corrupted_array(saved, tmp_path, corruption, verify):
    """The same checks as the in-memory open, before any value is trusted (a wrong dtype would convert)."""
    _, path = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    corrupt, match = _CORRUPTIONS[corruption]
    corrupt(copy)
    with pytest.raises(ValueError, match=match):
        calibrate.open_cache(copy, verify=verify)
    with pytest.raises(ValueError, match=match):
        calibrate.open_cache(copy, chunks=50, verify=verify)


def test_lazy_open_verifies_the_metadata_checksum(saved, tmp_path):
    import json
    _, path = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["generation"] = {"max_new_tokens": 999}  # decay=<tau> and the certificate's budget read it
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="its metadata .* was edited after the cache was written"):
        calibrate.open_cache(copy, chunks=50)
    assert calibrate.open_cache(copy, chunks=50, verify=False).user_meta["generation"] == {"max_new_tokens": 999}


def test_cli_fit_with_chunks_reports_a_corrupted_cache(saved, tmp_path, capsys):
    from calibrate.cli import main

    _, path = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "arrays/full_tokens/c/0").write_bytes(b"garbage")
    assert main(["fit", str(copy), "--chunks", "5"]) == 2
    assert "cannot read array 'full_tokens'" in capsys.readouterr().err


def test_arrays_damaged_after_a_lazy_open_are_named(saved, tmp_path):
    import zarr

    _, path = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    lazy = calibrate.open_cache(copy, chunks=50)
    z = zarr.open_array(store=str(copy / "arrays/softmax_gap"), mode="r+")
    z[lazy.offsets[60] + 2] = np.nan  # other values in place, meta.json untouched
    where = rf"sequences \[50, 100\) of {copy} \(token indices below count from its token {lazy.offsets[50]}\)"
    with pytest.raises(ValueError, match=where + ": array 'softmax_gap' must be finite"):
        calibrate.fit(lazy)
    shutil.rmtree(copy / "arrays/softmax_gap/c")  # its chunks read as NaN fill values: was "must be finite"
    with pytest.raises(ValueError, match=r"array 'softmax_gap' at .* is missing \d+ chunk file\(s\)"):
        calibrate.fit(lazy)


def test_dask_arrays_check_their_chunks_as_load_does(saved, tmp_path, monkeypatch):
    """arrays() read dtype and shape only: NaN fill values for a lost chunk file, an out-of-vocabulary id unverified."""
    import re

    import zarr

    import calibrate.chunked as chunked

    cache, path = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    lazy = calibrate.open_cache(copy, chunks=50)
    with monkeypatch.context() as m:  # still lazy: building the arrays reads none
        m.setattr(chunked, "_read_slice", lambda *a: pytest.fail("read when built"))
        built = lazy.arrays()
    shutil.rmtree(copy / "arrays/softmax_gap/c")  # zarr reads the lost chunks as NaN
    with pytest.raises(ValueError) as by_load:
        lazy.load(0, 50)
    assert re.search(r"array 'softmax_gap' at .* is missing \d+ chunk file\(s\)", str(by_load.value))
    with pytest.raises(ValueError) as by_dask:
        built["softmax_gap"].compute()
    assert str(by_dask.value) == str(by_load.value)
    np.testing.assert_array_equal(built["topk_ids"].compute(), cache.arrays["topk_ids"])  # the others read as before

    shutil.rmtree(copy)
    shutil.copytree(path, copy)
    z = zarr.open_array(store=str(copy / "arrays/topk_ids"), mode="r+")
    token = int(cache.offsets[60]) + 2
    z[token, 1, 0] = 10**6  # a valid chunk, an id beyond the vocabulary (unverified)
    lazy = calibrate.open_cache(copy, chunks=50, verify=False)
    with pytest.raises(ValueError) as by_load:
        lazy.load(50, 100)
    where = rf"sequences \[50, 100\) of {copy} \(token indices below count from its token {lazy.offsets[50]}\)"
    assert re.match(where + r": array 'topk_ids' must lie in \[0, vocab_size=\d+\)", str(by_load.value))
    ids = lazy.arrays()["topk_ids"]
    for part in (ids, ids[token : token + 1]):  # the whole array, or only the chunk holding the id
        with pytest.raises(ValueError) as by_dask:
            part.compute()
        assert str(by_dask.value) == str(by_load.value)
    np.testing.assert_array_equal(
        ids[: int(cache.offsets[50])].compute(), cache.arrays["topk_ids"][: cache.offsets[50]]
    )


def test_a_cache_saved_over_a_lazily_opened_one_is_refused(saved, tmp_path):
    """Same shapes, other values: the tasks would read the new cache and stamp the old checksum on the certificate."""
    cache, _ = saved
    path = cache.save(tmp_path / "cache")
    lazy = calibrate.open_cache(path, chunks=50)
    other = calibrate.synthetic_cache(240, n_layers=6, seed=3, difficulty=2.0)
    assert other.n_tokens == cache.n_tokens and other.checksum != cache.checksum
    other.save(path, overwrite=True)
    with pytest.raises(ValueError, match="changed after it was opened"):
        calibrate.fit(lazy)
    with pytest.raises(ValueError, match="changed after it was opened"):
        lazy.arrays()
    assert calibrate.fit(calibrate.open_cache(path, chunks=50)) == calibrate.fit(other)
    built = calibrate.open_cache(path, chunks=50).arrays()  # dask arrays built, read later
    third = other.subset(np.arange(100))  # fewer tokens: a raw reshape error from zarr before
    third.save(path, overwrite=True)
    for name in ("softmax_gap", "topk_ids"):
        with pytest.raises(ValueError, match="changed after it was opened"):
            built[name].compute()
        with pytest.raises(ValueError, match="changed after it was opened"):
            built[name][:10].compute()  # the first partition only


def test_an_edited_vocab_is_refused_after_opening(tmp_path):
    cache = calibrate.synthetic_cache(20, n_layers=3, seed=0)
    path = cache.save(tmp_path / "cache")
    lazy = calibrate.open_cache(path, chunks=5)
    vocab = json.loads((path / "vocab.json").read_text())
    (path / "vocab.json").write_text(json.dumps(["EDITED"] + vocab[1:]))
    with pytest.raises(ValueError, match=r"vocab.json changed after the cache was opened"):
        lazy.load(0, 5)


def test_an_unverified_vocab_is_accepted_as_in_memory(tmp_path):
    """A vocab.json that never matched meta.json, opened with verify=False: every read said it changed after opening."""
    cache = calibrate.synthetic_cache(20, n_layers=3, seed=0)
    path = cache.save(tmp_path / "cache")
    vocab = json.loads((path / "vocab.json").read_text())
    (path / "vocab.json").write_text(json.dumps(["EDITED"] + vocab[1:]))
    with pytest.raises(ValueError, match="checksum mismatch in vocab 'vocab'"):
        calibrate.open_cache(path, chunks=5)  # verified: refused at open, as in memory
    in_memory = calibrate.open_cache(path, verify=False)
    lazy = calibrate.open_cache(path, chunks=5, verify=False)
    assert lazy.load(0, 5).vocab == lazy.take(np.arange(20)).vocab == in_memory.vocab == ["EDITED"] + vocab[1:]
    lam = [0.9, 0.5]  # each partition reads the vocab again
    assert lazy.loss_table(lambdas=lam) == calibrate.proxy_losses(in_memory, in_memory.arrays["softmax_gap"], lam)
    (path / "vocab.json").write_text(json.dumps(vocab))  # changed after this open: refused
    with pytest.raises(ValueError, match=r"vocab.json changed after the cache was opened"):
        lazy.load(0, 5)


def test_lazy_caches_compare_and_hash_by_identity(saved):
    """The generated __eq__/__hash__ compared arrays (ValueError) and hashed a dict (TypeError)."""
    _, path = saved
    a, b = calibrate.open_cache(path, chunks=50), calibrate.open_cache(path, chunks=50)
    assert a == a and a != b and not (a == b)
    assert hash(a) == hash(a) and a in {a} and len({a, b, a}) == 2
    assert {a: 1, b: 2}[b] == 2


def test_missing_references_are_counted_on_the_client(tmp_path, monkeypatch):
    """A risk needs every reference: refused before any task, counting all the sequences (not one partition's)."""
    import calibrate.chunked as chunked

    cache = calibrate.synthetic_cache(60, n_layers=4, seed=1, references=False)
    lazy = calibrate.open_cache(cache.save(tmp_path / "cache"), chunks=25)
    monkeypatch.setattr(chunked, "_partition_losses", lambda *a: pytest.fail("a task ran"))
    with pytest.raises(ValueError, match="but 60 sequences have no 'reference'"):
        lazy.loss_table(consistency="risk_rouge_l")
    with pytest.raises(ValueError, match="but 60 sequences have no 'reference'"):
        calibrate.proxy_losses(cache, cache.arrays["softmax_gap"], [0.9, 0.5], consistency="risk_rouge_l")


def test_a_last_partition_of_one_sequence_is_kept(tmp_path):
    cache = calibrate.synthetic_cache(51, n_layers=4, seed=0)
    lazy = calibrate.open_cache(cache.save(tmp_path / "cache"), chunks=50)
    assert lazy.partitions == [(0, 50), (50, 51)]
    cert = calibrate.fit(lazy, delta=0.2, epsilon=0.1)
    assert cert.n == 51 and cert == calibrate.fit(cache, delta=0.2, epsilon=0.1)


def test_partial_character_pieces_are_named_as_in_memory(tmp_path):
    """A textual loss without decode is refused where layers predict pieces of a split character: per partition,
    each chunked fit named only its first failing partition's ids (in memory [12, 14, 29], chunked [12, 29])."""
    full = calibrate.synthetic_cache(40, n_layers=4, max_tokens=6, min_tokens=2, seed=3, vocab_size=50)
    arrays = full.arrays
    vocab = [f"t{i} " for i in range(50)]
    early = set(arrays["topk_ids"][:, :-1, 0].ravel().tolist()) - set(arrays["full_tokens"].tolist())
    for token in sorted(early)[:3]:
        vocab[token] = "\ufffd"
    tokens = [arrays["full_tokens"][a:b] for a, b in zip(full.offsets[:-1], full.offsets[1:])]
    cache = calibrate.LayerCache.from_arrays(
        full_tokens=arrays["full_tokens"], topk_ids=arrays["topk_ids"], topk_logprobs=arrays["topk_logprobs"],
        offsets=full.offsets, vocab=vocab, vocab_size=50, outputs=["".join(vocab[t] for t in ids) for ids in tokens],
    )
    path = cache.save(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"parts of a character \(ids \[") as in_memory:
        calibrate.fit(cache, consistency="rouge_l")
    with pytest.raises(ValueError) as chunked:
        calibrate.fit(calibrate.open_cache(path, chunks=5), consistency="rouge_l")
    assert str(chunked.value) == str(in_memory.value) and str(sorted(early)[:3]) in str(in_memory.value)


def test_the_vocab_is_read_once_per_fit_and_not_for_token_losses(saved, monkeypatch):
    """Every partition read and hashed vocab.json again: 24 s of a 27 s fit at a 152k vocab, 40 partitions."""
    from calibrate.chunked import ChunkedCache

    cache, path = saved
    lazy = calibrate.open_cache(path, chunks=20)
    reads = []
    original = ChunkedCache._vocab
    monkeypatch.setattr(ChunkedCache, "_vocab", lambda self: reads.append(1) or original(self))
    assert calibrate.fit(lazy, delta=0.2, epsilon=0.1) == calibrate.fit(cache, delta=0.2, epsilon=0.1)
    assert reads == []
    kwargs = dict(delta=0.3, epsilon=0.1, consistency="rouge_l")
    assert calibrate.fit(lazy, **kwargs) == calibrate.fit(cache, **kwargs)
    assert len(reads) == 1 and len(lazy.partitions) == 12


def test_a_learned_measure_of_other_widths_is_refused_before_any_training_or_task(monkeypatch, tmp_path):
    """A classifier trained on hidden size 8 for a cache of 16: in memory the error came after the training, on
    Dask from every partition's task, each retried."""
    import calibrate.chunked as chunked
    import measures.learned
    from measures.learned import train_measure

    cal = calibrate.synthetic_cache(60, n_layers=4, hidden_size=16, seed=1)
    train = calibrate.synthetic_cache(60, n_layers=4, hidden_size=8, seed=2, first_id=1000)
    with monkeypatch.context() as m:
        m.setattr(measures.learned, "train_measure", lambda *a, **k: pytest.fail("trained before the check"))
        with pytest.raises(ValueError, match=r"'hidden' features have \(layers, hidden size\) \(4, 8\), the calib"):
            calibrate.fit(cal, measure="classifier", train_cache=train, progress=False)
    state = train_measure("classifier", train, seed=0).to_dict()
    path = cal.save(tmp_path / "cache")
    monkeypatch.setattr(chunked, "_partition_losses", lambda *a: pytest.fail("a task ran before the check"))
    with pytest.raises(ValueError, match="the cache's hidden size is 16 but the classifier was fitted on 8"):
        calibrate.open_cache(path, chunks=10).loss_table(measure="classifier", measure_state=state)
