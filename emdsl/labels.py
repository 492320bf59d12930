"""The one place where xarray dims and coords are stripped from data and re-attached.

Kernels work on plain arrays whose axes are symbolic: ``latent`` (the K states),
``event`` (a node's D elements, flattened) and ``event_`` (the second axis of a
covariance). This module converts between those arrays and labelled xarray objects.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from emdsl.errors import ModelError

if TYPE_CHECKING:
    from emdsl.compile import Node, Plan


def as_dataset(data: Any) -> xr.Dataset:
    """Accept a Dataset, DataArray, pandas DataFrame or numpy array as a Dataset.

    An unnamed DataArray or an array becomes the variable ``"x"``; arrays get the
    dims ``("sample",)`` or ``("sample", "feature")``; a DataFrame's index becomes
    the sample dimension (``"sample"`` when the index has no name).
    """
    if isinstance(data, xr.Dataset):
        return data
    if isinstance(data, xr.DataArray):
        return data.to_dataset(name=data.name if data.name is not None else "x")
    if type(data).__name__ == "DataFrame" and hasattr(data, "columns"):
        frame = data.copy(deep=False)
        if frame.index.name is None:
            frame.index = frame.index.rename("sample")
        frame.columns = [str(c) for c in frame.columns]
        return xr.Dataset.from_dataframe(frame)
    if isinstance(data, np.ndarray | list | tuple):
        array = np.asarray(data)
        if array.ndim not in (1, 2):
            raise ModelError(f"data: a numpy array must be 1-D (sample,) or 2-D (sample, feature), "
                             f"got shape {array.shape}; wrap it in an xarray.DataArray with named dims")
        return xr.Dataset({"x": (("sample", "feature")[: array.ndim], array)})
    raise ModelError(f"data: expected an xarray.Dataset, DataArray, pandas.DataFrame or numpy array, "
                     f"got {type(data).__name__}")


def describe_position(array: xr.DataArray, flat_index: int) -> str:
    """``"sample=17"`` (labels where the dims have coordinates) for an element of ``array``."""
    where = np.unravel_index(flat_index, array.shape)
    parts = []
    for dim, i in zip(array.dims, where, strict=True):
        label = array[dim].values[i] if dim in array.coords else i
        parts.append(f"{dim}={label.item() if hasattr(label, 'item') else label!r}")
    return ", ".join(parts)


def axis_labels(plan: Plan, node: Node | None, axes: Sequence[str]) -> tuple[list[Hashable], list[int], dict]:
    """Dims, shape and coords of a labelled parameter with symbolic ``axes``."""
    dims: list[Hashable] = []
    shape: list[int] = []
    coords: dict[Hashable, Any] = {}
    for axis in axes:
        if axis == "latent":
            if plan.latent is not None:
                dims.append(plan.latent.name)
                shape.append(plan.K)
                coords[plan.latent.name] = list(plan.latent.family.states)
        elif axis == "event":
            assert node is not None
            dims.extend(node.event_dims)
            shape.extend(node.event_shape)
            coords.update(node.event_coords)
        elif axis == "level":
            assert node is not None and node.levels is not None
            dims.append("level")
            shape.append(len(node.levels))
            coords["level"] = list(node.levels)
        elif axis == "event_":
            assert node is not None
            (dim,) = node.event_dims
            dims.append(f"{dim}_")
            shape.extend(node.event_shape)
            if dim in node.event_coords:
                coords[f"{dim}_"] = node.event_coords[dim]
    return dims, shape, coords


def labelled(plan: Plan, node: Node | None, axes: Sequence[str], values: np.ndarray,
             name: str, attrs: Mapping[str, Any] | None = None) -> xr.DataArray:
    """Attach dims and coords to an internal array with symbolic ``axes``."""
    dims, shape, coords = axis_labels(plan, node, axes)
    return xr.DataArray(np.reshape(values, shape), dims=dims, coords=coords, name=name,
                        attrs=dict(attrs or {}))


def internal(plan: Plan, node: Node | None, axes: Sequence[str], value: Any, where: str) -> np.ndarray:
    """A user value (array-like or DataArray) as an internal array with symbolic ``axes``.

    DataArrays are matched by dimension name (any order; coordinates are aligned
    to the data's), plain arrays are broadcast to the labelled shape.
    """
    dims, shape, coords = axis_labels(plan, node, axes)
    if isinstance(value, xr.DataArray):
        extra = [d for d in value.dims if d not in dims]
        if extra:
            raise ModelError(f"{where}: dims {tuple(value.dims)} do not match the expected {tuple(dims)} "
                             f"(unexpected {extra})")
        for dim in value.dims:
            if dim in coords and dim in value.coords:
                wanted = coords[dim]
                have = list(value[dim].values)
                if sorted(map(str, have)) != sorted(map(str, wanted)):
                    raise ModelError(f"{where}: coordinate {dim!r} has {have}, expected {list(wanted)}")
                value = value.sel({dim: wanted})
        for dim, size in zip(dims, shape, strict=True):
            if dim in value.dims and value.sizes[dim] != size:
                raise ModelError(f"{where}: dimension {dim!r} has size {value.sizes[dim]}, expected {size}")
        value = value.transpose(*[d for d in dims if d in value.dims])
        array = value.values.astype(float)
        array = array.reshape([s if d in value.dims else 1 for d, s in zip(dims, shape, strict=True)])
    else:
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: expected numbers, got {value!r}") from None
        event_positions = [i for i, d in enumerate(dims) if node is not None and d in node.event_dims]
        if event_positions and array.ndim == len(shape) - len(event_positions) and array.ndim > 0:
            # Per-state values without the event dims (e.g. a categorical's (states × levels)
            # probabilities) hold for every element.
            array = np.expand_dims(array, event_positions)
    try:
        array = np.broadcast_to(array, shape)
    except ValueError:
        raise ModelError(f"{where}: expected shape {tuple(shape)} (dims {tuple(dims)}), "
                         f"got {np.shape(value)}") from None
    flat = [plan.K] if "latent" in axes else []
    for axis in axes:
        if axis in ("event", "event_"):
            assert node is not None
            flat.append(node.D)
        elif axis == "level":
            assert node is not None and node.levels is not None
            flat.append(len(node.levels))
    return np.array(array, dtype=float).reshape(flat)


def params_tree(plan: Plan, params: Mapping[str, Mapping[str, np.ndarray]]) -> xr.DataTree:
    """Labelled parameters: one DataTree node per latent and observed node."""
    children: dict[str, xr.Dataset] = {}
    if plan.latent is not None:
        family = plan.latent.family
        ds = xr.Dataset({"probs": labelled(plan, None, ("latent",), params[plan.latent.name]["probs"], "probs")})
        ds.attrs = {"family": family.kind, "role": "latent", "fixed": ",".join(family.fixed)}
        children[plan.latent.name] = ds
    for node in plan.nodes:
        axes = node.family.param_axes()
        ds = xr.Dataset({key: labelled(plan, node, axes[key], params[node.name][key], key) for key in axes})
        ds.attrs = {"family": node.family.kind, "role": "observed",
                    "variables": ",".join(node.variables), "fixed": ",".join(node.family.fixed)}
        if node.family.multivariate and hasattr(node.family, "covariance_type"):
            ds.attrs["covariance_type"] = node.family.covariance_type
        children[node.name] = ds
    return xr.DataTree.from_dict(children)


def tree_values(tree: xr.DataTree | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{node: {param: DataArray}}`` from a params DataTree (or a plain nested mapping)."""
    if isinstance(tree, xr.DataTree):
        return {name: dict(child.to_dataset().data_vars) for name, child in tree.children.items()}
    return {name: dict(values) for name, values in tree.items()}


def states_array(plan: Plan, values: np.ndarray, name: str) -> xr.DataArray:
    """(sample, latent) array of per-state values, labelled."""
    assert plan.latent is not None
    return xr.DataArray(values, dims=(plan.sample_dim, plan.latent.name),
                        coords={**plan.sample_coords, plan.latent.name: list(plan.latent.family.states)},
                        name=name)


def samples_array(plan: Plan, values: np.ndarray, name: str) -> xr.DataArray:
    """(sample,) array of per-sample values, labelled."""
    return xr.DataArray(values, dims=(plan.sample_dim,), coords=plan.sample_coords, name=name)
