"""Poisson distribution of counts, independent for each element of a variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import gammaln

from emdsl import priors
from emdsl.families._base import (
    Axes,
    BoundPrior,
    ElementwiseFamily,
    Floored,
    Marginal,
    Params,
    check_range,
    empty_components,
    held_or,
    keep_empty,
    safe_counts,
)

#: the weak prior's pseudo-samples (fit(prior="weak")), as mclust's shrinkage κ = 0.01 of the mean
WEAK_COUNT = 0.01

# A rate of exactly 0 is a valid MLE (a state that only ever saw zeros); inside the log
# it is floored so that η = log λ stays finite and 0 · η never becomes NaN.
_TINY = 1e-300


#: the largest count the count families take. Their log-likelihood sums terms of size
#: x·log λ and log x! ≈ x log x that cancel to O(log x) per value; float64 rounds those
#: terms by ε·x·log x, 0.006 at 1e12 but 150 at 2^53 (and x·log λ overflows near 1e306)
MAX_COUNT = 1e12
#: the reason given when a count exceeds MAX_COUNT
TOO_LARGE = ("counts above 1e12 cannot be fitted in float64 (the log-likelihood's terms x·log λ "
             "and log x! then carry rounding errors beyond 0.01 per value, and overflow near 1e306); "
             "model such counts as continuous values (e.g. LogNormal or Normal)")


def non_integer_or_negative(x: np.ndarray) -> np.ndarray:
    """Present values that are not finite non-negative integers (NaN is missing, never bad)."""
    with np.errstate(invalid="ignore"):
        return ~np.isnan(x) & ~(np.isfinite(x) & (x >= 0) & (x == np.round(x)))


def too_large(x: np.ndarray) -> np.ndarray:
    """Present finite counts above :data:`MAX_COUNT`."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & (x > MAX_COUNT)


def discrete_marginal(mean: np.ndarray, log_pmf: Any) -> Marginal:
    """A per-state marginal from ``log_pmf(grid (1, G)) -> (K, G)``, 0 off the integers."""

    def density(grid: np.ndarray) -> np.ndarray:
        grid = np.asarray(grid, dtype=float)[None, :]
        inside = (grid >= 0) & (grid == np.round(grid))
        return np.where(inside, np.exp(log_pmf(np.where(inside, grid, 0.0))), 0.0)

    return Marginal(mean=np.asarray(mean, dtype=float), density=density, discrete=True)


class Poisson(ElementwiseFamily):
    r"""Poisson distribution of counts, independent for each element of a variable.

    .. math::

        p(x \mid \lambda) = \frac{\lambda^x e^{-\lambda}}{x!}, \qquad
        \phi(x) = x, \quad \eta = \log\lambda, \quad A(\eta) = e^\eta = \lambda, \quad
        \log h(x) = -\log x!

    M-step (moment matching): λ_kd = S_x / N_kd, the responsibility-weighted mean
    count over the samples where element d is observed. A rate of 0 (a state that
    saw only zeros) is kept; its log is floored at 1e-300 so H stays finite. With a
    :class:`~emdsl.priors.Gamma` (α, β) prior the M-step is the posterior mode
    λ = (S_x + α − 1) / (N + β).

    Parameters
    ----------
    rate : array_like, optional
        Fixed rates λ ≥ 0, broadcast over (states, elements); held, not learned.
    prior : emdsl.priors.Gamma, optional
        A conjugate prior on the rate; the M-step becomes the MAP estimate.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Poisson()
    Poisson()
    >>> em.Poisson(rate=[1.0, 5.0])
    Poisson(rate=[1.0, 5.0])
    """

    param_names = ("rate",)
    prior_type = priors.Gamma

    def __init__(self, *, rate: ArrayLike | None = None, prior: priors.Gamma | None = None) -> None:
        self._rate = rate
        self.check_given(rate=rate)
        self.accept_prior(prior)

    def arguments(self) -> dict[str, Any]:
        return self.with_prior({"rate": self._rate})

    def param_axes(self) -> dict[str, Axes]:
        return {"rate": ("latent", "event")}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]

    def log_h(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return -gammaln(x + 1.0)

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        rate = np.asarray(params["rate"], dtype=float)
        return [np.log(np.maximum(rate, _TINY))], rate

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        K, D = nk.shape
        rate = held_or(hold, "rate", (K, D), lambda: keep_empty(
            np.maximum(sums[0], 0.0) / safe_counts(nk), (previous or {}).get("rate"),
            self.default_params(K, D)["rate"], empty_components(nk)))
        return {"rate": rate}, []

    def posterior_mode(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params, previous: Params | None,
                       prior: BoundPrior) -> tuple[Params, Floored]:
        K, D = nk.shape
        return {"rate": held_or(hold, "rate", (K, D), lambda: (
            np.maximum(sums[0], 0.0) + prior["shape"] - 1.0) / (nk + prior["rate"]))}, []

    def prior_axes(self) -> dict[str, Axes]:
        return {"shape": ("event",), "rate": ("event",)}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """Gamma(1 + 0.01 x̄, 0.01): 0.01 of a pseudo-sample at the data's mean count x̄."""
        nk, (s_x,) = self.split(stats, self.n_suff)
        mean = np.where(nk > 0, np.maximum(s_x, 0.0) / np.where(nk > 0, nk, 1.0), 0.0)
        return {"shape": 1.0 + WEAK_COUNT * mean, "rate": np.full_like(mean, WEAK_COUNT)}

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        return priors.total(priors.gamma_terms(params["rate"], prior["shape"], prior["rate"]))

    def default_params(self, K: int, D: int) -> Params:
        return {"rate": np.ones((K, D))}

    def n_free_params(self, K: int, D: int) -> int:
        return 0 if self._rate is not None else K * D

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "rate", where, low=0.0, low_open=False)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        bad, large = non_integer_or_negative(x), too_large(x)
        reason = "Poisson counts must be non-negative integers"
        return bad | large, reason + (f"; {TOO_LARGE}" if large.any() else "")

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return rng.poisson(params["rate"][labels]).astype(float)

    def expected_value(self, params: Params) -> np.ndarray:
        return np.asarray(params["rate"], dtype=float)

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        rate = np.asarray(values["rate"], dtype=float)[:, None]
        return discrete_marginal(rate[:, 0], lambda grid: grid * np.log(np.maximum(rate, _TINY))
                                 - rate - gammaln(grid + 1.0))
