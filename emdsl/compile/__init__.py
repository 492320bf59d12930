"""Declaration + data → Plan: the layout of Φ and H, standardization, validation.

All validation of data and starting values lives in this package, with messages that
name the variable, the dimension and the position, say what was expected and what
arrived, and what to do about it. Its modules: :mod:`~emdsl.compile.plan` (the
:class:`Plan` and its nodes), :mod:`~emdsl.compile.binding` (data to nodes: sample
dims, weights, levels, known states, checks on values), :mod:`~emdsl.compile.units`
(standardization), :mod:`~emdsl.compile.sequences` (a Markov latent's sequences),
:mod:`~emdsl.compile.start` (starting values), :mod:`~emdsl.compile.hyperparameters`
(priors); here, :func:`compile_plan`, which runs them in order.

Φ is laid out *statistics × samples*: row 0 is a constant 1 (so the component
constants c_k ride along in the E-step product and N_k falls out of the M-step
product), then each observed node's rows, at ``node.offset``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from emdsl import labels
from emdsl.compile.binding import _bind, _check_values, _infer_sample_dim, _known_states, _weights
from emdsl.compile.hyperparameters import bind_priors
from emdsl.compile.plan import SCAN_PHI_BYTES, SCAN_ROWS, LatentNode, Node, Plan, blocks, phi_rows
from emdsl.compile.sequences import markov_layout
from emdsl.compile.start import _bind_fixed, responsibilities, start_values
from emdsl.compile.units import _given_units, _units
from emdsl.data import is_chunked
from emdsl.errors import ModelError
from emdsl.latent import Markov, Mixture
from emdsl.latent.joint import Given, JointCategorical
from emdsl.model import Model
__all__ = ["SCAN_PHI_BYTES", "SCAN_ROWS", "LatentNode", "Node", "Plan", "bind_priors", "blocks", "compile_plan",
           "markov_layout", "node_given", "phi_rows", "responsibilities", "start_values"]


def compile_plan(
    model: Model,
    data: Any,
    *,
    sample_dim: Hashable | None = None,
    standardization: Mapping[str, tuple[Any, Any]] | None = None,
    levels: Mapping[str, Sequence[Any]] | None = None,
    weights: Any = None,
    fitting: bool = True,
    prior: str | None = None,
) -> Plan:
    """Validate ``model`` against ``data`` and lay out the statistics.

    Parameters
    ----------
    standardization : mapping, optional
        ``{node: (center, scale)}`` to reuse (from a fit) instead of computing it
        from ``data``; predictions on new data must use the fit's units.
    levels : mapping, optional
        ``{node: level labels}`` of categorical nodes, from a fit: new data must use
        the same levels, in the same order.
    weights : str or DataArray, optional
        A weight per sample: the name of a data variable, or a DataArray over the
        sample dimension.
    fitting : bool
        Whether the plan is for fitting (checks that there are at least as many
        samples as states, and that no Gaussian variable is constant). Priors are
        bound only for fitting.
    prior : {"weak"}, optional
        ``"weak"``: every node (and the latent) that takes a conjugate prior and
        declares none gets the weakly informative one scaled from these data (see
        :meth:`Model.fit`); declared priors are bound either way.
    """
    if not model.observed:
        raise ModelError("model: nothing is observed; declare data with .observe(name, family)")
    ds = labels.as_dataset(data)
    for decl in model.observed:
        for variable in decl.variables + tuple(decl.family.data_arguments().values()):
            if variable not in ds.data_vars:
                available = ", ".join(map(repr, ds.data_vars)) or "none"
                raise ModelError(f"observe({variable!r}, {decl.family.kind}): the data have no "
                                 f"variable {variable!r}; available: {available}")
    sequences = None
    if model.latent_var is not None and model.latent_var.markov is not None:
        # A chain's rows are the (sequence, time) steps, flattened so that each sequence is
        # consecutive: from here on it is a plan over rows like any other.
        ds, sample_dim, weights, sequences = markov_layout(model, ds, sample_dim, weights)
    sample_dim = _infer_sample_dim(model, ds, sample_dim)
    n_samples = int(ds.sizes[sample_dim])
    if n_samples == 0:
        raise ModelError(f"data: the sample dimension {sample_dim!r} is empty; there is nothing to fit")
    latent = None
    if model.latent_var is not None:
        decl = model.latent_var
        latent = LatentNode(decl.name, decl.family,
                            structure=Markov(decl.family, sequences) if sequences is not None else Mixture(decl.family))
        if fitting and decl.family.k > n_samples:
            raise ModelError(f"latent({decl.name!r}, {decl.family!r}): {decl.family.k} states but the data "
                             f"have only {n_samples} samples along {sample_dim!r}; use fewer states")
    sample_coords = {sample_dim: ds[sample_dim].values} if sample_dim in ds.coords else {}
    plan = Plan(model, sample_dim, n_samples, sample_coords, latent, [],
                _weights(ds, weights, sample_dim) if weights is not None else None, sequences=sequences)
    offset = 1
    for decl in model.observed:
        node = _bind(decl, ds, sample_dim, (levels or {}).get(decl.name))
        if decl.covariates or not decl.intercept:  # a regression: its family and design (levels: its terms)
            from emdsl.regression import bind

            bind(node, decl.covariates, decl.intercept, ds, sample_dim, (levels or {}).get(decl.name), fitting,
                 decl.offset)
        node.offset = offset
        offset += node.n_rows
        moments = _check_values(node, ds, sample_dim, plan.weights)
        node.given = node_given(model, decl)
        if standardization is not None and node.name in standardization:
            node.center, node.scale = _given_units(plan, node, standardization)
        else:
            node.center, node.scale = _units(node, fitting, plan.weights, moments)
        plan.nodes.append(node)
    if latent is not None and model.latent_var.covariates:  # weights moved by covariates: a hidden node
        from emdsl.regression import bind_concomitant

        node = bind_concomitant(plan, model.latent_var.covariates, ds, sample_dim, (levels or {}).get(latent.name),
                                fitting)
        node.offset = offset
        offset += node.n_rows
        plan.nodes.append(node)
    if is_chunked(plan):  # every array of the plan shares the first variable's sample chunks
        from emdsl.data import dask_source

        dask_source.align(plan)
    _bind_fixed(plan)
    if fitting:
        # Sums that overflow are refused before θ⁽⁰⁾ is computed from them; on dask data too (one
        # pass, which the first iteration needs anyway): the start's M-step met the overflowed sums
        # first there and failed with "cannot convert float NaN to integer" (found by fuzzing dask
        # against memory).
        plan.phi_magnitude  # noqa: B018
        bind_priors(plan, weak=prior == "weak")
    if latent is not None and isinstance(latent.family, JointCategorical):
        # several latents, any of them partly labelled: one column of known states per latent
        named = [name for name in latent.family.names if name in ds.data_vars]
        if named:
            plan.clamp = np.full((n_samples, len(latent.family.names)), -1, dtype=np.intp)
            for i, (name, member) in enumerate(zip(latent.family.names, latent.family.members, strict=True)):
                if name in ds.data_vars:
                    plan.clamp[:, i] = _known_states(plan, ds[name], name, member.states)
    elif latent is not None and latent.name in ds.data_vars:
        plan.clamp = _known_states(plan, ds[latent.name])
    return plan


def node_given(model: Model, decl: Any) -> Given | None:
    """The node's map to the joint states: set with several latents, or for a node shared by all samples."""
    names = [x.name for x in model.latents]
    if decl.given is None and len(names) <= 1:
        return None
    given = names if decl.given is None else decl.given
    missing = [name for name in given if name not in names]
    if missing:
        raise ModelError(f"observe({decl.name!r}, ..., given={tuple(given)!r}): {missing} "
                         f"{'is not a latent' if len(missing) == 1 else 'are not latents'} of this model "
                         f"(latents: {names})")
    if decl.covariates and len(given) != len(names):
        raise ModelError(f"observe({decl.name!r}, ..., given={tuple(given)!r}): a regression node depends on "
                         "every latent (given= is not supported with covariates=)")
    return Given(names, [x.family for x in model.latents], given)
