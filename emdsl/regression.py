r"""Covariates: a Normal observation whose mean is linear in covariates, per latent state.

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

import dataclasses
import functools
import json
import operator
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.data import is_chunked, is_dask
from emdsl.errors import ModelError
from emdsl.families._base import (
    Axes,
    Floored,
    LatentFamily,
    Marginal,
    ObservedFamily,
    Params,
    empty_components,
    safe_counts,
)
from emdsl.families.normal import LOG_2PI, apply_floor, gaussian_marginal

#: families that take covariates, and those whose link is the log (they may take an offset)
SUPPORTED = ("Normal", "Poisson", "Bernoulli", "Binomial")
LOG_LINK = ("Poisson",)
#: normalized singular value of the design below which its columns count as collinear
_COLLINEAR = 1e-9


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


def check_concomitant(where: str, family: LatentFamily, markov: str | None, covariates: Any) -> tuple[str, ...]:
    """Validate ``latent(..., covariates=)``; return the names."""
    if markov is not None:
        raise ModelError(f"{where}: covariates on a Markov latent (transition rows that depend on covariates) "
                         "are not supported; drop markov= or covariates=")
    if family.k < 2:
        raise ModelError(f"{where}: covariates move the weights of several states; {family!r} has one")
    if family.fixed:
        raise ModelError(f"{where}: fixed weights {family!r} cannot depend on covariates")
    if isinstance(covariates, str):
        covariates = [covariates]
    if not hasattr(covariates, "__iter__") or isinstance(covariates, Mapping | set | frozenset | bytes):
        raise ModelError(f"{where}: covariates must be a list of data variable names, got {covariates!r}")
    names = tuple(covariates)
    if not names:
        raise ModelError(f"{where}: covariates=[] is the plain mixture; leave covariates out")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ModelError(f"{where}: covariates must be data variable names (non-empty strings), got {name!r}")
    if len(set(names)) != len(names):
        raise ModelError(f"{where}: a covariate is listed twice in {list(names)}")
    return names


class _CoefficientPrior:
    """A Gaussian prior on ``coef`` (em.priors.Normal), bound per term: mean m and precision 1/s² (0: flat)."""

    prior: Any = None
    prior_type = None  # no weak prior for coefficients (docs/design.md, "The weak prior")
    terms: tuple[str, ...]

    def prior_axes(self) -> dict[str, Axes]:
        return {"mean": ("term",), "scale": ("term",)}  # type: ignore[dict-item]

    def standard_prior(self, values: Mapping[str, np.ndarray], center: np.ndarray | None,
                       scale: np.ndarray | None) -> Params:
        mean = np.array(values["mean"], dtype=float).reshape(-1)
        sd = np.array(values["scale"], dtype=float).reshape(-1)
        if getattr(self, "standardize", False) and center is not None and scale is not None:
            # coef' = (coef − c e₀) / s: the intercept's mean moves, every mean and scale shrinks by s
            mean[0] -= float(center[0])
            mean /= float(scale[0])
            sd = sd / float(scale[0])
        return {"mean": mean, "precision": np.where(np.isinf(sd), 0.0, 1.0 / sd**2)}

    def check_prior(self, values: Mapping[str, np.ndarray], where: str) -> None:
        if not np.all(np.isfinite(values["mean"])):
            raise ModelError(f"{where}: the mean must be finite for every term")

    def prior_jacobian(self, scale: np.ndarray | None, K: int) -> float:
        # coef = s coef' (+ c for the intercept): −log s per coefficient under a proper prior
        if not getattr(self, "standardize", False) or scale is None:
            return 0.0
        sd = np.broadcast_to(np.asarray(self.prior.scale, dtype=float), (len(self.terms),))
        return -K * int(np.isfinite(sd).sum()) * float(np.log(scale[0]))

    def log_prior(self, params: Params, prior: Any) -> tuple[float, float]:
        from emdsl import priors

        proper = prior["precision"] > 0
        coef = np.asarray(params["coef"], dtype=float)[:, proper]
        terms = priors.normal_terms(coef, prior["mean"][proper], 1.0 / prior["precision"][proper])
        value, size = priors.total(terms)
        return value + prior.log_jacobian, size + abs(prior.log_jacobian)


def _penalized(gram: np.ndarray, rhs: np.ndarray, precision: np.ndarray, mean: np.ndarray,
               weight: float = 1.0) -> np.ndarray:
    """argmax of −½βᵀGβ + βᵀv − ½ w (β − m)ᵀ diag(P) (β − m): (G + w P) β = v + w P m."""
    system = gram + weight * np.diag(precision)
    target = rhs + weight * precision * mean
    try:
        return np.linalg.solve(system, target)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(system, target, rcond=None)[0]


class _NormalRegression(_CoefficientPrior, ObservedFamily):
    """A Normal node whose mean is linear in covariates, bound to its terms (built by :func:`bind`)."""

    param_names = ("coef", "variance")
    standardize = True
    continuous = True
    constraints: ClassVar[dict[str, str]] = {"coef": "real", "variance": "positive"}

    def __init__(self, base: ObservedFamily, covariates: tuple[str, ...], terms: tuple[str, ...],
                 intercept: bool) -> None:
        self.base, self.covariates, self.terms, self.intercept = base, covariates, terms, intercept
        self.tied = getattr(base, "tied", None)
        self.floor = base.floor
        self._variance = getattr(base, "_variance", None)
        self.prior = base.prior  # a coefficient prior (check_declaration refuses any other)
        if not intercept:
            # Centering y would add an implicit intercept: without one, y stays in the data's units.
            self.standardize = False  # type: ignore[misc]

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def seeds_kmeans(self) -> bool:
        # The response mixes the covariates' effect with the states': two crossing regression
        # curves share every level of y, and k-means on y (the same split from any seeds, so
        # every restart alike) put the start on a wrong split: on flexmix's NPreg design all 20
        # restarts ended at ℓ = −697.4, against −618.6 from random labels (as a GLM node, and
        # flexmix, start). The states are seeded on the other nodes, else by random labels.
        return False

    def arguments(self) -> dict[str, Any]:
        return {"variance": self._variance}

    @property
    def T(self) -> int:
        return len(self.terms)

    def param_axes(self) -> dict[str, Axes]:
        variance: Axes = ("event",) if self.tied == "variance" else ("latent", "event")
        return {"coef": ("latent", "term"), "variance": variance}  # type: ignore[dict-item]

    def n_rows(self, D: int) -> int:
        T = self.T
        return 2 + T + T * (T + 1) // 2

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        T, X = self.T, aux["design"]
        observed = ~np.isnan(x[0])
        y = np.where(observed, x[0], 0.0)
        out[0] = observed
        np.multiply(X, y, out=out[1:1 + T])
        np.multiply(y, y, out=out[1 + T])
        upper = np.triu_indices(T)
        np.multiply(X[upper[0]], X[upper[1]], out=out[2 + T:])
        if not observed.all():
            out[2 + T:] *= observed

    def natural(self, params: Params) -> np.ndarray:
        coef = np.asarray(params["coef"], dtype=float)
        K, T = coef.shape
        variance = np.broadcast_to(np.asarray(params["variance"], dtype=float).reshape(-1), (K,))
        precision = 1.0 / variance
        upper = np.triu_indices(T)
        factor = np.where(upper[0] == upper[1], 1.0, 2.0)
        return np.hstack([(-0.5 * np.log(variance))[:, None], coef * precision[:, None], (-0.5 * precision)[:, None],
                          -0.5 * precision[:, None] * factor * coef[:, upper[0]] * coef[:, upper[1]]])

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return -0.5 * LOG_2PI * (~np.isnan(x)).sum(axis=0)

    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: Any = None) -> tuple[Params, Floored]:
        K, T = stats.shape[0], self.T
        nk, s_xy, s_yy = stats[:, 0], stats[:, 1:1 + T], stats[:, 1 + T]
        gram = np.zeros((K, T, T))
        upper = np.triu_indices(T)
        gram[:, upper[0], upper[1]] = stats[:, 2 + T:]
        gram[:, upper[1], upper[0]] = stats[:, 2 + T:]
        empty = empty_components(nk)
        before = previous or {}
        fallback = self.default_params(K, 1)
        if "coef" in hold:
            coef = np.broadcast_to(np.asarray(hold["coef"], dtype=float), (K, T)).copy()
        else:
            coef = np.empty((K, T))
            for k in range(K):
                if empty[k]:
                    coef[k] = before.get("coef", fallback["coef"])[k]
                    continue
                try:
                    coef[k] = np.linalg.solve(gram[k], s_xy[k])
                except np.linalg.LinAlgError:  # a state whose weighted rows do not span the terms
                    coef[k] = np.linalg.lstsq(gram[k], s_xy[k], rcond=None)[0]
            if prior is not None:  # ECM: the ridge-like MAP of β given the current σ², then σ² given β
                given = self._conditioning_variance(hold, before, coef, nk, s_xy, s_yy, gram)
                for k in np.flatnonzero(~empty):
                    coef[k] = _penalized(gram[k], s_xy[k], prior["precision"], prior["mean"], float(given[k]))
        rss = s_yy - 2.0 * np.einsum("kt,kt->k", coef, s_xy) + np.einsum("kt,kts,ks->k", coef, gram, coef)
        if "variance" in hold:
            return {"coef": coef, "variance": np.asarray(hold["variance"], dtype=float)}, []
        if self.tied == "variance":
            total = max(float(nk.sum()), 1e-300)
            pooled = np.array([max(float(rss.sum()), 0.0) / total])
            variance, low = apply_floor(pooled, self.floor, mean_square=np.array([s_yy.sum() / total]), tied=True)
            return {"coef": coef, "variance": variance}, [(-1, float(pooled[0]))] if low.any() else []
        counts = safe_counts(nk)
        raw = np.where(empty, before.get("variance", fallback["variance"]).reshape(-1), np.maximum(rss, 0.0) / counts)
        variance, low = apply_floor(raw, self.floor, mean_square=np.where(empty, 0.0, s_yy / counts))
        return {"coef": coef, "variance": variance[:, None]}, [(int(k), float(raw[k])) for k in np.flatnonzero(low)]

    def _conditioning_variance(self, hold: Params, before: Params, ols: np.ndarray, nk: np.ndarray,
                               s_xy: np.ndarray, s_yy: np.ndarray, gram: np.ndarray) -> np.ndarray:
        """σ²_k that the MAP step of β conditions on (K,): held, else the current one (ECM), else at the
        start (no σ² yet) the state's least-squares residual variance."""
        K = len(nk)
        if "variance" in hold:
            return np.broadcast_to(np.asarray(hold["variance"], dtype=float).reshape(-1), (K,))
        if "variance" in before:
            return np.broadcast_to(np.asarray(before["variance"], dtype=float).reshape(-1), (K,))
        rss = np.maximum(s_yy - np.einsum("kt,kt->k", ols, s_xy), 0.0)
        if self.tied == "variance":
            return np.full(K, max(float(rss.sum()) / max(float(nk.sum()), 1e-300), 1e-12))
        return np.maximum(rss / safe_counts(nk), 1e-12)

    def default_params(self, K: int, D: int) -> Params:
        variance = np.ones(1) if self.tied == "variance" else np.ones((K, 1))
        return {"coef": np.zeros((K, self.T)), "variance": variance}

    def n_free_params(self, K: int, D: int) -> int:
        n_var = 0 if self._variance is not None else (1 if self.tied == "variance" else K)
        return K * self.T + n_var

    def to_original(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        if not self.standardize:
            return dict(params)
        c, s = float(center[0]), float(scale[0])
        coef = s * np.asarray(params["coef"], dtype=float)
        coef[:, 0] += c  # the intercept is the first term
        return {"coef": coef, "variance": s * s * np.asarray(params["variance"], dtype=float)}

    def to_standard(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        if not self.standardize:
            return dict(params)
        c, s = float(center[0]), float(scale[0])
        out = {}
        if "coef" in params:
            coef = np.array(params["coef"], dtype=float)
            coef[..., 0] -= c
            out["coef"] = coef / s
        if "variance" in params:
            out["variance"] = np.asarray(params["variance"], dtype=float) / (s * s)
        return out

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        if "coef" in params and not np.all(np.isfinite(params["coef"])):
            raise ModelError(f"{where}: coef must be finite, got {np.asarray(params['coef']).tolist()}")
        variance = params.get("variance")
        if variance is not None and not (np.all(np.isfinite(variance)) and np.all(np.asarray(variance) > 0)):
            raise ModelError(f"{where}: variance must be finite and positive, got {np.asarray(variance).tolist()}")

    def mean(self, params: Params, design: np.ndarray) -> np.ndarray:
        """E[y | x, z=k] for each row of ``design`` (n × T): (n × K)."""
        return design @ np.asarray(params["coef"], dtype=float).T

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """One draw per row; ``aux["design"]`` holds the rows' design (n × T)."""
        design = np.asarray(aux["design"], dtype=float)
        mean = self.mean(params, design)[np.arange(len(labels)), labels]
        variance = np.broadcast_to(np.asarray(params["variance"], dtype=float).reshape(-1), (len(params["coef"]),))
        return (mean + np.sqrt(variance[labels]) * rng.standard_normal(len(labels)))[:, None]

    def impute(self, params: Params, x: np.ndarray, resp: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each missing y becomes Σ_k r_nk x_nᵀβ_k."""
        filled = (resp * self.mean(params, aux["design"].T)).sum(axis=1)[None, :]
        return np.where(np.isnan(x), filled, x)

    def expected_value(self, params: Params) -> np.ndarray:
        raise ModelError("a regression's expected value depends on each sample's covariates")

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        # For plots of y alone: each state's intercept, a line's value at zero covariates.
        coef = np.asarray(values["coef"], dtype=float)
        return gaussian_marginal(coef[:, 0], np.asarray(values["variance"], dtype=float).reshape(-1))


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


class _GLMRegression(_CoefficientPrior, ObservedFamily):
    r"""A count or 0/1 node whose canonical parameter is linear in covariates (a GLM per latent state).

    η_nk = x_nᵀβ_k + o_n (o the offset, 0 without one); log p(y | η) = yη − n·b(η) + log h(y),
    with b(η) = e^η (Poisson, n = 1) or log(1 + e^η) (Bernoulli, n = 1; Binomial, n trials).

    Its log-density is not linear in fixed statistics, so every row takes the engine's
    per-row path (the one that holds the conditional Gaussian of partly missing events): the
    E-step adds yη − n b(η) to L row by row (:meth:`_GLMTerms.log_density`) and sums, per state,
    the coefficients of a quadratic *minorizer* of the expected complete log-likelihood at the
    current β (:meth:`_GLMTerms.expected_statistics`):

    .. math::

        Q_k(\beta) \ge S_k(\beta) = Q_k(\beta^{old}) + g_k^\top\Delta - \tfrac12 \Delta^\top B_k \Delta,
        \quad \Delta = \beta - \beta^{old},\quad
        g_k = \textstyle\sum_n r_{nk}(y_n - \mu_{nk})x_n,\quad
        B_k = \textstyle\sum_n r_{nk}\,\kappa_{nk}\, x_n x_n^\top,

    with κ_nk ≥ n·b'' anywhere within |x_nᵀΔ| ≤ δ: e^δ μ_nk for the Poisson, and
    e^δ n p(1 − p) for the logit (|d log p(1−p)/dη| ≤ 1). S_k is a quadratic in β
    whose coefficients are sums over rows, so it is this node's block of the statistics
    (H = [1, β, −½ββᵀ] against Φ = [S(β⁰) − …, g + Bβ⁰, B]); the M-step maximizes it within
    the trust region |x_nᵀΔ| ≤ δ (a Newton step on S, shortened to ‖Δ‖ ≤ δ / max‖x_n‖):
    generalized EM, since S_k(β_new) ≥ S_k(β_old) = Q_k(β_old) and Q_k ≥ S_k there, and the
    ELBO the loop checks, vdot(H, stats), is S's value, a lower bound of the true one.
    Near the optimum the steps are Newton's with curvature inflated by e^δ (δ = 0.5: the
    coefficients converge linearly at rate ≤ 1 − e^−δ ≈ 0.4, whatever the data).

    On dask-backed data every chunk's task sums its own rows' minorizer coefficients, so an
    iteration's E-step is one pass. The trust region needs max_n |x_nᵀΔ_k| over all rows: it is
    bounded from the design's column ranges (:class:`LazyDesign`), and only when that bound
    exceeds δ does the M-step make a second pass, computing the exact reach of every state's
    step at once. The steps are then exactly the in-memory ones, so the run-time monotonicity
    check holds as it does in memory (measured: no second pass in any iteration of the
    tests' Poisson, Binomial and concomitant fits; a few, early on, from a start far off).
    """

    param_names = ("coef",)
    multivariate = False  # rows are laid out by the compiler: response, design, offset or trials
    #: every row whose first column (the response) is observed takes the per-row path
    row_by_row = True
    constraints: ClassVar[dict[str, str]] = {"coef": "real"}
    #: the trust region, in units of the linear predictor
    delta = 0.5
    #: how far the start's IRLS step may move any row's linear predictor from the anchor
    start_reach = 5.0

    def __init__(self, base: ObservedFamily, covariates: tuple[str, ...], terms: tuple[str, ...],
                 intercept: bool, has_offset: bool, design: np.ndarray | None = None) -> None:
        self.base, self.covariates, self.terms, self.intercept = base, covariates, terms, intercept
        self.has_offset = has_offset
        self.prior = base.prior  # a coefficient prior (check_declaration refuses any other)
        self.trials = getattr(base, "trials", None)  # Binomial: an int, or a data variable (a column)
        self.floor = 0.0
        #: the rows' design (N × T), for the trust region: no row's linear predictor moves by more than δ
        self.design = design
        #: where the start's Newton step begins (T): the intercept-only MLE (set by :func:`bind`), else 0
        self.anchor = np.zeros(len(terms))

    @property
    def kind(self) -> str:
        return self.base.kind

    def arguments(self) -> dict[str, Any]:
        return {}

    @property
    def T(self) -> int:
        return len(self.terms)

    @property
    def D(self) -> int:
        return 1 + self.T + int(self.has_offset or isinstance(self.trials, str))

    def param_axes(self) -> dict[str, Axes]:
        return {"coef": ("latent", "term")}  # type: ignore[dict-item]

    def n_rows(self, D: int) -> int:
        T = self.T
        return 1 + D + 1 + T + T * (T + 1) // 2

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        out[...] = 0.0  # every row enters through the per-row path (_GLMTerms)

    def natural(self, params: Params) -> np.ndarray:
        coef = np.asarray(params["coef"], dtype=float)
        K, T = coef.shape
        upper = np.triu_indices(T)
        factor = np.where(upper[0] == upper[1], 1.0, 2.0)
        return np.hstack([np.zeros((K, 1 + self.D)), np.ones((K, 1)), coef,
                          -0.5 * factor * coef[:, upper[0]] * coef[:, upper[1]]])

    # -- per-row pieces ----------------------------------------------------------------
    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Response y, design X (T × n), offset o and trials n from the node's rows (D × n)."""
        y, X = x[0], x[1:1 + self.T]
        extra = x[1 + self.T] if self.D > 1 + self.T else None
        offset = extra if self.has_offset and extra is not None else np.zeros_like(y)
        if isinstance(self.trials, str):
            trials = extra if extra is not None else np.ones_like(y)
        else:
            trials = np.full_like(y, float(self.trials) if self.trials is not None else 1.0)
        return y, X, offset, trials

    def cumulant(self, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """b(η), b'(η) (the mean per trial) and b''(η), elementwise."""
        if self.kind == "Poisson":
            mu = np.exp(np.minimum(eta, 700.0))
            return mu, mu, mu
        p = 0.5 * (1.0 + np.tanh(0.5 * eta))  # the logistic function, without overflow
        return np.logaddexp(0.0, eta), p, p * (1.0 - p)

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        from scipy.special import gammaln

        y, _, _, trials = self.split(x)
        observed = ~np.isnan(y)
        safe = np.where(observed, y, 0.0)
        if self.kind == "Poisson":
            value = -gammaln(safe + 1.0)
        elif self.kind == "Binomial":
            value = gammaln(trials + 1.0) - gammaln(safe + 1.0) - gammaln(trials - safe + 1.0)
        else:
            value = np.zeros_like(safe)
        return np.where(observed, value, 0.0)

    def patterns(self, params: Params, observed: np.ndarray) -> _GLMTerms:
        return _GLMTerms(self, np.asarray(params["coef"], dtype=float))

    def second_moments(self, out: np.ndarray, D: int) -> None:
        """Starting statistics (no θ yet): one column per sample, the rows of an IRLS step from the anchor.

        The exact curvature (no e^δ inflation): the start's M-step takes a full Newton step from
        :attr:`anchor` weighted by each state's starting responsibilities (see :meth:`m_step`).
        """
        x = out[:D]
        terms = _GLMTerms(self, np.asarray(self.anchor, dtype=float)[None], inflate=False)
        out[D:] = terms.rows(x)[0, 1:]

    # -- M-step ------------------------------------------------------------------------------
    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: Any = None) -> tuple[Params, Floored]:
        K, T = stats.shape[0], self.T
        if "coef" in hold:
            return {"coef": np.broadcast_to(np.asarray(hold["coef"], dtype=float), (K, T)).copy()}, []
        start = 1 + self.D + 1
        v = stats[:, start:start + T]
        gram = np.zeros((K, T, T))
        upper = np.triu_indices(T)
        gram[:, upper[0], upper[1]] = stats[:, start + T:]
        gram[:, upper[1], upper[0]] = stats[:, start + T:]
        starting = previous is None or "coef" not in previous
        # The start: one full IRLS (Newton) step per state from the anchor, weighted by the starting
        # responsibilities (second_moments), only kept within a wide reach; afterwards, trust-region steps.
        old = np.broadcast_to(np.asarray(self.anchor, dtype=float), (K, T)) if starting else np.asarray(
            previous["coef"])
        reach = self.start_reach if starting else self.delta
        empty = empty_components(stats[:, 0])
        coef = np.array(old, dtype=float)
        steps = np.zeros((K, T))
        for k in range(K):
            if empty[k]:
                continue
            if prior is not None:  # the prior's curvature Λ⁻¹ and gradient Λ⁻¹(m − β) join the minorizer's
                target = _penalized(gram[k], v[k], prior["precision"], prior["mean"])
            else:
                try:
                    target = np.linalg.solve(gram[k], v[k])
                except np.linalg.LinAlgError:
                    target = np.linalg.lstsq(gram[k], v[k], rcond=None)[0]
            steps[k] = target - old[k]
        moving = ~empty
        if moving.any():  # every state's step shortened on its own (one pass over dask chunks, if any)
            coef[moving] = old[moving] + within_reach(self.design, steps[moving], reach, joint=False)
        return {"coef": coef}, []

    # -- the rest of the family interface --------------------------------------------------
    def default_params(self, K: int, D: int) -> Params:
        return {"coef": np.zeros((K, self.T))}

    def n_free_params(self, K: int, D: int) -> int:
        return K * self.T

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        if "coef" in params and not np.all(np.isfinite(params["coef"])):
            raise ModelError(f"{where}: coef must be finite, got {np.asarray(params['coef']).tolist()}")

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        y = x[:, :1]
        if self.kind == "Binomial":
            trials = x[:, -1:] if isinstance(self.trials, str) else np.full_like(y, float(self.trials))
            return self.base.outside_support(y, {"trials": trials})
        return self.base.outside_support(y, {})

    def mean(self, params: Params, columns: np.ndarray) -> np.ndarray:
        """E[y | x, z=k] for each row of the node's columns (n × D): (n × K)."""
        _, X, offset, trials = self.split(np.asarray(columns, dtype=float).T)
        eta = (np.asarray(params["coef"], dtype=float) @ X + offset).T
        return self.cumulant(eta)[1] * trials[:, None]

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """One draw per row; ``aux["columns"]`` holds the rows' node columns (n × D)."""
        columns = np.asarray(aux["columns"], dtype=float)
        _, X, offset, trials = self.split(columns.T)
        eta = np.einsum("nt,nt->n", np.asarray(params["coef"], dtype=float)[labels], X.T) + offset
        mean = self.cumulant(eta)[1]
        if self.kind == "Poisson":
            return rng.poisson(mean).astype(float)[:, None]
        return rng.binomial(trials.astype(np.int64), mean).astype(float)[:, None]

    def impute(self, params: Params, x: np.ndarray, resp: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        filled = x.copy()
        filled[0] = np.where(np.isnan(x[0]), (resp * self.mean(params, np.nan_to_num(x).T)).sum(axis=1), x[0])
        return filled

    def expected_value(self, params: Params) -> np.ndarray:
        raise ModelError("a regression's expected value depends on each sample's covariates")

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        raise ModelError(f"plots of a {self.kind} regression's response alone are not available")


class _GLMTerms:
    """One parameter value's per-row terms of a GLM node: log-densities and the minorizer's sums."""

    def __init__(self, family: _GLMRegression, coef: np.ndarray, inflate: bool = True) -> None:
        self.family, self.coef, self.inflate = family, coef, inflate
        self.o = np.arange(family.D)  # every column is observed: rows with a missing response are left out

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """y η − n b(η) for every state and row (K × n); log h is the node's log_base_measure."""
        y, X, offset, trials = self.family.split(x)
        eta = self.coef @ X + offset
        return y * eta - trials * self.family.cumulant(eta)[0]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Per state and row, the minorizer's coefficients [c, v, vech B] around the current β (K × R × n)."""
        family = self.family
        y, X, offset, trials = family.split(x)
        T = family.T
        linear = self.coef @ X  # η − o: x_nᵀβ_k (K × n)
        eta = linear + offset
        b, mean, curvature = family.cumulant(eta)
        mu = trials * mean
        # e^δ times the curvature here bounds it anywhere in the trust region; a smooth bound (no
        # min with the logit's global n/4), so that the standard errors can differentiate these sums
        exact = mu if family.kind == "Poisson" else trials * curvature
        kappa = np.exp(family.delta) * exact if self.inflate else exact
        residual = y - mu
        q = y * eta - trials * b
        out = np.empty((len(self.coef), 2 + T + T * (T + 1) // 2, x.shape[1]))
        out[:, 0] = 1.0
        out[:, 1] = q - residual * linear - 0.5 * kappa * linear * linear
        out[:, 2:2 + T] = (residual + kappa * linear)[:, None, :] * X[None]
        upper = np.triu_indices(T)
        out[:, 2 + T:] = kappa[:, None, :] * (X[upper[0]] * X[upper[1]])[None]
        return out

    def expected_statistics(self, x: np.ndarray, resp: np.ndarray) -> tuple[np.ndarray, float]:
        """Σ_n r_nk (presence, columns, minorizer rows) (K × node rows), and nothing for the entropy."""
        family = self.family
        K = resp.shape[0]
        stats = np.zeros((K, family.n_rows(family.D)))
        rows = self.rows(x)
        stats[:, 0] = resp.sum(axis=1)
        stats[:, 1:1 + family.D] = resp @ x.T
        stats[:, 1 + family.D:] = np.einsum("krn,kn->kr", rows[:, 1:], resp)
        return stats, 0.0


class _ConcomitantWeights(LatentFamily):
    r"""A latent's weights as a multinomial logit of covariates (a concomitant model, a mixture of experts).

    π_nk = exp(γ_kᵀx_n) / Σ_j exp(γ_jᵀx_n), with γ over (latent, term) and the first state as
    the reference (γ_0 = 0). The per-row log-weights and the M-step's sums come from a hidden
    node of the plan (:class:`_ConcomitantLogit`, named like the latent); this family only
    stands for the parameters in the declaration's place: H's weight column is 0.
    """

    constraints: ClassVar[dict[str, str]] = {"coef": "reference"}

    def __init__(self, base: LatentFamily, terms: tuple[str, ...]) -> None:
        self.base, self.terms = base, terms
        self.k, self.states = base.k, base.states

    @property
    def kind(self) -> str:
        return self.base.kind

    def arguments(self) -> dict[str, Any]:
        return self.base.arguments()

    @property
    def fixed(self) -> dict[str, Any]:
        return {}

    def param_axes(self) -> dict[str, Axes]:
        return {"coef": ("latent", "term")}  # type: ignore[dict-item]

    def log_weights(self, params: Params) -> np.ndarray:
        return np.zeros(self.k)  # each sample's log-weights enter through the hidden node

    def weights_m_step(self, nk: np.ndarray, hold: Params, prior: Any = None) -> Params:
        return {}  # the hidden node's M-step, run after this one, sets the coefficients

    def n_free_params(self) -> int:
        return (self.k - 1) * len(self.terms)

    def check_params(self, params: Mapping[str, np.ndarray], where: str, size: int | None = None) -> None:
        coef = params.get("coef")
        if coef is not None and not np.all(np.isfinite(coef)):
            raise ModelError(f"{where}: coef must be finite")


class _ConcomitantLogit(ObservedFamily):
    r"""The hidden node of a concomitant latent: log π_nk(γ) per row, and the M-step of γ.

    Q(γ) = Σ_n Σ_k r_nk log π_nk(γ) is raised by a step on a quadratic minorizer valid in a
    trust region |x_nᵀΔγ_k| ≤ δ: there π'_k ≤ e^{2δ} π_k, so the multinomial logit's curvature
    at any point of the region is below e^{2δ} Σ_n w_n (diag π_n − π_nπ_nᵀ) ⊗ x_n x_nᵀ (the
    variance of the one-hot state under π' is at most e^{2δ} times its spread under π). With
    g_k = Σ_n (r_nk − w_n π_nk) x_n, S(γ) = Q(γ⁰) + gᵀΔ − ½ΔᵀBΔ: its coefficients are sums over
    rows (this node's block of the statistics, with H_k = [1, γ_k, −½ vec(γ_k γ_lᵀ) for every l]),
    and the M-step solves for its maximizer over the free γ_1..γ_{K−1} (γ_0 = 0), shortened to the
    trust region: generalized EM, as for the GLM nodes.
    """

    param_names = ("coef",)
    multivariate = False
    #: every row takes the per-row path (its first column, a design's, is never missing)
    row_by_row = True
    delta = 0.5

    def __init__(self, latent: _ConcomitantWeights, design: np.ndarray | None = None) -> None:
        self.latent = latent
        self.terms = latent.terms
        self.K = latent.k
        self.floor = 0.0
        self.design = design

    @property
    def kind(self) -> str:
        return "Categorical"

    def arguments(self) -> dict[str, Any]:
        return {}

    @property
    def T(self) -> int:
        return len(self.terms)

    def param_axes(self) -> dict[str, Axes]:
        return {"coef": ("latent", "term")}  # type: ignore[dict-item]

    def n_rows(self, D: int) -> int:
        return 1 + D + 1 + self.T + self.K * self.T * self.T

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        out[...] = 0.0

    def natural(self, params: Params) -> np.ndarray:
        coef = np.asarray(params["coef"], dtype=float)
        K, T = coef.shape
        quadratic = -0.5 * np.einsum("kt,ls->klts", coef, coef).reshape(K, K * T * T)
        return np.hstack([np.zeros((K, 1 + T)), np.ones((K, 1)), coef, quadratic])

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.zeros(x.shape[1])

    def patterns(self, params: Params, observed: np.ndarray) -> _ConcomitantTerms:
        return _ConcomitantTerms(self, np.asarray(params["coef"], dtype=float))

    def second_moments(self, out: np.ndarray, D: int) -> None:
        out[D:] = 0.0  # the start's M-step reads only the counts (see m_step)

    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: Any = None) -> tuple[Params, Floored]:
        K, T = self.K, self.T
        if "coef" in hold:
            return {"coef": np.broadcast_to(np.asarray(hold["coef"], dtype=float), (K, T)).copy()}, []
        nk = stats[:, 0]
        if previous is None or "coef" not in previous:
            # The start: the intercepts of the weights the responsibilities give, the slopes 0.
            coef = np.zeros((K, T))
            if self.terms and self.terms[0] == "intercept":
                share = np.maximum(nk, 1e-12 * max(float(nk.sum()), 1.0))
                coef[:, 0] = np.log(share) - np.log(share[0])
            return {"coef": coef}, []
        start = 2 + T
        v = stats[:, start:start + T]
        curvature = stats[:, start + T:].reshape(K, K, T, T)  # B_kl
        free = np.transpose(curvature[1:, 1:], (0, 2, 1, 3)).reshape((K - 1) * T, (K - 1) * T)
        old = np.asarray(previous["coef"], dtype=float)
        try:
            target = np.linalg.solve(free, v[1:].ravel()).reshape(K - 1, T)
        except np.linalg.LinAlgError:
            target = np.linalg.lstsq(free, v[1:].ravel(), rcond=None)[0].reshape(K - 1, T)
        coef = np.zeros((K, T))
        coef[1:] = old[1:] + within_reach(self.design, target - old[1:], self.delta)
        return {"coef": coef}, []

    def default_params(self, K: int, D: int) -> Params:
        return {"coef": np.zeros((K, self.T))}

    def n_free_params(self, K: int, D: int) -> int:
        return 0  # counted once, by the latent

    def log_weights_per_row(self, coef: np.ndarray, X: np.ndarray) -> np.ndarray:
        """log π_nk (K × n) for design columns X (T × n)."""
        eta = coef @ X
        return eta - np.logaddexp.reduce(eta, axis=0)

    def expected_value(self, params: Params) -> np.ndarray:
        raise ModelError("a concomitant model has no expected value")


class _ConcomitantTerms:
    """One γ's per-row terms: log π_nk, and the minorizer's sums."""

    def __init__(self, family: _ConcomitantLogit, coef: np.ndarray) -> None:
        self.family, self.coef = family, coef
        self.o = np.arange(family.T)

    def log_density(self, x: np.ndarray) -> np.ndarray:
        return self.family.log_weights_per_row(self.coef, x)

    def expected_statistics(self, x: np.ndarray, resp: np.ndarray) -> tuple[np.ndarray, float]:
        family = self.family
        K, T = family.K, family.T
        log_pi = family.log_weights_per_row(self.coef, x)
        pi = np.exp(log_pi)
        w = resp.sum(axis=0)
        g = (resp - pi * w) @ x.T  # (K × T)
        inflation = np.exp(2 * family.delta)
        diagonal = np.einsum("n,kn,tn,sn->kts", w, pi, x, x)
        cross = np.einsum("n,kn,ln,tn,sn->klts", w, pi, pi, x, x)
        curvature = -cross
        curvature[np.arange(K), np.arange(K)] += diagonal
        curvature *= inflation  # B_kl (K × K × T × T)
        m_old = np.einsum("klts,ls->kt", curvature, self.coef)
        stats = np.zeros((K, family.n_rows(T)))
        stats[:, 0] = resp.sum(axis=1)
        stats[:, 1:1 + T] = resp @ x.T
        q = (resp * log_pi).sum(axis=1)
        stats[:, 1 + T] = q - np.einsum("kt,kt->k", g, self.coef) - 0.5 * np.einsum("kt,kt->k", self.coef, m_old)
        stats[:, 2 + T:2 + 2 * T] = g + m_old
        stats[:, 2 + 2 * T:] = curvature.reshape(K, K * T * T)
        return stats, 0.0


def bind_concomitant(plan: Any, covariates: Sequence[str], ds: xr.Dataset, sample_dim: Hashable,
                     terms: Sequence[str] | None, fitting: bool) -> Any:
    """The hidden node of ``latent(name, ..., covariates=[...])``; the plan's latent family becomes the logit's."""
    from emdsl.compile import Node

    latent = plan.latent
    where = f"latent({latent.name!r}, ..., covariates={list(covariates)!r})"
    for name in covariates:
        if name not in ds.data_vars:
            available = ", ".join(map(repr, ds.data_vars)) or "none"
            raise ModelError(f"{where}: the covariate {name!r} is not in the data{' (new data)' if not fitting else ''}"
                             f"; available: {available}")
    if lazy(ds, covariates):  # dask-backed: the design stays lazy, with the covariates' chunks
        import dask.array as da

        chunks = _chunks_of(ds, covariates, plan.n_samples)
        design, found = lazy_design_matrix(ds, covariates, True, sample_dim, where, terms, chunks)
        summary = design_summary(design) if fitting else None
        if summary is not None:
            check_design(summary, found, covariates, True, where)
        reach: Any = LazyDesign(design, summary.low, summary.high) if summary is not None else None
        rows = da.arange(plan.n_samples, chunks=(chunks,), dtype=np.intp)
        pattern = da.zeros(plan.n_samples, chunks=(chunks,), dtype=np.intp)
    else:
        design, found = design_matrix(ds, covariates, True, sample_dim, where, terms)
        if fitting:
            check_design(design, found, covariates, True, where)
        reach = design
        rows = np.arange(plan.n_samples, dtype=np.intp)
        pattern = np.zeros(plan.n_samples, dtype=np.intp)
    family = _ConcomitantWeights(latent.family, Terms(found))
    latent.family = family
    T = len(found)
    node = Node(latent.name, _ConcomitantLogit(family, reach), tuple(covariates), True, ("column",), (T,),
                {"column": list(found)}, [design], np.zeros(T), np.ones(T))
    # Every row takes the per-row path (on dask data each chunk's task finds its own rows again).
    node.partial_rows, node.partial_pattern = rows, pattern
    node.patterns = [np.ones(T, dtype=bool)]
    return node


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


def _anchor(family: _GLMRegression, total_y: float, total_exposure: float, total_trials: float) -> np.ndarray:
    """:func:`start_anchor` from the sums over the rows with an observed response."""
    anchor = np.zeros(family.T)
    if not family.intercept:
        return anchor
    total = max(float(total_y), 0.5)
    if family.kind == "Poisson":
        anchor[0] = np.log(total / float(total_exposure))
    else:
        share = min(max(total / float(total_trials), 1e-3), 1.0 - 1e-3)
        anchor[0] = np.log(share / (1.0 - share))
    return anchor


def start_anchor(family: _GLMRegression, rows: np.ndarray) -> np.ndarray:
    """Where the start's IRLS step begins: the intercept-only MLE of the observed rows (T).

    With an intercept, Poisson's log(Σy / Σe^o) and the logit of Σy / Σn; the other terms 0
    (no intercept: all 0). Every state's starting coefficients are then one Newton step from
    here, weighted by that state's starting responsibilities (``_GLMRegression.m_step``).
    """
    anchor = np.zeros(family.T)
    if not len(rows) or not family.intercept:
        return anchor
    y, _, offset, trials = family.split(rows.T)
    total = max(float(y.sum()), 0.5)
    if family.kind == "Poisson":
        anchor[0] = np.log(total / float(np.exp(offset).sum()))
    else:
        share = min(max(total / float(trials.sum()), 1e-3), 1.0 - 1e-3)
        anchor[0] = np.log(share / (1.0 - share))
    return anchor


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


def _observed_part(family: _GLMRegression, start: int, block: np.ndarray) -> tuple[list[int], np.ndarray]:
    """One chunk of a GLM's columns: [its count of rows with an observed response], Σy, Σe^o and Σn over them."""
    x = np.asarray(block, dtype=float)
    rows = x[~np.isnan(x[:, 0])]
    y, _, offset, trials = family.split(rows.T)
    return [len(rows)], np.array([y.sum(), np.exp(offset).sum(), trials.sum()])


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
