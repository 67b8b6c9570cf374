"""Fit throughput on chunked caches with Dask, next to one plain read pass of the same zarr arrays.

Synthetic caches of ``--base`` sequences times 1, 4 and 16 (``--sizes``), written to ``--dir`` (default:
a temporary folder, removed at the end). For each size, in one run:

- **read pass**: every per-token zarr array read once, chunk by chunk (the physical limit of any fit);
- **in memory**: ``open_cache`` (checksums off) then ``calibrate.fit`` (token consistency, softmax gap);
- **chunked, in process**: ``open_cache(chunks=...)`` then ``fit`` without a client: the partitions one after
  another in this process (Dask's synchronous scheduler);
- **Dask, 1 and 2 workers**: a ``LocalCluster`` of worker processes (one thread each, ``--worker-memory``
  each; one untimed fit of a small cache first, so the workers' imports are not timed), with the peak
  resident memory of its workers (``VmHWM``: ``ru_maxrss`` would carry the peak of this process into the
  spawned workers).

Throughput is token x layers per second; the ratios are over the read pass. Every path gives the same
certificate (checked). ``--figure`` plots seconds against cache size.

Run: ``python benchmarks/scale.py [--base 2000] [--sizes 1 4 16] [--chunks 500] [--worker-memory 512MiB]
[--figure scale.png]``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import positive_int

import calibrate


def read_pass(path: Path) -> None:
    import zarr

    for array in sorted((path / "arrays").iterdir()):
        z = zarr.open_array(store=str(array), mode="r")
        step = int(z.chunks[0])
        for lo in range(0, z.shape[0], step):
            np.asarray(z[lo : lo + step])


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux ``VmHWM``; elsewhere ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(root: Path, args: argparse.Namespace) -> list[tuple[int, dict]]:
    """Time every path at every size, print one table row per size; caches are written under ``root``."""
    from distributed import Client, LocalCluster

    options = dict(delta=0.1, epsilon=0.05, measure="softmax_gap", consistency="token")
    rows = []
    print(
        f"chunks of {args.chunks} sequences, {args.layers} layers, workers of {args.worker_memory}; "
        "throughput in token x layers / s"
    )
    print(
        "| sequences | tokens | arrays MiB | read pass | in memory | chunked in process | 1 worker | 2 workers "
        "| peak worker MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    # One untimed pass of every in-process path (imports, compiled kernels, first opens); names carry the settings,
    # so a --dir kept from a run of other settings is not reused.
    warm = root / f"warm-up_L{args.layers}"
    if not warm.exists():
        calibrate.synthetic_cache(50, n_layers=args.layers, seed=0, store_hidden=False).save(warm)
    read_pass(warm)
    calibrate.fit(calibrate.open_cache(warm, verify=False), **options)
    calibrate.fit(calibrate.open_cache(warm, chunks=25, verify=False), **options)
    for size in args.sizes:
        n = args.base * size
        path = root / f"cache_{n}_L{args.layers}_seed{size}"
        if not path.exists():
            calibrate.synthetic_cache(n, n_layers=args.layers, seed=size, store_hidden=False).save(path)
        times, certs = {}, {}
        start = time.perf_counter()
        read_pass(path)
        times["read"] = time.perf_counter() - start
        start = time.perf_counter()
        cache = calibrate.open_cache(path, verify=False)
        certs["memory"] = calibrate.fit(cache, **options)
        times["memory"] = time.perf_counter() - start
        tokens, layers = cache.n_tokens, cache.n_layers
        del cache
        start = time.perf_counter()
        certs["chunked"] = calibrate.fit(calibrate.open_cache(path, chunks=args.chunks, verify=False), **options)
        times["chunked"] = time.perf_counter() - start
        peak = 0.0
        for workers in (1, 2):
            with LocalCluster(
                n_workers=workers, threads_per_worker=1, memory_limit=args.worker_memory, dashboard_address=None
            ) as cluster:
                with Client(cluster) as client:
                    # untimed: the workers' imports, compiled kernels and first opens
                    calibrate.fit(calibrate.open_cache(warm, chunks=25, verify=False), client=client, **options)
                    start = time.perf_counter()
                    lazy = calibrate.open_cache(path, chunks=args.chunks, verify=False)
                    certs[workers] = calibrate.fit(lazy, client=client, **options)
                    times[workers] = time.perf_counter() - start
                    peak = max(peak, max(client.run(peak_rss_mib).values()))
        assert all(c == certs["memory"] for c in certs.values()), "a path gave another certificate"
        work = tokens * layers
        cells = " | ".join(
            f"{work / times[k] / 1e6:.1f}M ({times['read'] / times[k]:.2f})" for k in ("memory", "chunked", 1, 2)
        )
        mib = (
            sum(
                np.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
                for spec in calibrate.open_cache(path, chunks=args.chunks, verify=False).meta["fields"].values()
                if spec.get("kind") == "array"
            )
            / 2**20
        )
        print(f"| {n} | {tokens} | {mib:.0f} | {work / times['read'] / 1e6:.1f}M | {cells} | {peak:.0f} |")
        rows.append((n, times))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=positive_int, default=2000)
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--chunks", type=positive_int, default=500)
    parser.add_argument("--layers", type=positive_int, default=24)
    parser.add_argument("--worker-memory", default="512MiB", help="memory limit of each worker process")
    parser.add_argument("--dir", default=None, help="keep the caches here (default: a temporary folder, removed)")
    parser.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    if args.dir:
        rows = measure(Path(args.dir), args)
    else:
        with tempfile.TemporaryDirectory(prefix="calm-scale-") as tmp:
            rows = measure(Path(tmp), args)
    print("(in parentheses: the read pass's time over that path's time)")
    if args.figure:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        sizes = [n for n, _ in rows]
        for key, label in (
            ("read", "read pass"),
            ("memory", "in memory"),
            ("chunked", "chunked in process"),
            (1, "1 worker"),
            (2, "2 workers"),
        ):
            ax.plot(sizes, [t[key] for _, t in rows], "o-", label=label)
        ax.set(xscale="log", yscale="log", xlabel="sequences", ylabel="seconds", title="fit cost vs cache size")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
