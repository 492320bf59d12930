"""Design matrices for covariates: terms, one-hot levels, checks, and their lazy (dask) twins."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.data import is_dask
from emdsl.errors import ModelError


#: normalized singular value of the design below which its columns count as collinear
_COLLINEAR = 1e-9


def within_reach(design: Any, step: np.ndarray, delta: float, joint: bool = True) -> np.ndarray:
    """``step`` (T, or m × T) shortened so that no row's linear predictor x_nᵀΔ moves by more than δ.

    ``joint``: one factor for all the rows of ``step`` (a concomitant's states move together);
    otherwise each row of ``step`` (a GLM state's Δ_k) is shortened on its own. ``design`` is the
    (N × T) design in memory, or a :class:`LazyDesign` over dask chunks (see there: a pass over
    the chunks only when a cheap bound cannot show that the step is within reach).
    """
    if design is None:
        return step
    steps = np.atleast_2d(np.asarray(step, dtype=float))
    reach = design.reaches(steps, delta) if isinstance(design, LazyDesign) else (
        np.abs(design @ steps.T).max(axis=0) if design.size else np.zeros(len(steps)))
    if joint:
        reach = np.full(len(steps), reach.max() if len(reach) else 0.0)
    factor = np.where(reach <= delta, 1.0, delta / np.where(reach > 0, reach, 1.0))
    out = steps * factor[:, None]
    return out.reshape(np.shape(step))


class LazyDesign:
    """A dask-backed design (N × T) for the trust region of the GLM and concomitant M-steps.

    max_n |x_nᵀΔ| is bounded without touching the data by the design's bounding box:
    |cᵀΔ| + Σ_t r_t |Δ_t|, with c and r the centre and half-width of each column's range
    (exact with one covariate and an intercept, whose column has r = 0). Only when that
    bound exceeds δ is the exact reach computed, in one dask pass over the chunks, so the
    steps (and the fit) are the in-memory path's; near the optimum the steps are small
    and the M-step needs no pass at all.
    """

    def __init__(self, array: Any, low: np.ndarray, high: np.ndarray) -> None:
        self.array, self.low, self.high = array, np.asarray(low, dtype=float), np.asarray(high, dtype=float)
        #: how many exact passes the M-steps have made (for tests and benchmarks)
        self.passes = 0

    @property
    def size(self) -> int:
        return int(np.prod(self.array.shape))

    def reaches(self, steps: np.ndarray, delta: float) -> np.ndarray:
        """max_n |x_nᵀs| for each row s of ``steps`` (m × T): exact where the box bound exceeds δ."""
        centre, half = (self.high + self.low) / 2, (self.high - self.low) / 2
        bound = np.abs(steps @ centre) + np.abs(steps) @ half
        unsure = bound > delta
        if not unsure.any():
            return bound
        import dask
        import dask.array as da

        self.passes += 1
        exact = dask.compute(da.abs(self.array @ steps[unsure].T).max(axis=0))[0]
        out = bound.copy()
        out[unsure] = np.asarray(exact, dtype=float)
        return out


def _lazy_block(response: Any, design: Any, extra: Any, n: int) -> Any:
    """A GLM node's columns (response, design, then the offset or the trials) as one lazy (N × D) dask array."""
    import dask.array as da

    from emdsl.data import dask_source, is_dask

    arrays = [a for a in (response, design, extra) if a is not None]
    chunks = next((tuple(a.chunks[0]) for a in arrays if is_dask(a)), (n,))
    parts = [dask_source.as_rows(np.asarray(a, dtype=float) if not is_dask(a) else a.astype(float), chunks)
             for a in arrays]
    parts[0] = parts[0].reshape(n, -1)[:, :1] if parts[0].ndim > 1 else parts[0][:, None]
    return dask_source.as_rows(da.concatenate(parts, axis=1), chunks)


class Terms(tuple):
    """A design's term names, with the baseline level of each categorical covariate that has one
    (an intercept's model: the first level gets no column). Recorded with the fit (the ``term``
    coordinate's ``baselines`` attribute), so that new data with a level the fit never saw are
    refused even when they lack the baseline (which the term names alone cannot tell apart)."""

    baselines: dict[str, str]

    def __new__(cls, names: Sequence[str], baselines: Mapping[str, str] | None = None) -> Terms:
        self = super().__new__(cls, names)
        self.baselines = dict(baselines if baselines is not None else getattr(names, "baselines", {}))
        return self

    @classmethod
    def of(cls, term: xr.DataArray) -> Terms:
        """The terms a fit's ``term`` coordinate holds, with the baselines recorded beside them (if any)."""
        try:
            baselines = json.loads(term.attrs.get("baselines", "{}"))
        except ValueError:
            baselines = {}
        if not isinstance(baselines, dict) or not all(isinstance(v, str) for v in baselines.values()):
            baselines = {}
        return cls([str(t) for t in term.values], baselines)


def design_matrix(ds: xr.Dataset, covariates: Sequence[str], intercept: bool, sample_dim: Hashable, where: str,
                  terms: Sequence[str] | None = None) -> tuple[np.ndarray, Terms]:
    """The design (N × T) and its term names: intercept, numeric covariates, one-hot levels."""
    n = int(ds.sizes[sample_dim])
    columns: list[np.ndarray] = [np.ones(n)] if intercept else []
    names: list[str] = ["intercept"] if intercept else []
    baselines: dict[str, str] = {}
    for name in covariates:
        da = ds[name]
        if da.dims != (sample_dim,):
            raise ModelError(f"{where}: the covariate {name!r} must be 1-D over {sample_dim!r}, got dims {da.dims}")
        categories = _categorical_labels(da)
        values = np.asarray(da.values) if categories is None else categories
        kind = values.dtype.kind
        if kind in "iuf" or kind == "b":  # (a pandas categorical's labels are an object array)
            if terms is not None and any(t.startswith(f"{name}[") for t in terms):
                raise ModelError(f"{where}: the covariate {name!r} is numeric in the new data, but the fit read it "
                                 f"as categorical (terms {[t for t in terms if t.startswith(f'{name}[')]}); give "
                                 "it as labels, e.g. .astype('category') as when fitting")
            numbers = values.astype(float)
            _no_missing(da, np.isnan(numbers), name, where)
            if np.isinf(numbers).any():
                raise ModelError(f"{where}: the covariate {name!r} has infinite values (first at "
                                 f"{labels.describe_position(da, int(np.flatnonzero(np.isinf(numbers))[0]))})")
            columns.append(numbers)
            names.append(name)
        elif kind in "OUS":
            raw = [None if _missing(v) else v for v in values.tolist()]
            _no_missing(da, np.array([v is None for v in raw]), name, where)
            if kind == "O" and not all(isinstance(v, str | bool | int | np.integer) for v in raw):
                bad = next(v for v in raw if not isinstance(v, str | bool | int | np.integer))
                raise ModelError(f"{where}: the covariate {name!r} is neither numeric nor categorical (it holds "
                                 f"{type(bad).__name__} values such as {bad!r}); convert it to numbers or to labels")
            kept = _kept_levels(where, name, da, {str(v) for v in raw}, terms, intercept, baselines)
            text = np.array([str(v) for v in raw], dtype=object)
            for level in kept:
                columns.append((text == str(level)).astype(float))
                names.append(f"{name}[{level}]")
        else:
            raise ModelError(f"{where}: the covariate {name!r} is neither numeric nor categorical (dtype "
                             f"{values.dtype}); convert it to numbers (e.g. days since a date) or to labels")
    if terms is not None and list(terms) != names:
        raise ModelError(f"{where}: the new data give the terms {names}, but the fit has {list(terms)}")
    return (np.column_stack(columns) if columns else np.zeros((n, 0))), Terms(names, baselines)


def _kept_levels(where: str, name: str, da: xr.DataArray, strings: set[str], terms: Sequence[str] | None,
                 intercept: bool, baselines: dict[str, str]) -> list[Any]:
    """The levels of a categorical covariate ``da`` (its values as text: ``strings``) that get a column:
    all but the first (the baseline, recorded in ``baselines``) when there is an intercept; for new
    data (``terms`` given), the fit's, and no level it did not see."""
    if terms is None:
        levels = _levels(da, strings)
        if len(levels) < 2 and intercept:
            raise ModelError(f"{where}: the covariate {name!r} is constant (every value is {levels[0]!r}); "
                             "it duplicates the intercept. Drop it")
        if intercept:
            baselines[name] = levels[0]
        return levels[1:] if intercept else levels
    kept = [t[len(name) + 1:-1] for t in terms if t.startswith(f"{name}[") and t.endswith("]")]
    baseline = getattr(terms, "baselines", {}).get(name)
    if baseline is not None:  # the fit recorded its baseline level: any other level is new
        unseen = sorted(strings - set(kept) - {baseline})
        if unseen:
            raise ModelError(f"{where}: the covariate {name!r} has levels {unseen} that the fit did not see "
                             f"(it knows {[baseline, *kept]})")
        return kept
    outside = sorted(strings - set(kept))
    if len(outside) > 1 or (outside and not intercept):
        raise ModelError(f"{where}: the covariate {name!r} has levels {outside} that the fit did not "
                         f"see (it knows {kept} and one baseline level)")
    return kept


def check_design(design: Any, terms: Sequence[str], covariates: Sequence[str], intercept: bool,
                 where: str) -> None:
    """Refuse constant covariates (with an intercept) and collinear terms, naming them.

    ``design`` is the (N × T) design, or a :class:`DesignSummary` of a dask-backed one: the
    columns' ranges and the R of its QR decomposition, whose singular values and right
    singular vectors are the design's.
    """
    if isinstance(design, DesignSummary):
        low, high, matrix = design.low, design.high, design.r
    else:
        low, high, matrix = design.min(axis=0), design.max(axis=0), design
    if intercept:
        for j, term in enumerate(terms[1:], start=1):
            if low[j] == high[j]:
                owner = next(c for c in covariates if term == c or term.startswith(f"{c}["))
                raise ModelError(f"{where}: the covariate {owner!r} is constant (every value is "
                                 f"{_show(low[j], term)}); it duplicates the intercept. Drop it")
    norms = np.linalg.norm(matrix, axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    _, singular, vt = np.linalg.svd(matrix / norms, full_matrices=False)
    if len(singular) and singular[-1] <= _COLLINEAR * singular[0]:
        null = vt[-1] / norms
        involved = [terms[j] for j in np.flatnonzero(np.abs(vt[-1]) > 1e-6 * np.abs(vt[-1]).max())]
        j = int(np.argmax(np.abs(vt[-1])))
        relation = " + ".join(f"{-null[i] / null[j]:.4g}·{terms[i]}" for i in range(len(terms))
                              if i != j and terms[i] in involved)
        raise ModelError(f"{where}: the terms {involved} are collinear ({terms[j]} = {relation}); "
                         "their coefficients cannot be told apart. Drop one of them")


def _show(value: float, term: str) -> str:
    return f"{value:g}" if "[" not in term else ("the baseline level" if value == 0 else term)


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _no_missing(da: xr.DataArray, missing: np.ndarray, name: str, where: str) -> None:
    if missing.any():
        count = int(missing.sum())
        raise ModelError(f"{where}: the covariate {name!r} has {count} missing value{'s' if count > 1 else ''} "
                         f"(first at {labels.describe_position(da, int(np.flatnonzero(missing)[0]))}); a covariate "
                         "must be known for every sample: drop those samples or fill the covariate in")


def _levels(da: xr.DataArray, present: set[str]) -> list[str]:
    """A categorical covariate's levels (as text; ``present``: its values), the first being the baseline:
    a pandas categorical's categories in their order, those that occur (an unused one would be a
    column of zeros, which no coefficient can fit); otherwise the distinct values, sorted."""
    categories = getattr(da.dtype, "categories", None)
    if categories is not None:
        return [level for level in map(str, categories) if level in present]
    return sorted(present)


def _categorical_labels(da: xr.DataArray) -> np.ndarray | None:
    """A pandas categorical covariate as an object array of its labels as text (None where missing),
    whatever its categories' type (integer codes of sites are categorical too); None for other dtypes."""
    if getattr(da.dtype, "categories", None) is None:
        return None
    series = da.to_pandas()
    names = [str(c) for c in series.cat.categories]
    return np.array([names[c] if c >= 0 else None for c in series.cat.codes.to_numpy()], dtype=object)


# -- dask-backed covariates: the design stays lazy, its checks are passes over the chunks -------------
@dataclasses.dataclass
class DesignSummary:
    """One pass over a dask-backed design: each column's range and the R of its QR decomposition (T × T)."""

    low: np.ndarray
    high: np.ndarray
    r: np.ndarray


def lazy(ds: xr.Dataset, names: Sequence[str | None]) -> bool:
    """Whether any of the named data variables is dask-backed."""
    from emdsl.data import is_dask

    return any(name is not None and name in ds.data_vars and is_dask(ds[name].data) for name in names)


def _chunks_of(ds: xr.Dataset, names: Sequence[str | None], n: int) -> tuple[int, ...]:
    """The sample chunks of the first dask-backed variable among ``names`` (one chunk if none is)."""
    from emdsl.data import is_dask

    for name in names:
        if name is not None and name in ds.data_vars and is_dask(ds[name].data):
            return tuple(int(c) for c in ds[name].data.chunks[0])
    return (n,)


def _covariate_part(kinds: list[str], start: int, *blocks: np.ndarray) -> list[list[Any]]:
    """Per covariate of one chunk: [(missing, first), (infinite, first), (first bad index, value), labels]."""
    out = []
    for kind, block in zip(kinds, blocks, strict=True):
        values = np.asarray(block)
        if kind == "numeric":
            numbers = values.astype(float)
            found = [_first(np.isnan(numbers), start), _first(np.isinf(numbers), start), (-1, None), set()]
        else:
            raw = values.tolist()
            missing = np.array([_missing(v) for v in raw], dtype=bool)
            bad = (-1, None)
            if values.dtype.kind == "O":
                wrong = [i for i, v in enumerate(raw) if not missing[i]
                         and not isinstance(v, str | bool | int | np.integer)]
                bad = (start + wrong[0], raw[wrong[0]]) if wrong else (-1, None)
            found = [_first(missing, start), (0, -1), bad,
                     {str(v) for v, gone in zip(raw, missing, strict=True) if not gone}]
        out.append(found)
    return out


def _first(flags: np.ndarray, start: int) -> tuple[int, int]:
    count = int(flags.sum())
    return (count, start + int(np.flatnonzero(flags)[0])) if count else (0, -1)


def _earlier(a: tuple[int, Any], b: tuple[int, Any]) -> tuple[int, Any]:
    return a if a[0] >= 0 and (b[0] < 0 or a[0] <= b[0]) else b


def _covariate_combine(a: list[list[Any]], b: list[list[Any]]) -> list[list[Any]]:
    from emdsl.data.dask_source import _add_first

    return [[_add_first(x[0], y[0]), _add_first(x[1], y[1]), _earlier(x[2], y[2]), x[3] | y[3]]
            for x, y in zip(a, b, strict=True)]


def _design_chunk(specs: list[list[str] | None], intercept: bool, like: np.ndarray, *columns: np.ndarray
                  ) -> np.ndarray:
    """One chunk's design rows, as :func:`design_matrix` builds them (``specs``: None numeric, else levels)."""
    n = len(like)
    parts: list[np.ndarray] = [np.ones(n)] if intercept else []
    for spec, values in zip(specs, columns, strict=True):
        values = np.asarray(values)
        if spec is None:
            parts.append(values.astype(float))
        else:
            text = np.array([str(v) for v in values.tolist()], dtype=object)
            parts.extend((text == str(level)).astype(float) for level in spec)
    return np.column_stack(parts) if parts else np.zeros((n, 0))


def lazy_design_matrix(ds: xr.Dataset, covariates: Sequence[str], intercept: bool, sample_dim: Hashable,
                       where: str, terms: Sequence[str] | None, chunks: tuple[int, ...]) -> tuple[Any, Terms]:
    """:func:`design_matrix` over dask-backed covariates: a lazy (N × T) design with sample ``chunks``.

    One pass over the covariates finds what the in-memory path checks (holes, infinities,
    non-categorical values) and a categorical covariate's levels; the same messages, the
    same terms. The design is then built chunk by chunk, whenever a pass reads it.
    """
    import dask.array as da

    from emdsl.data import dask_source

    n = int(ds.sizes[sample_dim])
    kinds, arrays = [], []
    for name in covariates:
        array = ds[name]
        if array.dims != (sample_dim,):
            raise ModelError(f"{where}: the covariate {name!r} must be 1-D over {sample_dim!r}, got dims {array.dims}")
        kind = array.dtype.kind
        if kind not in "iufbOUS":
            raise ModelError(f"{where}: the covariate {name!r} is neither numeric nor categorical (dtype "
                             f"{array.dtype}); convert it to numbers (e.g. days since a date) or to labels")
        kinds.append("numeric" if kind in "iufb" else "categorical")
        arrays.append(dask_source.as_rows(dask_source.values_of(array), chunks))
    found = dask_source.scan(arrays, functools.partial(_covariate_part, kinds), _covariate_combine) if arrays else []
    names: list[str] = ["intercept"] if intercept else []
    baselines: dict[str, str] = {}
    specs: list[list[str] | None] = []
    for name, kind, (missing, infinite, bad, strings) in zip(covariates, kinds, found, strict=True):
        da_ = ds[name]
        if missing[0]:
            count = missing[0]
            raise ModelError(f"{where}: the covariate {name!r} has {count} missing value{'s' if count > 1 else ''} "
                             f"(first at {labels.describe_position(da_, missing[1])}); a covariate must be known "
                             "for every sample: drop those samples or fill the covariate in")
        if kind == "numeric":
            if infinite[0]:
                raise ModelError(f"{where}: the covariate {name!r} has infinite values (first at "
                                 f"{labels.describe_position(da_, infinite[1])})")
            specs.append(None)
            names.append(name)
            continue
        if bad[0] >= 0:
            raise ModelError(f"{where}: the covariate {name!r} is neither numeric nor categorical (it holds "
                             f"{type(bad[1]).__name__} values such as {bad[1]!r}); convert it to numbers or to labels")
        kept = _kept_levels(where, name, da_, strings, terms, intercept, baselines)
        specs.append(list(kept))
        names.extend(f"{name}[{level}]" for level in kept)
    if terms is not None and list(terms) != names:
        raise ModelError(f"{where}: the new data give the terms {names}, but the fit has {list(terms)}")
    like = da.zeros(n, chunks=(chunks,))
    design = da.map_blocks(functools.partial(_design_chunk, specs, intercept), like, *arrays, new_axis=1,
                           chunks=(chunks, (len(names),)), dtype=float, meta=np.empty((0, 0)))
    return design, Terms(names, baselines)


def _summary_part(start: int, design: np.ndarray) -> DesignSummary:
    X = np.asarray(design, dtype=float)
    T = X.shape[1]
    if not len(X):
        return DesignSummary(np.full(T, np.inf), np.full(T, -np.inf), np.zeros((0, T)))
    return DesignSummary(X.min(axis=0), X.max(axis=0), np.linalg.qr(X, mode="r"))


def _summary_combine(a: DesignSummary, b: DesignSummary) -> DesignSummary:
    # R of [Xa; Xb] from R of [Ra; Rb] (a tall-skinny QR, tree-combined)
    return DesignSummary(np.minimum(a.low, b.low), np.maximum(a.high, b.high),
                         np.linalg.qr(np.vstack([a.r, b.r]), mode="r"))


def design_summary(design: Any) -> DesignSummary:
    """One pass over a dask-backed design: column ranges and R (for :func:`check_design` and the trust region)."""
    from emdsl.data import dask_source

    return dask_source.scan([design], _summary_part, _summary_combine)


def _observed_combine(a: tuple[list[int], np.ndarray], b: tuple[list[int], np.ndarray]
                      ) -> tuple[list[int], np.ndarray]:
    return a[0] + b[0], a[1] + b[1]


def _observed_rows(start: int, block: np.ndarray) -> np.ndarray:
    return (start + np.flatnonzero(~np.isnan(np.asarray(block, dtype=float)[:, 0]))).astype(np.intp)


def _lazy_rows(block: Any, counts: Sequence[int]) -> Any:
    """The global rows with an observed response, as a lazy dask array (its chunk sizes are known)."""
    import dask
    import dask.array as da

    starts = np.concatenate([[0], np.cumsum(block.chunks[0])[:-1]]).astype(int)
    pieces = [da.from_delayed(dask.delayed(_observed_rows, pure=True)(int(start), part), shape=(int(count),),
                              dtype=np.intp)
              for start, part, count in zip(starts, block.to_delayed().ravel(), counts, strict=True)]
    return da.concatenate(pieces) if len(pieces) > 1 else pieces[0]
