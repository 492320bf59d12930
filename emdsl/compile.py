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
from collections.abc import Hashable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.data import is_chunked, is_dask
from emdsl.errors import ModelError
from emdsl.families._base import BoundPrior, LatentFamily, ObservedFamily, Params
from emdsl.latent import LatentStructure, Markov, Mixture, Sequences
from emdsl.latent.joint import Given, JointCategorical
from emdsl.model import Model, Observed

#: rows per block when scanning data outside EM iterations (validation, units, log h, seeding)
SCAN_ROWS = 65536
#: bytes of one block of Φ (n_stats × rows) when scanning it outside EM iterations: SCAN_ROWS rows
#: of a full 20-D covariance's 231 statistics would take 121 MB, 4× the data of 2e5 × 20
SCAN_PHI_BYTES = 16 << 20


def phi_rows(n_stats: int) -> int:
    """Rows per block of a scan over Φ: :data:`SCAN_ROWS`, fewer when its n_stats rows would pass
    :data:`SCAN_PHI_BYTES`."""
    return max(256, min(SCAN_ROWS, SCAN_PHI_BYTES // (8 * max(n_stats, 1))))


@dataclasses.dataclass(eq=False)
class Node:
    """An observed node bound to data: where its rows sit in Φ, its units and its holes."""

    name: str
    family: ObservedFamily
    variables: tuple[str, ...]
    stacked: bool
    event_dims: tuple[Hashable, ...]
    event_shape: tuple[int, ...]
    event_coords: dict[Hashable, list]
    #: (N, d) arrays (views of the data where possible), in event order; NaN where missing
    sources: list[np.ndarray]
    center: np.ndarray
    scale: np.ndarray
    offset: int = 0
    held: Params = dataclasses.field(default_factory=dict)
    #: the node's conjugate prior in internal units (declared, or fit(prior="weak")'s), or None
    prior: BoundPrior | None = None
    #: extra data the family reads (e.g. Binomial's trials), each (N, D)
    aux: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: level labels of a categorical node (the codes in ``sources`` index them)
    levels: tuple[Any, ...] | None = None
    #: whether some element is missing somewhere (set by the compiler)
    has_missing: bool = False
    #: samples whose event is partly observed (sorted), their pattern's index, and the
    #: patterns (D booleans, True = observed): the conditional-Gaussian rows of an event family
    partial_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    partial_pattern: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    patterns: list[np.ndarray] = dataclasses.field(default_factory=list)
    #: the latents the node depends on when not all of them, or when there are several
    #: (its parameters have one row per state of that subset; see emdsl.latent.joint)
    given: Given | None = None

    @property
    def D(self) -> int:
        return int(np.prod(self.event_shape, dtype=int))

    @property
    def n_rows(self) -> int:
        return self.family.n_rows(self.D)

    @cached_property
    def inverse_scale(self) -> np.ndarray:
        return 1.0 / self.scale

    def where(self) -> str:
        if not self.stacked:
            return f"observe({self.variables[0]!r}, {self.family.kind})"
        if len(self.variables) <= 4:
            return f"observe({list(self.variables)!r}, {self.family.kind})"
        shown = ", ".join(map(repr, self.variables[:2]))
        return f"observe([{shown}, … {len(self.variables)} variables], {self.family.kind}, name={self.name!r})"

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Write the node's data for samples [start, stop) into ``out`` (D × n), standardized; NaN = missing."""
        row = 0
        for source in self.sources:
            width = source.shape[1]
            rows = out[row:row + width]
            if self.family.standardize:
                np.subtract(source[start:stop].T, self.center[row:row + width, None], out=rows)
                rows *= self.inverse_scale[row:row + width, None]
            else:
                rows[...] = source[start:stop].T
            row += width

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The node's data for the given samples (D × len(rows)), standardized."""
        x = np.hstack([source[rows] for source in self.sources]).T.astype(float)
        if self.family.standardize:
            x = (x - self.center[:, None]) * self.inverse_scale[:, None]
        return x

    def find_patterns(self) -> None:
        """Group the samples whose event is partly observed by their pattern of holes."""
        if not (self.family.multivariate and hasattr(self.family, "patterns")):
            return
        if is_dask(self.sources[0]):  # one dask pass; a chunk's task finds its own rows again
            from emdsl.data import dask_source

            self.partial_rows, observed = dask_source.partial_rows(self)
            if len(self.partial_rows):
                keys, inverse = np.unique(observed, axis=0, return_inverse=True)
                self.patterns = list(keys)
                self.partial_pattern = inverse.ravel().astype(np.intp)
            return
        missing = np.hstack([np.isnan(np.asarray(s, dtype=float)) for s in self.sources])
        partial = missing.any(axis=1) & ~missing.all(axis=1)
        self.partial_rows = np.flatnonzero(partial)
        if len(self.partial_rows):
            keys, inverse = np.unique(~missing[self.partial_rows], axis=0, return_inverse=True)
            self.patterns = list(keys)
            self.partial_pattern = inverse.ravel().astype(np.intp)

    def read_aux(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The family's extra data for samples [start, stop), each (D × n)."""
        return {key: value[start:stop].T for key, value in self.aux.items()}


@dataclasses.dataclass(eq=False)
class LatentNode:
    """The latent variable of a plan."""

    name: str
    family: LatentFamily
    held: Params = dataclasses.field(default_factory=dict)
    #: the Dirichlet prior on the weights in internal form (declared, or fit(prior="weak")'s), or None
    prior: BoundPrior | None = None
    #: how its posterior is computed from the emissions: a mixture's softmax or a chain's forward–backward
    structure: LatentStructure | None = None


@dataclasses.dataclass(eq=False)
class Plan:
    """A model compiled against data: everything the engine needs, as plain arrays."""

    model: Model
    sample_dim: Hashable
    n_samples: int
    sample_coords: dict[Hashable, np.ndarray]
    latent: LatentNode | None
    nodes: list[Node]
    #: per-sample weights (N,), or None when every sample counts once
    weights: np.ndarray | None = None
    #: known latent state per sample (−1 = unknown), from a data variable named like the latent
    clamp: np.ndarray | None = None
    #: for a Markov latent: how the rows form sequences (each sequence's rows consecutive)
    sequences: Sequences | None = None
    #: precision of Φ, L, R and H in the E-step (``fit(dtype=...)``); sums are float64 either way
    dtype: Any = np.float64

    @property
    def K(self) -> int:
        """Number of components (1 when the model has no latent)."""
        return self.latent.family.k if self.latent is not None else 1

    @property
    def n_stats(self) -> int:
        """Rows of Φ: the constant row plus every node's rows."""
        return 1 + sum(node.n_rows for node in self.nodes)

    @property
    def max_D(self) -> int:
        """The widest node: the scratch rows a block needs to read one node's data."""
        return max(node.D for node in self.nodes)

    @property
    def total_weight(self) -> float:
        """Σ_n w_n: the effective number of samples (N when unweighted), as BIC counts them."""
        return float(self.n_samples if self.weights is None else self.weights.sum())

    def read(self, start: int, stop: int, out: np.ndarray, scratch: np.ndarray) -> None:
        """Fill Φ (n_stats × n) for samples [start, stop); ``scratch`` holds ≥ max_D × n floats."""
        out[0] = 1.0
        n = stop - start
        for node in self.nodes:
            x = scratch[:node.D * n].reshape(node.D, n)
            node.read(start, stop, x)
            node.family.statistics(x, out[node.offset:node.offset + node.n_rows], node.read_aux(start, stop))

    def log_base_measure(self, start: int, stop: int) -> np.ndarray:
        """Σ_v log h_v(x_n) over present elements for samples [start, stop), in the data's units."""
        total = np.zeros(stop - start)
        for node in self.nodes:
            x = np.empty((node.D, stop - start))
            node.read(start, stop, x)
            total += node.family.log_base_measure(x, node.read_aux(start, stop))
            if node.family.standardize:  # the Jacobian of the internal units
                total -= (~np.isnan(x) * np.log(node.scale)[:, None]).sum(axis=0)
        return total

    @cached_property
    def log_base_total(self) -> float:
        """Σ_n w_n Σ_v log h_v(x_n): constant over iterations, so computed once."""
        if is_chunked(self):
            return self._chunked_totals[0]
        total = 0.0
        for a, b in blocks(self.n_samples, SCAN_ROWS):
            part = self.log_base_measure(a, b)
            total += float(part.sum() if self.weights is None else part @ self.weights[a:b])
        return total

    @cached_property
    def phi_magnitude(self) -> np.ndarray:
        """Σ_n w_n |Φ_sn| (S,), then the latent's own columns: the size of the E-step's sums (rounding slack)."""
        out = np.zeros(self.n_stats)
        for a, b in blocks(self.n_samples, phi_rows(self.n_stats)) if not is_chunked(self) else ():
            phi = np.empty((self.n_stats, b - a))
            self.read(a, b, phi, np.empty(self.max_D * (b - a)))
            np.abs(phi, out=phi)
            out += phi.sum(axis=1) if self.weights is None else phi @ self.weights[a:b]
        if is_chunked(self):
            out = self._chunked_totals[1].copy()
        _check_sums(self, out)
        if self.latent is not None and self.latent.structure is not None and self.latent.structure.n_stats:
            out = np.concatenate([out, self.latent.structure.stats_magnitude(self)])
        return out

    @cached_property
    def _chunked_totals(self) -> tuple[float, np.ndarray]:
        """Σ w log h and Σ w |Φ| of dask-backed data, in one pass (both are needed by the first iteration)."""
        from emdsl.data import dask_source

        return dask_source.plan_totals(self)

    def n_free_params(self) -> int:
        """Number of learned scalars, for BIC and AIC."""
        latent = self.latent.family.n_free_params() if self.latent is not None else 0
        return latent + sum(node.family.n_free_params(self.components(node), node.D) for node in self.nodes)

    def components(self, node: Node) -> int:
        """Rows of a node's parameters: K, or the states of the latents it depends on."""
        return node.given.K if node.given is not None else self.K

    def component_label(self, node: Node | None, k: int) -> str:
        """``"component z='a'"`` for row k of a node's parameters (of the latent's states when node is None)."""
        if node is not None and node.given is not None:
            if not node.given.latents:
                return "the shared component"
            where = np.unravel_index(k, node.given.shape)
            return "component " + ", ".join(f"{name}={member.states[i]!r}" for (name, member), i
                                             in zip(node.given.latents, where, strict=True))
        if self.latent is None:
            return "the single component"
        family = self.latent.family
        if isinstance(family, JointCategorical):
            return "component " + ", ".join(f"{name}={member.states[i]!r}" for name, member, i
                                            in zip(family.names, family.members, family.unravel(k), strict=True))
        return f"component {self.latent.name}={family.states[k]!r}"

    def expand(self, node: Node, params: Params) -> Params:
        """A node's parameters with one row per joint state, as the E-step uses them."""
        return params if node.given is None else node.given.expand(params, node.family.param_axes())


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``size`` rows covering n rows."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


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


def _known_states(plan: Plan, da: xr.DataArray, name: str | None = None,
                  states: Sequence[Any] | None = None) -> np.ndarray:
    """The known state of each sample from a data variable named like the latent (−1 = unknown)."""
    assert plan.latent is not None
    name = plan.latent.name if name is None else name
    states = plan.latent.family.states if states is None else states
    where = f"latent({name!r}, ...): the data's variable {name!r} (known states)"
    if da.dims != (plan.sample_dim,):
        raise ModelError(f"{where} must be 1-D over {plan.sample_dim!r}, got dims {da.dims}")
    lookup = {_tidy_label(state): k for k, state in enumerate(states)}
    raw = _missing_as_none(np.asarray(da.values))
    known = np.full(len(raw), -1, dtype=np.intp)
    for i, value in enumerate(raw.tolist()):
        if value is None:
            continue
        k = lookup.get(_tidy_label(value))
        if k is None:
            unknown = [v for v in raw.tolist() if v is not None and _tidy_label(v) not in lookup]
            raise ModelError(f"{where}: {len(unknown)} value(s) are not states of {name!r} (first "
                             f"{_tidy_label(value)!r} at {labels.describe_position(da, i)}); the states are "
                             f"{list(states)}; mark an unknown state with NaN or None")
        known[i] = k
    return known


def _weights(ds: xr.Dataset, weights: Any, sample_dim: Hashable) -> np.ndarray:
    """Validated per-sample weights: finite, non-negative, not all zero."""
    if isinstance(weights, str):
        if weights not in ds.data_vars:
            raise ModelError(f"fit(weights={weights!r}): the data have no variable {weights!r}; "
                             f"available: {', '.join(map(repr, ds.data_vars))}")
        da, where = ds[weights], f"fit(weights={weights!r})"
    elif isinstance(weights, xr.DataArray):
        da, where = weights, "fit(weights=<DataArray>)"
    else:
        raise ModelError("fit(weights=...): expected the name of a data variable or a DataArray over "
                         f"{sample_dim!r}, got {type(weights).__name__}")
    if da.dims != (sample_dim,):
        raise ModelError(f"{where}: weights must be 1-D over the sample dimension {sample_dim!r}, "
                         f"got dims {da.dims}")
    if sample_dim in da.coords and sample_dim in ds.coords and not da.indexes[sample_dim].equals(
            ds.indexes[sample_dim]):
        da = da.reindex({sample_dim: ds[sample_dim].values})
    if da.sizes[sample_dim] != ds.sizes[sample_dim]:
        raise ModelError(f"{where}: {da.sizes[sample_dim]} weights for {ds.sizes[sample_dim]} samples")
    if da.dtype.kind not in "iufb":
        raise ModelError(f"{where}: weights must be numbers, got dtype {da.dtype}")
    if is_dask(da.data):
        return _chunked_weights(da, where, sample_dim)
    values = np.asarray(da.values, dtype=float)
    for bad, what in ((~np.isfinite(values), "missing or infinite (NaN, ±inf)"), (values < 0, "negative")):
        if bad.any():
            first = labels.describe_position(da, int(np.flatnonzero(bad)[0]))
            raise ModelError(f"{where}: {int(bad.sum())} weight{'s are' if bad.sum() > 1 else ' is'} {what}, "
                             f"first at {first}; weights must be finite and >= 0")
    if not values.any():
        raise ModelError(f"{where}: every weight is 0; there is nothing to fit")
    return values


def _infer_sample_dim(model: Model, ds: xr.Dataset, sample_dim: Hashable | None) -> Hashable:
    """The sample dimension (given, or the one dim every observed variable shares), and no name clash."""
    chosen = _sample_dim(model, ds, sample_dim)
    _check_latent_name(model, ds, chosen)
    return chosen


def _sample_dim(model: Model, ds: xr.Dataset, sample_dim: Hashable | None) -> Hashable:
    variables = [v for decl in model.observed for v in decl.variables]
    if sample_dim is not None:
        if not isinstance(sample_dim, Hashable):
            raise ModelError(f"fit(sample_dim=...): expected a dimension name, got {type(sample_dim).__name__}")
        for variable in variables:
            if sample_dim not in ds[variable].dims:
                raise ModelError(f"fit(sample_dim={sample_dim!r}): variable {variable!r} has dims "
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


def _check_latent_name(model: Model, ds: xr.Dataset, sample_dim: Hashable) -> None:
    """The latent's name becomes a dimension of every parameter: it must not be one of the data's dims.

    Reserved alongside the data's own dims: each event dim ``d`` and its second axis
    ``d_`` (covariances), and ``level`` (categorical levels).
    """
    for latent in model.latents:
        _check_one_latent_name(model, latent, ds, sample_dim)


def _check_one_latent_name(model: Model, latent: Any, ds: xr.Dataset, sample_dim: Hashable) -> None:
    where = f"latent({latent.name!r}, ...)"
    if latent.name == sample_dim:
        raise ModelError(f"{where}: the latent has the name of the sample dimension {sample_dim!r}; "
                         "give the latent another name")
    for decl in model.observed:
        dims: list[Hashable] = []
        if decl.stacked:
            dims.append(getattr(decl.family, "dim", None) or "feature")
        for variable in decl.variables + tuple(decl.family.data_arguments().values()):
            dims.extend(d for d in ds[variable].dims if d != sample_dim)
        reserved = {d: f"a dimension of variable(s) {list(decl.variables)}" for d in dims}
        if decl.family.multivariate:
            reserved.update({f"{d}_": f"the second axis of the covariance over {d!r}" for d in dims
                             if isinstance(d, str)})
        if decl.family.categorical:
            reserved["level"] = "the dimension of the levels of a categorical node"
        if latent.name in reserved:
            raise ModelError(f"{where}: the latent's name {latent.name!r} is {reserved[latent.name]} "
                             f"(node {decl.name!r}); its states would clash with that dimension: give "
                             "the latent another name")


def _bind(decl: Observed, ds: xr.Dataset, sample_dim: Hashable, levels: Sequence[Any] | None) -> Node:
    family = decl.family
    where = f"observe({list(decl.variables) if decl.stacked else decl.variables[0]!r}, {family.kind})"
    if not family.categorical:
        for variable in decl.variables:
            dtype = ds[variable].dtype
            if dtype.kind not in "iufb":
                raise ModelError(f"{where}: variable {variable!r} is not numeric (dtype {dtype}); "
                                 f"{family.kind} needs numbers" + (
                                     "; for labels use em.Categorical" if dtype.kind in "OUSM" else ""))
    if decl.stacked:
        dim = getattr(family, "dim", None) or "feature"
        for variable in decl.variables:
            if ds[variable].dims != (sample_dim,):
                raise ModelError(f"{where}: stacked variables must each be 1-D over {sample_dim!r}; "
                                 f"{variable!r} has dims {ds[variable].dims}")
        arrays = [ds[v] for v in decl.variables]
        event_dims, shape, coords = (dim,), (len(decl.variables),), {dim: list(decl.variables)}
        columns = [_values(da)[:, None] for da in arrays]
    else:
        variable = decl.variables[0]
        da = ds[variable]
        others = tuple(d for d in da.dims if d != sample_dim)
        if family.multivariate:
            dim = getattr(family, "dim", None)
            if dim is not None and dim not in others:
                raise ModelError(f"{where}: variable {variable!r} has dims {da.dims}, without the event dim {dim!r}")
            if len(others) != 1:
                raise ModelError(f"{where}: {family.kind} needs exactly one dimension besides "
                                 f"{sample_dim!r} (the event); {variable!r} has dims {da.dims}"
                                 + ("; for independent elements use em.Normal" if not others else ""))
        for d in others:
            if da.sizes[d] == 0:
                raise ModelError(f"{where}: variable {variable!r} has an empty dimension {d!r} (size 0); "
                                 "there is nothing to observe")
        values = _values(da.transpose(sample_dim, *others))
        columns = [values.reshape(values.shape[0], -1)]
        event_dims = others
        coords = {d: list(da[d].values) for d in others if d in da.coords}
        shape = tuple(int(da.sizes[d]) for d in others)
    node = Node(decl.name, family, decl.variables, decl.stacked, event_dims, shape, coords, columns,
                np.zeros(0), np.ones(0))
    if family.categorical:
        _encode_levels(node, ds, sample_dim, levels)
    for key, variable in family.data_arguments().items():
        node.aux[key] = _aux_values(node, ds, sample_dim, key, variable)
    return node


def _encode_levels(node: Node, ds: xr.Dataset, sample_dim: Hashable, given: Sequence[Any] | None) -> None:
    """Replace a categorical node's labels by float level codes (NaN = missing), and bind its levels."""
    family = node.family
    declared = given if given is not None else getattr(family, "levels", None)
    if is_dask(node.sources[0]):
        _encode_chunked(node, ds, sample_dim, declared)
        return
    arrays = [ds[v] for v in node.variables]
    raw = [_missing_as_none(column) for column in node.sources]
    if declared is None:
        categories = next((c for c in map(_categories, arrays) if c is not None), None)
        found: list[Any] = list(categories) if categories is not None else sorted(
            {v for column in raw for v in column[column != None].ravel().tolist()},  # noqa: E711
            key=_sort_key)
        declared = [_tidy_label(v) for v in found]
        if not declared:
            raise ModelError(f"{node.where()}: every value is missing; there are no levels to learn")
    lookup = {_tidy_label(level): code for code, level in enumerate(declared)}
    codes = []
    for column, variable in zip(raw, node.variables if node.stacked else node.variables * len(raw), strict=False):
        out = np.full(column.shape, np.nan)
        present = column != None  # noqa: E711
        flat = column[present].ravel().tolist()
        mapped = [lookup.get(_tidy_label(v)) for v in flat]
        unknown = [v for v, m in zip(flat, mapped, strict=True) if m is None]
        if unknown:
            first_index = int(np.flatnonzero(present.ravel())[[m is None for m in mapped].index(True)])
            position = labels.describe_position(ds[variable].transpose(sample_dim, ...), first_index)
            raise ModelError(f"{node.where()}: variable {variable!r} has {len(unknown)} value"
                             f"{'s' if len(unknown) > 1 else ''} that {'are' if len(unknown) > 1 else 'is'} "
                             f"not a known level (first {_tidy_label(unknown[0])!r} at {position}); "
                             f"levels: {list(declared)[:20]}")
        out[present] = np.asarray(mapped, dtype=float)
        codes.append(out)
    node.sources = codes
    node.levels = tuple(declared)
    node.family = family.bound(node.levels)  # type: ignore[attr-defined]


def _categories(da: xr.DataArray) -> list[Any] | None:
    """A pandas categorical's categories (in their order; xarray keeps the dtype), or None."""
    categories = getattr(da.dtype, "categories", None)
    return [_tidy_label(v) for v in categories] if categories is not None else None


def _missing_as_none(column: np.ndarray) -> np.ndarray:
    """An object array of labels with every kind of missing value (NaN, None, pd.NA, NaT) as None."""
    out = np.asarray(column, dtype=object).copy()
    flat = out.ravel()
    for i, v in enumerate(flat):
        if v is None or (isinstance(v, float | np.floating) and np.isnan(v)) or type(v).__name__ in ("NAType", "NaTType"):
            flat[i] = None
    return out


def _tidy_label(value: Any) -> Any:
    """Labels as plain Python values; integral floats (pandas' integer codes with holes) as ints."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _sort_key(value: Any) -> tuple[int, Any]:
    value = _tidy_label(value)
    return (0, value) if isinstance(value, int | float) else (1, str(value))


def _aux_values(node: Node, ds: xr.Dataset, sample_dim: Hashable, key: str, variable: str) -> np.ndarray:
    """A data variable the family reads besides x (e.g. trials), broadcast to the node's (N, D)."""
    where = f"{node.where()}: {key}={variable!r}"
    da = ds[variable]
    if da.dtype.kind not in "iuf":
        raise ModelError(f"{where} is not numeric (dtype {da.dtype})")
    extra = [d for d in da.dims if d != sample_dim and d not in node.event_dims]
    if sample_dim not in da.dims or extra:
        raise ModelError(f"{where} must be over {sample_dim!r} and the node's dims {node.event_dims}, "
                         f"got dims {da.dims}")
    if node.stacked:
        da = da.expand_dims({node.event_dims[0]: len(node.variables)}) if node.event_dims[0] not in da.dims else da
    else:
        template = ds[node.variables[0]]
        da = da.broadcast_like(template).transpose(*template.dims)
    if is_dask(da.data):
        return _chunked_counts(da.transpose(sample_dim, ...), where, ds.sizes[sample_dim])
    values = np.asarray(da.transpose(sample_dim, ...).values, dtype=float).reshape(ds.sizes[sample_dim], -1)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        first = labels.describe_position(da.transpose(sample_dim, ...), int(np.flatnonzero(bad.ravel())[0]))
        raise ModelError(f"{where}: {int(bad.sum())} value(s) are not non-negative integers (first at {first})")
    return values


def _check_values(node: Node, ds: xr.Dataset, sample_dim: Hashable, weights: Any) -> Any:
    """Reject ±inf and values outside the family's support, naming where they are; NaN is missing.

    On dask, returns the node's per-element moments (weighted by ``weights``) read in the same
    pass, for :func:`_units`; in memory, None.
    """
    arrays = ([ds[v] for v in node.variables] if node.stacked else [ds[node.variables[0]]])
    if is_dask(node.sources[0]):
        return _check_chunked(node, arrays, sample_dim, weights)
    if node.family.multivariate and node.stacked:
        # An event family judges whole events: its stacked variables are seen side by side.
        found = node.family.outside_support(np.hstack([np.asarray(s, dtype=float) for s in node.sources]),
                                            dict(node.aux))
        if found is not None and found[0].any():
            column = int(np.flatnonzero(found[0].any(axis=0))[0])
            _report(node, arrays[column], sample_dim, found[0][:, column], "", " outside the support", found[1])
    row = 0
    for da, source in zip(arrays, node.sources, strict=True):
        width = source.shape[1]
        if source.dtype.kind == "f":
            infinite = np.isinf(source)
            if infinite.any():
                _report(node, da, sample_dim, infinite, "infinite ", " (±inf)",
                        "remove them, or replace them by NaN to mark them missing")
        aux = {key: value[:, row:row + width] for key, value in node.aux.items()}
        found = (None if node.family.multivariate and node.stacked
                 else node.family.outside_support(np.asarray(source, dtype=float), aux))
        if found is not None and found[0].any():
            _report(node, da, sample_dim, found[0], "", " outside the support", found[1])
        if source.dtype.kind == "f" and np.isnan(source).any():
            node.has_missing = True
        row += width
    if node.has_missing:
        node.find_patterns()
    return None


def _report(node: Node, da: xr.DataArray, sample_dim: Hashable, mask: np.ndarray, kind: str, detail: str,
            advice: str) -> None:
    count = int(mask.sum())
    first = labels.describe_position(da.transpose(sample_dim, ...), int(np.flatnonzero(mask.ravel())[0]))
    raise ModelError(f"{node.where()}: variable {da.name!r} has {count} {kind}value{'s' if count > 1 else ''}"
                     f"{detail}, first at {first}; {advice}")


#: the farthest, in standard deviations of the training data, that a value or a mean may lie
#: from the data's mean: its square (a sufficient statistic, and μ² in A(η)) stays below 1e200,
#: which leaves the E-step's sums and products over many elements and small variances finite
FARTHEST = 1e100
#: relative spread below which a variable counts as constant: the rounding of its values
_CONSTANT = 1e-14
_HUGE = np.finfo(float).max
_TINY_SCALE = np.finfo(float).tiny
#: standard deviations whose variance (σ², and the floor's 1e-6·σ²) is a normal float, with room
#: for a component's variance to be many times the data's
_SPREAD = (1e-150, 1e150)


def _units(node: Node, fitting: bool, weights: Any = None, chunked: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-element mean and standard deviation over observed values (pooled where one scale is shared).

    With ``weights`` (the fit's, per sample) a value counts as that many copies of itself:
    the units are those of the expanded table, so that a weighted fit and the fit to the
    table with rows repeated start from the same point (holes start at the mean) and
    floor variances at the same fraction of the same spread. On dask, ``chunked`` holds the
    moments that :func:`_check_values` read in its pass (merged chunk by chunk, Chan et al.).

    Computed on each element's values divided by their largest magnitude, so that data
    near ±1.8e308 do not overflow and data near 1e-300 do not underflow; whether an
    element is constant is judged against its own magnitude.
    """
    if not node.family.standardize and not (fitting and node.has_missing):
        return np.zeros(node.D), np.ones(node.D)
    # Families fitted in the data's units come here only to check that every element has a value.
    if chunked is None and weights is not None:
        weights = np.asarray(weights, dtype=float)  # lazy weights of in-memory data: N floats beside N × D values
        weights = weights / weights.max()  # only relative weights matter here, and their sum cannot overflow
    count, mass, low, high, magnitude = _extent(node, weights) if chunked is None else (
        chunked.count, chunked.mass, chunked.low, chunked.high, chunked.magnitude)
    for lacking, what in ((count == 0, "has no observed value (every value is NaN)"),
                          (mass == 0, ("is observed only in samples of weight 0, so the weighted data have no "
                                       "value of it"))):
        if lacking.any():
            raise ModelError(f"{node.where()}: {_element_label(node, int(np.flatnonzero(lacking)[0]))} {what}; "
                             "drop it from the model")
    if not node.family.standardize:
        return np.zeros(node.D), np.ones(node.D)
    # x − mean would overflow while standardizing (with a margin for the rounding of the mean)
    wide = high / 2 - low / 2 > 0.49 * _HUGE
    if wide.any():
        element = int(np.flatnonzero(wide)[0])
        raise ModelError(f"{node.where()}: {_element_label(node, element)} ranges from {float(low[element])!r} "
                         f"to {float(high[element])!r}, a span wider than the largest float "
                         f"({_HUGE:.4g}); rescale it (e.g. divide by 1e10)")
    unit = np.where(magnitude > 0, magnitude, 1.0)
    if chunked is not None:
        center_u, spread_u = chunked.mean, chunked.m2
    else:
        center_u, spread_u = np.zeros(node.D), np.zeros(node.D)
        for rows, first, source in _element_blocks(node):
            w = 1.0 if weights is None else weights[first:first + len(source), None]
            center_u[rows] += np.nansum(source / unit[rows] * w, axis=0)
        center_u /= mass
        for rows, first, source in _element_blocks(node):
            w = 1.0 if weights is None else weights[first:first + len(source), None]
            spread_u[rows] += np.nansum((source / unit[rows] - center_u[rows]) ** 2 * w, axis=0)
    center = center_u * unit
    sd_u = np.sqrt(spread_u / mass)  # in units of each element's largest magnitude, ≤ 1
    sd = sd_u * unit
    if node.family.pool_scale:
        largest = sd.max()
        sd = np.full(node.D, largest * np.sqrt(np.mean((sd / largest) ** 2)) if largest > 0 else 0.0)
    constant = sd <= _CONSTANT * unit
    if fitting and constant.any():
        element = int(np.flatnonzero(constant)[0])
        label = _element_label(node, element)
        if low[element] == high[element]:
            what = f"is constant (every value is {float(low[element])!r})"
        elif weights is not None:
            what = (f"is constant where its samples' weights are positive (every such value is "
                    f"{float(center[element])!r}, to within rounding)")
        else:
            what = (f"is constant to within rounding (its values differ only in the last digits, from "
                    f"{float(low[element])!r} to {float(high[element])!r})")
        raise ModelError(f"{node.where()}: {label} {what}; a {node.family.kind} fitted to it would have "
                         "zero variance. Drop it from the model")
    # The family's variances are in the data's units: σ² must be a float, and so must the floor·σ².
    unrepresentable = ~constant & ((sd < _SPREAD[0]) | (sd > _SPREAD[1]))
    if fitting and unrepresentable.any():
        element = int(np.flatnonzero(unrepresentable)[0])
        big = sd[element] > _SPREAD[1]
        power = int(np.floor(np.log10(sd[element])))
        raise ModelError(f"{node.where()}: {_element_label(node, element)} has a standard deviation of "
                         f"{float(sd[element]):.3g}, so its variance (≈1e{2 * power}) "
                         f"{'overflows' if big else 'underflows'} floating point (whose range is 1e-308 to "
                         f"1e308); {node.family.kind} fits data whose spread is between {_SPREAD[0]:.0e} and "
                         f"{_SPREAD[1]:.0e}: {'divide' if big else 'multiply'} it by 1e{abs(power)}")
    return center, np.where(constant | (sd < _TINY_SCALE), 1.0, sd)


def _check_sums(plan: Plan, magnitude: np.ndarray) -> None:
    """Refuse a node whose Σ_n w_n |Φ_sn| overflows: the E-step's sums R Φᵀ and H Φ would be ±inf or NaN.

    Families fitted in the data's units (Gamma, Exponential, counts) sum x itself over the
    samples, so values near 1e308 overflow even though each one is a float.
    """
    for node in plan.nodes:
        rows = magnitude[node.offset:node.offset + node.n_rows]
        if np.isfinite(rows).all():
            continue
        largest = max((float(np.nanmax(np.abs(np.where(np.isfinite(s), s, np.nan)), initial=0.0))
                       for _, _, s in _element_blocks(node)), default=0.0) if node.sources else 0.0
        total = plan.total_weight
        power = int(np.ceil(np.log10(max(largest, 1.0)) + np.log10(max(total, 1.0)) - 300))
        label = f"variable {node.variables[0]!r}" if len(node.variables) == 1 else f"variables {list(node.variables)!r}"
        raise ModelError(f"{node.where()}: {label} reaches {largest!r}, and summed over the {total:g} (weighted) "
                         f"samples its statistics overflow float64 (beyond {_HUGE:.4g}); {node.family.kind} works "
                         f"in the data's units: divide it by 1e{max(power, 1)}")


def _extent(node: Node, weights: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per element, in one pass: how many values are observed, their mass Σ w (the count without
    ``weights``), the smallest, the largest and the largest magnitude."""
    count, low, high = np.zeros(node.D), np.full(node.D, np.inf), np.full(node.D, -np.inf)
    mass = count if weights is None else np.zeros(node.D)
    for rows, first, source in _element_blocks(node):
        observed = ~np.isnan(source)
        count[rows] += observed.sum(axis=0)
        if weights is not None:
            mass[rows] += np.where(observed, weights[first:first + len(source), None], 0.0).sum(axis=0)
        if observed.any():
            low[rows] = np.minimum(low[rows], np.min(np.where(observed, source, np.inf), axis=0))
            high[rows] = np.maximum(high[rows], np.max(np.where(observed, source, -np.inf), axis=0))
    magnitude = np.where(count > 0, np.maximum(np.abs(low), np.abs(high)), 0.0)
    return count, mass, low, high, magnitude


def _element_blocks(node: Node) -> Iterator[tuple[slice, int, np.ndarray]]:
    """(the node's elements, the first sample, float64 values (b × width)) over every source and block."""
    n = len(node.sources[0])
    row = 0
    for source in node.sources:
        width = source.shape[1]
        for a, b in blocks(n, SCAN_ROWS):
            yield slice(row, row + width), a, np.asarray(source[a:b], dtype=float)
        row += width


def _element_label(node: Node, element: int) -> str:
    """``variable 'x' at feature='f0'``: an element of a node as the user names it."""
    if node.stacked:
        return f"variable {node.variables[element]!r}"
    if not node.event_dims:
        return f"variable {node.variables[0]!r}"
    index = np.unravel_index(element, node.event_shape)
    where = ", ".join(f"{d}={labels._plain(node.event_coords[d][i]) if d in node.event_coords else int(i)!r}"
                      for d, i in zip(node.event_dims, index, strict=True))
    return f"variable {node.variables[0]!r} at {where}"


def _given_units(plan: Plan, node: Node, standardization: Mapping[str, tuple[Any, Any]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The fit's units for this node, aligned to the new data's coordinates; far-off new values are refused.

    A value more than :data:`FARTHEST` standard deviations from the training data's
    mean has a log-density whose square terms overflow: it cannot be scored.
    """
    where = f"{node.where()}: new data"
    center, scale = (labels.internal(plan, node, ("event",), value, where) for value in standardization[node.name])
    if node.family.standardize and is_dask(node.sources[0]):
        _far_chunked(plan, node, center, scale, where)
    elif node.family.standardize:
        for rows, start, source in _element_blocks(node):
            # halves, so that the difference of two finite floats cannot overflow
            distance = np.abs(source / 2 - center[rows] / 2) / (scale[rows] / 2)
            far = distance > FARTHEST  # NaN (missing) compares False
            if far.any():
                first = int(np.flatnonzero(far.ravel())[0])
                block_row, column = divmod(first, source.shape[1])
                row = start + block_row
                label = _element_label(node, rows.start + column)
                sample = (labels._plain(plan.sample_coords[plan.sample_dim][row]) if plan.sample_coords
                          else row)
                raise ModelError(f"{where}: {label} has the value {float(source.flat[first])!r} at "
                                 f"{plan.sample_dim}={sample!r}, {float(distance.flat[first]):.3g} standard "
                                 f"deviations from the training data's mean; the fit cannot score values beyond "
                                 f"{FARTHEST:.0e} standard deviations (their squares overflow)")
    return center, scale


def _bind_fixed(plan: Plan) -> None:
    """Fixed parameter values of the declaration, checked and in internal units."""
    if plan.latent is not None and plan.latent.family.fixed:
        plan.latent.held = start_values(plan, {plan.latent.name: plan.latent.family.fixed},
                                        "fixed value")[plan.latent.name]
    for node in plan.nodes:
        if node.family.fixed:
            node.held = start_values(plan, {node.name: node.family.fixed}, "fixed value")[node.name]


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


def markov_layout(model: Model, ds: xr.Dataset, sample_dim: Any, weights: Any
                  ) -> tuple[xr.Dataset, Hashable, xr.DataArray | None, Sequences]:
    """The data of a Markov latent as rows: (sequence dims..., markov dim) flattened, padding trimmed.

    The sequence dims are ``sample_dim`` (a name or a tuple of names) when given, else the
    dims of the first observed variable listed before the markov dim; every other dim is
    part of an observation (an event dim). Each sequence keeps its steps up to its last
    observed one. Returns the flattened data over one row dim (the markov dim itself for a
    single sequence, else ``"(sequence, time)"``, labelled by tuples), per-row weights (a
    sequence's weight on each of its rows) and the :class:`Sequences` layout.
    """
    latent = model.latent_var
    assert latent is not None and latent.markov is not None
    dim = latent.markov
    where = f"latent({latent.name!r}, ..., markov={dim!r})"
    variables = [v for decl in model.observed for v in decl.variables]
    extra = [v for decl in model.observed for v in decl.family.data_arguments().values()]
    # a regression's covariates and offset ride along with its response (emdsl.regression)
    extra += [v for decl in model.observed for v in (*decl.covariates, *filter(None, [decl.offset]))
              if v in ds.data_vars]
    # known states (semi-supervised): a variable named like the latent, over the chain's grid
    known = [latent.name] if latent.name in ds.data_vars else []
    for variable in variables:
        if dim not in ds[variable].dims:
            raise ModelError(f"{where}: variable {variable!r} has dims {ds[variable].dims}, without the "
                             f"dimension {dim!r} the chain runs along; name one of its dims in markov=")
    if sample_dim is not None:
        sequence_dims = (sample_dim,) if isinstance(sample_dim, str) else tuple(sample_dim)
        if dim in sequence_dims:
            raise ModelError(f"{where}: fit(sample_dim={sample_dim!r}) names the sequences; it cannot "
                             f"include the chain's own dimension {dim!r}")
    else:
        first = ds[variables[0]].dims
        sequence_dims = tuple(first[:first.index(dim)])
    for variable in variables:
        lacking = [d for d in sequence_dims if d not in ds[variable].dims]
        if lacking:
            raise ModelError(f"{where}: the sequences run over {sequence_dims}, but variable {variable!r} has "
                             f"dims {ds[variable].dims}, without {lacking}; every observed variable needs the "
                             "sequence dims (or pass fit(sample_dim=...) to name them)")
    if latent.name in sequence_dims or f"{latent.name}_next" in sequence_dims:
        raise ModelError(f"{where}: the latent's name clashes with the sequence dimension {latent.name!r}")
    T = int(ds.sizes[dim])
    if T == 0:
        raise ModelError(f"{where}: the dimension {dim!r} is empty; there is nothing to fit")
    shape = tuple(int(ds.sizes[d]) for d in sequence_dims)
    n_sequences = int(np.prod(shape, dtype=np.int64))
    grid = sequence_dims + (dim,)
    for name in known:
        if set(ds[name].dims) != set(grid):
            raise ModelError(f"{where}: the known states {name!r} must be over the chain's grid {grid} (NaN or "
                             f"None where unknown), got dims {ds[name].dims}")
    template = xr.DataArray(np.zeros(shape + (T,), dtype=bool), dims=grid)
    arrays = {}
    present = np.zeros((n_sequences, T), dtype=bool)
    # dask-backed data stay lazy: each chunk a run of whole sequences (emdsl/data/dask_source.py)
    chunked = any(is_dask(ds[v].data) for v in dict.fromkeys(variables + extra + known))
    # A step whose state is known counts as a step of its sequence even without an observation
    judged = variables + known
    for variable in dict.fromkeys(variables + extra + known):
        da = ds[variable]
        if variable in extra:
            da = da.broadcast_like(template)
        da = da.transpose(*grid, ...)
        if chunked:
            arrays[variable] = (da, None)
            continue
        values = np.asarray(da.values).reshape((n_sequences, T) + da.shape[len(grid):])
        arrays[variable] = (da, values)
        if variable in judged:
            present |= _observed_mask(values).reshape(n_sequences, T, -1).any(axis=2)
    if chunked:
        from emdsl.data import dask_source

        lazy, lengths = dask_source.chain_layout({v: da.data for v, (da, _) in arrays.items()}, list(judged),
                                                 n_sequences, T, len(sequence_dims), dim, where)
    else:
        lengths = np.where(present.any(axis=1), T - np.argmax(present[:, ::-1], axis=1), 0)
    if not lengths.all():
        s = int(np.flatnonzero(lengths == 0)[0])
        raise ModelError(f"{where}: the sequence at {_sequence_label(ds, sequence_dims, shape, s)} has no "
                         f"observation (every value along {dim!r} is missing, a sequence of length 0 once its "
                         "NaN padding is removed); drop it from the data")
    keep = (np.arange(T)[None, :] < lengths[:, None]).ravel() if not chunked else None
    rows = dim if not sequence_dims else "(" + ", ".join(map(str, grid)) + ")"
    flat = xr.Dataset()
    for variable, (da, values) in arrays.items():
        rest = da.dims[len(grid):]
        kept = lazy[variable] if chunked else values.reshape((n_sequences * T,) + values.shape[2:])[keep]
        flat[variable] = xr.DataArray(kept, dims=(rows,) + rest,
                                      coords={d: da[d].values for d in rest if d in da.coords}, attrs=da.attrs)
    coords: dict[Hashable, Any] = {}
    if not sequence_dims:
        if dim in ds.coords:
            coords[rows] = ds[dim].values[:int(lengths[0])]
    elif not chunked:  # (dask: rows are unlabelled; results are labelled over the (sequence, time) grid)
        axes = [ds[d].values if d in ds.coords else np.arange(ds.sizes[d]) for d in grid]
        index = np.flatnonzero(keep)
        labels_ = np.empty(len(index), dtype=object)
        labels_[:] = list(zip(*(np.asarray([labels._plain(v) for v in axis], dtype=object)[i]
                                for axis, i in zip(axes, np.unravel_index(index, shape + (T,)), strict=True)),
                              strict=True))
        coords[rows] = labels_
    flat = flat.assign_coords(coords)
    per_sequence = _sequence_weights(ds, weights, sequence_dims, shape, where) if weights is not None else None
    sequences = Sequences(dim, sequence_dims, shape,
                          {d: list(ds[d].values) for d in sequence_dims if d in ds.coords}, T,
                          {dim: ds[dim].values} if dim in ds.coords else {},
                          np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), per_sequence)
    row_weights = (None if per_sequence is None
                   else xr.DataArray(np.repeat(per_sequence, lengths), dims=(rows,), coords=coords))
    return flat, rows, row_weights, sequences


def _observed_mask(values: np.ndarray) -> np.ndarray:
    """True where a value is observed (not NaN, None, pd.NA or NaT)."""
    if values.dtype.kind == "f":
        return ~np.isnan(values)
    if values.dtype.kind != "O":
        return np.ones(values.shape, dtype=bool)
    return _missing_as_none(values) != None  # noqa: E711


def _sequence_label(ds: xr.Dataset, dims: tuple[Hashable, ...], shape: tuple[int, ...], s: int) -> str:
    if not dims:
        return "the only sequence"
    index = np.unravel_index(s, shape)
    return ", ".join(f"{d}={labels._plain(ds[d].values[i]) if d in ds.coords else int(i)!r}"
                     for d, i in zip(dims, index, strict=True))


def _sequence_weights(ds: xr.Dataset, weights: Any, dims: tuple[Hashable, ...], shape: tuple[int, ...],
                      where: str) -> np.ndarray:
    """A Markov latent's weights: one per sequence, over the sequence dims."""
    if isinstance(weights, str):
        if weights not in ds.data_vars:
            raise ModelError(f"fit(weights={weights!r}): the data have no variable {weights!r}; "
                             f"available: {', '.join(map(repr, ds.data_vars))}")
        da = ds[weights]
    elif isinstance(weights, xr.DataArray):
        da = weights
    else:
        raise ModelError(f"fit(weights=...): expected the name of a data variable or a DataArray over the "
                         f"sequence dims {dims}, got {type(weights).__name__}")
    if set(da.dims) != set(dims):
        raise ModelError(f"fit(weights=...): {where} weighs whole sequences: weights must have the sequence "
                         f"dims {dims}, got dims {da.dims}")
    da = da.transpose(*dims)
    for d in dims:
        if d in da.coords and d in ds.coords and not da.indexes[d].equals(ds.indexes[d]):
            da = da.reindex({d: ds[d].values})
    values = np.asarray(da.values, dtype=float).reshape(-1)
    if values.size != int(np.prod(shape, dtype=np.int64)):
        raise ModelError(f"fit(weights=...): {values.size} weights for {int(np.prod(shape))} sequences")
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        s = int(np.flatnonzero(bad)[0])
        raise ModelError(f"fit(weights=...): {int(bad.sum())} weight(s) are missing, infinite or negative, "
                         f"first at {_sequence_label(ds, dims, shape, s)}; weights must be finite and >= 0")
    if not values.any():
        raise ModelError("fit(weights=...): every weight is 0; there is nothing to fit")
    return values


# -- dask-backed data: every scan above as one dask pass (emdsl/data/dask_source.py) ----------------
def _values(da: xr.DataArray) -> Any:
    """A variable's data as (N, ...): the dask array itself when dask-backed (never ``.values``), else numpy."""
    from emdsl.data import dask_source

    return dask_source.values_of(da)


def _where_chunk(da: xr.DataArray, sample_dim: Hashable, flat: int) -> str:
    """``sample=17 (chunk 0 of 4 along 'sample', rows 0–99)``: a position in dask-backed data."""
    from emdsl.data import dask_source

    da = da.transpose(sample_dim, ...)
    row = flat // max(1, int(np.prod(da.shape[1:], dtype=np.int64)))
    return (f"{labels.describe_position(da, flat)} "
            f"({dask_source.describe_chunk(da.chunks[0], row, sample_dim)})")


def _chunked_weights(da: xr.DataArray, where: str, sample_dim: Hashable) -> Any:
    """Dask weights, checked in one pass (finite, >= 0, not all 0) and kept lazy."""
    from emdsl.data import dask_source

    values = da.data.astype(float)
    nonfinite, negative, any_positive = dask_source.check_weights(values)
    for (count, first), what in ((nonfinite, "missing or infinite (NaN, ±inf)"), (negative, "negative")):
        if count:
            raise ModelError(f"{where}: {count} weight{'s are' if count > 1 else ' is'} {what}, first at "
                             f"{_where_chunk(da, sample_dim, first)}; weights must be finite and >= 0")
    if not any_positive:
        raise ModelError(f"{where}: every weight is 0; there is nothing to fit")
    return values


def _chunked_counts(da: xr.DataArray, where: str, n: int) -> Any:
    """A family's extra dask data (e.g. trials) as lazy (N, D) floats, checked in one pass."""
    from emdsl.data import dask_source

    values = dask_source.values_of(da).astype(float).reshape(n, -1)
    count, first = dask_source.check_counts(values)
    if count:
        raise ModelError(f"{where}: {count} value(s) are not non-negative integers (first at "
                         f"{_where_chunk(da, da.dims[0], first)})")
    return values


def _encode_chunked(node: Node, ds: xr.Dataset, sample_dim: Hashable, declared: Sequence[Any] | None) -> None:
    """Dask labels → lazy level codes: levels learned in one pass (or checked against the given ones)."""
    from emdsl.data import dask_source

    learned = declared is None
    if learned:
        found = sorted(dask_source.unique_labels(node.sources, _tidy_label), key=_sort_key)
        declared = [_tidy_label(v) for v in found]
        if not declared:
            raise ModelError(f"{node.where()}: every value is missing; there are no levels to learn")
    lookup = {_tidy_label(level): code for code, level in enumerate(declared)}
    variables = node.variables if node.stacked else node.variables * len(node.sources)
    for column, variable in zip(node.sources, variables, strict=False) if not learned else ():
        count, first, label = dask_source.unknown_labels(column, lookup, _tidy_label)
        if count:
            raise ModelError(f"{node.where()}: variable {variable!r} has {count} value"
                             f"{'s' if count > 1 else ''} that {'are' if count > 1 else 'is'} not a known "
                             f"level (first {label!r} at {_where_chunk(ds[variable], sample_dim, first)}); "
                             f"levels: {list(declared)[:20]}")
    node.sources = [dask_source.encode(column, lookup, _tidy_label) for column in node.sources]
    node.levels = tuple(declared)
    node.family = node.family.bound(node.levels)  # type: ignore[attr-defined]


def _check_chunked(node: Node, arrays: list[xr.DataArray], sample_dim: Hashable, weights: Any) -> Any:
    """:func:`_check_values` on dask sources: one pass, the same messages, the chunk named; returns
    the moments read in that pass (:class:`emdsl.data.dask_source.Moments`)."""
    from emdsl.data import dask_source

    found, moments = dask_source.check_values(node, weights)

    def fail(da: xr.DataArray, count: int, first: int, kind: str, detail: str, advice: str) -> None:
        raise ModelError(f"{node.where()}: variable {da.name!r} has {count} {kind}value{'s' if count > 1 else ''}"
                         f"{detail}, first at {_where_chunk(da, sample_dim, first)}; {advice}")

    if found.events is not None:
        for column, (count, first_row) in enumerate(found.events):
            if count:
                fail(arrays[column], count, first_row, "", " outside the support", found.event_advice or "")
    for da, (inf_count, inf_first), (out_count, out_first), advice in zip(
            arrays, found.infinite, found.outside, found.advice, strict=True):
        if inf_count:
            fail(da, inf_count, inf_first, "infinite ", " (±inf)",
                 "remove them, or replace them by NaN to mark them missing")
        if out_count:
            fail(da, out_count, out_first, "", " outside the support", advice or "")
    node.has_missing = any(found.missing)
    if node.has_missing:
        node.find_patterns()
    return moments


def _far_chunked(plan: Plan, node: Node, center: np.ndarray, scale: np.ndarray, where: str) -> None:
    """:func:`_given_units`' check on dask sources: one pass for values too far to score."""
    from emdsl.data import dask_source

    count, first, value, distance = dask_source.far_values(node, center, scale, FARTHEST)
    if count:
        row, element = divmod(first, node.D)
        sample = labels._plain(plan.sample_coords[plan.sample_dim][row]) if plan.sample_coords else row
        raise ModelError(f"{where}: {_element_label(node, element)} has the value {value!r} at "
                         f"{plan.sample_dim}={sample!r}, {distance:.3g} standard deviations from the training "
                         f"data's mean; the fit cannot score values beyond {FARTHEST:.0e} standard deviations "
                         "(their squares overflow)")
