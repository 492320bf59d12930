"""Multinomial distribution of counts over the categories of one event dimension."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import gammaln

from emdsl import priors
from emdsl.errors import ModelError
from emdsl.families._base import (
    Axes,
    BoundPrior,
    Floored,
    Marginal,
    ObservedFamily,
    Params,
    as_float,
    empty_components,
    held_or,
    keep_empty,
)
from emdsl.families.binomial import Binomial
from emdsl.families.categorical import _check_rows, log_probs, unit_rows
from emdsl.families.poisson import (
    MAX_COUNT,
    TOO_LARGE,
    non_integer_or_negative,
    too_large,
)

#: the weak prior's pseudo-events (fit(prior="weak"))
WEAK_EVENTS = 0.01


class Multinomial(ObservedFamily):
    r"""Multinomial distribution of counts over the D categories of one event dimension.

    .. math::

        p(x \mid p) = \frac{n!}{\prod_l x_l!} \prod_l p_l^{x_l}, \quad n = \sum_l x_l, \qquad
        \phi(x) = x, \quad \eta = \log p, \quad A(\eta) = 0, \quad
        \log h(x) = \log n! - \sum_l \log x_l!

    The probabilities are normalized, so A = 0 and each sample's total n only enters
    log h. Rows of Φ: one presence row (1 where the whole event is observed), then the
    counts. An event is observed completely or not at all: an all-NaN event is
    missing, and one with only some NaN is an error (a multinomial cannot be
    marginalized over part of its categories without knowing n). M-step (moment
    matching): p_kl = S_kl / Σ_l S_kl, the responsibility-weighted share of category
    l among all counts of state k. log p is floored at log 1e-300, so p_l = 0 stays
    finite in H. With a :class:`~emdsl.priors.Dirichlet` (α) prior the M-step is the
    posterior mode p_kl = (S_kl + α_l − 1) / (Σ_l S_kl + Σ_l α_l − D).

    Parameters
    ----------
    dim : str, optional
        The category dimension, inferred as for :class:`MultivariateNormal`.
    probs : array_like, optional
        Fixed category probabilities (D,) or (states × D), each row summing to 1; held.
    trials : int, optional
        The total count of every event; then each event must sum to it, and
        :meth:`Fit.sample` draws events of this size.
    prior : emdsl.priors.Dirichlet, optional
        A conjugate prior on the category probabilities (α per category, in the
        order of the event dimension); the M-step becomes the MAP estimate.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Multinomial()
    Multinomial()
    >>> em.Multinomial("word", trials=20)
    Multinomial(dim='word', trials=20)
    """

    param_names = ("probs",)
    multivariate = True
    prior_type = priors.Dirichlet

    def __init__(self, dim: Hashable | None = None, *, probs: ArrayLike | None = None,
                 trials: int | None = None, prior: priors.Dirichlet | None = None) -> None:
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int | np.integer)
                                   or not 1 <= trials <= MAX_COUNT):
            raise ModelError(f"Multinomial(trials=...): expected a positive integer up to 1e12, "
                             f"got {trials!r}")
        if dim is not None and not (isinstance(dim, str) and dim):
            raise ModelError(f"Multinomial(dim=...): expected the name of a dimension (a string), got {dim!r}")
        if probs is not None:
            _check_rows(as_float(probs, "Multinomial(probs=...)"), "Multinomial(probs=...)", None)
        self.dim, self._probs = dim, probs
        self.trials = None if trials is None else int(trials)
        self.accept_prior(prior)

    def arguments(self) -> dict[str, Any]:
        return self.with_prior({"dim": self.dim, "probs": self._probs, "trials": self.trials})

    def param_axes(self) -> dict[str, Axes]:
        return {"probs": ("latent", "event")}

    def n_rows(self, D: int) -> int:
        return 1 + D

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        complete = ~np.isnan(x).any(axis=0)
        out[0] = complete
        out[1:] = x
        if not complete.all():
            out[1:, ~complete] = 0.0

    def natural(self, params: Params) -> np.ndarray:
        log_p = log_probs(np.asarray(params["probs"], dtype=float))
        return np.hstack([np.zeros((log_p.shape[0], 1)), log_p])

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        complete = ~np.isnan(x).any(axis=0)
        safe = np.where(complete, x, 0.0)
        return gammaln(safe.sum(axis=0) + 1.0) - gammaln(safe + 1.0).sum(axis=0)

    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: BoundPrior | None = None) -> tuple[Params, Floored]:
        K, D = stats.shape[0], stats.shape[1] - 1
        counts = np.maximum(stats[:, 1:], 0.0)
        if prior is not None:  # pseudo-counts: the posterior mode
            counts = counts + prior["alpha"] - 1.0
        total = counts.sum(axis=1)
        # A state whose events all had zero counts learned nothing about p either (nor,
        # with a prior of α = 1, from the prior: every p is then a mode).
        empty = (total <= 0) if prior is not None else empty_components(stats[:, 0]) | (total <= 0)
        probs = held_or(hold, "probs", (K, D), lambda: keep_empty(
            counts / np.where(empty, 1.0, total)[:, None], (previous or {}).get("probs"),
            self.default_params(K, D)["probs"], empty))
        return {"probs": probs}, []

    def prior_axes(self) -> dict[str, Axes]:
        return {"alpha": ("event",)}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """Dirichlet(1 + 0.01 c̄): 0.01 of a pseudo-event with the data's mean counts c̄."""
        events, counts = float(stats[0]), np.maximum(stats[1:], 0.0)
        mean = counts / events if events > 0 else np.zeros_like(counts)
        return {"alpha": 1.0 + WEAK_EVENTS * mean}

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        return priors.total(priors.dirichlet_terms(params["probs"], prior["alpha"]))

    def default_params(self, K: int, D: int) -> Params:
        return {"probs": np.full((K, D), 1.0 / D)}

    def n_free_params(self, K: int, D: int) -> int:
        return 0 if self._probs is not None else K * (D - 1)

    def tidy_params(self, params: Mapping[str, np.ndarray]) -> Params:
        return unit_rows(params, ("probs",))

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        if "probs" in params:
            _check_rows(np.asarray(params["probs"], dtype=float), where, None)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        missing = np.isnan(x)
        partial = ~missing & missing.any(axis=1, keepdims=True)
        bad = non_integer_or_negative(x)
        problems = ["Multinomial counts must be non-negative integers"]
        if self.trials is not None:
            with np.errstate(invalid="ignore"):
                off = ~missing & ~missing.any(axis=1, keepdims=True) & (
                    x.sum(axis=1, keepdims=True) != self.trials)
            bad |= off
            problems[0] += f" summing to trials={self.trials} over the event"
        with np.errstate(invalid="ignore"):  # the total n enters log n!: it is a count too
            large = too_large(x) | (~missing & (np.nansum(np.where(bad, 0.0, x), axis=1, keepdims=True) > MAX_COUNT))
        if large.any():
            bad |= large
            problems.append(TOO_LARGE.replace("counts above", "counts (or event totals) above"))
        if partial.any():
            problems.append("an event with some but not all counts missing (NaN) cannot be marginalized "
                            "for a multinomial: the total count n is unknown; drop or fill those events")
        return bad | partial, "; ".join(problems)

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        if "trials" in aux:
            trials = np.broadcast_to(np.asarray(aux["trials"], dtype=float)[:, :1], (len(labels), 1))[:, 0]
        elif self.trials is not None:
            trials = np.full(len(labels), self.trials)
        else:
            raise ModelError("Multinomial: drawing events needs their total count; declare it, "
                             "e.g. em.Multinomial(trials=20)")
        probs = np.asarray(params["probs"], dtype=float)
        probs = probs / probs.sum(axis=1, keepdims=True)
        return rng.multinomial(trials.astype(np.int64), probs[labels]).astype(float)

    def expected_value(self, params: Params) -> np.ndarray:
        # Without a declared total, the expected share of each category (n = 1).
        return (1.0 if self.trials is None else float(self.trials)) * np.asarray(params["probs"], dtype=float)

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        # One category's count is Binomial(n, p_l); n = 1 (the share) without a declared total.
        return Binomial(self.trials or 1).marginal(values)
