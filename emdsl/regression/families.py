"""The observed families with covariates: the Normal regression and the GLMs (Poisson, Bernoulli, Binomial)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from emdsl import labels
from emdsl.errors import ModelError
from emdsl.families._base import Axes, Floored, Marginal, ObservedFamily, Params, empty_components, safe_counts
from emdsl.families.normal import LOG_2PI, apply_floor, gaussian_marginal
from emdsl.regression.design import within_reach


#: families that take covariates, and those whose link is the log (they may take an offset)
SUPPORTED = ("Normal", "Poisson", "Bernoulli", "Binomial")
LOG_LINK = ("Poisson",)


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


def _observed_part(family: _GLMRegression, start: int, block: np.ndarray) -> tuple[list[int], np.ndarray]:
    """One chunk of a GLM's columns: [its count of rows with an observed response], Σy, Σe^o and Σn over them."""
    x = np.asarray(block, dtype=float)
    rows = x[~np.isnan(x[:, 0])]
    y, _, offset, trials = family.split(rows.T)
    return [len(rows)], np.array([y.sum(), np.exp(offset).sum(), trials.sum()])
