"""A mixture: K independent states per sample, R = softmax_k(L) (DESIGN.md §2).

The engine runs this structure inline (``engine/estep.py``), fused with the block's
matrix products: it is benchmarked against scikit-learn and must not pay for an
indirection per block. :func:`posterior` is the same computation, standalone, as the
reference the inline path is tested against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emdsl.families._base import LatentFamily, Params
from emdsl.latent._base import LatentStructure


class Mixture(LatentStructure):
    """Mixture weights π: log π in H's constant column, π_k = N_k / N in the M-step."""

    n_stats = 0

    def __init__(self, family: LatentFamily) -> None:
        self.family = family
        self.K = family.k

    def log_weights(self, params: Params) -> np.ndarray:
        return self.family.log_weights(params)  # type: ignore[attr-defined]

    def m_step(self, counts: np.ndarray, stats: np.ndarray, hold: Params,
               previous: Params | None, prior: Any = None) -> Params:
        return self.family.weights_m_step(counts, hold, prior=prior)  # type: ignore[attr-defined]


def posterior(log_joint: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Responsibilities (K × n), Σ w log p(x_n) and the entropy −Σ w r log r, from L (K × n) with log π in it."""
    peak = log_joint.max(axis=0)
    shifted = log_joint - peak
    total = np.exp(shifted).sum(axis=0)
    log_resp = shifted - np.log(total)
    resp = np.exp(log_resp)
    w = np.ones(log_joint.shape[1]) if weights is None else weights
    loglik = float((peak + np.log(total)) @ w)
    entropy = -float(np.sum(resp * log_resp * w))
    return resp, loglik, entropy
