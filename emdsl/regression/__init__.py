r"""Covariates: regressions inside components, and covariates on the mixture weights.

The package's modules: :mod:`~emdsl.regression.families` (the Normal regression and the
GLMs, as observed families), :mod:`~emdsl.regression.concomitant` (covariates on the
weights), :mod:`~emdsl.regression.design` (design matrices, eager and lazy, and their
checks), :mod:`~emdsl.regression.draws` (:func:`simulate`, and the families a saved fit
holds); here, the declaration's checks and :func:`bind`, which builds a node's family
from the data.

**The Normal regression.**

``observe("y", em.Normal, covariates=["dose", "sex"])`` makes y | z=k ~ N(x_nᵀβ_k, σ²_k)
(a mixture of linear regressions, flexmix's ``FLXMRglm()``), with x_n the design row
["intercept", dose, sex[male], ...]: an intercept unless ``intercept=False``, numeric
covariates as they are, categorical ones one-hot against their first level (a pandas
categorical's first category that occurs, else the first in sorted order), in labelled
``term``\s. It stays an exponential family in the joint statistics of (y, x):

.. math::

    \log p(y \mid x, \beta, \sigma^2) = -\tfrac12\log\sigma^2
        + \frac{y\, x^\top\beta}{\sigma^2} - \frac{y^2}{2\sigma^2}
        - \frac{\beta^\top x x^\top \beta}{2\sigma^2} - \tfrac12\log 2\pi ,

    \phi(y, x) = \big(1,\ y\,x,\ y^2,\ \mathrm{vech}(x x^\top)\big),

so the node owns 1 + T + 1 + T(T+1)/2 rows of Φ (T terms), its sums are XᵀRy, yᵀRy and
XᵀRX per state, and the M-step is weighted least squares in closed form:
β_k = (XᵀR_kX)⁻¹ XᵀR_k y and σ²_k = (yᵀR_ky − 2β_kᵀXᵀR_ky + β_kᵀXᵀR_kXβ_k) / N_k — a sum
over blocks like every other node. y is standardized internally (the covariates are
used as they are); ``coef`` and ``variance`` are reported in the data's units.

Validation (here, at compile time): a covariate that is missing from the data, not
1-D over the samples, missing anywhere (NaN or None), constant (with an intercept),
neither numeric nor categorical, or collinear with others is a ``ModelError`` naming it.

Dask-backed covariates stay lazy (:func:`lazy_design_matrix`): one pass finds holes,
infinities and a categorical covariate's levels, one more (when fitting) the columns'
ranges and the R of the design's tall-skinny QR (the collinearity check reads R's
singular values, which are the design's), and the design is built chunk by chunk inside
each pass. A GLM's columns (response, design, offset or trials) become one lazy block
whose rows with an observed response each chunk's task finds for itself.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from emdsl.data import is_dask
from emdsl.errors import ModelError
from emdsl.families._base import ObservedFamily
from emdsl.regression.concomitant import bind_concomitant, check_concomitant
from emdsl.regression.design import (
    LazyDesign,
    Terms,
    _chunks_of,
    _lazy_block,
    _lazy_rows,
    _observed_combine,
    check_design,
    design_matrix,
    design_summary,
    lazy,
    lazy_design_matrix,
)
from emdsl.regression.draws import simulate, stored_family
from emdsl.regression.families import (
    LOG_LINK,
    SUPPORTED,
    _GLMRegression,
    _NormalRegression,
    _anchor,
    _observed_part,
    start_anchor,
)
__all__ = ["bind", "bind_concomitant", "check_concomitant", "check_declaration", "simulate", "stored_family"]


def check_declaration(where: str, family: ObservedFamily, variables: Sequence[str], covariates: Any,
                      intercept: Any, offset: Any) -> tuple[tuple[str, ...], bool, str | None]:
    """Validate ``observe(..., covariates=, intercept=, offset=)``; return them normalized."""
    if offset is not None:
        if family.kind not in LOG_LINK:
            raise ModelError(f"{where}: offset={offset!r} needs a family with a log link (em.Poisson); "
                             f"{family.kind} has none (an offset is added to log E[y])")
        if not isinstance(offset, str) or not offset:
            raise ModelError(f"{where}: offset must name a data variable (log exposure), got {offset!r}")
    if not isinstance(intercept, bool):
        raise ModelError(f"{where}: intercept must be True or False, got {intercept!r}")
    prior = getattr(family, "prior", None)
    if getattr(prior, "on_coefficients", False) and covariates is None:
        raise ModelError(f"{where}: {prior!r} is a prior on a regression's coefficients; give covariates= "
                         "(or a prior on the family's own parameters, see em.priors)")
    if prior is not None and covariates is not None and not getattr(prior, "on_coefficients", False):
        raise ModelError(f"{where}: {prior!r} is a prior on a plain {family.kind}'s parameters; with covariates= "
                         "put em.priors.Normal(mean, scale) on the coefficients instead")
    if covariates is None:
        if offset is not None:
            raise ModelError(f"{where}: offset={offset!r} is part of a regression; give covariates= too")
        return (), True, None
    if isinstance(covariates, str):
        covariates = [covariates]
    if not hasattr(covariates, "__iter__") or isinstance(covariates, Mapping | set | frozenset | bytes):
        raise ModelError(f"{where}: covariates must be a list of data variable names, got {covariates!r}")
    names = tuple(str(c) if isinstance(c, str) else c for c in covariates)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ModelError(f"{where}: covariates must be data variable names (non-empty strings), got {name!r}")
    if len(set(names)) != len(names):
        raise ModelError(f"{where}: a covariate is listed twice in {list(names)}")
    clash = [name for name in names if name in variables]
    if clash:
        raise ModelError(f"{where}: {clash[0]!r} is both the response and a covariate")
    if not names and not intercept:
        raise ModelError(f"{where}: covariates=[] with intercept=False leaves no term to fit")
    if family.kind not in SUPPORTED:
        raise ModelError(f"{where}: covariates are implemented for em.Normal (linear regression), em.Poisson "
                         f"(log link), em.Bernoulli and em.Binomial (logit link); not for {family.kind}")
    fixed = sorted(set(family.fixed) - {"variance"})
    if fixed:
        raise ModelError(f"{where}: {fixed} fixed in {family!r} cannot go with covariates, "
                         "which make them depend on each sample")
    if len(variables) != 1:
        raise ModelError(f"{where}: a regression has one response variable; observe each in its own node")
    return names, intercept, offset


def bind(node: Any, covariates: Sequence[str], intercept: bool, ds: xr.Dataset, sample_dim: Hashable,
         terms: Sequence[str] | None = None, fitting: bool = True, offset: str | None = None) -> None:
    """Turn a compiled node into a regression on ``covariates``: its family and its design.

    ``terms`` are the fit's terms when new data are scored: the new design must have
    the same columns (a categorical covariate's levels are read off the term names).
    A Normal node keeps its rows of Φ (the design rides in ``node.aux``); a GLM node's
    data become one (N × D) block of columns — response, design, then the offset or the
    Binomial's trials — and every row with an observed response takes the per-row path.
    """
    where = node.where()
    for name in tuple(covariates) + ((offset,) if offset is not None else ()):
        if name not in ds.data_vars:
            available = ", ".join(map(repr, ds.data_vars)) or "none"
            what = "offset" if name == offset else "covariate"
            raise ModelError(f"{where}: the {what} {name!r} is not in the data{' (new data)' if not fitting else ''}"
                             f"; available: {available}")
    from emdsl.data import is_dask

    n = int(ds.sizes[sample_dim])
    trials = node.aux.get("trials") if isinstance(getattr(node.family, "trials", None), str) else None
    chunked = lazy(ds, covariates) or is_dask(node.sources[0]) or lazy(ds, [offset]) or is_dask(trials)
    summary = None
    if lazy(ds, covariates):  # dask-backed covariates: a lazy design with their chunks, checked in one pass
        design, found = lazy_design_matrix(ds, covariates, intercept, sample_dim, where, terms,
                                           _chunks_of(ds, covariates, n))
        if fitting:
            summary = design_summary(design)
            check_design(summary, found, covariates, intercept, where)
    else:
        design, found = design_matrix(ds, covariates, intercept, sample_dim, where, terms)
        if fitting:
            check_design(design, found, covariates, intercept, where)
    if node.family.kind == "Normal":
        node.family = _NormalRegression(node.family, tuple(covariates), Terms(found), intercept)
        node.aux["design"] = design
        return
    names = [node.variables[0], *found]
    if offset is not None:
        bad = ds[offset].dtype.kind not in "iufb" or ds[offset].dims != (sample_dim,)
        if not bad and is_dask(ds[offset].data):
            from emdsl.data import dask_source

            values = dask_source.values_of(ds[offset]).astype(float)
            bad = dask_source.first_bad(values[:, None], lambda x: ~np.isfinite(x))[0] > 0
        elif not bad:
            values = np.asarray(ds[offset].values, dtype=float)
            bad = not np.all(np.isfinite(values))
        if bad:
            raise ModelError(f"{where}: the offset {offset!r} must be finite numbers over {sample_dim!r} "
                             "(a log exposure; log 0 = −inf means no exposure: drop those samples)")
        extra = values[:, None]
        names.append(f"offset:{offset}")
    elif trials is not None:
        node.aux.pop("trials")
        extra = trials.astype(float)[:, :1]
        names.append(f"trials:{node.family.trials}")
    else:
        extra = None
    if chunked:
        block = _lazy_block(node.sources[0], design, extra, n)
    else:
        columns = [np.asarray(node.sources[0], dtype=float).reshape(-1, 1), design]
        block = np.hstack(columns + ([np.asarray(extra, dtype=float)] if extra is not None else []))
        observed = np.flatnonzero(~np.isnan(block[:, 0])).astype(np.intp)
    reach: Any = design
    if chunked and not isinstance(design, np.ndarray):
        reach = LazyDesign(design, summary.low, summary.high) if summary is not None else None
    node.family = _GLMRegression(node.family, tuple(covariates), Terms(found), intercept, offset is not None, reach)
    if chunked:  # one pass: each chunk's count of observed responses, and the sums the start's anchor needs
        from emdsl.data import dask_source

        counts, totals = dask_source.scan([block], functools.partial(_observed_part, node.family), _observed_combine)
        observed = _lazy_rows(block, counts)
    node.sources = [block]
    node.event_dims, node.event_shape, node.event_coords = ("column",), (block.shape[1],), {"column": names}
    node.aux.clear()
    # Every row with an observed response takes the per-row path (on dask data: a lazy array of
    # those rows, whose length is known; each chunk's task finds its own rows again).
    node.partial_rows = observed
    node.partial_pattern = (np.zeros(len(observed), dtype=np.intp) if isinstance(observed, np.ndarray)
                            else observed * 0)
    node.patterns = [np.ones(block.shape[1], dtype=bool)]
    if fitting:
        node.family.anchor = (start_anchor(node.family, block[observed]) if not chunked
                              else _anchor(node.family, *totals) if sum(counts) else np.zeros(node.family.T))
