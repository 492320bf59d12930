"""Filling holes with their posterior expectation (``Fit.impute``).

Each missing value becomes Σ_k p(z=k | what is observed) E[x | z=k, what is observed]: the family's
``impute`` (a categorical hole takes its most probable level). A regression node's hole is its
response's E[y | covariates, z=k] (x_nᵀβ_k, or the GLM's mean through its link, with the offset or
the trials), weighted by the posterior over the states given the sample's other nodes (and, with a
concomitant latent, its own weights). On dask-backed data the result is lazy, with the data's
chunks: one task per chunk computes that chunk's responsibilities and fills its holes, as the
in-memory path does (the same numbers, to rounding).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import xarray as xr

from emdsl.compile import SCAN_ROWS, Node, Plan, blocks
from emdsl.data import is_chunked
from emdsl.engine.estep import engine
from emdsl.engine.mstep import Theta, natural_matrix


def impute(plan: Plan, theta: Theta, ds: xr.Dataset) -> xr.Dataset:
    """A copy of ``ds`` whose missing observed values are their posterior expectations."""
    if is_chunked(plan):
        return _assign(plan, ds, _lazy_fill(plan, theta))
    resp = np.ones((plan.n_samples, 1))
    if plan.latent is not None:
        resp = np.empty((plan.n_samples, plan.K))
        with engine(plan) as estep:
            estep.evaluate(natural_matrix(plan, theta), theta, resp_out=resp)
    return _assign(plan, ds, fill(plan, theta, resp, [node.name for node in _holed(plan)]))


def _holed(plan: Plan) -> list[Node]:
    return [node for node in plan.nodes if node.has_missing]


def _width(node: Node) -> int:
    """How many of the node's columns are data to fill: a GLM's response only (not its design, offset or trials)."""
    from emdsl.regression import _GLMRegression

    return 1 if isinstance(node.family, _GLMRegression) else node.D


def fill(plan: Plan, theta: Theta, resp: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The named nodes' values (N × width each), holes filled, in the data's units (level codes for labels)."""
    out = []
    for node in (node for name in names for node in plan.nodes if node.name == name):
        filled = np.empty((plan.n_samples, node.D))
        for a, b in blocks(plan.n_samples, SCAN_ROWS):
            x = np.empty((node.D, b - a))
            node.read(a, b, x)
            filled[a:b] = node.family.impute(plan.expand(node, theta[node.name]), x, resp[a:b],
                                             node.read_aux(a, b)).T
        if node.family.standardize:
            filled = node.center + node.scale * filled
        # Observed values are returned as given, not through a round trip of the units.
        original = np.hstack([np.asarray(s, dtype=float) for s in node.sources])
        filled = np.where(np.isnan(original), filled, original)
        out.append(filled[:, :_width(node)])
    return out


def _fill_chunk(skeleton: Plan, slots: list[Any], theta: Theta, names: list[str], with_resp: bool,
                *chunk: np.ndarray) -> list[np.ndarray]:
    """One chunk's filled values (a task): its own plan, its responsibilities (the last block) and :func:`fill`."""
    from emdsl.data import dask_source

    local = dask_source.local_plan(skeleton, slots, chunk[:len(slots)])
    resp = np.asarray(chunk[-1], dtype=float) if with_resp else np.ones((local.n_samples, 1))
    return fill(local, theta, resp, names)


def _lazy_fill(plan: Plan, theta: Theta) -> list[Any]:
    """Dask arrays (N × width each, the data's chunks) of the holed nodes' filled values."""
    import dask
    import dask.array as da

    from emdsl.data import dask_source

    names = [node.name for node in _holed(plan)]
    slots, arrays = dask_source.layout(plan)
    with_resp = plan.latent is not None
    if with_resp:
        with engine(plan) as estep:
            arrays = [*arrays, estep.lazy(natural_matrix(plan, theta), theta, "resp")]
    starts, chunks = dask_source.chunk_blocks(arrays)
    sizes = np.diff([*starts, plan.n_samples])
    skeleton = dask.delayed(dask_source.skeleton(plan), traverse=False)
    theta_key = dask.delayed(theta, traverse=False)
    parts = [dask.delayed(_fill_chunk, pure=True)(skeleton, slots, theta_key, names, with_resp, *chunk)
             for chunk in chunks]
    out = []
    for i, name in enumerate(names):
        width = _width(next(node for node in plan.nodes if node.name == name))
        pieces = [da.from_delayed(dask.delayed(operator.getitem)(part, i), shape=(int(size), width), dtype=float)
                  for part, size in zip(parts, sizes, strict=True)]
        out.append(da.concatenate(pieces, axis=0))
    return out


def _assign(plan: Plan, ds: xr.Dataset, filled: list[Any]) -> xr.Dataset:
    """``ds`` with each holed node's variables replaced by their filled values (lazy ones stay lazy)."""
    out = ds.copy()
    for node, values in zip(_holed(plan), filled, strict=True):
        if node.levels is not None:
            values = (values.map_blocks(_labels, node.levels, dtype=object) if hasattr(values, "map_blocks")
                      else _labels(values, node.levels))
        if node.stacked:
            for d, variable in enumerate(node.variables):
                out[variable] = _placed(plan, ds[variable], values[:, d], [])
        else:
            variable = node.variables[0]
            event_dims = [dim for dim in node.event_dims if dim in ds[variable].dims]
            out[variable] = _placed(plan, ds[variable], values, event_dims)
    return out


def _placed(plan: Plan, da: xr.DataArray, values: Any, event_dims: list[Any]) -> xr.DataArray:
    """``da`` with the plan's rows of ``values`` (N × event elements) written back where they came from.

    A Markov latent's rows are its sequences' steps up to each one's last observation, flattened
    (compile.markov_layout): the steps past it are the padding of a shorter sequence, not holes,
    and keep their missing values.
    """
    sequences = plan.sequences
    if sequences is None:
        ordered = da.transpose(plan.sample_dim, *event_dims)
        return ordered.copy(data=_as_dtype(values.reshape(ordered.shape), ordered)).transpose(*da.dims)
    ordered = da.transpose(*sequences.sequence_dims, sequences.dim, *event_dims)
    grid = np.array(ordered.values)
    steps = grid.reshape((sequences.n_sequences * sequences.length, -1))
    kept = sequences.observed.ravel()
    written = _as_dtype(np.asarray(values).reshape((int(kept.sum()), -1)), ordered)
    if written.dtype != steps.dtype:  # e.g. float codes of a label column read back as labels
        steps = steps.astype(np.result_type(steps.dtype, written.dtype) if steps.dtype.kind != "O" else object)
    steps[kept] = written
    return ordered.copy(data=steps.reshape(grid.shape)).transpose(*da.dims)


def _labels(codes: np.ndarray, levels: tuple) -> np.ndarray:
    labels = np.asarray(levels, dtype=object)[codes.astype(np.intp)]
    if all(isinstance(v, str) for v in levels):
        return labels.astype(str)
    return labels


def _as_dtype(values: Any, template: xr.DataArray) -> Any:
    """Keep the variable's dtype where the filled values allow it (labels stay labels)."""
    if values.dtype.kind in "OU" and template.dtype.kind in "OU":
        return values.astype(template.dtype) if template.dtype.kind == "U" else values
    return values
