"""The one place where xarray dims and coords are stripped from data and re-attached.

Kernels work on plain arrays whose axes are symbolic: ``latent`` (the K states),
``event`` (a node's D elements, flattened) and ``event_`` (the second axis of a
covariance). This module converts between those arrays and labelled xarray objects.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from emdsl.errors import ModelError

if TYPE_CHECKING:
    from emdsl.compile import Node, Plan
    from emdsl.model import Model


def as_dataset(data: Any, like: Model | None = None) -> xr.Dataset:
    """Accept a Dataset, DataArray, pandas DataFrame or Series, or numpy array as a Dataset.

    * A DataArray becomes one variable, named after it (``"x"`` when unnamed).
    * A DataFrame's columns become variables over its index, which is the sample
      dimension (named after the index, ``"sample"`` when unnamed); column names are
      kept as their ``str()``. A ``MultiIndex`` is flattened to one sample dimension,
      ``"sample"``, whose coordinate holds the index's tuples (e.g. ``(2024, "a")``), so
      that predictions keep the rows' labels. A Series is a one-column DataFrame.
    * An array becomes the variable ``"x"`` with dims ``("sample",)`` or
      ``("sample", "feature")``; with ``like`` (a :class:`~emdsl.Model` whose data
      variables are 1-D, as when it was fitted to a DataFrame), an array whose columns
      are as many as the model's variables gives those variables, column by column in
      the order the model declares them.

    Examples
    --------
    >>> import numpy as np, pandas as pd, emdsl as em
    >>> frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]},
    ...                      index=pd.MultiIndex.from_tuples([(0, "p"), (0, "q")]))
    >>> as_dataset(frame)["sample"].values.tolist()
    [(0, 'p'), (0, 'q')]
    >>> model = em.Model().observe(["a", "b"], em.MultivariateNormal)
    >>> sorted(as_dataset(np.ones((3, 2)), like=model).data_vars)
    ['a', 'b']
    """
    if isinstance(data, xr.Dataset):
        return data
    if isinstance(data, xr.DataArray):
        return data.to_dataset(name=data.name if data.name is not None else "x")
    kind = type(data).__name__
    if kind == "Series" and hasattr(data, "to_frame"):
        data = data.to_frame(name=data.name if data.name is not None else "x")
        kind = "DataFrame"
    if kind == "DataFrame" and hasattr(data, "columns"):
        return _from_frame(data)
    if isinstance(data, np.ndarray | list | tuple):
        try:
            array = np.asarray(data)
        except ValueError as error:  # ragged nested lists
            raise ModelError(f"data: cannot read the list as an array ({error})") from None
        if array.ndim not in (1, 2):
            raise ModelError(f"data: a numpy array must be 1-D (sample,) or 2-D (sample, feature), "
                             f"got shape {array.shape}; wrap it in an xarray.DataArray with named dims")
        columns = _columns_like(like, array)
        if columns is not None:
            return xr.Dataset({name: ("sample", array[:, i] if array.ndim == 2 else array)
                               for i, name in enumerate(columns)})
        return xr.Dataset({"x": (("sample", "feature")[: array.ndim], array)})
    raise ModelError(f"data: expected an xarray.Dataset, DataArray, pandas.DataFrame or numpy array, "
                     f"got {kind}")


def _from_frame(data: Any) -> xr.Dataset:
    """A DataFrame's columns as variables over one sample dimension (a MultiIndex flattened to tuples)."""
    import pandas as pd

    frame = data.copy(deep=False)
    if isinstance(frame.index, pd.MultiIndex):
        frame.index = pd.Index(list(frame.index), tupleize_cols=False, dtype=object, name="sample")
    elif frame.index.name is None:
        frame.index = frame.index.rename("sample")
    frame.columns = [str(c) for c in frame.columns]
    repeated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if repeated:
        raise ModelError(f"data: the DataFrame has several columns named {repeated[0]!r} "
                         "(after converting names to strings); give them distinct names")
    if frame.index.name in frame.columns:
        raise ModelError(f"data: the DataFrame's index and one of its columns are both named "
                         f"{frame.index.name!r}; rename one of them")
    return xr.Dataset.from_dataframe(frame)


def _columns_like(like: Model | None, array: np.ndarray) -> list[str] | None:
    """The model's variables, in declaration order, when the array's columns stand for them."""
    if like is None:
        return None
    variables = [v for decl in like.observed for v in decl.variables]
    if not variables or "x" in variables:
        return None  # the model reads the array as the variable "x", the default
    width = array.shape[1] if array.ndim == 2 else 1
    return variables if width == len(variables) else None


def _plain(label: Any) -> Any:
    """A coordinate label as users write it: numpy scalars as Python values, dates as ISO strings."""
    if isinstance(label, np.datetime64 | np.timedelta64):
        return str(label)
    return label.item() if isinstance(label, np.generic) else label


def label_array(labels: Sequence[Hashable]) -> np.ndarray:
    """Labels given by the user (of models, say) as a 1-D coordinate: strings or integers keep their
    dtype, anything else (tuples such as ``("full", 3)``) stays as given in an object array, where
    ``np.asarray`` would read a list of tuples as 2-D.

    Examples
    --------
    >>> label_array([("full", 2), ("tied", 3)]).shape
    (2,)
    """
    if all(isinstance(label, str) for label in labels) or all(
            isinstance(label, int | np.integer) and not isinstance(label, bool) for label in labels):
        return np.asarray(labels)
    out = np.empty(len(labels), dtype=object)
    out[:] = list(labels)
    return out


def describe_position(array: xr.DataArray, flat_index: int) -> str:
    """``"sample=17"`` (labels where the dims have coordinates) for an element of ``array``."""
    where = np.unravel_index(flat_index, array.shape)
    parts = []
    for dim, i in zip(array.dims, where, strict=True):
        label = _plain(array[dim].values[i]) if dim in array.coords else int(i)
        parts.append(f"{dim}={label!r}")
    return ", ".join(parts)


def axis_labels(plan: Plan, node: Node | None, axes: Sequence[str]) -> tuple[list[Hashable], list[int], dict]:
    """Dims, shape and coords of a labelled parameter with symbolic ``axes``."""
    dims: list[Hashable] = []
    shape: list[int] = []
    coords: dict[Hashable, Any] = {}
    for axis in axes:
        if axis == "latent" and node is not None and node.given is not None:
            for name, member in node.given.latents:  # exactly the latents the node depends on
                dims.append(name)
                shape.append(member.k)
                coords[name] = list(member.states)
        elif axis == "latent":
            if plan.latent is not None:
                dims.append(plan.latent.name)
                shape.append(plan.K)
                coords[plan.latent.name] = list(plan.latent.family.states)
        elif axis == "latent_next":  # a transition matrix's second axis: the state at the next step
            assert plan.latent is not None
            dims.append(f"{plan.latent.name}_next")
            shape.append(plan.K)
            coords[f"{plan.latent.name}_next"] = list(plan.latent.family.states)
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
        elif axis == "term":  # a regression's design columns (emdsl.regression); the latent's, for its weights
            terms = list((node.family if node is not None else plan.latent.family).terms)
            dims.append("term")
            shape.append(len(terms))
            coords["term"] = terms
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
    flat = [plan.K if node is None else plan.components(node)] if "latent" in axes else []
    for axis in axes:
        if axis == "latent_next":
            flat.append(plan.K)
        elif axis in ("event", "event_"):
            assert node is not None
            flat.append(node.D)
        elif axis == "level":
            assert node is not None and node.levels is not None
            flat.append(len(node.levels))
        elif axis == "term":
            flat.append(len((node.family if node is not None else plan.latent.family).terms))
    return np.array(array, dtype=float).reshape(flat)


def params_tree(plan: Plan, params: Mapping[str, Mapping[str, np.ndarray]]) -> xr.DataTree:
    """Labelled parameters: one DataTree node per latent and observed node."""
    children: dict[str, xr.Dataset] = {}
    if plan.latent is not None and hasattr(plan.latent.family, "members"):  # several latents: one child each
        joint = plan.latent.family
        for name, member in zip(joint.names, joint.members, strict=True):
            probs = xr.DataArray(np.asarray(params[plan.latent.name][name], dtype=float), dims=(name,),
                                 coords={name: list(member.states)}, name="probs")
            ds = xr.Dataset({"probs": probs})
            ds.attrs = {"family": member.kind, "role": "latent", "fixed": ",".join(member.fixed)}
            children[name] = ds
    elif plan.latent is not None:
        family = plan.latent.family
        ds = xr.Dataset({key: labelled(plan, None, axes, params[plan.latent.name][key], key)
                         for key, axes in family.param_axes().items()})
        ds.attrs = {"family": family.kind, "role": "latent", "fixed": ",".join(family.fixed)}
        _record_baselines(ds, family)
        if plan.sequences is not None:
            ds.attrs["markov"] = str(plan.sequences.dim)
        children[plan.latent.name] = ds
    for node in plan.nodes:
        if node.name in children:
            continue  # the hidden node of a latent's covariates: its coefficients are the latent's
        axes = node.family.param_axes()
        ds = xr.Dataset({key: labelled(plan, node, axes[key], params[node.name][key], key) for key in axes})
        ds.attrs = {"family": node.family.kind, "role": "observed",
                    "variables": ",".join(node.variables), "fixed": ",".join(node.family.fixed)}
        if node.family.multivariate and hasattr(node.family, "covariance_type"):
            ds.attrs["covariance_type"] = node.family.covariance_type
        _record_baselines(ds, node.family)
        children[node.name] = ds
    return xr.DataTree.from_dict(children)


def _record_baselines(ds: xr.Dataset, family: Any) -> None:
    """A regression's baseline levels (``regression.Terms``) as the ``term`` coordinate's attribute."""
    baselines = getattr(getattr(family, "terms", None), "baselines", None)
    if baselines and "term" in ds.coords:
        ds["term"].attrs["baselines"] = json.dumps(baselines)


def tree_values(tree: xr.DataTree | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{node: {param: DataArray}}`` from a params DataTree (or a plain nested mapping)."""
    if isinstance(tree, xr.DataTree):
        return {name: dict(child.to_dataset().data_vars) for name, child in tree.children.items()}
    return {name: dict(values) for name, values in tree.items()}


def states_array(plan: Plan, values: Any, name: str) -> xr.DataArray:
    """(sample, latent) array of per-state values, labelled; (sample, a, b, ...) for several latents."""
    assert plan.latent is not None
    joint = plan.latent.family
    if hasattr(joint, "members"):
        return xr.DataArray(values.reshape((values.shape[0], *joint.shape)), dims=(plan.sample_dim, *joint.names),
                            coords={**plan.sample_coords, **{n: list(m.states) for n, m in
                                                             zip(joint.names, joint.members, strict=True)}},
                            name=name)
    return xr.DataArray(values, dims=(plan.sample_dim, plan.latent.name),
                        coords={**plan.sample_coords, plan.latent.name: list(plan.latent.family.states)},
                        name=name)


def samples_array(plan: Plan, values: np.ndarray, name: str) -> xr.DataArray:
    """(sample,) array of per-sample values, labelled."""
    return xr.DataArray(values, dims=(plan.sample_dim,), coords=plan.sample_coords, name=name)


def chain_array(plan: Plan, values: np.ndarray, name: str, *, states: bool = False) -> xr.DataArray:
    """Values over a Markov latent's (sequence, time) grid, (n_sequences, T, [K]), labelled.

    Dims: the sequence dims, the markov dim, and the latent's states when ``states``.
    """
    sequences = plan.sequences
    assert sequences is not None and plan.latent is not None
    dims = [*sequences.sequence_dims, sequences.dim]
    coords: dict[Hashable, Any] = {**sequences.sequence_coords, **sequences.time_coords}
    shape = [*sequences.sequence_shape, sequences.length]
    if states:
        dims.append(plan.latent.name)
        coords[plan.latent.name] = list(plan.latent.family.states)
        shape.append(plan.K)
    return xr.DataArray(values.reshape(shape), dims=dims, coords=coords, name=name)


def sequences_array(plan: Plan, values: np.ndarray, name: str) -> xr.DataArray:
    """One value per sequence, over the sequence dims (0-d when the data are one sequence)."""
    sequences = plan.sequences
    assert sequences is not None
    return xr.DataArray(values.reshape(sequences.sequence_shape), dims=sequences.sequence_dims,
                        coords=sequences.sequence_coords, name=name)


def in_fitted_dtypes(draws: xr.Dataset, dtypes: Mapping[str, str]) -> xr.Dataset:
    """Simulated variables in the dtype they had when fitted (``Fit.data_dtypes``), where the draws
    fit it exactly: counts as integers, 0/1 as bool, float32 as float32.

    Families draw in float64. A variable whose draws do not fit (a Normal fitted to integer
    data, a hole past a sequence's end, an integer beyond the dtype's range) stays float64
    rather than be rounded or wrapped; lazy draws and labels are left as they are.
    """
    out = draws.copy()
    for name, text in dtypes.items():
        if name not in out.data_vars or out[name].chunks is not None or out[name].dtype.kind != "f":
            continue
        target, values = np.dtype(text), out[name].values
        if target == values.dtype:
            continue
        if target.kind == "f":
            out[name] = out[name].astype(target)
            continue
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            continue
        low, high = (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
        if values.size and (values.min() < low or values.max() > high):
            continue
        out[name] = out[name].astype(target)
    return out
