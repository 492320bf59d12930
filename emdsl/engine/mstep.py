"""M-step and natural parameters: statistics → parameters → H (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from emdsl.compile import Plan
from emdsl.errors import ModelError
from emdsl.families._base import Params

Theta = dict[str, Params]


def natural_matrix(plan: Plan, theta: Mapping[str, Params]) -> np.ndarray:
    """H (K × S): each node's block (−A in its presence columns, η in the others), log π_k in column 0.

    A latent structure with statistics of its own (a Markov chain's initial and transition
    counts) appends its columns (log π, log A): H is then K × (S + extra), the E-step's
    product uses the first S, and ``vdot(H, stats)`` is still E_q[log p(x, z | θ)].
    """
    structure = plan.latent.structure if plan.latent is not None else None
    extra = structure.n_stats if structure is not None else 0
    H = np.empty((plan.K, plan.n_stats + extra))
    H[:, 0] = plan.latent.family.log_weights(theta[plan.latent.name]) if plan.latent is not None else 0.0
    for node in plan.nodes:
        # A node that depends on some of several latents: its rows repeated over the others'.
        H[:, node.offset:node.offset + node.n_rows] = node.family.natural(plan.expand(node, theta[node.name]))
    if extra:
        H[:, plan.n_stats:] = structure.natural(theta[plan.latent.name])
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
        held = {**hold.get(latent.name, {}), **latent.held}
        if latent.structure is not None and latent.structure.n_stats:
            theta[latent.name] = latent.structure.m_step(stats[:, 0], stats[:, plan.n_stats:], held,
                                                         previous.get(latent.name), prior=latent.prior)
        else:
            theta[latent.name] = latent.family.weights_m_step(stats[:, 0], held, prior=latent.prior)
    for node in plan.nodes:
        # With a bound prior, the family's step is the posterior mode (MAP-EM, DESIGN.md §1).
        try:
            block = stats[:, node.offset:node.offset + node.n_rows]
            theta[node.name], low = node.family.m_step(
                block if node.given is None else node.given.reduce(block),
                {**hold.get(node.name, {}), **node.held}, previous.get(node.name), prior=node.prior)
        except ModelError as error:
            raise ModelError(f"{node.where()}: {error}") from None
        floored.extend((node.name, k, value) for k, value in low)
    return theta, floored


def has_prior(plan: Plan) -> bool:
    """Whether any node (or the latent) has a prior: then EM climbs ℓ(θ) + log p(θ), not ℓ(θ)."""
    latent = plan.latent is not None and plan.latent.prior is not None
    return latent or any(node.prior is not None for node in plan.nodes)


def log_prior(plan: Plan, theta: Mapping[str, Params]) -> tuple[float, float]:
    """(log p(θ), the magnitude of its terms): Σ of every bound prior's normalized log density.

    log p(θ) is the density of the parameters in the data's units (each family adds the
    constant Jacobian of its internal units), so ℓ(θ) + log p(θ) is comparable across
    fits. (0, 0) without priors. The magnitude bounds the rounding of the sum.
    """
    value = size = 0.0
    if plan.latent is not None and plan.latent.prior is not None:
        value, size = plan.latent.family.log_prior(theta[plan.latent.name], plan.latent.prior)
    for node in plan.nodes:
        if node.prior is not None:
            part, magnitude = node.family.log_prior(theta[node.name], node.prior)
            value, size = value + part, size + magnitude
    return value, size


def expected_complete_loglik(H: np.ndarray, stats: np.ndarray) -> float:
    """E_q[log p(x, z | θ)] without log h: Σ_k H_k · ((R w) Φᵀ)_k, for the q that made ``stats``."""
    return float(np.vdot(H, stats))


def on_model(plan: Plan, theta: Theta | None) -> Theta | None:
    """θ with each node's parameters moved onto its M-step's structure (``family.project``: mclust's
    constrained covariances; the identity for most families). An affine combination of
    structured points need not be one (a shape of determinant 1 is not a linear constraint)."""
    if theta is None:
        return None
    return {**theta, **{node.name: node.family.project(theta[node.name]) for node in plan.nodes
                        if node.name in theta}}
