"""The layout of a Markov latent's sequences: their steps, observed masks, weights and labels."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.compile.binding import _missing_as_none
from emdsl.data import is_dask
from emdsl.errors import ModelError
from emdsl.latent import Sequences
from emdsl.model import Model


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
