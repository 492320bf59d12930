"""Exact EM on dask chunks: in-memory overhead, out-of-core scaling and memory, a LocalCluster.

Three measurements, printed as one table at the end:

1. **In memory**: the same N × 10 float64 array fitted from numpy and from a dask array
   over it (chunks of ``--chunk`` rows), from the same θ⁽⁰⁾; seconds per iteration (median
   over the iterations) and the ratio dask / numpy (target ≤ 1.3 at N = 1e7).
2. **Out of core**: an N × 10 float32 zarr store written to ``--store`` (default under
   /tmp, only if the disk has room: ``df``), fitted at N = 1e6, 1e7 and 1e8 (prefixes of
   the largest store) in a child process each, which reports seconds per iteration and
   its peak resident memory (``ru_maxrss``; target ≤ 2 GiB at 1e8, where the data are
   4 GB on disk).
3. **LocalCluster** with 2 single-threaded workers (separate processes) against the
   threaded scheduler, on the zarr store at N = 1e7; again without the
   ``MALLOC_TRIM_THRESHOLD_`` that distributed's nanny sets in its workers (see ``child``).

    python benchmarks/bench_dask.py            # N = 1e7 in memory; 1e6, 1e7, 1e8 out of core
    python benchmarks/bench_dask.py --quick    # N = 1e6 in memory; 1e5, 1e6 out of core

Spark MLlib's ``GaussianMixture`` (the distributed tool people reach for) caches the
data as an RDD in executor memory (it calls ``persist`` and warns when the input is not
cached), so a data set beyond the cluster's memory spills to disk and every iteration
re-reads it; it offers full covariances only, and its per-iteration cost is a
``treeAggregate`` of per-partition sufficient statistics — the same map-reduce as here,
where the partition is a chunk and dask's scheduler plays the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

D, K = 10, 8


def _model(covariance: str = "diag"):  # noqa: ANN202
    import emdsl as em

    return em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal(covariance=covariance))


def _start(seed: int = 0) -> dict:
    """θ⁽⁰⁾ given outright: no seeding pass, both paths start from the same point."""
    rng = np.random.default_rng(seed)
    return {"z": {"probs": np.full(K, 1 / K)}, "x": {"mean": rng.normal(0, 3, (K, D)), "covariance": np.ones((K, D))}}


def _per_iteration(fit) -> float:  # noqa: ANN001
    return float(np.median(np.diff(fit.trace["time"].values[1:])))


def _generate(store: str, n: int, chunk: int) -> None:
    """An n × 10 float32 store of K Gaussian clusters, written chunk by chunk (never whole in memory)."""
    import dask.array as da
    import xarray as xr

    centres = np.random.default_rng(1).normal(0, 3, (K, D)).astype(np.float32)

    def block(block_id=None):  # noqa: ANN001, ANN202
        i = block_id[0]
        rng = np.random.default_rng([2, i])
        rows = min(chunk, n - i * chunk)
        labels = rng.integers(K, size=rows)
        return centres[labels] + rng.standard_normal((rows, D), dtype=np.float32)

    chunks = ((chunk,) * (n // chunk) + ((n % chunk,) if n % chunk else ()), (D,))
    x = da.map_blocks(block, chunks=chunks, dtype=np.float32)
    import zarr

    # Uncompressed: random float32 noise does not compress, and decoding would only add CPU time.
    encoding = {"x": {"compressors": None} if int(zarr.__version__.split(".")[0]) >= 3 else {"compressor": None}}
    xr.Dataset({"x": (("sample", "feature"), x)}).to_zarr(store, mode="w", encoding=encoding, consolidated=False)


def child(kind: str, store: str, n: int, iterations: int) -> None:
    """Runs in a child process: one fit, then prints its seconds per iteration and peak RSS as JSON."""
    import warnings

    import xarray as xr

    warnings.simplefilter("ignore")
    ds = xr.open_zarr(store, consolidated=False).isel(sample=slice(0, n))
    if kind.startswith("cluster"):
        import dask
        from dask.distributed import Client, LocalCluster

        if kind == "cluster-notrim":
            # distributed's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which turns off
            # glibc's adaptive mmap threshold: every temporary above 128 kB is then mmapped and page-
            # faulted afresh, block after block (measured: the E-step's tasks run ~2x slower).
            env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
            env.pop("MALLOC_TRIM_THRESHOLD_", None)
            dask.config.set({"distributed.nanny.pre-spawn-environ": env})

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster):
            fit = _model().fit(ds, init=_start(), max_iter=iterations, tol=0)
    else:
        fit = _model().fit(ds, init=_start(), max_iter=iterations, tol=0)
    print(json.dumps({"per_iteration": _per_iteration(fit), "rss": _peak_rss()}))


def _peak_rss() -> int:
    """This process's peak resident memory, in bytes.

    VmHWM from /proc (Linux): ``ru_maxrss`` is not reset by exec, so a child started by a
    parent holding the in-memory data would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_child(kind: str, store: str, n: int, iterations: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, store, str(n), str(iterations)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_memory(n: int, chunk: int, iterations: int) -> tuple[float, float, float]:
    import xarray as xr

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (K, D))
    x = centres[rng.integers(K, size=n)] + rng.standard_normal((n, D))
    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    numpy_fit = _model().fit(ds, init=_start(), max_iter=iterations, tol=0)
    dask_fit = _model().fit(ds.chunk({"sample": chunk}), init=_start(), max_iter=iterations, tol=0)
    assert abs(numpy_fit.loglik - dask_fit.loglik) <= 1e-10 * abs(numpy_fit.loglik)
    a, b = _per_iteration(numpy_fit), _per_iteration(dask_fit)
    return a, b, b / a


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--chunk", type=int, default=1_000_000)
    parser.add_argument("--store", default="/tmp/emdsl_bench_dask.zarr")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--child", nargs=4)
    parser.add_argument("--skip-memory", action="store_true", help="skip the in-memory comparison")
    parser.add_argument("--only-cluster", action="store_true", help="out of core: only the cluster comparison")
    parser.add_argument("--keep-store", action="store_true", help="reuse a store already written, keep it after")
    args = parser.parse_args()
    if args.child:
        kind, store, n, iterations = args.child
        child(kind, store, int(n), int(iterations))
        return
    rows = []
    n_memory = 1_000_000 if args.quick else 10_000_000
    chunk = min(args.chunk, n_memory // 4)
    if not args.skip_memory:
        numpy_s, dask_s, ratio = in_memory(n_memory, chunk, args.iterations)
        rows.append(f"| in memory, N={n_memory:.0e}, chunks of {chunk:.0e} | numpy {numpy_s:.3f} s/it | "
                    f"dask {dask_s:.3f} s/it | ratio {ratio:.2f} (target ≤ 1.3) |")
        print(rows[-1], flush=True)
    sizes = [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000, 100_000_000]
    need = sizes[-1] * D * 4 * 1.3
    free = shutil.disk_usage(os.path.dirname(args.store) or ".").free
    if free < need:
        rows.append(f"| out of core | skipped: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed |")
    else:
        t = time.perf_counter()
        if not (args.keep_store and os.path.exists(args.store)):
            _generate(args.store, sizes[-1], min(args.chunk, sizes[-1] // 10))
            print(f"(wrote {sizes[-1]:.0e} × {D} float32 to {args.store} in {time.perf_counter() - t:.0f} s)",
                  flush=True)
        for n in sizes if not args.only_cluster else ():
            found = _run_child("threads", args.store, n, args.iterations if n < 1e8 else 3)
            rows.append(f"| out of core (zarr), N={n:.0e} | {found['per_iteration']:.3f} s/it | "
                        f"peak RSS {found['rss'] / 2**30:.2f} GiB |")
            print(rows[-1], flush=True)
        n = sizes[-2]
        threads = _run_child("threads", args.store, n, args.iterations)
        cluster = _run_child("cluster", args.store, n, args.iterations)
        notrim = _run_child("cluster-notrim", args.store, n, args.iterations)
        rows.append(f"| N={n:.0e} zarr: threaded scheduler (2 threads) {threads['per_iteration']:.3f} s/it | "
                    f"LocalCluster 2 workers × 1 thread {cluster['per_iteration']:.3f} s/it (ratio "
                    f"{cluster['per_iteration'] / threads['per_iteration']:.2f}); without the nanny's "
                    f"MALLOC_TRIM_THRESHOLD_ {notrim['per_iteration']:.3f} s/it (ratio "
                    f"{notrim['per_iteration'] / threads['per_iteration']:.2f}) |")
        print(rows[-1], flush=True)
        if not args.keep_store:
            shutil.rmtree(args.store, ignore_errors=True)
    print("\n".join(["", *rows]))


if __name__ == "__main__":
    main()
