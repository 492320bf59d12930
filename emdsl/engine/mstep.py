"""M-step and natural parameters: statistics → parameters → H (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from emdsl.compile import Plan
from emdsl.families._base import Params

Theta = dict[str, Params]


def natural_matrix(plan: Plan, theta: Mapping[str, Params]) -> np.ndarray:
    """H (K × S): each node's block (−A in its presence columns, η in the others), log π_k in column 0."""
    H = np.empty((plan.K, plan.n_stats))
    H[:, 0] = plan.latent.family.log_weights(theta[plan.latent.name]) if plan.latent is not None else 0.0
    for node in plan.nodes:
        H[:, node.offset:node.offset + node.n_rows] = node.family.natural(theta[node.name])
    return H


def maximize(plan: Plan, stats: np.ndarray, previous: Mapping[str, Params] | None,
             hold: Mapping[str, Params] | None = None) -> tuple[Theta, list[tuple[str, int, float]]]:
    """Moment matching for every node from its block of the summed statistics (R w) Φᵀ (K × S).

    ``hold`` adds parameters to keep as they are (starting values given by the
    user) to the declaration's fixed ones. Returns the parameters and the
    ``(node, component, smallest variance)`` triples where a variance floor applied.
    """
    hold = hold or {}
    previous = previous or {}
    theta: Theta = {}
    floored: list[tuple[str, int, float]] = []
    if plan.latent is not None:
        latent = plan.latent
        theta[latent.name] = latent.family.weights_m_step(stats[:, 0], {**hold.get(latent.name, {}), **latent.held})
    for node in plan.nodes:
        theta[node.name], low = node.family.m_step(
            stats[:, node.offset:node.offset + node.n_rows],
            {**hold.get(node.name, {}), **node.held}, previous.get(node.name))
        floored.extend((node.name, k, value) for k, value in low)
    return theta, floored


def expected_complete_loglik(H: np.ndarray, stats: np.ndarray) -> float:
    """E_q[log p(x, z | θ)] without log h: Σ_k H_k · ((R w) Φᵀ)_k, for the q that made ``stats``."""
    return float(np.vdot(H, stats))
