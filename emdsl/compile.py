"""Declaration + data → Plan: the layout of Φ and H, standardization, validation.

All validation of data and starting values lives here, with messages that name
the variable, the dimension and the position, say what was expected and what
arrived, and what to do about it.

Φ is laid out *statistics × samples*: row 0 is a constant 1 (so the component
constants c_k ride along in the E-step product and N_k falls out of the M-step
product), then each observed node's rows, at ``node.offset``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator, Mapping
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.errors import ModelError
from emdsl.families._base import LatentFamily, ObservedFamily, Params
from emdsl.model import Model, Observed

#: rows per block when scanning data outside EM iterations (validation, units, log h, seeding)
SCAN_ROWS = 65536


@dataclasses.dataclass(eq=False)
class Node:
    """An observed node bound to data: where its statistics sit in Φ, and its units."""

    name: str
    family: ObservedFamily
    variables: tuple[str, ...]
    stacked: bool
    event_dims: tuple[Hashable, ...]
    event_shape: tuple[int, ...]
    event_coords: dict[Hashable, list]
    #: (N, d) arrays (views of the data where possible), in event order
    sources: list[np.ndarray]
    center: np.ndarray
    scale: np.ndarray
    offset: int = 0
    held: Params = dataclasses.field(default_factory=dict)

    @property
    def D(self) -> int:
        return int(np.prod(self.event_shape, dtype=int))

    @property
    def n_stats(self) -> int:
        return self.family.n_stats(self.D)

    @cached_property
    def inverse_scale(self) -> np.ndarray:
        return 1.0 / self.scale

    def where(self) -> str:
        names = self.variables[0] if not self.stacked else list(self.variables)
        return f"observe({names!r}, {type(self.family).__name__})"

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Write the node's data for samples [start, stop) into ``out`` (D × n), standardized."""
        row = 0
        for source in self.sources:
            width = source.shape[1]
            rows = out[row:row + width]
            np.subtract(source[start:stop].T, self.center[row:row + width, None], out=rows)
            rows *= self.inverse_scale[row:row + width, None]
            row += width


@dataclasses.dataclass(eq=False)
class LatentNode:
    """The latent variable of a plan."""

    name: str
    family: LatentFamily
    held: Params = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class Plan:
    """A model compiled against data: everything the engine needs, as plain arrays."""

    model: Model
    sample_dim: Hashable
    n_samples: int
    sample_coords: dict[Hashable, np.ndarray]
    latent: LatentNode | None
    nodes: list[Node]

    @property
    def K(self) -> int:
        """Number of components (1 when the model has no latent)."""
        return self.latent.family.k if self.latent is not None else 1

    @property
    def n_stats(self) -> int:
        """Rows of Φ: the constant row plus every node's statistics."""
        return 1 + sum(node.n_stats for node in self.nodes)

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Fill Φ (n_stats × n) for samples [start, stop)."""
        out[0] = 1.0
        for node in self.nodes:
            stats = out[node.offset:node.offset + node.n_stats]
            node.read(start, stop, stats[:node.D])
            node.family.statistics(stats, node.D)

    def log_base_measure(self, start: int, stop: int) -> np.ndarray:
        """Σ_v log h_v(x_n) for samples [start, stop), in the data's units (with the Jacobian)."""
        total = np.zeros(stop - start)
        for node in self.nodes:
            x = np.empty((node.D, stop - start))
            node.read(start, stop, x)
            total += node.family.log_base_measure(x) - np.log(node.scale).sum()
        return total

    @cached_property
    def log_base_total(self) -> float:
        """Σ_n Σ_v log h_v(x_n): constant over iterations, so computed once."""
        return float(sum(self.log_base_measure(a, b).sum() for a, b in blocks(self.n_samples, SCAN_ROWS)))

    def n_free_params(self) -> int:
        """Number of learned scalars, for BIC and AIC."""
        latent = self.latent.family.n_free_params() if self.latent is not None else 0
        return latent + sum(node.family.n_free_params(self.K, node.D) for node in self.nodes)


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``size`` rows covering n rows."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def compile_plan(
    model: Model,
    data: Any,
    *,
    sample_dim: Hashable | None = None,
    standardization: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    fitting: bool = True,
) -> Plan:
    """Validate ``model`` against ``data`` and lay out the statistics.

    Parameters
    ----------
    standardization : mapping, optional
        ``{node: (center, scale)}`` to reuse (from a fit) instead of computing it
        from ``data``; predictions on new data must use the fit's units.
    fitting : bool
        Whether the plan is for fitting (checks that there are at least as many
        samples as states, and that no Gaussian variable is constant).
    """
    if not model.observed:
        raise ModelError("model: nothing is observed; declare data with .observe(name, family)")
    ds = labels.as_dataset(data)
    for decl in model.observed:
        for variable in decl.variables:
            if variable not in ds.data_vars:
                available = ", ".join(map(repr, ds.data_vars)) or "none"
                raise ModelError(f"observe({variable!r}, {type(decl.family).__name__}): the data have no "
                                 f"variable {variable!r}; available: {available}")
    sample_dim = _infer_sample_dim(model, ds, sample_dim)
    n_samples = int(ds.sizes[sample_dim])
    if n_samples == 0:
        raise ModelError(f"data: the sample dimension {sample_dim!r} is empty; there is nothing to fit")
    latent = None
    if model.latent_var is not None:
        decl = model.latent_var
        latent = LatentNode(decl.name, decl.family)
        if fitting and decl.family.k > n_samples:
            raise ModelError(f"latent({decl.name!r}, {decl.family!r}): {decl.family.k} states but the data "
                             f"have only {n_samples} samples along {sample_dim!r}; use fewer states")
    sample_coords = {sample_dim: ds[sample_dim].values} if sample_dim in ds.coords else {}
    plan = Plan(model, sample_dim, n_samples, sample_coords, latent, [])
    offset = 1
    for decl in model.observed:
        node = _bind(decl, ds, sample_dim)
        node.offset = offset
        offset += node.n_stats
        _check_values(node, ds, sample_dim)
        if standardization is not None:
            node.center, node.scale = _given_units(plan, node, standardization)
        else:
            node.center, node.scale = _units(node, fitting)
        plan.nodes.append(node)
    _bind_fixed(plan)
    return plan


def _infer_sample_dim(model: Model, ds: xr.Dataset, sample_dim: Hashable | None) -> Hashable:
    variables = [v for decl in model.observed for v in decl.variables]
    if sample_dim is not None:
        for variable in variables:
            if sample_dim not in ds[variable].dims:
                raise ModelError(f"sample_dim={sample_dim!r}: variable {variable!r} has dims "
                                 f"{ds[variable].dims}, without {sample_dim!r}")
        return sample_dim
    shared = [d for d in ds[variables[0]].dims if all(d in ds[v].dims for v in variables)]
    event_dims = {getattr(decl.family, "dim", None) for decl in model.observed}
    candidates = [d for d in shared if d not in event_dims]
    if len(candidates) == 1:
        return candidates[0]
    if "sample" in candidates:
        return "sample"
    listing = "; ".join(f"{v!r} has {ds[v].dims}" for v in variables)
    if not candidates:
        raise ModelError(f"data: no dimension is shared by every observed variable ({listing}); "
                         "observed variables must share a sample dimension")
    raise ModelError(f"data: cannot tell the sample dimension among {candidates} ({listing}); "
                     "pass sample_dim=... to fit")


def _bind(decl: Observed, ds: xr.Dataset, sample_dim: Hashable) -> Node:
    family = decl.family
    where = f"observe({list(decl.variables) if decl.stacked else decl.variables[0]!r}, {type(family).__name__})"
    for variable in decl.variables:
        dtype = ds[variable].dtype
        if dtype.kind not in "iuf":
            raise ModelError(f"{where}: variable {variable!r} is not numeric (dtype {dtype}); "
                             f"{type(family).__name__} needs real numbers")
    if decl.stacked:
        dim = getattr(family, "dim", None) or "feature"
        for variable in decl.variables:
            if ds[variable].dims != (sample_dim,):
                raise ModelError(f"{where}: stacked variables must each be 1-D over {sample_dim!r}; "
                                 f"{variable!r} has dims {ds[variable].dims}")
        sources = [np.asarray(ds[v].values)[:, None] for v in decl.variables]
        return Node(decl.name, family, decl.variables, True, (dim,), (len(decl.variables),),
                    {dim: list(decl.variables)}, sources, np.zeros(0), np.ones(0))
    variable = decl.variables[0]
    da = ds[variable]
    others = tuple(d for d in da.dims if d != sample_dim)
    if family.multivariate:
        dim = getattr(family, "dim", None)
        if dim is not None and dim not in others:
            raise ModelError(f"{where}: variable {variable!r} has dims {da.dims}, without the event dim {dim!r}")
        if len(others) != 1:
            raise ModelError(f"{where}: {type(family).__name__} needs exactly one dimension besides "
                             f"{sample_dim!r} (the event); {variable!r} has dims {da.dims}"
                             + ("; for independent elements use em.Normal" if not others else ""))
    values = np.asarray(da.transpose(sample_dim, *others).values)
    values = values.reshape(values.shape[0], -1)
    coords = {d: list(da[d].values) for d in others if d in da.coords}
    shape = tuple(int(da.sizes[d]) for d in others)
    return Node(decl.name, family, decl.variables, False, others, shape, coords, [values],
                np.zeros(0), np.ones(0))


def _check_values(node: Node, ds: xr.Dataset, sample_dim: Hashable) -> None:
    """Reject NaN, ±inf and values outside the family's support, naming where they are."""
    for variable, source in zip(node.variables if node.stacked else node.variables[:1], node.sources,
                                strict=True):
        for start, stop in blocks(len(source), SCAN_ROWS):
            block = source[start:stop]
            if source.dtype.kind == "f" and not np.isfinite(block).all():
                _report_non_finite(node, ds[variable], sample_dim)
            node.family.check_data(block, f"{node.where()}: variable {variable!r}")


def _report_non_finite(node: Node, da: xr.DataArray, sample_dim: Hashable) -> None:
    da = da.transpose(sample_dim, ...)
    values = np.asarray(da.values)
    for kind, mask, what in (("missing", np.isnan(values), "NaN"), ("infinite", np.isinf(values), "±inf")):
        count = int(mask.sum())
        if count:
            first = labels.describe_position(da, int(np.flatnonzero(mask.ravel())[0]))
            advice = ("missing values are not supported yet: drop them first, e.g. "
                      f"ds.dropna({sample_dim!r})") if kind == "missing" else "remove or replace them"
            raise ModelError(f"{node.where()}: variable {da.name!r} has {count} {kind} value"
                             f"{'s' if count > 1 else ''} ({what}), first at {first}; {advice}")


def _units(node: Node, fitting: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-element mean and standard deviation (pooled for families that share one scale)."""
    if not node.family.standardize:
        return np.zeros(node.D), np.ones(node.D)
    n = len(node.sources[0])
    center = np.concatenate([sum(s[a:b].sum(axis=0, dtype=float) for a, b in blocks(n, SCAN_ROWS))
                             for s in node.sources]) / n
    spread = np.zeros(node.D)
    row = 0
    for source in node.sources:
        width = source.shape[1]
        mean = center[row:row + width]
        for a, b in blocks(n, SCAN_ROWS):
            spread[row:row + width] += ((source[a:b] - mean) ** 2).sum(axis=0)
        row += width
    variance = spread / n
    if node.family.pool_scale:
        variance = np.full(node.D, variance.mean())
    constant = variance <= (1e-14 * np.maximum(np.abs(center), 1e-300)) ** 2
    if fitting and constant.any():
        element = int(np.flatnonzero(constant)[0])
        label = _element_label(node, element)
        raise ModelError(f"{node.where()}: {label} is constant (every value is {center[element]:.6g}); "
                         f"a {type(node.family).__name__} fitted to it would have zero variance. "
                         "Drop it from the model")
    return center, np.where(constant, 1.0, np.sqrt(variance))


def _element_label(node: Node, element: int) -> str:
    if node.stacked:
        return f"variable {node.variables[element]!r}"
    if not node.event_dims:
        return f"variable {node.variables[0]!r}"
    index = np.unravel_index(element, node.event_shape)
    where = ", ".join(f"{d}={node.event_coords[d][i] if d in node.event_coords else i!r}"
                      for d, i in zip(node.event_dims, index, strict=True))
    return f"variable {node.variables[0]!r} at {where}"


def _given_units(plan: Plan, node: Node, standardization: Mapping[str, tuple[Any, Any]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The fit's units for this node, aligned to the new data's coordinates."""
    where = f"{node.where()}: new data"
    center, scale = (labels.internal(plan, node, ("event",), value, where) for value in standardization[node.name])
    return center, scale


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
    out: dict[str, Params] = {}
    for name, params in values.items():
        if name not in known:
            raise ModelError(f"{what}: {name!r} is not a node of this model; nodes: {', '.join(known)}")
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
        if node is not None:
            converted = family.to_standard(converted, node.center, node.scale)
        out[name] = converted
    return out


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
