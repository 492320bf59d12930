"""E-step kernels: blocks of rows, one matrix product each way (DESIGN.md §2).

For a block of n samples, with Φ (S × n) the statistics and H (K × S) the natural
parameters (column 0 holding the constants c_k):

    L = H Φ                          (K × n)
    log p(x_n) = logsumexp_k L_kn,   R = softmax_k L   (responsibilities)
    stats += R Φᵀ                     (K × S; column 0 is N_k)

L is laid out K × n so that the max and sum over components run along rows,
and Φ is statistics × rows so that each statistic is one contiguous row.
Blocks bound the memory (see ``default_block_rows``) and are split over worker threads, each with
its own buffers and sums; numpy and BLAS release the GIL, and the caller holds
BLAS to one thread (threadpoolctl) because small-K products scale badly with
BLAS threads. Sums from blocks and threads simply add up.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from emdsl.compile import Plan, blocks
from emdsl.options import OPTIONS


@dataclasses.dataclass
class Summary:
    """What an E-step pass adds up: weighted statistics, log-likelihood, entropy."""

    stats: np.ndarray  # (K, S): R Φᵀ; column 0 holds N_k
    loglik: float  # Σ_n logsumexp_k L_kn (log h(x) not included)
    entropy: float  # −Σ_nk r_nk log r_nk

    def __add__(self, other: Summary) -> Summary:
        return Summary(self.stats + other.stats, self.loglik + other.loglik, self.entropy + other.entropy)


class _Buffers:
    """One worker's scratch space, reused block after block."""

    def __init__(self, n_stats: int, K: int, rows: int) -> None:
        self.phi = np.empty(n_stats * rows)
        self.log_joint = np.empty(K * rows)
        self.resp = np.empty(K * rows)

    def views(self, n_stats: int, K: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Contiguous views of the leading part of each flat buffer, for any n ≤ rows.
        return (self.phi[:n_stats * n].reshape(n_stats, n), self.log_joint[:K * n].reshape(K, n),
                self.resp[:K * n].reshape(K, n))


class EStep:
    """Runs the E-step of one plan over blocks of rows, on worker threads.

    Use as a context manager so that the worker threads are released.
    """

    def __init__(self, plan: Plan, n_threads: int | None = None, block_rows: int | None = None) -> None:
        self.plan = plan
        self.K, self.S, self.N = plan.K, plan.n_stats, plan.n_samples
        self.rows = block_rows or OPTIONS["block_rows"] or default_block_rows(self.S, self.K)
        self.ranges = list(blocks(self.N, self.rows))
        threads = n_threads or OPTIONS["n_threads"] or default_threads(self.S, self.K)
        self.n_workers = max(1, min(threads, len(self.ranges)))
        self.chunks = [self.ranges[i::self.n_workers] for i in range(self.n_workers)]
        self.buffers = [_Buffers(self.S, self.K, min(self.rows, self.N)) for _ in range(self.n_workers)]
        self.pool = ThreadPoolExecutor(self.n_workers) if self.n_workers > 1 else None

    def __enter__(self) -> EStep:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _map(self, work: Callable[[Sequence[tuple[int, int]], _Buffers], Any]) -> list[Any]:
        if self.pool is None:
            return [work(chunk, buf) for chunk, buf in zip(self.chunks, self.buffers, strict=True)]
        futures = [self.pool.submit(work, chunk, buf) for chunk, buf in zip(self.chunks, self.buffers, strict=True)]
        return [future.result() for future in futures]

    def _log_joint(self, H: np.ndarray, start: int, stop: int, buf: _Buffers) -> tuple[np.ndarray, ...]:
        """Φ and L − max_k L, exp of it, its column sums and the max, for one block."""
        phi, log_joint, resp = buf.views(self.S, self.K, stop - start)
        self.plan.read(start, stop, phi)
        np.matmul(H, phi, out=log_joint)
        peak = log_joint.max(axis=0)
        log_joint -= peak
        np.exp(log_joint, out=resp)
        total = resp.sum(axis=0)
        return phi, log_joint, resp, total, peak

    def summarize(self, H: np.ndarray) -> Summary:
        """One E-step pass: R Φᵀ, Σ log p(x_n) (without log h) and the entropy of R."""
        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> Summary:
            stats = np.zeros((self.K, self.S))
            loglik = entropy = 0.0
            for start, stop in chunk:
                phi, shifted, resp, total, peak = self._log_joint(H, start, stop, buf)
                log_total = np.log(total)
                resp /= total
                stats += resp @ phi.T
                sum_log_total = float(log_total.sum())
                loglik += float(peak.sum()) + sum_log_total
                # −Σ r log r with log r = (L − max) − log Σ exp(L − max), and Σ_k r = 1
                entropy += sum_log_total - float(np.vdot(resp, shifted))
            return Summary(stats, loglik, entropy)

        return _total(self._map(work), self.K, self.S)

    def statistics_from(self, resp_of: Callable[[int, int], np.ndarray]) -> Summary:
        """R Φᵀ and the entropy of R for given responsibilities (``resp_of(start, stop)``: K × n)."""
        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> Summary:
            stats = np.zeros((self.K, self.S))
            entropy = 0.0
            for start, stop in chunk:
                phi = buf.views(self.S, self.K, stop - start)[0]
                self.plan.read(start, stop, phi)
                resp = resp_of(start, stop)
                stats += resp @ phi.T
                positive = resp > 0
                entropy -= float(np.sum(resp[positive] * np.log(resp[positive])))
            return Summary(stats, 0.0, entropy)

        return _total(self._map(work), self.K, self.S)

    def evaluate(self, H: np.ndarray, *, resp_out: np.ndarray | None = None,
                 loglik_out: np.ndarray | None = None) -> None:
        """Per-sample results: responsibilities (N × K) and/or log p(x_n) without log h (N,)."""
        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> None:
            for start, stop in chunk:
                _, _, resp, total, peak = self._log_joint(H, start, stop, buf)
                if resp_out is not None:
                    resp_out[start:stop] = (resp / total).T
                if loglik_out is not None:
                    loglik_out[start:stop] = peak + np.log(total)

        self._map(work)


#: S·K below which one thread is faster: the per-block numpy calls are too short to
#: amortise handing the GIL back and forth. Measured summarize() on 2 cores, speed-up of
#: 2 threads over 1: S·K = 18 → 0.71, 33 → 0.84, 40 → 0.97, 48 → 1.04, 168 → 1.25–1.38,
#: 1848 → 1.79.
_THREADED_WORK = 64


def default_threads(n_stats: int, K: int) -> int:
    """Worker threads: one per CPU when each row carries enough work (S·K), else one."""
    return (os.cpu_count() or 1) if n_stats * K >= _THREADED_WORK else 1


def default_block_rows(n_stats: int, K: int) -> int:
    """Rows per block: one worker's Φ, L and R fit in 16 MB, between 1024 and 16384 rows.

    Measured (benchmarks/bench_gmm.py, 2 cores): per-iteration time falls as blocks
    grow up to ~8–16k rows (fewer Python-level calls per sample, longer GEMM
    panels), e.g. N=2e5, D=20, K=8 full: 103 ms at 1024 rows, 70 ms at 8192;
    the memory budget, not the cache, is what bounds the block.
    """
    return int(np.clip((16 << 20) // (8 * (n_stats + 2 * K)), 1024, 16384))


def _total(parts: list[Summary], K: int, S: int) -> Summary:
    out = Summary(np.zeros((K, S)), 0.0, 0.0)
    for part in parts:
        out = out + part
    return out
