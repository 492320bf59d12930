"""Compiled recursions of the Markov latent: forward–backward and Viterbi (numba).

Why numba: the recursions are sequential in time, K² work per step. In numpy each
step is a few calls on K-vectors, microseconds of interpreter overhead per step
whatever K is: a plain numpy forward–backward over one sequence of 1e5 steps, K = 4,
takes 1.2 s of CPU; this kernel takes 4 ms (vectorizing numpy across sequences only
helps when there are many short ones). With it, an EM iteration costs 0.1–0.5× the CPU
of hmmlearn's compiled one (benchmarks/bench_hmm.py; categorical emissions, K = 4, are
the closest, at ~0.45–0.5). Emissions stay a
matrix product (BLAS), exponentials and logarithms stay numpy's (SIMD); only the
recursions are compiled. ``nogil`` lets the engine's worker threads run blocks of
sequences side by side; ``cache`` keeps the compiled code on disk, so a machine pays
for compilation once per number of states (see :func:`states_key`).

Scaled recursions (Rabiner 1989): α̂_t = α_t / Π_{s≤t} c_s sums to one at every t,
and emissions are exp(L_t − max_k L_tk), so nothing under- or overflows however long
the sequence; log p(x) = Σ_t (log c_t + max_k L_tk).
"""

from __future__ import annotations

import numpy as np
from numba import njit


def states_key(K: int) -> tuple[int, ...]:
    """K as a type: the kernels take a tuple of K zeros, so each K compiles (and caches) its own
    code with loops of known length, which the compiler unrolls: 1.7× faster at K = 4 than
    reading K from an array's shape (6.7 → 3.9 ms per forward–backward over 1e5 steps)."""
    return (0,) * K


#: below this, a step's scaled probability (relative to its best state's emission) is
#: redone with the emissions scaled by the best state the chain can be in, so that
#: products of small numbers cannot underflow to 0
_RESCALE = 1e-250


@njit(cache=True, nogil=True)
def forward_backward(states, L, starts, weights, initial, transition, impossible,  # noqa: ANN001, ANN201
                     resp, scratch, peak, scale, init_out, xi_out):
    """Posterior of a block of whole sequences; returns the first impossible row (−1: none).

    states: a tuple of K zeros, whose length is K as a compile-time constant (see
    :func:`states_key`); L (n × K): emission log-densities; starts (m + 1): the sequences'
    first rows (block relative) and the block's end; weights (m); initial (K),
    transition (K × K). On entry scratch (n × K) holds exp(L − peak) and peak (n) the row maxima of L (the
    caller computes them with numpy's vectorized exp); a step may rescale its row (peak
    is then updated). Writes resp (n × K) = w γ and the scales c (n), so that
    log p(x_s) = Σ_t (peak_t + log c_t); adds w γ at each sequence's first row to
    init_out (K) and the expected transition counts w Σ_t ξ_t to xi_out (K × K). A row
    is impossible when its observation has, given the past, a probability below
    exp(``impossible``) times what the best state would give it (−inf: never; used for
    zeros fixed in the declaration). A sequence of weight 0 is skipped: resp 0, peak 0, c 1.
    """
    K = len(states)
    beta = np.empty(K)
    step = np.empty(K)
    new_beta = np.empty(K)
    predicted = np.empty(K)
    for s in range(starts.shape[0] - 1):
        a = starts[s]
        e = starts[s + 1]
        w = weights[s]
        if w == 0.0:
            # adds nothing (w γ = 0, log p × 0 = 0 with peak 0 and scale 1): skipped, so that a
            # sequence of weight 0 that no state can emit is ignored, as a mixture's sample is
            for t in range(a, e):
                peak[t] = 0.0
                scale[t] = 1.0
                for k in range(K):
                    resp[t, k] = 0.0
            continue
        # forward: resp holds α̂
        for t in range(a, e):
            if t == a:
                for j in range(K):
                    predicted[j] = initial[j]
            else:
                for j in range(K):
                    predicted[j] = 0.0
                for i in range(K):
                    r = resp[t - 1, i]
                    for j in range(K):
                        predicted[j] += r * transition[i, j]
            total = 0.0
            for k in range(K):
                v = predicted[k] * scratch[t, k]
                resp[t, k] = v
                total += v
            if not (total > _RESCALE):
                # the states the chain can be in emit far worse than the best one: scale by
                # the best of those instead (a ruled-out state gets 0, exactly what it adds)
                best = peak[t]
                top = -np.inf
                for k in range(K):
                    if predicted[k] > 0.0 and L[t, k] > top:
                        top = L[t, k]
                total = 0.0
                for k in range(K):
                    b = np.exp(L[t, k] - top) if predicted[k] > 0.0 else 0.0
                    scratch[t, k] = b
                    v = predicted[k] * b
                    resp[t, k] = v
                    total += v
                if not (total > 0.0) or not np.isfinite(total) or np.log(total) + top - best < impossible:
                    return t
                peak[t] = top
            scale[t] = total
            inverse = 1.0 / total
            for k in range(K):
                resp[t, k] *= inverse
        # backward: β̂_{e−1} = 1; at each t, ξ_t uses α̂_t before resp[t] becomes γ_t
        for k in range(K):
            beta[k] = 1.0
        for t in range(e - 1, a - 1, -1):
            if t < e - 1:
                inverse = 1.0 / scale[t + 1]
                for j in range(K):
                    step[j] = scratch[t + 1, j] * beta[j] * inverse
                for i in range(K):
                    acc = 0.0
                    alpha = w * resp[t, i]
                    for j in range(K):
                        v = transition[i, j] * step[j]
                        acc += v
                        xi_out[i, j] += alpha * v
                    new_beta[i] = acc
                for k in range(K):
                    beta[k] = new_beta[k]
            total = 0.0
            for k in range(K):
                g = resp[t, k] * beta[k]
                resp[t, k] = g
                total += g
            inverse = w / total
            for k in range(K):
                resp[t, k] *= inverse
        for k in range(K):
            init_out[k] += resp[a, k]
    return -1


@njit(cache=True, nogil=True)
def viterbi(states, L, starts, lengths, log_initial, log_transition, path, log_prob):  # noqa: ANN001, ANN201
    """Most probable state paths of whole sequences (log space).

    L (n × K) holds the observed rows of each sequence (starts: m + 1 offsets);
    lengths (m) are the full lengths, which may run past a sequence's last row
    (NaN padding, missing observations: emission 0 there). Writes path (m × T) and
    log_prob (m), −inf where no path has positive probability.
    """
    K = len(states)
    T = path.shape[1]
    delta = np.empty(K)
    new_delta = np.empty(K)
    back = np.empty((T, K), dtype=np.int64)
    for s in range(starts.shape[0] - 1):
        a = starts[s]
        observed = starts[s + 1] - a
        length = lengths[s]
        for k in range(K):
            delta[k] = log_initial[k] + L[a, k]
        for t in range(1, length):
            for j in range(K):
                best = -np.inf
                arg = 0
                for i in range(K):
                    v = delta[i] + log_transition[i, j]
                    if v > best:
                        best = v
                        arg = i
                back[t, j] = arg
                new_delta[j] = best + (L[a + t, j] if t < observed else 0.0)
            for k in range(K):
                delta[k] = new_delta[k]
        best = -np.inf
        arg = 0
        for k in range(K):
            if delta[k] > best:
                best = delta[k]
                arg = k
        log_prob[s] = best
        path[s, length - 1] = arg
        for t in range(length - 1, 0, -1):
            arg = back[t, arg]
            path[s, t - 1] = arg
        for t in range(length, T):
            path[s, t] = -1


@njit(cache=True, nogil=True)
def shift_rows(L, peak, shifted):  # noqa: ANN001, ANN201
    """peak (n) = max_k L_tk and shifted (n × K) = L − peak (numpy then takes exp in place)."""
    n, K = L.shape
    for t in range(n):
        top = L[t, 0]
        for k in range(1, K):
            if L[t, k] > top:
                top = L[t, k]
        peak[t] = top
        for k in range(K):
            shifted[t, k] = L[t, k] - top


@njit(cache=True, nogil=True)
def sequence_sums(peak, log_scale, starts, loglik, magnitude):  # noqa: ANN001, ANN201
    """Per sequence: log p(x_s) = Σ_t (peak_t + log c_t), and Σ_t (|peak_t| + |log c_t|) for the rounding slack."""
    for s in range(starts.shape[0] - 1):
        total = 0.0
        size = 0.0
        for t in range(starts[s], starts[s + 1]):
            total += peak[t] + log_scale[t]
            size += abs(peak[t]) + abs(log_scale[t])
        loglik[s] = total
        magnitude[s] = size
