"""Log-normal distribution: log x is normal, independently for each element of a variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from emdsl import priors
from emdsl.families._base import (
    Axes,
    BoundPrior,
    ElementwiseFamily,
    Floored,
    Marginal,
    Params,
    check_number,
    check_range,
    empty_components,
    held_or,
    keep_empty,
    safe_counts,
)
from emdsl.families.normal import (
    LOG_2PI,
    apply_floor,
    natural_parameters,
    nig_log_prior,
    nig_mean,
    nig_variance,
    nig_weak,
    scatter,
)


class LogNormal(ElementwiseFamily):
    r"""Log-normal distribution: log x ~ Normal(mean, variance), independent for each element.

    .. math::

        p(x \mid \mu, \sigma^2) = \frac{1}{x\sqrt{2\pi\sigma^2}}
            \exp\!\left(-\frac{(\log x-\mu)^2}{2\sigma^2}\right), \quad x > 0

        \phi(x) = (\log x,\ (\log x)^2), \quad
        \eta = \left(\frac{\mu}{\sigma^2},\ -\frac{1}{2\sigma^2}\right), \quad
        A(\eta) = \frac{\mu^2}{2\sigma^2} + \tfrac12\log\sigma^2, \quad
        \log h(x) = -\log x - \tfrac12 \log 2\pi

    M-step (closed form, the Normal's on log x): μ_k = S_log / N_k and
    σ²_k = S_loglog / N_k − μ_k², over the samples where the element is observed.
    With a :class:`~emdsl.priors.NormalInverseGamma` prior on (mean, variance) of
    log x, the M-step is its posterior mode (the Normal's, on log x).

    Parameters
    ----------
    mean, variance : array_like, optional
        Fixed mean and variance *of log x* (broadcast over states and elements); held,
        not learned.
    floor : float, default 1e-6
        Lower bound on the variance of log x, absolute (not relative to the data as
        Normal's is): σ² of log x is already unit-free, since rescaling x only shifts
        log x, and for small σ it is the squared coefficient of variation of x. A
        component that collapses onto a point is held at the floor and reported.
    prior : emdsl.priors.NormalInverseGamma, optional
        A conjugate prior on (mean, variance) of log x, in units of log x; the
        M-step becomes the MAP estimate.

    Examples
    --------
    >>> from emdsl.families.lognormal import LogNormal
    >>> LogNormal(variance=0.25)
    LogNormal(variance=0.25)
    """

    # Not standardized: x enters in the user's units. log x never overflows, but far from
    # x ≈ 1 the variance S_loglog/N − μ² cancels: its relative error is about ε μ²/σ²
    # (1e-8 for data near 1e300 with σ² = 0.01). Only a scale x/c is allowed (x > 0); with c
    # the geometric mean it would centre log x, removing that cancellation, shift the mean
    # by −log c (to_original adds it back), and leave the variance and the floor unchanged.
    param_names = ("mean", "variance")
    continuous = True
    n_suff = 2
    fill: ClassVar[float] = 1.0
    prior_type = priors.NormalInverseGamma

    def __init__(self, *, mean: ArrayLike | None = None, variance: ArrayLike | None = None,
                 floor: float = 1e-6, prior: priors.NormalInverseGamma | None = None) -> None:
        self.floor = check_number(floor, "LogNormal(floor=...)", low=0.0, low_open=True)
        self._mean, self._variance = mean, variance
        self.check_given(mean=mean, variance=variance)
        self.accept_prior(prior)

    def arguments(self) -> dict[str, Any]:
        return self.with_prior({"mean": self._mean, "variance": self._variance, "floor": self.floor})

    def param_axes(self) -> dict[str, Axes]:
        return {"mean": ("latent", "event"), "variance": ("latent", "event")}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        log_x = np.log(x)
        return [log_x, log_x * log_x]

    def log_h(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return -np.log(x) - 0.5 * LOG_2PI

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        mean, variance = np.broadcast_arrays(params["mean"], params["variance"])
        eta_log, eta_loglog, log_partition = natural_parameters(mean, variance)
        return [eta_log, eta_loglog], log_partition

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        s_log, s_loglog = sums
        K, D = nk.shape
        empty, fallback, before = empty_components(nk), self.default_params(K, D), previous or {}
        mean = held_or(hold, "mean", (K, D), lambda: keep_empty(
            s_log / safe_counts(nk), before.get("mean"), fallback["mean"], empty))
        if "variance" in hold:
            return {"mean": mean, "variance": np.broadcast_to(np.asarray(hold["variance"], dtype=float),
                                                              (K, D)).copy()}, []
        raw = keep_empty(scatter(s_log, s_loglog, nk, mean) / safe_counts(nk), before.get("variance"),
                         fallback["variance"], empty)
        variance, low = apply_floor(raw, self.floor)
        return {"mean": mean, "variance": variance}, [
            (int(k), float(raw[k].min())) for k in np.flatnonzero(low.any(axis=1))]

    def posterior_mode(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params, previous: Params | None,
                       prior: BoundPrior) -> tuple[Params, Floored]:
        s_log, s_loglog = sums
        K, D = nk.shape
        mean = held_or(hold, "mean", (K, D), lambda: nig_mean(nk, s_log, prior))
        if "variance" in hold:
            return {"mean": mean, "variance": np.broadcast_to(np.asarray(hold["variance"], dtype=float),
                                                              (K, D)).copy()}, []
        raw = nig_variance(nk, s_log, s_loglog, mean, prior, mean_prior="mean" not in self.fixed)
        variance, low = apply_floor(raw, self.floor)
        return {"mean": mean, "variance": variance}, [
            (int(k), float(raw[k].min())) for k in np.flatnonzero(low.any(axis=1))]

    def prior_axes(self) -> dict[str, Axes]:
        return {name: ("event",) for name in ("mean", "kappa", "shape", "scale")}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """The Normal's weak prior on log x (its mean and variance from the data's log x)."""
        nk, (s_log, s_loglog) = self.split(stats, self.n_suff)
        return nig_weak(nk, s_log, s_loglog, K, self.floor)

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        return nig_log_prior(params["mean"], params["variance"], prior, held=self.fixed)

    def default_params(self, K: int, D: int) -> Params:
        return {"mean": np.zeros((K, D)), "variance": np.ones((K, D))}

    def n_free_params(self, K: int, D: int) -> int:
        return K * D * ((self._mean is None) + (self._variance is None))

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "mean", where)
        check_range(params, "variance", where, low=0.0)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        return (x <= 0) | np.isinf(x), "LogNormal data must be positive and finite (x > 0)"

    def seed_features(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)  # the family's own geometry; positive data (checked) give finite logs

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        mean, variance = params["mean"][labels], params["variance"][labels]
        return np.exp(mean + np.sqrt(variance) * rng.standard_normal(mean.shape))

    def expected_value(self, params: Params) -> np.ndarray:
        # exp(μ + σ²/2), capped below overflow: imputation must never write inf.
        return np.exp(np.minimum(params["mean"] + 0.5 * params["variance"], 709.0))

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        mean, variance = (np.asarray(values[p], dtype=float)[:, None] for p in ("mean", "variance"))

        def density(grid: np.ndarray) -> np.ndarray:
            x = np.asarray(grid, dtype=float)[None, :]
            inside = (x > 0) & np.isfinite(x)
            log_x = np.log(np.where(inside, x, 1.0))
            log_p = -0.5 * (log_x - mean) ** 2 / variance - log_x - 0.5 * np.log(2 * np.pi * variance)
            return np.where(inside, np.exp(log_p), 0.0)

        return Marginal(mean=np.exp(np.minimum(mean + 0.5 * variance, 709.0))[:, 0], density=density)
