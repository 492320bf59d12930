"""E-step kernels: blocks of rows, one matrix product each way (DESIGN.md §2).

For a block of n samples, with Φ (S × n) the statistics and H (K × S) the natural
parameters (column 0 holding the constants c_k):

    L = H Φ                          (K × n)
    log p(x_n) = logsumexp_k L_kn,   R = softmax_k L   (responsibilities)
    stats += (R w) Φᵀ                 (K × S; column 0 is N_k)

with w the per-sample weights (1 when none are given): every sum the M-step and the
objective see is weighted, so a weight of 3 is exactly three copies of the row.

L is laid out K × n so that the max and sum over components run along rows,
and Φ is statistics × rows so that each statistic is one contiguous row.
Blocks bound the memory (see ``default_block_rows``) and are split over worker threads, each with
its own buffers and sums; numpy and BLAS release the GIL, and the caller holds
BLAS to one thread (threadpoolctl) because small-K products scale badly with
BLAS threads. Sums from blocks and threads simply add up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from emdsl.compile import Plan, blocks
from emdsl.errors import ImpossibleDataError, ModelError
from emdsl.options import OPTIONS


@dataclasses.dataclass
class Summary:
    """What an E-step pass adds up: weighted statistics, log-likelihood, entropy."""

    stats: np.ndarray  # (K, S): (R w) Φᵀ; column 0 holds N_k
    loglik: float  # Σ_n w_n logsumexp_k L_kn (log h(x) not included)
    entropy: float  # −Σ_nk w_n r_nk log r_nk
    #: Σ_n w_n (|max_k L_kn| + |log Σ_k exp(L_kn − max)|): the size of what was added, for rounding slack
    magnitude: float = 0.0

    def __add__(self, other: Summary) -> Summary:
        return Summary(self.stats + other.stats, self.loglik + other.loglik, self.entropy + other.entropy,
                       self.magnitude + other.magnitude)


class _Buffers:
    """One worker's scratch space, reused block after block."""

    def __init__(self, n_stats: int, K: int, rows: int, width: int) -> None:
        self.phi = np.empty(n_stats * rows)
        self.log_joint = np.empty(K * rows)
        self.resp = np.empty(K * rows)
        self.scratch = np.empty(width * rows)  # one node's data (D × n) while its rows of Φ are written
        self.rows = rows
        self.chain: _ChainBuffers | None = None  # a Markov latent's workspace, sized by its longest block

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
        #: a Markov latent's blocks hold whole sequences (the recursion runs along each one)
        self.sequences = plan.sequences
        self.ranges = list(blocks(self.N, self.rows)) if self.sequences is None else self.sequences.blocks(self.rows)
        threads = n_threads or OPTIONS["n_threads"] or default_threads(self.S, self.K)
        self.n_workers = max(1, min(threads, len(self.ranges)))
        self.chunks = [self.ranges[i::self.n_workers] for i in range(self.n_workers)]
        self.buffers = [_Buffers(self.S, self.K, min(self.rows, self.N), plan.max_D) for _ in range(self.n_workers)]
        if self.sequences is not None:
            longest = max(stop - start for start, stop in self.ranges)
            if self._phi_bytes(longest) <= _CHAIN_PHI_BYTES and longest > self.buffers[0].rows:
                # Φ of a whole block kept: R Φᵀ then needs no second read of the data
                self.buffers = [_Buffers(self.S, self.K, longest, plan.max_D) for _ in range(self.n_workers)]
            for buf in self.buffers:
                buf.chain = _ChainBuffers(self.K, longest)
        self.weights = plan.weights
        #: nodes with partly observed events, whose rows take the conditional-Gaussian path
        self.partial = [node for node in plan.nodes if len(node.partial_rows)]
        self.pool = ThreadPoolExecutor(self.n_workers) if self.n_workers > 1 else None

    def _phi_bytes(self, rows: int) -> int:
        """Bytes of Φ for ``rows`` rows."""
        return 8 * self.S * rows

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

    def _patterns(self, theta: Mapping[str, Any] | None) -> dict[str, list[Any]]:
        """Each partly observed node's conditional Gaussians, one per pattern of holes, at θ."""
        if not self.partial:
            return {}
        if theta is None:
            raise ValueError("an E-step over partly observed events needs the parameters θ")
        return {node.name: [node.family.patterns(self.plan.expand(node, theta[node.name]), observed)
                            for observed in node.patterns]
                for node in self.partial}

    def _partial_rows(self, start: int, stop: int) -> list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]]:
        """(node, pattern ids, block-local columns, x) of the partly observed rows in [start, stop)."""
        found = []
        for node in self.partial:
            a, b = np.searchsorted(node.partial_rows, [start, stop])
            if a < b:
                rows = node.partial_rows[a:b]
                found.append((node, node.partial_pattern[a:b], rows - start, node.read_rows(rows)))
        return found

    def _log_joint(self, H: np.ndarray, start: int, stop: int, buf: _Buffers,
                   patterns: Mapping[str, list[Any]]) -> tuple[Any, ...]:
        """Φ and L − max_k L, exp of it, its column sums and the max, for one block."""
        phi, log_joint, resp = buf.views(self.S, self.K, stop - start)
        self.plan.read(start, stop, phi, buf.scratch)
        # A value near the largest float times a coefficient above 1 (Gamma's rate) overflows to
        # −∞: that state's probability is exactly 0, which is handled (see ``lost`` below, and
        # loop.rounding_slack), so numpy's warning would only alarm. Validated data cannot make +∞.
        with np.errstate(over="ignore"):
            np.matmul(H, phi, out=log_joint)
        if self.plan.clamp is not None:
            _clamp(log_joint, self.plan.clamp[start:stop], self.plan)
        partial = self._partial_rows(start, stop) if patterns else []
        for node, pattern, columns, x in partial:
            # These rows' presence row in Φ is 0: their observed block enters here instead.
            for g in np.unique(pattern):
                chosen = pattern == g
                terms = patterns[node.name][g]
                log_joint[:, columns[chosen]] += terms.log_density(x[terms.o][:, chosen])
        peak = log_joint.max(axis=0)
        # A row whose L is −∞ in every state (its terms overflow: a value far beyond what the
        # parameters make possible) would turn into NaN below; it is made uniform here, and
        # the caller decides: a row of weight 0 adds nothing, anything else is refused.
        lost = peak == -np.inf
        if lost.any():
            log_joint[:, lost] = 0.0
            peak[lost] = 0.0
        else:
            lost = None
        log_joint -= peak
        np.exp(log_joint, out=resp)
        total = resp.sum(axis=0)
        return phi, log_joint, resp, total, peak, partial, lost

    def _lost_error(self, H: np.ndarray, start: int, lost: np.ndarray) -> ModelError:
        """The error for rows whose L is −∞ in every state: which row, and the nodes whose terms overflow there."""
        row = start + int(np.flatnonzero(lost)[0])
        phi = np.empty((self.S, 1))
        self.plan.read(row, row + 1, phi, np.empty(self.plan.max_D))
        with np.errstate(over="ignore", invalid="ignore"):
            culprits = [node.where() for node in self.plan.nodes
                        if np.all(H[:, node.offset:node.offset + node.n_rows]
                                  @ phi[node.offset:node.offset + node.n_rows, 0] == -np.inf)]
        culprits = culprits or [node.where() for node in self.plan.nodes]
        row += _chunk_offset() or 0  # a dask chunk's rows count from its first global row
        latent = self.plan.latent.name if self.plan.latent is not None else "the model"
        return ModelError(
            f"{'; '.join(culprits)}: the sample at row {row} (counting from 0) lies so far outside the range of the "
            f"parameters that its log-density is below the float range (−∞) in every state of {latent!r}, so its "
            "posterior cannot be computed; check its values, or fit data that include such values")

    def summarize(self, H: np.ndarray, theta: Mapping[str, Any] | None = None) -> Summary:
        """One E-step pass: R Φᵀ, Σ log p(x_n) (without log h) and the entropy of R (θ: for holes in events)."""
        if self.sequences is not None:
            return self._summarize_chain(H, theta)
        patterns = self._patterns(theta)

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> Summary:
            stats = np.zeros((self.K, self.S))
            loglik = entropy = magnitude = 0.0
            for start, stop in chunk:
                phi, shifted, resp, total, peak, partial, lost = self._log_joint(H, start, stop, buf, patterns)
                if lost is not None and (self.weights is None or np.any(self.weights[start:stop][lost] != 0)):
                    raise self._lost_error(H, start, lost)
                log_total = np.log(total)
                if self.weights is None:
                    resp /= total
                    sum_log_total, sum_peak = float(log_total.sum()), float(peak.sum())
                    magnitude += float(np.abs(peak).sum() + np.abs(log_total).sum())
                else:
                    w = self.weights[start:stop]
                    resp *= w / total  # weighted responsibilities: R w
                    sum_log_total, sum_peak = float(log_total @ w), float(peak @ w)
                    magnitude += float((np.abs(peak) + np.abs(log_total)) @ w)
                stats += resp @ phi.T
                entropy += _add_partial_rows(stats, partial, patterns, resp)
                loglik += sum_peak + sum_log_total
                # −Σ w r log r with log r = (L − max) − log Σ exp(L − max), and Σ_k r = 1. A state whose
                # L is −∞ (its terms overflow: x near the largest float) has r = 0 exactly and adds 0, not NaN.
                np.maximum(shifted, np.finfo(shifted.dtype).min, out=shifted)
                entropy += sum_log_total - float(np.vdot(resp, shifted))
            return Summary(stats, loglik, entropy, magnitude)

        return _total(self._map(work), self.K, self.S)

    def statistics_from(self, resp_of: Callable[[int, int], np.ndarray]) -> Summary:
        """R Φᵀ and the entropy of R for given responsibilities (``resp_of(start, stop)``: K × n)."""
        if self.sequences is not None:
            return self._statistics_from_chain(resp_of)

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> Summary:
            stats = np.zeros((self.K, self.S))
            entropy = 0.0
            for start, stop in chunk:
                phi = buf.views(self.S, self.K, stop - start)[0]
                self.plan.read(start, stop, phi, buf.scratch)
                resp = resp_of(start, stop)
                positive = resp > 0
                terms = np.where(positive, resp * np.log(np.where(positive, resp, 1.0)), 0.0).sum(axis=0)
                if self.weights is not None:
                    resp = resp * self.weights[start:stop]
                    terms = terms * self.weights[start:stop]
                stats += resp @ phi.T
                entropy -= float(terms.sum())
                for node, _, columns, x in self._partial_rows(start, stop):
                    # No θ yet to fill holes with: they start at the element's mean (0 in
                    # internal units), as for k-means++ seeding; the trace's ELBO at t = 0 is ℓ.
                    filled = np.empty((node.n_rows, len(columns)))
                    filled[0] = 1.0
                    filled[1:1 + node.D] = np.nan_to_num(x, nan=0.0)
                    node.family.second_moments(filled[1:], node.D)
                    stats[:, node.offset:node.offset + node.n_rows] += resp[:, columns] @ filled.T
            return Summary(stats, 0.0, entropy)

        return _total(self._map(work), self.K, self.S)

    def evaluate(self, H: np.ndarray, theta: Mapping[str, Any] | None = None, *,
                 resp_out: np.ndarray | None = None, loglik_out: np.ndarray | None = None) -> None:
        """Per-sample results: responsibilities (N × K) and/or log p(x_n) without log h (N,).

        For a Markov latent: p(z_t | x) per row (N × K), and log p(x_s) per *sequence*
        (n_sequences,), without log h.
        """
        if self.sequences is not None:
            self._evaluate_chain(H, theta, resp_out, loglik_out)
            return
        patterns = self._patterns(theta)

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> None:
            for start, stop in chunk:
                _, _, resp, total, peak, _, lost = self._log_joint(H, start, stop, buf, patterns)
                if resp_out is not None:
                    if lost is not None:  # no posterior: its ratios of densities are all ∞ / ∞
                        raise self._lost_error(H, start, lost)
                    resp_out[start:stop] = (resp / total).T
                if loglik_out is not None:
                    loglik_out[start:stop] = peak + np.log(total)
                    if lost is not None:  # log p(x) below the float range: its float is −∞
                        loglik_out[start:stop][lost] = -np.inf

        self._map(work)

    # -- a Markov latent: blocks of whole sequences, forward–backward (emdsl/latent/markov.py) ----------
    def _chain_emission(self, HT: np.ndarray, start: int, stop: int, buf: _Buffers,
                        patterns: Mapping[str, list[Any]]) -> tuple[np.ndarray, np.ndarray | None, list[Any]]:
        """L (n × K) of a block, by the same product H Φ as a mixture, Φ read in pieces of at most ``rows``.

        Returns L, Φ when the block fitted in one piece (else None: R Φᵀ re-reads it),
        and the block's partly observed rows.
        """
        n = stop - start
        L = buf.chain.L[:n * self.K].reshape(n, self.K)
        width = self.buffers[0].rows
        phi = None
        for a in range(0, n, width):
            b = min(a + width, n)
            phi = buf.phi[:self.S * (b - a)].reshape(self.S, b - a)
            self.plan.read(start + a, start + b, phi, buf.scratch)
            with np.errstate(over="ignore"):  # −∞: a state that cannot hold the value, as in _log_joint
                np.matmul(phi.T, HT, out=L[a:b])
        partial = self._partial_rows(start, stop) if patterns else []
        for node, pattern, columns, x in partial:
            for g in np.unique(pattern):
                chosen = pattern == g
                terms = patterns[node.name][g]
                L[columns[chosen]] += terms.log_density(x[terms.o][:, chosen]).T
        if self.plan.clamp is not None:  # known states: p(x_t, z_t = label), as a mixture's _log_joint
            _clamp(L.T, self.plan.clamp[start:stop])
        return L, (phi if n <= width else None), partial

    def _add_phi(self, stats: np.ndarray, resp: np.ndarray, phi: np.ndarray | None, start: int, stop: int,
                 buf: _Buffers) -> None:
        """stats (K × S) += Rᵀ Φᵀ for R (n × K), re-reading Φ in pieces when the block did not fit."""
        if phi is not None:
            stats += resp.T @ phi.T
            return
        width = self.buffers[0].rows
        for a in range(0, stop - start, width):
            b = min(a + width, stop - start)
            piece = buf.phi[:self.S * (b - a)].reshape(self.S, b - a)
            self.plan.read(start + a, start + b, piece, buf.scratch)
            stats += resp[a:b].T @ piece.T

    def _chain_failure(self, error: Any, start: int, L: np.ndarray) -> ImpossibleDataError:
        from emdsl.latent.markov import emits_nothing, impossible_message

        assert self.sequences is not None and self.plan.latent is not None
        return ImpossibleDataError(impossible_message(self.sequences, start + error.row, self.plan.latent.name,
                                                      bool(emits_nothing(L[error.row]))))

    def _summarize_chain(self, H: np.ndarray, theta: Mapping[str, Any] | None) -> Summary:
        from emdsl.latent.markov import ImpossibleSequence

        plan, sequences = self.plan, self.sequences
        assert sequences is not None and plan.latent is not None and theta is not None
        structure = plan.latent.structure
        params = theta[plan.latent.name]
        patterns = self._patterns(theta)
        HT = np.ascontiguousarray(H[:, :self.S].T)
        width = self.S + structure.n_stats

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> Summary:
            stats = np.zeros((self.K, width))
            loglik = entropy = magnitude = 0.0
            for start, stop in chunk:
                L, phi, partial = self._chain_emission(HT, start, stop, buf, patterns)
                a, b = sequences.sequences_in(start, stop)
                resp, scratch, peak, scale = buf.chain.views(stop - start)
                try:
                    part, gained, size, latent = structure.posterior(
                        L, sequences.starts[a:b + 1] - start, sequences.weights_of(a, b), params, resp, scratch, peak,
                        scale)
                except ImpossibleSequence as error:
                    raise self._chain_failure(error, start, L) from None
                self._add_phi(stats[:, :self.S], resp, phi, start, stop, buf)
                gained += _add_partial_rows(stats, partial, patterns, resp.T)
                stats[:, self.S:] += latent
                loglik += part
                entropy += gained
                magnitude += size
            return Summary(stats, loglik, entropy, magnitude)

        return _total(self._map(work), self.K, width)

    def _evaluate_chain(self, H: np.ndarray, theta: Mapping[str, Any] | None, resp_out: np.ndarray | None,
                        loglik_out: np.ndarray | None) -> None:
        from emdsl.latent.markov import ImpossibleSequence

        plan, sequences = self.plan, self.sequences
        assert sequences is not None and plan.latent is not None and theta is not None
        structure = plan.latent.structure
        params = theta[plan.latent.name]
        patterns = self._patterns(theta)
        HT = np.ascontiguousarray(H[:, :self.S].T)

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> None:
            for start, stop in chunk:
                L = self._chain_emission(HT, start, stop, buf, patterns)[0]
                a, b = sequences.sequences_in(start, stop)
                resp, scratch, peak, scale = buf.chain.views(stop - start)
                try:
                    loglik = structure.evaluate(L, sequences.starts[a:b + 1] - start, params, resp, scratch, peak,
                                                scale)
                except ImpossibleSequence as error:
                    if resp_out is not None:  # a posterior needs every sequence possible
                        raise self._chain_failure(error, start, L) from None
                    # log p(x_s) alone: a sequence of probability 0 scores −∞, as a mixture's sample does
                    loglik = _per_sequence(structure, L, sequences.starts[a:b + 1] - start, params, buf)
                if resp_out is not None:
                    resp_out[start:stop] = resp
                if loglik_out is not None:
                    loglik_out[a:b] = loglik

        self._map(work)

    def sequence_statistics(self, H: np.ndarray, theta: Mapping[str, Any]) -> np.ndarray:
        """Each sequence's own E-step sums, unweighted (n_sequences × K × (S + the chain's statistics)):
        what its score reads (Fisher's identity, sequence by sequence: ``inference.sample_scores``).

        The forward–backward recursion runs one sequence at a time here, since the chain's
        transition counts are otherwise summed over the sequences of a block.
        """
        from emdsl.latent.markov import ImpossibleSequence

        plan, sequences = self.plan, self.sequences
        assert sequences is not None and plan.latent is not None
        structure = plan.latent.structure
        params = theta[plan.latent.name]
        patterns = self._patterns(theta)
        HT = np.ascontiguousarray(H[:, :self.S].T)
        out = np.zeros((sequences.n_sequences, self.K, self.S + structure.n_stats))

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> None:
            for start, stop in chunk:
                L, _, partial = self._chain_emission(HT, start, stop, buf, patterns)
                a, b = sequences.sequences_in(start, stop)
                bounds = sequences.starts[a:b + 1] - start
                for s, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True), start=a):
                    resp, scratch, peak, scale = buf.chain.views(int(r1 - r0))
                    try:
                        latent = structure.posterior(L[r0:r1], np.array([0, r1 - r0]), np.ones(1), params, resp,
                                                     scratch, peak, scale)[3]
                    except ImpossibleSequence as error:
                        raise self._chain_failure(error, start + int(r0), L[r0:r1]) from None
                    mine = out[s]
                    mine[:, self.S:] = latent
                    self._add_phi(mine[:, :self.S], resp, None, start + int(r0), start + int(r1), buf)
                    inside = [(columns >= r0) & (columns < r1) for _, _, columns, _ in partial]
                    own = [(node, pattern[i], columns[i] - r0, x[:, i])
                           for (node, pattern, columns, x), i in zip(partial, inside, strict=True)]
                    _add_partial_rows(mine, own, patterns, resp.T)

        self._map(work)
        return out

    def emissions(self, H: np.ndarray, theta: Mapping[str, Any] | None, out: np.ndarray) -> None:
        """The emission log-densities L (N × K) of every row of a Markov latent's data, log h excluded."""
        patterns = self._patterns(theta)
        HT = np.ascontiguousarray(H[:, :self.S].T)

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> None:
            for start, stop in chunk:
                out[start:stop] = self._chain_emission(HT, start, stop, buf, patterns)[0]

        self._map(work)

    def _statistics_from_chain(self, resp_of: Callable[[int, int], np.ndarray]) -> Summary:
        plan, sequences = self.plan, self.sequences
        assert sequences is not None and plan.latent is not None
        structure = plan.latent.structure
        width = self.S + structure.n_stats

        def work(chunk: Sequence[tuple[int, int]], buf: _Buffers) -> Summary:
            stats = np.zeros((self.K, width))
            entropy = 0.0
            for start, stop in chunk:
                resp = resp_of(start, stop)
                a, b = sequences.sequences_in(start, stop)
                starts, w = sequences.starts[a:b + 1] - start, sequences.weights_of(a, b)
                latent, gained = structure.factorized(resp, starts, w)
                weighted = resp * np.repeat(w, np.diff(starts))
                self._add_phi(stats[:, :self.S], np.ascontiguousarray(weighted.T), None, start, stop, buf)
                for node, _, columns, x in self._partial_rows(start, stop):
                    filled = np.empty((node.n_rows, len(columns)))
                    filled[0] = 1.0
                    filled[1:1 + node.D] = np.nan_to_num(x, nan=0.0)
                    node.family.second_moments(filled[1:], node.D)
                    stats[:, node.offset:node.offset + node.n_rows] += weighted[:, columns] @ filled.T
                stats[:, self.S:] += latent
                entropy += gained
            return Summary(stats, 0.0, entropy)

        return _total(self._map(work), self.K, width)


#: the largest Φ a worker keeps for one block of whole sequences (longer ones read Φ twice)
_CHAIN_PHI_BYTES = 64 << 20


class _ChainBuffers:
    """A worker's workspace for forward–backward: L, γ, exp(L − max) (n × K each), the maxima and scales (n)."""

    def __init__(self, K: int, rows: int) -> None:
        self.K = K
        self.L = np.empty(K * rows)
        self.resp = np.empty(K * rows)
        self.scratch = np.empty(K * rows)
        self.peak = np.empty(rows)
        self.scale = np.empty(rows)

    def views(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        K = self.K
        return (self.resp[:K * n].reshape(n, K), self.scratch[:K * n].reshape(n, K), self.peak[:n],
                self.scale[:n])


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


def _add_partial_rows(stats: np.ndarray, partial: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]],
                      patterns: Mapping[str, list[Any]], resp: np.ndarray) -> float:
    """stats (K × …) += the expected statistics of a block's partly observed rows (``partial``, as
    :meth:`EStep._partial_rows` gives them: their Φ columns are 0) under the responsibilities
    ``resp`` (K × the block's rows); returns the holes' conditional entropy term."""
    gained = 0.0
    for node, pattern, columns, x in partial:
        block = slice(node.offset, node.offset + node.n_rows)
        for g in np.unique(pattern):
            chosen = pattern == g
            terms = patterns[node.name][g]
            extra, more = terms.expected_statistics(x[terms.o][:, chosen], resp[:, columns[chosen]])
            stats[:, block] += extra
            gained += more
    return gained


def _per_sequence(structure: Any, L: np.ndarray, starts: np.ndarray, params: Any, buf: _Buffers) -> np.ndarray:
    """log p(x_s) of a block's sequences one at a time, −∞ for those of probability 0 (the block's
    recursion stops at the first such sequence)."""
    from emdsl.latent.markov import ImpossibleSequence

    out = np.empty(len(starts) - 1)
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        views = buf.chain.views(int(b - a))
        try:
            out[i] = structure.evaluate(L[a:b], np.array([0, b - a]), params, *views)[0]
        except ImpossibleSequence:
            out[i] = -np.inf
    return out


#: log-joint of a state a known label rules out: exp() of it is 0 and 0 times it stays finite
RULED_OUT = -1e300


def _clamp(log_joint: np.ndarray, known: np.ndarray, plan: Plan | None = None) -> None:
    """Rule out every state but the known one for labelled samples (semi-supervised EM).

    Their likelihood term becomes log p(x, z = label), so that the posterior is the
    label itself and ℓ is the log-likelihood of the data and the labels together.
    With several latents ``known`` has a column per latent, and a sample keeps the joint
    states that agree with each of its known labels.
    """
    if known.ndim == 2:
        rows = np.flatnonzero((known >= 0).any(axis=1))
        if len(rows):
            block = log_joint[:, rows]
            block[~allowed_states(plan, known[rows]).T] = RULED_OUT
            log_joint[:, rows] = block
        return
    columns = np.flatnonzero(known >= 0)
    if len(columns):
        kept = log_joint[known[columns], columns]
        log_joint[:, columns] = RULED_OUT
        log_joint[known[columns], columns] = kept


def allowed_states(plan: Plan | None, known: np.ndarray) -> np.ndarray:
    """(n × K) whether each joint state of several latents agrees with a sample's known labels (n × L)."""
    assert plan is not None and plan.latent is not None
    family = plan.latent.family
    table = np.stack(family.unravel(np.arange(family.k)))  # (L × K): each latent's state in each joint state
    return ~((known[:, :, None] >= 0) & (table[None, :, :] != known[:, :, None])).any(axis=1)


def _total(parts: list[Summary], K: int, S: int) -> Summary:
    out = Summary(np.zeros((K, S)), 0.0, 0.0)
    for part in parts:
        out = out + part
    return out


@contextlib.contextmanager
def engine(plan: Plan) -> Iterator[EStep]:
    """An E-step runner with BLAS held to one thread: our own workers share the blocks, and
    the products are too small (K × S per block) for BLAS's threads to pay for themselves."""
    from emdsl.data import is_chunked

    if is_chunked(plan):  # dask-backed data: one task per chunk, run by whatever scheduler is active
        from emdsl.engine.chunked import ChunkedEStep

        with ChunkedEStep(plan) as chunked, threadpool_limits(limits=1, user_api="blas"):
            yield chunked  # type: ignore[misc]
        return
    from emdsl.engine.precision import make_estep

    with make_estep(plan) as estep, threadpool_limits(limits=1, user_api="blas"):
        yield estep


def _chunk_offset() -> int | None:
    """The first global row of the dask chunk this E-step is working on (None in memory: rows are global)."""
    from emdsl.engine import chunked  # chunked builds on this module

    try:
        return chunked.current_chunk()[1]
    except RuntimeError:  # not inside a chunk's task
        return None
