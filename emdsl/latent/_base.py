"""The latent-structure seam (DESIGN.md §3): what a latent adds to the E-step and the M-step.

The observed nodes give every sample (or time step) its emission log-densities
L = H Φ (K per row); a latent structure turns a block of L into

* the responsibilities R (p(z | x), the weights of R Φᵀ),
* the log-likelihood Σ log p(x),
* the entropy term ℍ[q] of the posterior, and
* the latent's own expected statistics (extra columns of the summed statistics),

and owns the M-step of the latent's parameters. Its natural parameters are extra
columns of H matching its statistics, so that E_q[log p(x, z | θ)] stays one dot
product ``vdot(H, stats)`` for any structure, and the loop's ELBO needs no special case.

A mixture (softmax over K independent states) has no extra columns: its log-weights
ride in H's constant column 0. A Markov chain (forward–backward) has 1 + K: the
initial counts and the expected transition counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from emdsl.families._base import Params


class LatentStructure:
    """One latent's structure over the rows of a block; the interface the engine calls."""

    #: extra columns of the statistics (and of H) that hold the latent's own statistics
    n_stats: int = 0
    K: int

    def log_weights(self, params: Params) -> np.ndarray:
        """H's column 0 (K,): log π for a mixture, 0 where the structure keeps its own terms."""
        raise NotImplementedError

    def natural(self, params: Params) -> np.ndarray:
        """The latent's own columns of H (K × n_stats): log-probabilities matching its statistics."""
        return np.zeros((self.K, 0))

    def m_step(self, counts: np.ndarray, stats: np.ndarray, hold: Params,
               previous: Params | None, prior: Any = None) -> Params:
        """The latent's parameters from N_k (K,) and its own statistics (K × n_stats); MAP with a bound prior."""
        raise NotImplementedError

    def stats_magnitude(self, plan: Any) -> np.ndarray:
        """Σ |statistic| per extra column (n_stats,), a bound on what the E-step adds there (rounding slack)."""
        return np.zeros(self.n_stats)

    def default_params(self) -> Params:
        """Starting values of the latent's parameters when the data say nothing about them."""
        return {}


def held(hold: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """A held (fixed or given) parameter as a float array, or None."""
    value = hold.get(name)
    return None if value is None else np.asarray(value, dtype=float)
