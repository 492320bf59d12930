"""Draws from a fit at the covariates of given data, and the families a saved fit's regressions had."""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.data import is_chunked, is_dask
from emdsl.regression.concomitant import _ConcomitantWeights
from emdsl.regression.design import Terms
from emdsl.regression.families import _GLMRegression, _NormalRegression


def stored_family(decl: Any, params: Any) -> Any:
    """The family whose parameters a saved fit holds for ``decl`` (a regression's, with the stored terms)."""
    covariates = tuple(getattr(decl, "covariates", ()))
    if not covariates and getattr(decl, "intercept", True):
        return decl.family
    child = params.children.get(decl.name) if hasattr(params, "children") else None
    terms = Terms.of(child["term"]) if child is not None and "term" in child.coords else covariates
    if not hasattr(decl, "variables"):  # the latent
        return _ConcomitantWeights(decl.family, terms)
    if decl.family.kind == "Normal":
        return _NormalRegression(decl.family, covariates, terms, decl.intercept)
    return _GLMRegression(decl.family, covariates, terms, decl.intercept, decl.offset is not None)


def simulate(fit: Any, data: Any, seed: int | None = None) -> xr.Dataset:
    """Draw from ``fit`` at the covariates of ``data``: one draw per sample of ``data``.

    The states are drawn from the weights (each sample's own, with a latent's covariates;
    for a Markov latent, a path of the chain along each of the data's sequences), then each
    node's response given the state and the sample's covariates; ``data``'s other
    variables are kept (so are the holes a sequence ends with), and the states become a
    coordinate, as in ``Fit.sample``. On dask data the draws are lazy, chunk by chunk like
    the data (each chunk's draws come from ``seed`` and the chunk's first row, so they do
    not depend on the scheduler); in memory the data are one chunk, so one-chunk dask data
    give the same draws.

    Examples
    --------
    >>> import numpy as np, xarray as xr, emdsl as em
    >>> ds = xr.Dataset({"x": ("sample", np.arange(20.0)), "y": ("sample", 2 * np.arange(20.0) + np.sin(np.arange(20)))})
    >>> fit = em.Model().observe("y", em.Normal, covariates=["x"]).fit(ds)
    >>> simulate(fit, ds, seed=0)["y"].sizes["sample"]
    20
    """
    ds = labels.as_dataset(data)
    plan, theta, _ = fit._compiled(ds)
    entropy = np.random.SeedSequence(seed).entropy
    states, draws = _lazy_draws(plan, theta, entropy) if is_chunked(plan) else _draws(plan, theta, entropy, 0)
    sequences = plan.sequences
    # where a sample's values sit: (sample,), or a chain's (sequence dims..., markov dim)
    grid = ((plan.sample_dim,), (plan.n_samples,)) if sequences is None else (
        (*sequences.sequence_dims, sequences.dim), (*sequences.sequence_shape, sequences.length))
    out = ds.copy()
    for node, values in zip(_drawn(plan), draws, strict=True):
        if node.levels is not None:
            values = (values.map_blocks(_codes_as_levels, node.levels, dtype=object) if is_dask(values)
                      else _codes_as_levels(values, node.levels))
        if node.stacked:
            for d, variable in enumerate(node.variables):
                out[variable] = ds[variable].transpose(*grid[0]).copy(data=values[..., d].reshape(grid[1]))
        else:
            variable = node.variables[0]
            template = ds[variable].transpose(*grid[0], ...)
            out[variable] = template.copy(data=values.reshape(template.shape)).transpose(*ds[variable].dims)
    if plan.latent is not None:
        names = np.asarray(plan.latent.family.states, dtype=object)
        named = states.map_blocks(names.take, dtype=object) if is_dask(states) else names[states]
        out = out.assign_coords({plan.latent.name: (grid[0], named.reshape(grid[1]))})
    return labels.in_fitted_dtypes(out, getattr(fit, "data_dtypes", {}))


def _drawn(plan: Any) -> list[Any]:
    """The nodes :func:`simulate` draws: all but a latent's covariates (a hidden node)."""
    return [node for node in plan.nodes if plan.latent is None or node.name != plan.latent.name]


def _codes_as_levels(codes: np.ndarray, levels: Sequence[Any]) -> np.ndarray:
    """Level labels of codes; a NaN (a sequence's trailing hole) stays a hole (None)."""
    codes = np.asarray(codes, dtype=float)
    out = np.full(codes.shape, None, dtype=object)
    drawn = ~np.isnan(codes)
    out[drawn] = np.asarray(levels, dtype=object)[codes[drawn].astype(np.intp)]
    return out


def _draws(plan: Any, theta: Mapping[str, Any], entropy: int, start: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The states and each drawn node's values (codes for labels) over the plan's rows, from the
    generator of (``entropy``, ``start``: the rows' first global row): (N,) and (N × width), or
    for a Markov latent over its sequences' grid, (n_sequences × length) and (n_sequences ×
    length × width), the chain drawn to the grid's end and the values NaN past a sequence's end."""
    rng = np.random.default_rng([entropy, start])
    latent, sequences = plan.latent, plan.sequences
    hidden = [node for node in plan.nodes if latent is not None and node.name == latent.name]
    path = None
    if latent is None:
        states = np.zeros(plan.n_samples, dtype=np.intp)
    elif sequences is not None:
        from emdsl.latent.markov import sample_states

        path = sample_states(theta[latent.name], sequences.n_sequences, sequences.length, rng)
        states = path[sequences.observed]
    elif hidden:
        log_pi = hidden[0].family.log_weights_per_row(np.asarray(theta[latent.name]["coef"]),
                                                      np.asarray(hidden[0].sources[0], dtype=float).T)
        cumulative = np.cumsum(np.exp(log_pi), axis=0)
        states = np.minimum((rng.random(plan.n_samples) * cumulative[-1] > cumulative).sum(axis=0), plan.K - 1)
    else:
        states = latent.family.draw(theta[latent.name], plan.n_samples, rng)
    draws = []
    for node in _drawn(plan):
        params = node.family.to_original(theta[node.name], node.center, node.scale)
        if isinstance(node.family, _NormalRegression):
            values = node.family.sample(params, states, rng, {"design": node.aux["design"]})
        elif isinstance(node.family, _GLMRegression):
            values = node.family.sample(params, states, rng, {"columns": node.sources[0]})[:, :1]
        else:
            values = node.family.sample(params, states, rng, {key: value for key, value in node.aux.items()})
        values = np.asarray(values, dtype=float).reshape(plan.n_samples, -1)
        draws.append(values if sequences is None else sequences.scatter(values, np.nan))
    return (np.asarray(states, dtype=np.intp) if path is None else path), draws


def _lazy_draws(plan: Any, theta: Mapping[str, Any], entropy: int) -> tuple[Any, list[Any]]:
    """:func:`_draws` chunk by chunk, as dask arrays with the data's sample chunks (a Markov
    latent's: a chunk per run of whole sequences)."""
    import dask
    import dask.array as da

    from emdsl.data import dask_source

    slots, arrays = dask_source.layout(plan)
    starts, blocks = dask_source.chunk_blocks(arrays)
    sizes = np.diff([*starts, plan.n_samples]).astype(int)
    skeleton = dask.delayed(dask_source.skeleton(plan), traverse=False)
    theta_key = dask.delayed(dict(theta), traverse=False)
    parts = [dask.delayed(_draw_chunk, pure=True)(skeleton, slots, theta_key, entropy, start, *chunk)
             for start, chunk in zip(starts, blocks, strict=True)]
    sequences = plan.sequences
    shapes = ([(int(n),) for n in sizes] if sequences is None else
              [(b - a, sequences.length) for a, b in (sequences.sequences_in(start, start + int(n))
                                                      for start, n in zip(starts, sizes, strict=True))])

    def stacked(pick: Any, width: int | None, dtype: Any) -> Any:
        pieces = [da.from_delayed(dask.delayed(pick)(part), shape=shape if width is None else (*shape, width),
                                  dtype=dtype) for part, shape in zip(parts, shapes, strict=True)]
        return da.concatenate(pieces, axis=0)

    states = stacked(operator.itemgetter(0), None, np.intp)
    draws = [stacked(functools.partial(_pick, i), _draw_width(node), float) for i, node in enumerate(_drawn(plan))]
    return states, draws


def _draw_chunk(skeleton: Any, slots: Sequence[Any], theta: Mapping[str, Any], entropy: int, start: int,
                *blocks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    from emdsl.data import dask_source

    return _draws(dask_source.local_plan(skeleton, slots, blocks, start), theta, entropy, start)


def _pick(i: int, part: tuple[np.ndarray, list[np.ndarray]]) -> np.ndarray:
    return np.asarray(part[1][i], dtype=float)


def _draw_width(node: Any) -> int:
    """Columns of a node's draws: the response of a GLM, else the node's elements."""
    return 1 if isinstance(node.family, _GLMRegression) else node.D
