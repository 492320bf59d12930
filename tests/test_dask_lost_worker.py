"""A dask.distributed worker killed in the middle of a fit: dask recomputes its tasks and the fit is unchanged.

The data are not persisted, so every chunk can be rebuilt from the graph; the plan, H and θ
travel with every pass (emdsl/engine/chunked.py), so nothing the fit needs lives only on the
lost worker. The nanny restarts the killed process. The fit equals the in-memory one to 1e-10.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import xarray as xr

import emdsl as em

distributed = pytest.importorskip("distributed")

from tests.test_dask import assert_same_fit


def test_worker_killed_mid_fit_is_recomputed() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (20_000, 3)), rng.normal(3, 1.5, (20_000, 3))])
    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    want = model.fit(ds, seed=1, max_iter=12, tol=0)
    started = time.perf_counter()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit="1GiB", silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=20)
        before = client.run(os.getpid)  # worker address → process id
        victim = min(before.values())
        killed: list[int] = []

        def kill_one(event) -> None:  # a few iterations in: a worker process dies while the next pass runs
            if event.iteration == 4 and not killed:
                killed.append(victim)
                threading.Timer(0.02, os.kill, args=(victim, signal.SIGKILL)).start()

        fit = model.fit(ds.chunk({"sample": 2_000}), seed=1, max_iter=12, tol=0, callbacks=[kill_one])
        client.wait_for_workers(2, timeout=20)  # the nanny brought the process back
        after = client.run(os.getpid)
    assert killed and victim not in after.values()
    assert_same_fit(fit, want)
    assert time.perf_counter() - started < 45
