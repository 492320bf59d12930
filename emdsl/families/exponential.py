"""Exponential distribution of non-negative values, independent for each element of a variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    check_range,
    empty_components,
    held_or,
    keep_empty,
    safe_counts,
)

# A state whose samples are all exactly 0 has an unbounded likelihood (λ → ∞). The mean
# 1/λ is bounded below by this value, the exact M-step under the constraint λ ≤ 1e100
# (Q is concave in λ), so EM stays monotone and −λx stays far from overflow.
_SMALLEST_MEAN = 1e-100
# ... and λ → 0 keeps A = −log λ finite. Not larger: 1/x̄ of data near 1.8e308 is 5.6e-309
# (subnormal), and a floor above it would change A for such a state, and with it EM's monotonicity.
_TINY = float(np.finfo(float).smallest_subnormal)
#: the weak prior's pseudo-samples (fit(prior="weak"))
WEAK_COUNT = 0.01


class Exponential(ElementwiseFamily):
    r"""Exponential distribution of non-negative values, independent for each element.

    .. math::

        p(x \mid \lambda) = \lambda e^{-\lambda x} \quad (x \ge 0), \qquad
        \phi(x) = x, \quad \eta = -\lambda, \quad A(\eta) = -\log(-\eta) = -\log\lambda, \quad
        \log h(x) = 0

    M-step (moment matching): 1/λ_kd = S_x / N_kd, the responsibility-weighted mean
    over the samples where element d is observed (λ capped at 1e100 for a state
    that saw only zeros). With a :class:`~emdsl.priors.Gamma` (α, β) prior on λ the
    M-step is the posterior mode λ = (N + α − 1) / (S_x + β).

    Parameters
    ----------
    rate : array_like, optional
        Fixed rates λ > 0, broadcast over (states, elements); held, not learned.
    prior : emdsl.priors.Gamma, optional
        A conjugate prior on the rate (β in the units of x); the M-step becomes the MAP
        estimate.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Exponential()
    Exponential()
    >>> em.Exponential(rate=2.0)
    Exponential(rate=2.0)
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

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        rate = np.asarray(params["rate"], dtype=float)
        return [-rate], -np.log(np.maximum(rate, _TINY))

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        K, D = nk.shape
        mean = np.maximum(sums[0] / safe_counts(nk), _SMALLEST_MEAN)
        rate = held_or(hold, "rate", (K, D), lambda: keep_empty(
            1.0 / mean, (previous or {}).get("rate"), self.default_params(K, D)["rate"],
            empty_components(nk)))
        return {"rate": rate}, []

    def posterior_mode(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params, previous: Params | None,
                       prior: BoundPrior) -> tuple[Params, Floored]:
        K, D = nk.shape
        # Q + log p is concave in λ: capping at 1/_SMALLEST_MEAN is the exact constrained step.
        return {"rate": held_or(hold, "rate", (K, D), lambda: np.minimum(
            (nk + prior["shape"] - 1.0) / (np.maximum(sums[0], 0.0) + prior["rate"]), 1.0 / _SMALLEST_MEAN))}, []

    def prior_axes(self) -> dict[str, Axes]:
        return {"shape": ("event",), "rate": ("event",)}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """Gamma(1.01, 0.01 x̄) on λ: 0.01 of a pseudo-sample at the data's mean x̄."""
        nk, (s_x,) = self.split(stats, self.n_suff)
        mean = np.where(nk > 0, s_x / np.where(nk > 0, nk, 1.0), 1.0)
        return {"shape": np.full_like(mean, 1.0 + WEAK_COUNT),
                "rate": WEAK_COUNT * np.maximum(mean, _SMALLEST_MEAN)}

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        return priors.total(priors.gamma_terms(params["rate"], prior["shape"], prior["rate"]))

    def default_params(self, K: int, D: int) -> Params:
        return {"rate": np.ones((K, D))}

    def n_free_params(self, K: int, D: int) -> int:
        return 0 if self._rate is not None else K * D

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "rate", where, low=0.0)

    def within_m_step_bounds(self, params: Mapping[str, np.ndarray]) -> bool:
        # the M-steps cap λ at 1 / _SMALLEST_MEAN; a held rate is not learned, so not bounded
        return "rate" in self.fixed or bool(np.all(np.asarray(params["rate"]) <= 1.0 / _SMALLEST_MEAN))

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        with np.errstate(invalid="ignore"):
            return ~np.isnan(x) & ~(np.isfinite(x) & (x >= 0)), "Exponential values must be finite and >= 0"

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return rng.exponential(1.0 / params["rate"][labels])

    def expected_value(self, params: Params) -> np.ndarray:
        return 1.0 / np.asarray(params["rate"], dtype=float)

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        rate = np.asarray(values["rate"], dtype=float)[:, None]

        def density(grid: np.ndarray) -> np.ndarray:
            grid = np.asarray(grid, dtype=float)[None, :]
            return np.where(grid >= 0, rate * np.exp(-rate * np.maximum(grid, 0.0)), 0.0)

        return Marginal(mean=1.0 / rate[:, 0], density=density)
