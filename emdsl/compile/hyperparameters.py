"""Priors bound to the plan: declared hyperparameters in the fitted units, and the weak prior from the data."""

from __future__ import annotations

from typing import Any

import numpy as np

from emdsl import labels
from emdsl.compile.plan import SCAN_ROWS, Node, Plan, blocks
from emdsl.data import is_chunked
from emdsl.errors import ModelError
from emdsl.families._base import BoundPrior
from emdsl.latent.joint import JointCategorical


def bind_priors(plan: Plan, weak: bool) -> None:
    """Declared priors, their hyperparameters checked and in internal units; with ``weak``, the others.

    A weak prior is scaled from the data's own sufficient statistics Σ_n w_n Φ_n (one
    pass over the data), in internal units: the family reads the data's mean, spread or
    frequencies off its block of that sum.
    """
    stats = _data_statistics(plan) if weak else None
    if plan.latent is not None and isinstance(plan.latent.family, JointCategorical):
        plan.latent.prior = _member_priors(plan.latent.family, stats)
    elif plan.latent is not None:  # a Markov latent's Dirichlet is on initial and each row of transition
        family = plan.latent.family
        where = f"latent({plan.latent.name!r}, {family!r})"
        if family.prior is not None:
            values = _hyperparameters(plan, None, family, where)
            plan.latent.prior = family.bind_prior(values, None, None, plan.K, where)
        elif stats is not None:
            plan.latent.prior = family.weak_prior(stats[:1], None, plan.K)
    for node in plan.nodes:
        family = node.family
        if family.prior is not None:
            where = node.where()
            values = _hyperparameters(plan, node, family, where)
            node.prior = family.bind_prior(values, node.center, node.scale, plan.components(node),
                                           f"{where}: {family.prior!r}")
        elif stats is not None:
            node.prior = family.weak_prior(stats[node.offset:node.offset + node.n_rows],
                                           node.scale if family.standardize else None, plan.components(node))


def _member_priors(joint: JointCategorical, stats: np.ndarray | None) -> dict[str, BoundPrior] | None:
    """Each of several latents' Dirichlet prior on its weights (declared, or the weak one), by name."""
    out = {}
    for name, member in zip(joint.names, joint.members, strict=True):
        where = f"latent({name!r}, {member!r})"
        if member.prior is not None:
            if member.prior.initial is not None or np.ndim(member.prior.alpha) > 1:
                raise ModelError(f"{where}: a matrix alpha and initial=... are for a Markov latent; the "
                                 "weights of one of several latents take a number or one alpha per state")
            alpha = np.broadcast_to(np.asarray(member.prior.alpha, dtype=float), (member.k,))
            out[name] = member.bind_prior({"alpha": alpha}, None, None, member.k, where)
        elif stats is not None:
            out[name] = member.weak_prior(stats[:1], None, member.k)
    return {name: prior for name, prior in out.items() if prior is not None} or None


def _hyperparameters(plan: Plan, node: Node | None, family: Any, where: str) -> dict[str, np.ndarray]:
    """A declared prior's hyperparameters (data units) as arrays shaped by the family's ``prior_axes``.

    Labelled values (DataArrays) are aligned like fixed parameters; a scale matrix given as a
    number or a vector (over the event) is that multiple of I or that diagonal.
    """
    out = {}
    axes_of = family.prior_axes()
    for name in family.prior.arguments():
        if name not in axes_of:  # e.g. Dirichlet(initial=...) on a mixture: refused, not ignored
            raise ModelError(f"{where}: {family.prior.kind}({name}=...) applies to a Markov latent's initial "
                             f"distribution only; {family.kind} here has no such parameter")
    for name, axes in axes_of.items():
        value = getattr(family.prior, name)
        if value is None:  # an optional hyperparameter left out: the family fills its default
            continue
        at = f"{where}: {family.prior.kind}({name}=...)"
        if "event_" in axes and np.ndim(value) < 2:
            out[name] = np.diag(labels.internal(plan, node, ("event",), value, at))
        else:
            out[name] = labels.internal(plan, node, axes, value, at)
    return out


def _data_statistics(plan: Plan) -> np.ndarray:
    """Σ_n w_n Φ_n (S,): the whole data's sufficient statistics, from which weak priors are scaled."""
    if is_chunked(plan):  # one dask pass, chunk by chunk
        from emdsl.data import dask_source

        return dask_source.data_statistics(plan)
    total = np.zeros(plan.n_stats)
    for a, b in blocks(plan.n_samples, SCAN_ROWS):
        phi = np.empty((plan.n_stats, b - a))
        plan.read(a, b, phi, np.empty(plan.max_D * (b - a)))
        total += phi.sum(axis=1) if plan.weights is None else phi @ plan.weights[a:b]
    return total
