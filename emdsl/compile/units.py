"""Standardization: the units each node is fitted in, and the checks on the data's range."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from emdsl import labels
from emdsl.compile.plan import _HUGE, Node, Plan, _element_blocks
from emdsl.data import is_dask
from emdsl.errors import ModelError


#: the farthest, in standard deviations of the training data, that a value or a mean may lie
#: from the data's mean: its square (a sufficient statistic, and μ² in A(η)) stays below 1e200,
#: which leaves the E-step's sums and products over many elements and small variances finite
FARTHEST = 1e100
#: relative spread below which a variable counts as constant: the rounding of its values
_CONSTANT = 1e-14
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
