"""Filling holes with their posterior expectation (``Fit.impute``)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from emdsl.compile import SCAN_ROWS, Plan, blocks
from emdsl.engine.estep import engine
from emdsl.engine.mstep import Theta, natural_matrix


def impute(plan: Plan, theta: Theta, ds: xr.Dataset) -> xr.Dataset:
    """A copy of ``ds`` whose missing observed values are their posterior expectations."""
    resp = np.ones((plan.n_samples, 1))
    if plan.latent is not None:
        resp = np.empty((plan.n_samples, plan.K))
        with engine(plan) as estep:
            estep.evaluate(natural_matrix(plan, theta), theta, resp_out=resp)
    out = ds.copy()
    for node in plan.nodes:
        if not node.has_missing:
            continue
        filled = np.empty((plan.n_samples, node.D))
        for a, b in blocks(plan.n_samples, SCAN_ROWS):
            x = np.empty((node.D, b - a))
            node.read(a, b, x)
            filled[a:b] = node.family.impute(theta[node.name], x, resp[a:b], node.read_aux(a, b)).T
        if node.family.standardize:
            filled = node.center + node.scale * filled
        # Observed values are returned as given, not through a round trip of the units.
        original = np.hstack([np.asarray(s, dtype=float) for s in node.sources])
        filled = np.where(np.isnan(original), filled, original)
        values = filled if node.levels is None else _labels(node.levels, filled)
        if node.stacked:
            for d, variable in enumerate(node.variables):
                out[variable] = out[variable].copy(data=_as_dtype(values[:, d], ds[variable]))
        else:
            variable = node.variables[0]
            da = ds[variable].transpose(plan.sample_dim, *node.event_dims)
            data = _as_dtype(values.reshape(da.shape), da)
            out[variable] = da.copy(data=data).transpose(*ds[variable].dims)
    return out


def _labels(levels: tuple, codes: np.ndarray) -> np.ndarray:
    labels = np.asarray(levels, dtype=object)[codes.astype(np.intp)]
    if all(isinstance(v, str) for v in levels):
        return labels.astype(str)
    return labels


def _as_dtype(values: np.ndarray, template: xr.DataArray) -> np.ndarray:
    """Keep the variable's dtype where the filled values allow it (labels stay labels)."""
    if values.dtype.kind in "OU" and template.dtype.kind in "OU":
        return values.astype(template.dtype) if template.dtype.kind == "U" else values
    return values
