"""Normal distribution, independent for each element of a variable."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from emdsl import priors
from emdsl.errors import ModelError
from emdsl.families._base import (
    Axes,
    BoundPrior,
    ElementwiseFamily,
    Floored,
    Marginal,
    Params,
    as_float,
    check_number,
    empty_components,
    held_or,
    keep_empty,
    safe_counts,
)

LOG_2PI = float(np.log(2 * np.pi))


def natural_parameters(mean: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """η₁ = μ/σ², η₂ = −1/(2σ²) and A = μ²/(2σ²) + ½ log σ², elementwise."""
    precision = 1.0 / variance
    return mean * precision, -0.5 * precision, 0.5 * mean * mean * precision + 0.5 * np.log(variance)


def scatter(s_x: np.ndarray, s_xx: np.ndarray, nk: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Σ_n r_nk (x_n − μ_k)² from the sums S_x, S_xx and counts N (K × D, or N of shape K), for any μ."""
    counts = nk if nk.ndim == mean.ndim else nk[:, None]
    return s_xx - 2.0 * mean * s_x + counts * mean * mean


def gaussian_marginal(mean: np.ndarray, variance: np.ndarray) -> Marginal:
    """Per-state normal densities, for plots."""
    mean, variance = np.asarray(mean, dtype=float), np.asarray(variance, dtype=float)

    def density(grid: np.ndarray) -> np.ndarray:
        grid = np.asarray(grid, dtype=float)[None, :]
        return np.exp(-0.5 * (grid - mean[:, None]) ** 2 / variance[:, None]) / np.sqrt(
            2 * np.pi * variance[:, None])

    return Marginal(mean=mean, density=density, variance=variance)


#: a variance below this fraction of the mean square it was computed from (S_xx/N − μ²) is
#: rounding error: the subtraction cancels about 13 of the 16 digits at that point
RESOLUTION = 1e-13


def apply_floor(variance: np.ndarray, floor: float, *, mean_square: np.ndarray | None = None,
                kind: str = "Normal", tied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """max(σ², floor): the exact M-step under the constraint σ² ≥ floor; also which were floored.

    With ``floor=0`` nothing holds a component that collapsed onto one value: its variance
    is 0 up to rounding (not above ``RESOLUTION · mean_square``, or not positive when the
    mean square is not given), and log σ² would be −inf or NaN. That is a ``ModelError``
    naming the component and the way out, never a NaN in the results.
    """
    if floor <= 0:
        noise = 0.0 if mean_square is None else RESOLUTION * np.broadcast_to(mean_square, np.shape(variance))
        collapsed = ~(variance > noise)  # NaN counts as collapsed too
        if collapsed.any():
            raise ModelError(_collapse_message(variance, collapsed, kind, tied))
        return variance, np.zeros(np.shape(variance), dtype=bool)
    low = variance < floor
    return (np.maximum(variance, floor) if low.any() else variance), low


def _collapse_message(variance: np.ndarray, collapsed: np.ndarray, kind: str, tied: bool) -> str:
    first = np.unravel_index(int(np.flatnonzero(collapsed)[0]), np.shape(collapsed))
    if tied:
        which = f"the shared (tied) variance of element {int(first[-1])}"
    elif len(first) == 2:
        which = f"component {int(first[0])} (element {int(first[1])})"
    else:
        which = f"component {int(first[0])}"
    value = float(np.asarray(variance)[first])
    return (f"{kind}(floor=0): {which} collapsed onto a single value (its variance, {value:.3g} in units "
            "of the data's variance, is zero to within rounding), and floor=0 allows no correction. "
            "Use floor > 0 (the default 1e-6 holds a collapsed component at a millionth of the data's "
            "variance and names it in a DegenerateComponentWarning), or fewer components")


#: the weak prior's pseudo-observations of a mean (mclust's ``priorControl`` shrinkage)
WEAK_KAPPA = 0.01


def nig_mean(nk: np.ndarray, s_x: np.ndarray, prior: BoundPrior) -> np.ndarray:
    """The posterior mode of the mean under a normal-inverse-gamma prior: (κ m + S_x) / (κ + N)."""
    kappa = prior["kappa"]
    return (kappa * prior["mean"] + s_x) / (kappa + nk)


def nig_variance(nk: np.ndarray, s_x: np.ndarray, s_xx: np.ndarray, mean: np.ndarray, prior: BoundPrior,
                 tied: bool = False, mean_prior: bool = True) -> np.ndarray:
    """The posterior mode of the variance given the mean (before any floor).

    σ² = (2b + Σ r (x − μ)² + κ (μ − m)²) / (N + 2a + 3); tied over the K states:
    (2b + Σ_k [...]) / (Σ_k N_k + K + 2a + 2) (one inverse-gamma, K normal means).
    With ``mean_prior=False`` (a held mean, which gets no prior term) the inverse-gamma
    alone: (2b + Σ r (x − μ)²) / (N + 2a + 2), tied (2b + Σ_k [...]) / (Σ_k N_k + 2a + 2).
    """
    a, b = prior["shape"], prior["scale"]
    spread = scatter(s_x, s_xx, nk, mean)
    if mean_prior:
        spread = spread + prior["kappa"] * (mean - prior["mean"]) ** 2
    if tied:
        return (spread.sum(axis=0) + 2.0 * b) / (nk.sum(axis=0) + len(nk) * mean_prior + 2.0 * a + 2.0)
    return (spread + 2.0 * b) / (nk + 2.0 * a + 2.0 + mean_prior)


def nig_log_prior(mean: np.ndarray, variance: np.ndarray, prior: BoundPrior,
                  held: Container[str] = ()) -> tuple[float, float]:
    """log p(μ, σ²) under a normal-inverse-gamma prior (a tied variance (D,) counted once).

    A parameter named in ``held`` (fixed in the declaration) has no prior term: a held
    mean drops the factor N(μ; m, σ²/κ), a held variance the inverse-gamma.
    """
    m, kappa, a, b = (prior[key] for key in ("mean", "kappa", "shape", "scale"))
    terms = [] if "mean" in held else priors.normal_terms(mean, m, np.broadcast_to(variance, np.shape(mean)) / kappa)
    terms += [] if "variance" in held else priors.inverse_gamma_terms(variance, a, b)
    value, size = priors.total(terms)
    return value + prior.log_jacobian, size + abs(prior.log_jacobian)


def nig_weak(nk: np.ndarray, s_x: np.ndarray, s_xx: np.ndarray, K: int, smallest: float) -> dict[str, np.ndarray]:
    """The weak prior of a univariate normal per element (the MultivariateNormal's with D = 1).

    m = the data's mean, κ = 0.01, and an inverse-gamma of dof ν = 3 and scale
    ς² = ν · var(x) / K² (ν times mclust's ``defaultPrior`` scale, so that E[1/σ²] = K² / var(x)):
    shape a = ν/2 = 1.5, scale b = ς²/2 = 3 var(x) / (2K²). A variance not above ``smallest``
    (constant data) is replaced by it.
    """
    count = np.where(nk > 0, nk, 1.0)
    mean = np.where(nk > 0, s_x / count, 0.0)
    variance = np.maximum(np.where(nk > 0, s_xx / count - mean * mean, 1.0), smallest)
    ones = np.ones_like(mean)
    return {"mean": mean, "kappa": WEAK_KAPPA * ones, "shape": 1.5 * ones, "scale": 3.0 * variance / (2.0 * K * K)}


class Normal(ElementwiseFamily):
    r"""Normal distribution, independent for each element of a variable.

    Every element of the variable (each combination of its dims other than the
    sample dim) gets its own mean and variance per latent state.

    .. math::

        p(x \mid \mu, \sigma^2) = (2\pi\sigma^2)^{-1/2}
            \exp\!\left(-\frac{(x-\mu)^2}{2\sigma^2}\right)

        \phi(x) = (x,\ x^2), \quad
        \eta = \left(\frac{\mu}{\sigma^2},\ -\frac{1}{2\sigma^2}\right), \quad
        A(\eta) = \frac{\mu^2}{2\sigma^2} + \tfrac12\log\sigma^2, \quad
        \log h(x) = -\tfrac12 \log 2\pi

    M-step (moment matching): μ_k = S_x / N_k and σ²_k = S_xx / N_k − μ_k², where
    S are responsibility-weighted sums over the samples where the element is
    observed; with ``tied="variance"`` the scatter is pooled over the states:
    σ² = Σ_k Σ_n r_nk (x_n − μ_k)² / Σ_k N_k. With a
    :class:`~emdsl.priors.NormalInverseGamma` prior the M-step is its posterior mode
    (the formulas are on that class); a tied variance has one inverse-gamma prior.

    Parameters
    ----------
    tied : {"variance"}, optional
        Share the variance across the latent states.
    mean, variance : array_like, optional
        Fixed values (broadcast over states and elements); held, not learned.
    floor : float, default 1e-6
        Lower bound on each variance, as a fraction of that element's variance in
        the data. A component that collapses onto a point is held at the floor
        (the exact M-step under that constraint) and a
        :class:`~emdsl.DegenerateComponentWarning` names it.
    prior : emdsl.priors.NormalInverseGamma, optional
        A conjugate prior on (mean, variance) in the data's units; the M-step becomes
        the MAP estimate.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Normal()
    Normal()
    >>> em.Normal(tied="variance")
    Normal(tied='variance')
    >>> em.Normal(prior=em.priors.NormalInverseGamma(mean=70, kappa=0.1, shape=2, scale=30))
    Normal(prior=NormalInverseGamma(mean=70, kappa=0.1, shape=2, scale=30))
    """

    param_names = ("mean", "variance")
    standardize = True
    continuous = True
    n_suff = 2
    prior_type = priors.NormalInverseGamma

    def __init__(
        self,
        tied: Literal["variance"] | None = None,
        *,
        mean: ArrayLike | None = None,
        variance: ArrayLike | None = None,
        floor: float = 1e-6,
        prior: priors.NormalInverseGamma | None = None,
    ) -> None:
        if tied not in (None, "variance"):
            raise ModelError(f"Normal(tied=...): only 'variance' can be tied, got {tied!r}")
        self.tied = tied
        self.floor = check_number(floor, "Normal(floor=...)", low=0.0)
        self._mean, self._variance = mean, variance
        if mean is not None:
            self.check_params({"mean": as_float(mean, "Normal(mean=...)")}, "Normal(mean=...)")
        if variance is not None:
            self.check_params({"variance": as_float(variance, "Normal(variance=...)")}, "Normal(variance=...)")
        self.accept_prior(prior)

    def arguments(self) -> dict[str, Any]:
        return self.with_prior({"tied": self.tied, "mean": self._mean, "variance": self._variance,
                                "floor": self.floor})

    def param_axes(self) -> dict[str, Axes]:
        variance: Axes = ("event",) if self.tied == "variance" else ("latent", "event")
        return {"mean": ("latent", "event"), "variance": variance}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [x, x * x]

    def log_h(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.full_like(x, -0.5 * LOG_2PI)

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        mean = params["mean"]
        variance = np.broadcast_to(params["variance"], mean.shape)
        eta_x, eta_xx, log_partition = natural_parameters(mean, variance)
        return [eta_x, eta_xx], log_partition

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        s_x, s_xx = sums
        K, D = nk.shape
        empty = empty_components(nk)
        fallback = self.default_params(K, D)
        before = previous or {}
        mean = held_or(hold, "mean", (K, D), lambda: keep_empty(
            s_x / safe_counts(nk), before.get("mean"), fallback["mean"], empty))
        if "variance" in hold:
            return {"mean": mean, "variance": np.asarray(hold["variance"], dtype=float)}, []
        spread = scatter(s_x, s_xx, nk, mean)
        if self.tied == "variance":
            total = np.maximum(nk.sum(axis=0), 1e-300)
            pooled = spread.sum(axis=0) / total
            variance, low = apply_floor(pooled, self.floor, mean_square=s_xx.sum(axis=0) / total, tied=True)
            return {"mean": mean, "variance": variance}, [(-1, float(pooled.min()))] if low.any() else []
        raw = keep_empty(spread / safe_counts(nk), before.get("variance"), fallback["variance"], empty)
        variance, low = apply_floor(raw, self.floor, mean_square=np.where(empty, 0.0, s_xx / safe_counts(nk)))
        floored = [(int(k), float(raw[k].min())) for k in np.flatnonzero(low.any(axis=1))]
        return {"mean": mean, "variance": variance}, floored

    def posterior_mode(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params, previous: Params | None,
                       prior: BoundPrior) -> tuple[Params, Floored]:
        s_x, s_xx = sums
        K, D = nk.shape
        mean = held_or(hold, "mean", (K, D), lambda: nig_mean(nk, s_x, prior))
        if "variance" in hold:
            return {"mean": mean, "variance": np.asarray(hold["variance"], dtype=float)}, []
        raw = nig_variance(nk, s_x, s_xx, mean, prior, tied=self.tied == "variance",
                           mean_prior="mean" not in self.fixed)
        variance, low = apply_floor(raw, self.floor, tied=self.tied == "variance")
        if self.tied == "variance":
            return {"mean": mean, "variance": variance}, [(-1, float(raw.min()))] if low.any() else []
        return {"mean": mean, "variance": variance}, [
            (int(k), float(raw[k].min())) for k in np.flatnonzero(low.any(axis=1))]

    def prior_axes(self) -> dict[str, Axes]:
        return {name: ("event",) for name in ("mean", "kappa", "shape", "scale")}

    def standard_prior(self, values: Mapping[str, np.ndarray], center: np.ndarray | None,
                       scale: np.ndarray | None) -> Params:
        assert center is not None and scale is not None
        return {"mean": (values["mean"] - center) / scale, "kappa": values["kappa"],
                "shape": values["shape"], "scale": values["scale"] / scale**2}

    def prior_jacobian(self, scale: np.ndarray | None, K: int) -> float:
        # μ = c + s μ' and σ² = s² σ'²: each mean contributes −log s, each variance −2 log s
        # (held ones have no prior term, and no Jacobian).
        log_scale = float(np.log(scale).sum()) if scale is not None else 0.0
        fixed = self.fixed
        means = 0 if "mean" in fixed else K
        variances = 0 if "variance" in fixed else (1 if self.tied == "variance" else K)
        return -(means + 2 * variances) * log_scale

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        nk, (s_x, s_xx) = self.split(stats, self.n_suff)
        return nig_weak(nk, s_x, s_xx, K, self.floor or 1e-12)

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        return nig_log_prior(params["mean"], params["variance"], prior, held=self.fixed)

    def default_params(self, K: int, D: int) -> Params:
        variance = np.ones(D) if self.tied == "variance" else np.ones((K, D))
        return {"mean": np.zeros((K, D)), "variance": variance}

    def n_free_params(self, K: int, D: int) -> int:
        n_mean = 0 if self._mean is not None else K * D
        n_var = 0 if self._variance is not None else (D if self.tied == "variance" else K * D)
        return n_mean + n_var

    def to_original(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        return {"mean": center + scale * params["mean"], "variance": scale**2 * params["variance"]}

    def to_standard(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        out = {}
        if "mean" in params:
            out["mean"] = (params["mean"] - center) / scale
        if "variance" in params:
            out["variance"] = params["variance"] / scale**2
        return out

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        if "mean" in params and not np.all(np.isfinite(params["mean"])):
            raise ModelError(f"{where}: mean must be finite, got {np.asarray(params['mean']).tolist()}")
        variance = params.get("variance")
        if variance is not None and not (np.all(np.isfinite(variance)) and np.all(variance > 0)):
            raise ModelError(f"{where}: variance must be finite and positive, got "
                             f"{np.asarray(variance).tolist()}")

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        mean = params["mean"][labels]
        sd = np.sqrt(np.broadcast_to(params["variance"], params["mean"].shape)[labels])
        return mean + sd * rng.standard_normal(mean.shape)

    def expected_value(self, params: Params) -> np.ndarray:
        return params["mean"]

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        return gaussian_marginal(values["mean"], values["variance"])

