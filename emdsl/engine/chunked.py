"""The E-step over dask chunks: one dask computation per pass, only K × S sums travel.

:class:`ChunkedEStep` has the interface of :class:`~emdsl.engine.estep.EStep`
(``summarize``, ``statistics_from``, ``evaluate``), so the loop, the accelerators and
the seeding run unchanged on dask-backed data. Each call builds one task per chunk
along the sample dimension; a task turns its chunk's numpy blocks into an ordinary plan
over that chunk (:func:`emdsl.data.dask_source.local_plan`) and runs the in-memory
E-step on it, on one thread (dask supplies the parallelism, across chunks). The
per-chunk :class:`~emdsl.engine.estep.Summary` objects are tree-summed, so what leaves
a worker is the K × S statistics and three scalars: statistics add up (DESIGN.md §2),
and a sum over chunks is the same EM step as a sum over blocks, up to the order of
floating-point additions (the fits agree to ~1e-13; tests/test_dask.py).

A hidden Markov model's chunks are runs of whole sequences (the recursion runs along
each one; :func:`emdsl.data.dask_source.chain_layout`), and each task localizes the plan's
sequence layout to its rows; its posterior, paths and scores come back lazily over the
sequences (:meth:`ChunkedEStep.lazy_chain`).

Whatever scheduler is active runs the tasks: the threaded scheduler by default, a
``dask.distributed`` cluster inside ``with Client(...)`` — the chunks are then read
(from zarr, say) by the workers that compute on them, and a worker lost mid-pass has its
tasks recomputed by dask from the source.

On worker *processes*, distributed's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536``, which
turns off glibc's adaptive mmap threshold: the E-step's per-block temporaries (above
128 kB) are then mmapped and page-faulted afresh every block, and its tasks ran 1.3–2.6×
slower than without it (measured on 2 cores, ``benchmarks/bench_dask.py``).
Removing that variable from ``distributed.nanny.pre-spawn-environ`` before the cluster
starts restores the speed, at the cost of memory the workers keep for reuse.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from emdsl.compile import Plan
from emdsl.data import dask_source
from emdsl.engine.estep import Summary
from emdsl.engine.init import row_uniforms
from emdsl.engine.loop import reaching_magnitude as _reaching_in_memory

_CURRENT = threading.local()


def current_chunk() -> tuple[Plan, int]:
    """The chunk a task is working on (its local plan and first global row), for ``resp_of`` callbacks."""
    found = getattr(_CURRENT, "chunk", None)
    if found is None:
        raise RuntimeError("current_chunk() is only defined inside a chunked E-step's task")
    return found


@contextlib.contextmanager
def _working_on(plan: Plan, offset: int) -> Iterator[None]:
    previous = getattr(_CURRENT, "chunk", None)
    _CURRENT.chunk = (plan, offset)
    try:
        yield
    finally:
        _CURRENT.chunk = previous


def _estep(plan: Plan) -> Any:
    from emdsl.engine.precision import make_estep

    return make_estep(plan, n_threads=1)


def _summarize_chunk(skeleton: Plan, slots: Sequence[Any], offset: int, H: np.ndarray,
                     theta: Mapping[str, Any] | None, *blocks: np.ndarray) -> Summary:
    plan = dask_source.local_plan(skeleton, slots, blocks, offset)
    with _working_on(plan, offset), _estep(plan) as estep:
        return estep.summarize(H, theta)


def _statistics_chunk(skeleton: Plan, slots: Sequence[Any], offset: int,
                      resp_of: Callable[[int, int], np.ndarray], *blocks: np.ndarray) -> Summary:
    plan = dask_source.local_plan(skeleton, slots, blocks, offset)

    def local(start: int, stop: int) -> np.ndarray:
        return resp_of(offset + start, offset + stop)

    with _working_on(plan, offset), _estep(plan) as estep:
        return estep.statistics_from(local)


def _reaching_chunk(skeleton: Plan, slots: Sequence[Any], H: np.ndarray, offset: int, *blocks: np.ndarray) -> float:
    return _reaching_in_memory(dask_source.local_plan(skeleton, slots, blocks, offset), H)


def reaching_magnitude(plan: Plan, H: np.ndarray) -> float:
    """``loop.reaching_magnitude`` of a dask-backed plan: one pass, summed over the chunks."""
    slots, arrays = dask_source.layout(plan)
    return float(dask_source.scan(arrays, functools.partial(_reaching_chunk, dask_source.skeleton(plan), slots, H),
                                  operator.add))


def _evaluate_chunk(skeleton: Plan, slots: Sequence[Any], offset: int, H: np.ndarray,
                    theta: Mapping[str, Any] | None, what: str, *blocks: np.ndarray) -> np.ndarray:
    """Per-sample results of one chunk: ``resp`` (n × K), ``loglik`` (n,) or ``score`` (n,, with log h)."""
    plan = dask_source.local_plan(skeleton, slots, blocks, offset)
    n = plan.n_samples
    with _working_on(plan, offset), _estep(plan) as estep:
        if what == "resp":
            out = np.empty((n, plan.K))
            estep.evaluate(H, theta, resp_out=out)
            return out
        out = np.empty(n)
        estep.evaluate(H, theta, loglik_out=out)
    if what == "score":
        out += plan.log_base_measure(0, n)
    return out


def _chain_chunk(skeleton: Plan, slots: Sequence[Any], offset: int, H: np.ndarray, theta: Mapping[str, Any],
                 what: str, *blocks: np.ndarray) -> Any:
    """A Markov latent's results for one chunk (a run of whole sequences, m of them, T steps).

    ``posterior``: p(z_t | x) over (m, T, K), the padding filled (γ_t = γ_{t−1} A);
    ``score``: log p(x_s) per sequence (m,), with log h; ``viterbi``: the most probable
    paths (m, T) and their log p(x, z*) (m,), with log h.
    """
    from emdsl.compile import SCAN_ROWS
    from emdsl.errors import ModelError
    from emdsl.latent.markov import fill_padding, viterbi_paths

    plan = dask_source.local_plan(skeleton, slots, blocks, offset)
    sequences, n, name = plan.sequences, plan.n_samples, plan.latent.name
    with _working_on(plan, offset), _estep(plan) as estep:
        if what == "posterior":
            out = np.empty((n, plan.K))
            estep.evaluate(H, theta, resp_out=out)
            grid = sequences.scatter(out, np.nan)
            fill_padding(grid, sequences.lengths, theta[name]["transition"])
            return grid
        base = np.concatenate([plan.log_base_measure(a, min(a + SCAN_ROWS, n)) for a in range(0, n, SCAN_ROWS)])
        base = np.add.reduceat(base, sequences.starts[:-1])
        if what == "score":
            out = np.empty(sequences.n_sequences)
            estep.evaluate(H, theta, loglik_out=out)
            return out + base
        L = np.empty((n, plan.K))
        estep.emissions(H, theta, L)
    path, log_prob = viterbi_paths(L, sequences, theta[name])
    log_prob += base
    if not np.all(np.isfinite(log_prob)):
        from emdsl.latent.markov import viterbi_failure

        raise ModelError(viterbi_failure(L, sequences, int(np.flatnonzero(~np.isfinite(log_prob))[0]), name))
    return path, log_prob


def _add(a: Summary, b: Summary) -> Summary:
    return a + b


class ChunkedEStep:
    """Runs the E-step of a dask-backed plan: one task per chunk, summaries tree-summed.

    Use as a context manager, like :class:`~emdsl.engine.estep.EStep`.
    """

    def __init__(self, plan: Plan) -> None:
        import dask

        self.plan = plan
        self.K, self.S, self.N = plan.K, plan.n_stats, plan.n_samples
        self.slots, arrays = dask_source.layout(plan)
        self.chunks = tuple(arrays[0].chunks[0])
        self.starts, self.blocks = dask_source.chunk_blocks(arrays)
        # One key for the data-free plan, shared by every task of every pass (sent once, not per chunk).
        self.skeleton = dask.delayed(dask_source.skeleton(plan), name=f"emdsl-plan-{uuid.uuid4().hex}",
                                     traverse=False)
        self._counter = itertools.count()

    def __enter__(self) -> ChunkedEStep:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: dask owns the workers."""

    def _shared(self, value: Any, what: str) -> Any:
        """A value every task of a pass reads, as one key (no hashing of its content)."""
        import dask

        return dask.delayed(value, name=f"emdsl-{what}-{uuid.uuid4().hex}", traverse=False)

    def _reduce(self, fn: Callable[..., Summary], *args: Any) -> Summary:
        import dask

        parts = [dask.delayed(fn, pure=False)(self.skeleton, self.slots, start, *args, *chunk)
                 for start, chunk in zip(self.starts, self.blocks, strict=True)]
        return dask.compute(dask_source._tree(parts, _add))[0]

    def summarize(self, H: np.ndarray, theta: Mapping[str, Any] | None = None) -> Summary:
        """One E-step pass over every chunk: R Φᵀ, Σ log p(x_n) (without log h) and the entropy of R."""
        return self._reduce(_summarize_chunk, self._shared(H, "H"), self._shared(theta, "theta"))

    def statistics_from(self, resp_of: Callable[[int, int], np.ndarray]) -> Summary:
        """R Φᵀ and the entropy of R for given responsibilities (``resp_of(start, stop)``, global rows: K × n)."""
        return self._reduce(_statistics_chunk, self._shared(resp_of, "resp"))

    def lazy(self, H: np.ndarray, theta: Mapping[str, Any] | None, what: str) -> Any:
        """Per-sample results as a dask array with the data's chunks: ``resp`` (N × K), ``loglik`` or ``score`` (N,)."""
        import dask
        import dask.array as da

        H_key, theta_key = self._shared(H, "H"), self._shared(theta, "theta")
        pieces = []
        for start, size, chunk in zip(self.starts, self.chunks, self.blocks, strict=True):
            task = dask.delayed(_evaluate_chunk, pure=False)(self.skeleton, self.slots, start, H_key, theta_key,
                                                            what, *chunk)
            shape = (size, self.K) if what == "resp" else (size,)
            pieces.append(da.from_delayed(task, shape=shape, dtype=float))
        return da.concatenate(pieces, axis=0)

    def lazy_chain(self, H: np.ndarray, theta: Mapping[str, Any], what: str) -> Any:
        """A Markov latent's results as dask arrays over the sequences, a chunk per run of whole sequences.

        ``posterior`` (n_sequences, T, K); ``score`` (n_sequences,); ``viterbi``: a pair,
        paths (n_sequences, T) of state indices and log p(x, z*) (n_sequences,).
        """
        import dask
        import dask.array as da

        sequences = self.plan.sequences
        assert sequences is not None
        H_key, theta_key = self._shared(H, "H"), self._shared(theta, "theta")
        T, first, second = sequences.length, [], []
        for start, size, chunk in zip(self.starts, self.chunks, self.blocks, strict=True):
            a, b = sequences.sequences_in(start, start + size)
            task = dask.delayed(_chain_chunk, pure=False)(self.skeleton, self.slots, start, H_key, theta_key,
                                                         what, *chunk)
            if what == "posterior":
                first.append(da.from_delayed(task, shape=(b - a, T, self.K), dtype=float))
            elif what == "score":
                first.append(da.from_delayed(task, shape=(b - a,), dtype=float))
            else:
                first.append(da.from_delayed(task[0], shape=(b - a, T), dtype=np.int64))
                second.append(da.from_delayed(task[1], shape=(b - a,), dtype=float))
        if what == "viterbi":
            return da.concatenate(first, axis=0), da.concatenate(second, axis=0)
        return da.concatenate(first, axis=0)

    def evaluate(self, H: np.ndarray, theta: Mapping[str, Any] | None = None, *,
                 resp_out: np.ndarray | None = None, loglik_out: np.ndarray | None = None) -> None:
        """Per-sample results written into in-memory arrays (N × K responsibilities, N log-likelihoods)."""
        import dask

        wanted = [(out, what) for out, what in ((resp_out, "resp"), (loglik_out, "loglik")) if out is not None]
        results = dask.compute(*[self.lazy(H, theta, what) for _, what in wanted])
        for (out, _), values in zip(wanted, results, strict=True):
            out[...] = values


# -- seeding on dask-backed data (called by engine/init.py) --------------------------------------
#: k-means on dask-backed data runs on at most this many rows, a uniform sample drawn with the fit's seed
SEED_SAMPLE = 100_000


def seed_nodes(plan: Plan, names: Sequence[str] | None = None) -> list[int]:
    """The positions of the plan's continuous nodes (those named, when given): what k-means seeds on."""
    return [i for i, node in enumerate(plan.nodes)
            if node.family.seeds_kmeans and (names is None or node.name in names)]


def _read_rows(plan: Plan, nodes: Sequence[int], start: int, stop: int) -> np.ndarray:
    """The chosen nodes' data as read (standardized or in the data's units, holes NaN) for rows [start, stop)
    of a (local) plan: (n × D)."""
    parts = []
    for i in nodes:
        node = plan.nodes[i]
        x = np.empty((node.D, stop - start))
        node.read(start, stop, x)
        parts.append(x)
    return np.vstack(parts).T


def _gather_part(skeleton: Plan, slots: Sequence[Any], nodes: Sequence[int], rows: np.ndarray,
                 start: int, *blocks: np.ndarray) -> np.ndarray:
    plan = dask_source.local_plan(skeleton, slots, blocks, start)
    local = rows[(rows >= start) & (rows < start + plan.n_samples)] - start
    if not len(local):
        return np.zeros((0, sum(plan.nodes[i].D for i in nodes)))
    return _read_rows(plan, nodes, 0, plan.n_samples)[local]


def _stack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.concatenate([a, b])


def gather_weighted_rows(plan: Plan, nodes: Sequence[int], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The data of the given (sorted) rows as read, holes NaN, (len(rows) × D), and the fit's
    weights of those rows (None without weights): one dask pass."""
    if plan.weights is None:
        return _gather(plan, nodes, rows), None
    data, weights = _gather(plan, nodes, rows, plan.weights[np.asarray(rows)])
    return data, np.asarray(weights, dtype=float)


def _gather(plan: Plan, nodes: Sequence[int], rows: np.ndarray, *also: Any) -> Any:
    slots, arrays = dask_source.layout(plan)
    part = functools.partial(_gather_part, dask_source.skeleton(plan), slots, list(nodes), np.asarray(rows))
    return dask_source.scan(arrays, part, _stack, *also)


class NearestSeed:
    """Each row's nearest centre, computed inside the chunk's task: ``labels[start:stop]`` (global rows).

    Used like the array of k-means labels the in-memory path builds, without an N-long
    array: it only answers inside a chunked E-step's task (:func:`current_chunk`). Rows are
    compared with the centres in the seeding space of engine/init.py (each family's
    ``seed_features``, then the per-element ``scaling`` of the sample the centres came from,
    when given).
    """

    def __init__(self, nodes: Sequence[int], centres: np.ndarray, scaling: np.ndarray | None = None) -> None:
        self.nodes = list(nodes)
        self.centres = np.asarray(centres, dtype=float)
        self.scaling = scaling

    def __getitem__(self, rows: slice) -> np.ndarray:
        from scipy.cluster.vq import vq

        from emdsl.engine.init import _seed_space

        plan, offset = current_chunk()
        raw = _read_rows(plan, self.nodes, rows.start - offset, rows.stop - offset)
        z, _ = _seed_space([plan.nodes[i] for i in self.nodes], np.array(raw.T),
                           rescale=self.scaling is not None, scaling=self.scaling)
        return vq(z.T, self.centres, check_finite=False)[0].astype(np.intp)


class NearestJoint:
    """Several latents' joint state of each row, computed inside the chunk's task like :class:`NearestSeed`:
    each latent's nearest centre in its own seeding space (engine/init.py ``LatentSeeding``: its
    nodes, scaled as on the sample it was seeded on; a latent seeded on the nodes it shares with
    earlier ones is first moved by the means of their joint clusters, as on the sample)."""

    def __init__(self, plan: Plan, chosen: Sequence[Any], shape: tuple[int, ...], seeded: Sequence[Any],
                 seed: int) -> None:
        positions = {id(node): i for i, node in enumerate(plan.nodes)}
        self.nodes = [[positions[id(node)] for node in (chosen if s.nodes is None else s.nodes)] for s in seeded]
        self.shape, self.seeded, self.seed = tuple(shape), list(seeded), seed

    def __getitem__(self, rows: slice) -> np.ndarray:
        from scipy.cluster.vq import vq

        from emdsl.engine.init import _group, _seed_space

        plan, offset = current_chunk()
        n = rows.stop - rows.start
        labels: list[np.ndarray] = []
        for position, (nodes, seeding) in enumerate(zip(self.nodes, self.seeded, strict=True)):
            if seeding.k == 1:
                labels.append(np.zeros(n, dtype=np.intp))
                continue
            if seeding.centres is None:  # no continuous node: random states, reproducible per chunk
                labels.append(np.random.default_rng([self.seed, position, rows.start]).integers(seeding.k, size=n))
                continue
            raw = _read_rows(plan, nodes, rows.start - offset, rows.stop - offset)
            z = _seed_space([plan.nodes[i] for i in nodes], np.array(raw.T), scaling=seeding.scaling)[0].T
            if seeding.within:
                ks = [self.seeded[i].k for i in seeding.within]
                z = z - seeding.offsets[_group([labels[i] for i in seeding.within], ks)]
            labels.append(vq(z, seeding.centres, check_finite=False)[0].astype(np.intp))
        return np.ravel_multi_index(tuple(labels), self.shape).astype(np.intp)


class RandomState:
    """A uniformly random state per row, reproducible from the seed and the row (not its chunk)."""

    def __init__(self, K: int, seed: int) -> None:
        self.K, self.seed = K, seed

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.argmax(row_uniforms(self.seed, rows.start, rows.stop, self.K), axis=1)


def kmeans_plusplus(plan: Plan, rng: np.random.Generator,
                    seeding: Callable[[np.ndarray, np.ndarray | None, np.ndarray],
                                      tuple[np.ndarray, np.ndarray, np.ndarray]]
                    ) -> Any:
    """k-means labels of a dask-backed plan: an array (N ≤ :data:`SEED_SAMPLE`) or a :class:`NearestSeed`.

    ``seeding`` runs the in-memory k-means (engine/init.py: seeding features, k-means++
    seeds, Lloyd's iterations to convergence) on rows as read, weighted by the fit's
    weights of those rows (None without weights), given which rows they are, and returns their labels,
    the centres and the per-element scaling of the seeding space. Up to
    :data:`SEED_SAMPLE` rows, every row is gathered (one pass) and seeded exactly as in
    memory, so the fit is the in-memory fit. Beyond, k-means runs on a uniform sample of
    that many rows drawn with the fit's seed, and every row is assigned to its nearest
    converged centre inside its chunk's task, in the same seeding space (scaled as the
    sample was).
    """
    nodes = seed_nodes(plan)
    if plan.K == 1:
        return RandomState(1, 0)
    if not nodes:
        if plan.n_samples <= SEED_SAMPLE:
            return np.argmax(rng.random((plan.n_samples, plan.K)), axis=1)
        return RandomState(plan.K, int(rng.integers(2**63)))
    if plan.n_samples <= SEED_SAMPLE:
        every = np.arange(plan.n_samples)
        return seeding(*gather_weighted_rows(plan, nodes, every), every)[0]
    rows = np.sort(rng.choice(plan.n_samples, SEED_SAMPLE, replace=False))
    _, centres, scaling = seeding(*gather_weighted_rows(plan, nodes, rows), rows)
    return NearestSeed(nodes, centres, scaling)


def nearest_given_mean(plan: Plan, names: Sequence[str], means: np.ndarray) -> NearestSeed:
    """Each row's nearest given mean, over the named continuous nodes (their seeding features), chunk by chunk."""
    return NearestSeed(seed_nodes(plan, names), means)
