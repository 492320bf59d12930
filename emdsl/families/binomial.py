"""Binomial distribution: successes out of a number of trials, independent for each element."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import gammaln

from emdsl import priors
from emdsl.errors import ModelError
from emdsl.families._base import (
    Axes,
    Marginal,
    Params,
    check_range,
)
from emdsl.families.bernoulli import _SuccessProbability, log_odds
from emdsl.families.poisson import (
    MAX_COUNT,
    TOO_LARGE,
    discrete_marginal,
    non_integer_or_negative,
    too_large,
)


class Binomial(_SuccessProbability):
    r"""Binomial distribution: x successes out of n trials, independent for each element.

    .. math::

        p(x \mid n, p) = \binom{n}{x} p^x (1-p)^{n-x}, \qquad
        \phi(x) = x, \quad \eta = \log\frac{p}{1-p}, \quad
        A(\eta) = n \log(1 + e^\eta) = -n \log(1-p), \quad \log h(x) = \log\binom{n}{x}

    The presence row of an element is its number of trials n where x is observed (0
    where missing), so that n·A(η) rides along in H Φ and its sums are the trials
    N_kd = Σ_n r_nk n. M-step (moment matching): p_kd = S_x / N_kd, the
    responsibility-weighted successes over the trials. p = 0 and 1 are kept, with
    the logs floored at log 1e-300 as for :class:`Bernoulli`. With a
    :class:`~emdsl.priors.Beta` (a, b) prior the M-step is the posterior mode
    p = (S_x + a − 1) / (N_kd + a + b − 2).

    Parameters
    ----------
    trials : int or str
        The number of trials: a positive integer shared by every sample and element,
        or the name of a data variable holding it per sample (and element).
    probs : array_like, optional
        Fixed success probabilities in [0, 1], broadcast over (states, elements); held.
    prior : emdsl.priors.Beta, optional
        A conjugate prior on p; the M-step becomes the MAP estimate.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Binomial(trials=10)
    Binomial(10)
    >>> em.Binomial(trials="n_seeds").data_arguments()
    {'trials': 'n_seeds'}
    """

    param_names = ("probs",)
    prior_type = priors.Beta

    def __init__(self, trials: int | str, *, probs: ArrayLike | None = None,
                 prior: priors.Beta | None = None) -> None:
        if isinstance(trials, str):
            if not trials:
                raise ModelError("Binomial(trials=...): the name of the trials variable is empty")
        elif isinstance(trials, bool) or not isinstance(trials, int | np.integer) or not 1 <= trials <= MAX_COUNT:
            raise ModelError("Binomial(trials=...): expected a positive integer number of trials (up to "
                             f"1e12) or the name of a data variable holding them, got {trials!r}")
        self.trials: int | str = trials if isinstance(trials, str) else int(trials)
        self._probs = probs
        self.check_given(probs=probs)
        self.accept_prior(prior)

    def arguments(self) -> dict[str, Any]:
        return self.with_prior({"trials": self.trials, "probs": self._probs})

    def data_arguments(self) -> dict[str, str]:
        return {"trials": self.trials} if isinstance(self.trials, str) else {}

    def param_axes(self) -> dict[str, Axes]:
        return {"probs": ("latent", "event")}

    def _trials(self, aux: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """The number of trials broadcast to ``shape`` (in the orientation of the data)."""
        if not isinstance(self.trials, str):
            return np.full(shape, float(self.trials))
        if "trials" not in aux:
            raise ModelError(f"Binomial(trials={self.trials!r}): the number of trials (data variable "
                             f"{self.trials!r}) was not passed along with the data")
        return np.broadcast_to(np.asarray(aux["trials"], dtype=float), shape)

    def presence(self, observed: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.where(observed, self._trials(aux, observed.shape), 0.0)

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [x]

    def log_h(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        n = self._trials(aux, x.shape)
        return gammaln(n + 1.0) - gammaln(x + 1.0) - gammaln(n - x + 1.0)

    def default_params(self, K: int, D: int) -> Params:
        return {"probs": np.full((K, D), 0.5)}

    def n_free_params(self, K: int, D: int) -> int:
        return 0 if self._probs is not None else K * D

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "probs", where, low=0.0, high=1.0, low_open=False, high_open=False)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        # x arrives as (b × D); aux is taken in the same orientation (transposed if it is D × b).
        if isinstance(self.trials, str) and "trials" in aux and np.shape(aux["trials"]) != x.shape \
                and np.shape(aux["trials"])[::-1] == x.shape:
            aux = {"trials": np.asarray(aux["trials"]).T}
        n = self._trials(aux, x.shape)
        present = ~np.isnan(x)
        bad_trials = present & non_integer_or_negative(np.where(np.isnan(n), -1.0, n))
        bad_counts = non_integer_or_negative(x)
        with np.errstate(invalid="ignore"):
            above = present & ~bad_trials & ~bad_counts & (x > n)
        problems = ["Binomial counts must be integers from 0 to the number of trials"]
        if above.any():
            problems.append("counts above trials")
        if bad_trials.any():
            problems.append(f"the number of trials ({self.trials!r}) must be a non-negative integer "
                            "wherever the count is observed")
        large = present & ~bad_trials & too_large(n)
        if large.any():
            problems.append(TOO_LARGE.replace("counts above", "numbers of trials above"))
        return bad_counts | above | bad_trials | large, "; ".join(problems)

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        probs = params["probs"][labels]
        return rng.binomial(self._trials(aux, probs.shape).astype(np.int64), probs).astype(float)

    def expected_value(self, params: Params) -> np.ndarray:
        # With a trials variable the count depends on each sample's n; this is n·p per trial (n = 1).
        n = 1.0 if isinstance(self.trials, str) else float(self.trials)
        return n * np.asarray(params["probs"], dtype=float)

    def impute(self, params: Params, x: np.ndarray, resp: np.ndarray,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each hole becomes Σ_k r_nk n_nd p_kd, with each sample's own number of trials."""
        trials = aux["trials"] if "trials" in aux else float(self.trials)  # type: ignore[arg-type]
        filled = (resp @ np.asarray(params["probs"], dtype=float)).T * trials
        return np.where(np.isnan(x), filled, x)

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        probs = np.asarray(values["probs"], dtype=float)[:, None]
        n = 1.0 if isinstance(self.trials, str) else float(self.trials)
        eta, log_partition = log_odds(probs)

        def log_pmf(grid: np.ndarray) -> np.ndarray:
            inside = grid <= n
            safe = np.minimum(grid, n)
            log_h = gammaln(n + 1.0) - gammaln(safe + 1.0) - gammaln(n - safe + 1.0)
            return np.where(inside, safe * eta - n * log_partition + log_h, -np.inf)

        return discrete_marginal(n * probs[:, 0], log_pmf)
