"""A cache bigger than the workers' memory, on a LocalCluster of worker processes; a worker killed mid-fit.

The 2 GiB cache is written shard by shard (never whole in memory) and joined by a manifest. Two workers
of 512 MiB each fit it with the same certificate as this process computes one partition at a time; then
one worker process is killed while the fit runs, and the certificate does not change.
"""

import os
import signal
import threading
import time

import pytest

import calibrate
from calibrate.shards import shard_name, write_manifest

distributed = pytest.importorskip("distributed")

N_SHARDS, PER_SHARD = 16, 4400  # 16 x 128 MiB of arrays
OPTIONS = dict(delta=0.1, epsilon=0.05, measure="softmax_gap", consistency="token")


def peak_memory_mib() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss carries the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    nbytes = 0
    for i in range(N_SHARDS):
        shard = calibrate.synthetic_cache(
            PER_SHARD, n_layers=32, top_k=4, store_hidden=False, seed=i, first_id=i * PER_SHARD
        )
        nbytes += sum(a.nbytes for a in shard.arrays.values())
        shard.save(root / shard_name(i, N_SHARDS))
        del shard
    write_manifest(root, N_SHARDS)
    lazy = calibrate.open_cache(root, chunks=550)
    return lazy, nbytes, calibrate.fit(lazy, **OPTIONS)  # partitions one after another, in this process


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc")
def test_a_cache_four_times_the_worker_memory(big):
    lazy, nbytes, expected = big
    limit = 512 * 2**20
    assert nbytes > 2 * 2**30 > 3 * limit
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, memory_limit=limit, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        pids = set(client.run(os.getpid).values())
        cert = calibrate.fit(lazy, client=client, **OPTIONS)
        peaks = client.run(peak_memory_mib)
        assert set(client.run(os.getpid).values()) == pids  # no worker was restarted for memory
    assert cert == expected
    assert max(peaks.values()) < limit / 2**20


@pytest.mark.slow
def test_a_worker_killed_mid_fit_does_not_change_the_certificate(big):
    lazy, _, expected = big
    n_tasks = len(lazy.partitions)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            victim = next(iter(client.run(os.getpid).values()))
            result = {}
            fit = threading.Thread(target=lambda: result.update(cert=calibrate.fit(lazy, client=client, **OPTIONS)))
            fit.start()
            done = 0
            deadline = time.monotonic() + 120
            while done == 0 and time.monotonic() < deadline:  # wait until some partitions are finished
                time.sleep(0.05)
                held = client.who_has()  # every submitted key, with the workers holding its result
                done = sum(bool(workers) for key, workers in held.items() if str(key).startswith("_partition_losses"))
            os.kill(victim, signal.SIGKILL)
            fit.join(timeout=600)
            assert victim not in client.run(os.getpid).values()
    assert 0 < done < n_tasks, "the worker must die while the fit runs"
    assert result["cert"] == expected
