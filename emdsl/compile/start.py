"""Starting values and responsibilities given by the user, checked and put into the plan's units."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.compile.plan import Node, Plan
from emdsl.compile.units import FARTHEST, _element_label
from emdsl.errors import ModelError
from emdsl.families._base import Params
from emdsl.latent.joint import JointCategorical


def _bind_fixed(plan: Plan) -> None:
    """Fixed parameter values of the declaration, checked and in internal units."""
    if plan.latent is not None and plan.latent.family.fixed:
        plan.latent.held = start_values(plan, {plan.latent.name: plan.latent.family.fixed},
                                        "fixed value")[plan.latent.name]
    for node in plan.nodes:
        if node.family.fixed:
            node.held = start_values(plan, {node.name: node.family.fixed}, "fixed value")[node.name]


def start_values(plan: Plan, values: Mapping[str, Mapping[str, Any]], what: str = "init"
                 ) -> dict[str, Params]:
    """User parameter values (data units, labelled or not) → internal arrays, validated.

    ``values`` maps node names to ``{param: value}``; unknown names are errors.
    """
    nodes = {node.name: node for node in plan.nodes}
    known = ([plan.latent.name] if plan.latent is not None else []) + list(nodes)
    if not isinstance(values, Mapping):
        raise ModelError(f"{what}: expected a mapping {{node: {{param: value}}}}, got {type(values).__name__}")
    joint = plan.latent.family if plan.latent is not None else None
    if isinstance(joint, JointCategorical):  # several latents: each one's weights, under its own name
        values = dict(values)
        members = {name: values.pop(name) for name in joint.names if name in values}
        if plan.latent.name in values:  # the joint's own (internal) entry, e.g. its fixed weights
            entry = values.pop(plan.latent.name)
            if not isinstance(entry, Mapping) or set(entry) - set(joint.names):
                raise ModelError(f"{what}[{plan.latent.name!r}]: the joint states of several latents take "
                                 f"each latent's weights under its own name ({what}={{name: {{'probs': ...}}}} "
                                 f"for a name in {list(joint.names)}), got {entry!r}")
            members.update({name: {"probs": v} for name, v in entry.items()})
        if what == "init":
            fixed = [name for name in members if name in joint.fixed]
            if fixed:
                raise ModelError(f"init: the weights of {fixed} are fixed by the declaration; a fixed parameter "
                                 "takes no starting value, drop it from init")
        known = list(joint.names) + list(nodes)
    unknown_nodes = [name for name in values if name not in known]
    if unknown_nodes:
        missing = [name for name in known if name not in values]
        raise ModelError(f"{what}: {', '.join(map(repr, unknown_nodes))} "
                         f"{'is not a node' if len(unknown_nodes) == 1 else 'are not nodes'} of this model "
                         f"(nodes: {', '.join(map(repr, known))}"
                         + (f"; not given: {', '.join(map(repr, missing))}" if missing else "")
                         + "); starting values from another model's fit need the same node names")
    out: dict[str, Params] = {}
    if isinstance(joint, JointCategorical) and members:
        out[plan.latent.name] = _member_weights(joint, members, what)
    for name, params in values.items():
        is_latent = plan.latent is not None and name == plan.latent.name
        family = plan.latent.family if is_latent else nodes[name].family
        node = None if is_latent else nodes[name]
        axes = family.param_axes()
        if not isinstance(params, Mapping):
            raise ModelError(f"{what}[{name!r}]: expected a mapping of parameters {list(axes)}, "
                             f"got {type(params).__name__}")
        unknown = [p for p in params if p not in axes]
        if unknown:
            raise ModelError(f"{what}[{name!r}]: unknown parameter(s) {unknown}; "
                             f"{type(family).__name__} has {list(axes)}")
        if what == "init":
            fixed = [p for p in params if p in family.fixed]
            if fixed:
                raise ModelError(f"init[{name!r}]: {fixed} fixed by the declaration ({family!r}); "
                                 "a fixed parameter takes no starting value, drop it from init")
        converted = {p: labels.internal(plan, node, axes[p], v, f"{what}[{name!r}][{p!r}]")
                     for p, v in params.items() if v is not None}
        family.check_params(converted, f"{what}[{name!r}]")
        converted = family.tidy_params(converted)
        if node is not None and family.standardize:
            converted = _standardized_values(node, converted, f"{what}[{name!r}]")
        elif node is not None:
            converted = family.to_standard(converted, node.center, node.scale)
        out[name] = converted
    return out


def _member_weights(joint: JointCategorical, values: Mapping[str, Any], what: str) -> Params:
    """Starting or fixed weights of several latents ``{name: {"probs": value}}`` as internal arrays."""
    out = {}
    for name, params in values.items():
        member = joint.members[joint.names.index(name)]
        where = f"{what}[{name!r}]"
        if not isinstance(params, Mapping) or set(params) - {"probs"}:
            raise ModelError(f"{where}: a latent's parameter is probs, got {params!r}")
        value = params.get("probs")
        if value is None:
            continue
        if isinstance(value, xr.DataArray):
            if value.dims != (name,):
                raise ModelError(f"{where}['probs']: expected dims ({name!r},), got {value.dims}")
            if name in value.coords:
                have = [labels._plain(v) for v in value[name].values]
                if sorted(map(str, have)) != sorted(map(str, member.states)):
                    raise ModelError(f"{where}['probs']: states {have}, expected {list(member.states)}")
                value = value.sel({name: list(member.states)})
            value = value.values
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise ModelError(f"{where}['probs']: expected numbers, got {value!r}") from None
        member.check_params({"probs": array}, f"{where}['probs']")
        out[name] = member.tidy_params({"probs": array})["probs"]
    return out


def _standardized_values(node: Node, params: Params, where: str) -> Params:
    """Parameters in the data's units → internal units, refused when they do not survive the change.

    A mean must lie within :data:`FARTHEST` standard deviations of the data's mean (μ²
    enters the log-partition), and a variance must stay finite and positive once
    divided by the data's variance.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        standard = node.family.to_standard(params, node.center, node.scale)
    mean = standard.get("mean")
    if mean is not None:
        far = ~(np.abs(mean) <= FARTHEST)
        if far.any():
            k, element = np.unravel_index(int(np.flatnonzero(far)[0]), mean.shape)
            given = float(np.broadcast_to(params["mean"], mean.shape)[k, element])
            raise ModelError(f"{where}['mean']: {given!r} (for {_element_label(node, int(element))}) lies "
                             f"{float(abs(mean[k, element])):.3g} standard deviations from the data's mean "
                             f"{float(node.center[element]):.6g}; a starting or fixed mean must lie within "
                             f"{FARTHEST:.0e} of them (further out its square overflows)")
    try:
        node.family.check_params(standard, where)
    except ModelError as error:
        raise ModelError(f"{error} — after dividing by the data's spread (standard deviation "
                         f"{float(node.scale.max()):.3g}), as the fit computes; the value is out of "
                         "range relative to the data") from None
    return standard


def responsibilities(plan: Plan, resp: xr.DataArray) -> np.ndarray:
    """A (sample, latent) DataArray of starting responsibilities as an (N, K) array."""
    if plan.latent is None:
        raise ModelError("init: responsibilities need a latent variable, and this model has none")
    name = plan.latent.name
    if set(resp.dims) != {plan.sample_dim, name}:
        raise ModelError(f"init: responsibilities must have dims ({plan.sample_dim!r}, {name!r}), "
                         f"got {resp.dims}")
    resp = resp.transpose(plan.sample_dim, name)
    if plan.sample_dim in resp.coords and plan.sample_coords:
        resp = resp.reindex({plan.sample_dim: plan.sample_coords[plan.sample_dim]})
    values = np.asarray(resp.values, dtype=float)
    if values.shape != (plan.n_samples, plan.K):
        raise ModelError(f"init: responsibilities must have shape ({plan.n_samples}, {plan.K}), got {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ModelError("init: responsibilities must be finite and non-negative "
                         "(a missing sample label gives NaN after alignment)")
    sums = values.sum(axis=1)
    if not np.allclose(sums, 1.0, rtol=0, atol=1e-6):
        bad = int(np.flatnonzero(~np.isclose(sums, 1.0, rtol=0, atol=1e-6))[0])
        raise ModelError(f"init: responsibilities must sum to 1 over {name!r} for every sample; "
                         f"sample {bad} sums to {sums[bad]:.6g}")
    return values
