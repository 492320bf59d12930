r"""A Markov latent: forward–backward over whole sequences (a hidden Markov model).

The latent is a first-order chain along one dimension of the data,

.. math::

    p(x, z) = \pi_{z_0} \prod_{t \ge 1} A_{z_{t-1} z_t} \prod_t p(x_t \mid z_t),

with the emissions p(x_t | z_t = k) = exp(L_tk) from the same matrix product
L = H Φ as a mixture (DESIGN.md §2), whose constant column is 0 here. The E-step is
forward–backward (``_kernels.forward_backward``): γ_t = p(z_t | x) are the
responsibilities (the weights of R Φᵀ), ξ_t = p(z_t, z_{t+1} | x) give the expected
transition counts, γ at each sequence's first step the initial counts; all weighted
by the sequence's weight. The M-step is π = Σ w γ_0 / Σ w and A_ij = Σ ξ_ij / Σ_j Σ ξ_ij
(a zero in A gives ξ = 0 there, so it stays zero).

With a Dirichlet(α) prior (``em.Categorical(k, prior=em.priors.Dirichlet(alpha))``, α a
number or one per state, as for a mixture's weights) the M-step is the posterior mode
π_k ∝ Σ w γ_0k + α⁰_k − 1 and A_ij ∝ Σ ξ_ij + α_ij − 1: by default the same α on the
initial distribution and on every row of A; a K × K α gives each row its own (a sticky
prior), ``Dirichlet(..., initial=α⁰)`` π its own. A zero of the parameters the E-step used (a
structural zero: fixed, or in the starting values) stays zero: the prior is a
Dirichlet over the other entries of that row (:func:`chain_log_prior`), so MAP-EM stays
a constrained maximization and the log-posterior never decreases. A row with no
transition counts is then α's mode (uniform for the weak prior), not a leftover.

The ELBO stays one dot product: the structure's natural parameters (log π, log A) are
extra columns of H matching its statistics (initial counts, ξ), and its entropy term
is what makes the ELBO equal ℓ at the E-step's θ:
ℍ = ℓ − Σ w γ·L − Σ w γ_0·log π − Σ ξ·log A.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import numpy as np

from emdsl.errors import ModelError
from emdsl.families._base import BoundPrior, LatentFamily, Params
from emdsl.families.categorical import log_probs
from emdsl.latent._base import LatentStructure, held


@dataclasses.dataclass(eq=False)
class Sequences:
    """How the rows of a plan form sequences: each sequence's rows are consecutive, in time order.

    The data's (sequence dims..., markov dim) are flattened in C order; each sequence
    keeps its rows up to its last observed step (NaN padding at the end is trimmed:
    a chain past its last observation marginalizes to one), so sequence s is rows
    ``starts[s]:starts[s+1]``, its step t at row ``starts[s] + t``.
    """

    dim: Hashable
    sequence_dims: tuple[Hashable, ...]
    sequence_shape: tuple[int, ...]
    sequence_coords: dict[Hashable, Any]
    #: the size of the markov dimension (the padded length)
    length: int
    time_coords: dict[Hashable, Any]
    starts: np.ndarray
    #: per-sequence weights (None: every sequence counts once)
    weights: np.ndarray | None = None
    #: the index of the first sequence among the data's (a chunk of dask-backed data holds a run of them)
    first: int = 0

    @property
    def n_sequences(self) -> int:
        return len(self.starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Observed length of each sequence (padding trimmed)."""
        return np.diff(self.starts)

    @property
    def observed(self) -> np.ndarray:
        """Which steps of the padded grid (n_sequences × length) are rows: each sequence's steps up to
        its last observation."""
        return np.arange(self.length)[None, :] < self.lengths[:, None]

    def blocks(self, rows: int) -> list[tuple[int, int]]:
        """Row ranges of whole sequences, about ``rows`` long (a longer sequence is a block of its own)."""
        out = []
        first = 0
        m = self.n_sequences
        while first < m:
            last = first + 1
            while last < m and self.starts[last + 1] - self.starts[first] <= rows:
                last += 1
            out.append((int(self.starts[first]), int(self.starts[last])))
            first = last
        return out

    def within(self, start: int, stop: int) -> Sequences:
        """The sequences of the rows [start, stop), numbered from ``start`` (they must be whole sequences)."""
        a, b = self.sequences_in(start, stop)
        if self.starts[a] != start or self.starts[b] != stop:
            raise RuntimeError(f"rows {start}–{stop - 1} do not hold whole sequences")
        weights = None if self.weights is None else self.weights[a:b]
        return dataclasses.replace(self, starts=self.starts[a:b + 1] - start, weights=weights, first=self.first + a)

    def sequences_in(self, start: int, stop: int) -> tuple[int, int]:
        """The sequences whose rows are [start, stop) (a block of whole sequences)."""
        a, b = np.searchsorted(self.starts, [start, stop])
        return int(a), int(b)

    def weights_of(self, a: int, b: int) -> np.ndarray:
        return np.ones(b - a) if self.weights is None else self.weights[a:b]

    def scatter(self, values: np.ndarray, fill: Any = np.nan, dtype: Any = None) -> np.ndarray:
        """Per-row values (N, ...) onto the padded grid (n_sequences, length, ...), ``fill`` in the padding."""
        out = np.full((self.n_sequences, self.length) + values.shape[1:], fill,
                      dtype=values.dtype if dtype is None else dtype)
        out[self.observed] = values
        return out


class Markov(LatentStructure):
    """Initial distribution and transition matrix of a chain; forward–backward E-step."""

    def __init__(self, family: LatentFamily, sequences: Sequences) -> None:
        self.family = family
        self.K = family.k
        self.sequences = sequences
        self.n_stats = 1 + self.K
        #: With zeros fixed in the declaration, a step that the allowed states explain
        #: 1e-290 times worse than the best state is reported as impossible: a fixed zero
        #: emission probability is floored at 1e-300 (Categorical), which would otherwise
        #: pass silently as a log-likelihood of −690. Zeros that EM learned are no error.
        fixed = [np.asarray(value) for value in family.fixed.values()]
        self.impossible = float(np.log(1e-290)) if any((value == 0).any() for value in fixed) else -np.inf

    def log_weights(self, params: Params) -> np.ndarray:
        return np.zeros(self.K)

    def natural(self, params: Params) -> np.ndarray:
        """[log π | log A] (K × (1 + K)): column 0 meets the initial counts, column 1 + j meets ξ_·j."""
        return np.hstack([log_probs(np.asarray(params["initial"], dtype=float))[:, None],
                          log_probs(np.asarray(params["transition"], dtype=float))])

    def m_step(self, counts: np.ndarray, stats: np.ndarray, hold: Params,
               previous: Params | None, prior: BoundPrior | None = None) -> Params:
        initial, transition = held(hold, "initial"), held(hold, "transition")
        if prior is not None:
            return self._posterior_mode(stats, initial, transition, previous, prior["initial"], prior["alpha"])
        if initial is None:
            first = stats[:, 0]
            if first.sum() > 0:
                initial = first / first.sum()
            else:  # no first step counted (a start from labelled steps only): Q does not depend on it
                fallback = (previous or {}).get("initial")
                initial = np.asarray(self.default_params()["initial"] if fallback is None else fallback, dtype=float)
        if transition is None:
            xi = stats[:, 1:]
            rows = xi.sum(axis=1, keepdims=True)
            # A state never left (it only ends sequences, or is never visited) has no
            # transition counts; Q does not depend on its row, which stays where it was.
            empty = rows[:, 0] <= 1e-12 * max(float(rows.sum()), 1.0)
            transition = xi / np.where(rows > 0, rows, 1.0)
            if empty.any():
                fallback = (previous or {}).get("transition")
                fallback = self.default_params()["transition"] if fallback is None else np.asarray(fallback)
                transition[empty] = fallback[empty]
        return {"initial": initial, "transition": transition}

    def _posterior_mode(self, stats: np.ndarray, initial: np.ndarray | None, transition: np.ndarray | None,
                        previous: Params | None, alpha0: np.ndarray, alpha: np.ndarray) -> Params:
        """MAP of π under Dirichlet(α⁰) and of each row i of A under Dirichlet(α_i·), zeros of ``previous``
        kept (see the module)."""
        previous = previous or {}
        out = {}
        for name, counts, fixed, alpha in (("initial", stats[:, :1].T, initial, alpha0[None, :]),
                                           ("transition", stats[:, 1:], transition, alpha)):
            if fixed is not None:
                out[name] = fixed
                continue
            support = np.ones(counts.shape, dtype=bool)
            if previous.get(name) is not None:
                support = np.reshape(np.asarray(previous[name], dtype=float), counts.shape) > 0
            pseudo = np.where(support, counts + alpha - 1.0, 0.0)  # α ≥ 1: every entry ≥ 0
            rows = pseudo.sum(axis=1, keepdims=True)
            value = pseudo / np.where(rows > 0, rows, 1.0)
            empty = rows[:, 0] <= 0  # no counts and α = 1 on its support: every row is a mode; keep the last
            if empty.any():
                fallback = previous.get(name)
                fallback = self.default_params()[name] if fallback is None else fallback
                value[empty] = np.reshape(np.asarray(fallback, dtype=float), counts.shape)[empty]
            out[name] = value[0] if name == "initial" else value
        return out

    def stats_magnitude(self, plan: Any) -> np.ndarray:
        seq = self.sequences
        w = seq.weights_of(0, seq.n_sequences)
        transitions = float(w @ np.maximum(seq.lengths - 1, 0))
        return np.concatenate([[float(w.sum())], np.full(self.K, transitions)])

    def default_params(self) -> Params:
        return self.family.default_params()  # type: ignore[attr-defined]

    # -- E-step of one block of whole sequences ---------------------------------------
    def posterior(self, L: np.ndarray, starts: np.ndarray, weights: np.ndarray, params: Params,
                  resp: np.ndarray, scratch: np.ndarray, peak: np.ndarray, scale: np.ndarray
                  ) -> tuple[float, float, float, np.ndarray]:
        """Forward–backward on L (n × K): writes w γ into ``resp`` (n × K).

        Returns Σ w log p(x_s) (log h excluded), the entropy term, the magnitude of the
        sums (for the rounding slack), and the latent's statistics (K × (1 + K)).
        """
        stats = np.zeros((self.K, 1 + self.K))
        gamma_l, per_sequence, sizes = self._forward_backward(L, starts, weights, params, resp, scratch, peak, scale,
                                                              stats[:, 0], stats[:, 1:])
        loglik = float(per_sequence @ weights)
        magnitude = float(sizes @ weights)
        entropy = loglik - gamma_l - float(np.vdot(self.natural(params), stats))
        return loglik, entropy, magnitude, stats

    def _forward_backward(self, L: np.ndarray, starts: np.ndarray, weights: np.ndarray, params: Params,
                          resp: np.ndarray, scratch: np.ndarray, peak: np.ndarray, scale: np.ndarray,
                          init_out: np.ndarray, xi_out: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """The compiled recursion with numpy's exp and log around it.

        Returns Σ w γ·L, and per sequence log p(x_s) (log h excluded) and Σ_t (|max_k L_tk| + |log c_t|).
        """
        from emdsl.latent._kernels import forward_backward, sequence_sums, shift_rows, states_key

        n = L.shape[0]
        shift_rows(L, peak, scratch)
        np.exp(scratch, out=scratch)
        initial = np.asarray(params["initial"], dtype=float)
        transition = np.ascontiguousarray(params["transition"], dtype=float)
        xi = np.zeros((self.K, self.K))
        first = np.zeros(self.K)
        bad = forward_backward(states_key(self.K), L, starts, weights, initial, transition, self.impossible,
                               resp, scratch, peak, scale, first, xi)
        if bad >= 0:
            raise ImpossibleSequence(int(bad))
        init_out += first
        xi_out += xi
        m = len(starts) - 1
        per_sequence, sizes = np.empty(m), np.empty(m)
        sequence_sums(peak, np.log(scale[:n]), starts, per_sequence, sizes)
        # Σ γ L over the states with γ > 0: an L of −∞ (overflowing terms) has γ = 0 exactly and adds 0, not NaN
        return float(np.vdot(resp, np.maximum(L, np.finfo(L.dtype).min))), per_sequence, sizes

    def factorized(self, resp: np.ndarray, starts: np.ndarray, weights: np.ndarray
                   ) -> tuple[np.ndarray, float]:
        """Statistics and entropy of a q that is independent across steps, from its marginals (K × n).

        For starting responsibilities (k-means++ labels, random ones): E_q over
        independent steps gives the transition counts Σ_t r_t r_{t+1}ᵀ, and ℍ[q] is
        the sum of the steps' entropies, so the ELBO of θ⁽⁰⁾ is a true lower bound.
        """
        n = resp.shape[1]
        lengths = np.diff(starts)
        row_w = np.repeat(weights, lengths)
        first = starts[:-1]
        stats = np.zeros((self.K, 1 + self.K))
        stats[:, 0] = resp[:, first] @ weights
        follows = np.ones(n, dtype=bool)
        follows[first] = False  # rows that have a predecessor in their sequence
        later = np.flatnonzero(follows)
        stats[:, 1:] = (resp[:, later - 1] * row_w[later]) @ resp[:, later].T
        positive = resp > 0
        terms = np.where(positive, resp * np.log(np.where(positive, resp, 1.0)), 0.0).sum(axis=0)
        return stats, -float(terms @ row_w)

    def evaluate(self, L: np.ndarray, starts: np.ndarray, params: Params, resp: np.ndarray,
                 scratch: np.ndarray, peak: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Unweighted γ into ``resp`` and log p(x_s) per sequence (log h excluded)."""
        weights = np.ones(len(starts) - 1)
        return self._forward_backward(L, starts, weights, params, resp, scratch, peak, scale,
                                      np.zeros(self.K), np.zeros((self.K, self.K)))[1]


class ImpossibleSequence(ModelError):
    """A sequence has probability 0 under the parameters (raised with the block row; the engine names it)."""

    def __init__(self, row: int) -> None:
        super().__init__(f"row {row}")
        self.row = row


def impossible_message(sequences: Sequences, row: int, name: str, emits_nothing: bool = False) -> str:
    """Say which sequence and time step cannot be reached, in the data's labels, and why: no state
    can emit the observation (``emits_nothing``), or none that the chain can reach there."""
    local = int(np.searchsorted(sequences.starts, row, side="right") - 1)
    t = row - int(sequences.starts[local])
    s = sequences.first + local
    where = []
    if sequences.sequence_dims:
        index = np.unravel_index(s, sequences.sequence_shape)
        for dim, i in zip(sequences.sequence_dims, index, strict=True):
            coords = sequences.sequence_coords.get(dim)
            where.append(f"{dim}={_plain(coords[i]) if coords is not None else int(i)!r}")
    coords = sequences.time_coords.get(sequences.dim)
    where.append(f"{sequences.dim}={_plain(coords[t]) if coords is not None else t!r}")
    head = (f"latent({name!r}, ..., markov={sequences.dim!r}): the sequence at {', '.join(where)} has "
            "probability 0 under the parameters: ")
    if emits_nothing:
        return head + ("no state can emit the observation there (its log-density is −∞ in every state: a "
                       "value far outside the range of the parameters, or a known state that rules out the "
                       "others). Check the data at that step")
    return head + ("no state allowed there by the initial distribution and the transition matrix (e.g. its "
                   "fixed zeros) can emit the observation. Check the zeros of initial/transition, or the data "
                   "at that step")


def emits_nothing(L: np.ndarray) -> np.ndarray:
    """Which rows of emission log-densities (… × K) no state can emit: −∞, or ruled out by a known
    state (``estep.RULED_OUT``), in every state."""
    from emdsl.engine.estep import RULED_OUT

    return np.all(L <= RULED_OUT, axis=-1)


def viterbi_failure(L: np.ndarray, sequences: Sequences, local: int, name: str) -> str:
    """Why a sequence (``local``: its index among ``sequences``) has no path: a step that no
    state can emit (named as the E-step names it), else the zeros of initial/transition."""
    a, b = int(sequences.starts[local]), int(sequences.starts[local + 1])
    silent = np.flatnonzero(emits_nothing(L[a:b]))
    if len(silent):
        return impossible_message(sequences, a + int(silent[0]), name, emits_nothing=True)
    return (f"viterbi: sequence {sequences.first + local} has probability 0 under the fitted parameters "
            "(no path avoids the zeros of initial/transition)")


def _plain(label: Any) -> Any:
    if isinstance(label, np.datetime64 | np.timedelta64):
        return str(label)
    return label.item() if isinstance(label, np.generic) else label


def chain_log_prior(params: Params, alpha0: np.ndarray, alpha: np.ndarray) -> tuple[float, float]:
    """log Dirichlet(π; α⁰) + Σ_i log Dirichlet(A_i·; α_i·), and the magnitude of its terms (of those in
    ``params``).

    Each density is over its row's support: the entries that are > 0, or whose α is 1
    (those add nothing but Γ(Σα)); a zero with α > 1 is a structural zero, outside the
    support. EM never moves an entry across that line (a zero stays zero; with α > 1 an
    entry stays > 0), so the normalizing constants do not change over a fit.
    """
    from scipy.special import gammaln, xlogy

    from emdsl.priors import total

    terms = []
    # a parameter left out of ``params`` (held: fixed in the declaration) has no prior term
    for name, of in (("initial", alpha0), ("transition", alpha)):
        if name not in params:
            continue
        value = np.atleast_2d(np.asarray(params[name], dtype=float))
        a = np.broadcast_to(np.asarray(of, dtype=float), value.shape)
        support = (value > 0) | (a == 1.0)
        terms += [gammaln(np.where(support, a, 0.0).sum(axis=1)), -np.where(support, gammaln(a), 0.0).sum(axis=1),
                  np.where(support, xlogy(a - 1.0, np.where(support, value, 1.0)), 0.0).sum(axis=1)]
    return total(terms)


def fill_padding(grid: np.ndarray, lengths: np.ndarray, transition: np.ndarray) -> None:
    """p(z_t | x) past each sequence's last observation (NaN padding): γ_t = γ_{t−1} A, in place.

    grid (n_sequences, T, K) holds γ over each sequence's observed span.
    """
    T = grid.shape[1]
    for t in range(int(lengths.min()) if len(lengths) else T, T):
        past = lengths <= t
        grid[past, t] = grid[past, t - 1] @ transition


def viterbi_paths(L: np.ndarray, sequences: Sequences, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Most probable paths (n_sequences × T, state indices) and their log p(x, z) without log h.

    The padded steps after a sequence's last observation are missing observations: the
    path continues along the most probable transitions.
    """
    from emdsl.latent._kernels import states_key, viterbi

    with np.errstate(divide="ignore"):
        log_initial = np.log(np.asarray(params["initial"], dtype=float))
        log_transition = np.log(np.ascontiguousarray(params["transition"], dtype=float))
    m = sequences.n_sequences
    path = np.empty((m, sequences.length), dtype=np.int64)
    log_prob = np.empty(m)
    lengths = np.full(m, sequences.length, dtype=np.int64)
    viterbi(states_key(L.shape[1]), np.ascontiguousarray(L), sequences.starts, lengths, log_initial, log_transition,
            path, log_prob)
    return path, log_prob


def sample_states(params: Params, n_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """State paths (n_sequences × length) drawn from the chain."""
    initial = np.asarray(params["initial"], dtype=float)
    cumulative = np.cumsum(np.asarray(params["transition"], dtype=float), axis=1)
    states = np.empty((n_sequences, length), dtype=np.intp)
    if length == 0:
        return states
    states[:, 0] = rng.choice(len(initial), size=n_sequences, p=initial / initial.sum())
    for t in range(1, length):
        u = rng.random(n_sequences)[:, None]
        rows = cumulative[states[:, t - 1]]
        states[:, t] = np.minimum((u * rows[:, -1:] > rows).sum(axis=1), len(initial) - 1)
    return states


def chain_sizes(fit: Any) -> tuple[str, int | None, int] | None:
    """A Markov fit's (markov dim, number of sequences or None when unknown, observed steps); None for a mixture.

    The sequences are counted from the training data (the dims before the markov dim, as
    the compiler finds them); a fit loaded from a file holds no data, only its steps.
    """
    latent = fit.model.latent_var
    if latent is None or latent.markov is None:
        return None
    data, n_sequences = getattr(fit, "_data", None), None
    if data is not None and fit.model.observed:
        variable = fit.model.observed[0].variables[0]
        if variable in data and latent.markov in data[variable].dims:
            dims = data[variable].dims
            n_sequences = int(np.prod([data.sizes[d] for d in dims[:dims.index(latent.markov)]], dtype=np.int64))
    return str(latent.markov), n_sequences, int(fit.n_samples)


def describe_sizes(sizes: tuple[str, int | None, int]) -> str:
    """``3 sequences, 140 steps along 'time'`` (the steps observed, NaN padding excluded)."""
    dim, n_sequences, steps = sizes
    head = "" if n_sequences is None else f"{n_sequences} sequence{'s' if n_sequences != 1 else ''}, "
    return f"{head}{steps} steps along {dim!r}"
