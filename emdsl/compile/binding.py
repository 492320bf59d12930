"""Binding a declaration to data: sample dims, weights, encoded levels, known states, and the checks on values."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.compile.plan import Node, Plan
from emdsl.data import is_dask
from emdsl.errors import ModelError
from emdsl.model import Model, Observed


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
