"""Bernoulli distribution of 0/1 values, independent for each element of a variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emdsl import priors
from emdsl._special import betaln
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

# p = 0 or 1 is a valid MLE (a state that saw only zeros or only ones). log p and
# log(1 − p) are floored at log(1e-300) ≈ −690, so η and A stay finite and 0 · η is 0.
_LOG_TINY = float(np.log(1e-300))


def log_odds(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """η = log p − log(1 − p) and A = −log(1 − p), both finite at p = 0 and p = 1."""
    probs = np.asarray(probs, dtype=float)
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(probs), _LOG_TINY)
        log_q = np.maximum(np.log1p(-probs), _LOG_TINY)  # log1p: exact for small p
    return log_p - log_q, -log_q


def fraction(successes: np.ndarray, trials: np.ndarray, hold: Params, previous: Params | None,
             fallback: np.ndarray) -> np.ndarray:
    """p = S_x / N (clipped to [0, 1] against rounding), or the held or previous value."""
    K, D = trials.shape
    return held_or(hold, "probs", (K, D), lambda: keep_empty(
        np.clip(successes / safe_counts(trials), 0.0, 1.0), (previous or {}).get("probs"),
        fallback, empty_components(trials)))


#: the weak prior's pseudo-trials (fit(prior="weak"))
WEAK_TRIALS = 0.01


def posterior_fraction(successes: np.ndarray, trials: np.ndarray, hold: Params, previous: Params | None,
                       fallback: np.ndarray, prior: BoundPrior) -> np.ndarray:
    """The posterior mode p = (S_x + a − 1) / (N + a + b − 2) under a Beta(a, b) prior.

    Where the denominator is 0 (no trials and a = b = 1) every p is a mode: the
    previous value is kept.
    """
    K, D = trials.shape
    a, b = prior["a"], prior["b"]
    denominator = np.broadcast_to(trials + a + b - 2.0, (K, D))
    empty = denominator <= 1e-12 * max(float(np.max(denominator, initial=0.0)), 1.0)
    return held_or(hold, "probs", (K, D), lambda: keep_empty(
        np.clip((successes + a - 1.0) / np.where(empty, 1.0, denominator), 0.0, 1.0),
        (previous or {}).get("probs"), fallback, empty))


def beta_weak(trials: np.ndarray, successes: np.ndarray) -> Params:
    """Beta(1 + 0.01 p̄, 1 + 0.01 (1 − p̄)): 0.01 pseudo-trials at the data's fraction p̄."""
    share = np.clip(np.where(trials > 0, successes / np.where(trials > 0, trials, 1.0), 0.5), 0.0, 1.0)
    return {"a": 1.0 + WEAK_TRIALS * share, "b": 1.0 + WEAK_TRIALS * (1.0 - share)}


def beta_log_prior(params: Params, prior: BoundPrior) -> tuple[float, float]:
    """log Beta(p; a, b) summed over states and elements.

    log p and log(1 − p) are floored at log 1e-300, as in η: with counts near 1e100 the
    mode 1 − (b − 1)/(N + a + b − 2) rounds to exactly 1, whose (b − 1) log(1 − p) would be −∞.
    """
    p, a, b = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (params["probs"], prior["a"], prior["b"])))
    with np.errstate(divide="ignore"):
        log_p, log_q = np.maximum(np.log(p), _LOG_TINY), np.maximum(np.log1p(-p), _LOG_TINY)
    # (a − 1)·log p with 0·log 0 = 0 (a = 1 at p = 0), as priors.beta_terms
    return priors.total([np.where(a == 1.0, 0.0, (a - 1.0) * log_p), np.where(b == 1.0, 0.0, (b - 1.0) * log_q),
                         -betaln(a, b)])


class _SuccessProbability(ElementwiseFamily):
    """What Bernoulli and Binomial share: a success probability per state and element, its
    log-odds as η, the fraction of successes as the M-step, and a Beta prior. The presence
    rows of Φ hold the trials (1 per observed Bernoulli element)."""

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        eta, log_partition = log_odds(params["probs"])
        return [eta], log_partition

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        K, D = nk.shape
        return {"probs": fraction(sums[0], nk, hold, previous, self.default_params(K, D)["probs"])}, []

    def posterior_mode(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params, previous: Params | None,
                       prior: BoundPrior) -> tuple[Params, Floored]:
        K, D = nk.shape
        return {"probs": posterior_fraction(sums[0], nk, hold, previous, self.default_params(K, D)["probs"],
                                            prior)}, []

    def prior_axes(self) -> dict[str, Axes]:
        return {"a": ("event",), "b": ("event",)}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        trials, (s_x,) = self.split(stats, self.n_suff)
        return beta_weak(trials, s_x)

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        return beta_log_prior(params, prior)


class Bernoulli(_SuccessProbability):
    r"""Bernoulli distribution of 0/1 values, independent for each element of a variable.

    .. math::

        p(x \mid p) = p^x (1-p)^{1-x}, \qquad
        \phi(x) = x, \quad \eta = \log\frac{p}{1-p}, \quad
        A(\eta) = \log(1 + e^\eta) = -\log(1-p), \quad \log h(x) = 0

    M-step (moment matching): p_kd = S_x / N_kd, the responsibility-weighted fraction
    of ones among the samples where element d is observed. p = 0 and p = 1 are kept;
    log p and log(1 − p) are floored at log 1e-300 so H stays finite. With a
    :class:`~emdsl.priors.Beta` (a, b) prior the M-step is the posterior mode
    p = (S_x + a − 1) / (N + a + b − 2).

    Parameters
    ----------
    probs : array_like, optional
        Fixed probabilities of a 1, in [0, 1], broadcast over (states, elements); held.
    prior : emdsl.priors.Beta, optional
        A conjugate prior on p; the M-step becomes the MAP estimate.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Bernoulli()
    Bernoulli()
    >>> em.Bernoulli(probs=[0.1, 0.9])
    Bernoulli(probs=[0.1, 0.9])
    """

    param_names = ("probs",)
    prior_type = priors.Beta

    def __init__(self, *, probs: ArrayLike | None = None, prior: priors.Beta | None = None) -> None:
        self._probs = probs
        self.check_given(probs=probs)
        self.accept_prior(prior)

    def arguments(self) -> dict[str, Any]:
        return self.with_prior({"probs": self._probs})

    def param_axes(self) -> dict[str, Axes]:
        return {"probs": ("latent", "event")}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]

    def default_params(self, K: int, D: int) -> Params:
        return {"probs": np.full((K, D), 0.5)}

    def n_free_params(self, K: int, D: int) -> int:
        return 0 if self._probs is not None else K * D

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "probs", where, low=0.0, high=1.0, low_open=False, high_open=False)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        return ~np.isnan(x) & (x != 0) & (x != 1), "Bernoulli values must be 0 or 1"

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        probs = params["probs"][labels]
        return (rng.random(probs.shape) < probs).astype(float)

    def expected_value(self, params: Params) -> np.ndarray:
        return np.asarray(params["probs"], dtype=float)

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        probs = np.asarray(values["probs"], dtype=float)

        def density(grid: np.ndarray) -> np.ndarray:
            grid = np.asarray(grid, dtype=float)[None, :]
            return np.where(grid == 1, probs[:, None], np.where(grid == 0, 1.0 - probs[:, None], 0.0))

        return Marginal(mean=probs, density=density, discrete=True)
