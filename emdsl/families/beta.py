"""Beta distribution on (0, 1), independent for each element of a variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from emdsl._special import betaln
from emdsl.families._base import (
    Axes,
    ElementwiseFamily,
    Floored,
    Marginal,
    Params,
    check_number,
    check_range,
    empty_components,
    keep_empty,
    safe_counts,
)
from emdsl.families._newton import newton_ascent


class Beta(ElementwiseFamily):
    r"""Beta distribution with shapes α and β, independent for each element.

    .. math::

        p(x \mid \alpha, \beta) = \frac{x^{\alpha-1}(1-x)^{\beta-1}}{B(\alpha, \beta)},
            \quad 0 < x < 1

        \phi(x) = (\log x,\ \log(1-x)), \quad \eta = (\alpha - 1,\ \beta - 1), \quad
        A(\eta) = \log B(\alpha, \beta), \quad \log h(x) = 0

    The support is the open interval: 0 and 1 themselves are outside it (log x or
    log(1 − x) is −∞ there), so data with exact zeros or ones are rejected.

    M-step (generalized EM): Q(α, β) = (α−1)S₁ + (β−1)S₂ − N log B(α, β) is concave;
    safeguarded 2-D Newton steps on ψ(α) − ψ(α+β) = S₁/N, ψ(β) − ψ(α+β) = S₂/N,
    started from the previous values (or the geometric-mean approximation
    α ≈ ½ + G₁ / (2(1 − G₁ − G₂)), G = exp(S/N), as x̄ is not among the statistics),
    until ``|Δ| < 1e-12`` relative or 50 steps. Q never decreases.

    Parameters
    ----------
    alpha, beta : array_like, optional
        Fixed values (broadcast over states and elements); held, not learned.
    floor : float, default 1e-8
        Lower bound on 1/α and 1/β. A component on (nearly) equal values, whose α and
        β would grow without bound, is held there and reported (its spread
        −2 log(G₁ + G₂) ≈ 1/(α + β)).
    prior : None
        Beta has no conjugate prior ((α, β) jointly have none with a closed-form mode): ``prior=`` other than None is a
        :class:`~emdsl.ModelError`, and ``fit(prior="weak")`` leaves it unregularized.

    Examples
    --------
    >>> from emdsl.families.beta import Beta
    >>> Beta(alpha=2.0)
    Beta(alpha=2.0)
    """

    # Not standardized: the support (0, 1) is fixed, so neither a shift nor a scale of x
    # is allowed; data in percent must be divided by 100 by the user.
    param_names = ("alpha", "beta")
    continuous = True
    n_suff = 2
    fill: ClassVar[float] = 0.5
    newton_steps: int = 50

    def __init__(self, *, alpha: ArrayLike | None = None, beta: ArrayLike | None = None,
                 floor: float = 1e-8, prior: None = None) -> None:
        self.accept_prior(prior)  # no conjugate prior: any prior is a ModelError that says so
        self.floor = check_number(floor, "Beta(floor=...)", low=0.0, low_open=True)
        self._alpha, self._beta = alpha, beta
        self.check_given(alpha=alpha, beta=beta)

    def arguments(self) -> dict[str, Any]:
        return {"alpha": self._alpha, "beta": self._beta, "floor": self.floor}

    def param_axes(self) -> dict[str, Axes]:
        return {"alpha": ("latent", "event"), "beta": ("latent", "event")}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.log(x), np.log1p(-x)]

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        alpha, beta = np.broadcast_arrays(params["alpha"], params["beta"])
        return [alpha - 1.0, beta - 1.0], betaln(alpha, beta)

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        K, D = nk.shape
        names = self.param_names
        empty, fallback, before = empty_components(nk), self.default_params(K, D), previous or {}
        # Empty entries get Beta(1, 1)'s E log x = E log(1 − x) = −1 until keep_empty.
        logs = np.stack([np.where(empty, -1.0, s / safe_counts(nk)) for s in sums], axis=-1)
        geometric = np.exp(logs)
        spread = 0.0 - np.log(np.minimum(geometric.sum(axis=-1), 1.0))  # Jensen: ≥ 0, = 0 for equal values
        start = 0.5 + geometric / (2 * np.maximum(1.0 - geometric.sum(axis=-1, keepdims=True), 1e-300))
        start = start * np.minimum(1.0, 1.0 / (self.floor * start.max(axis=-1, keepdims=True)))
        for i, name in enumerate(names):
            if name in hold:
                start[..., i] = np.asarray(hold[name], dtype=float)
            elif before.get(name) is not None:
                value = np.broadcast_to(np.asarray(before[name], dtype=float), (K, D))
                start[..., i] = np.where(np.isfinite(value) & (value > 0), value, start[..., i])
        free = np.stack([np.full((K, D), name not in hold) for name in names], axis=-1)

        def value(theta: np.ndarray) -> np.ndarray:
            return (theta * logs).sum(axis=-1) - betaln(theta[..., 0], theta[..., 1])

        def slope(theta: np.ndarray) -> np.ndarray:
            return logs - special.digamma(theta) + special.digamma(theta.sum(axis=-1, keepdims=True))

        def curvature(theta: np.ndarray) -> np.ndarray:
            shared = special.polygamma(1, theta.sum(axis=-1))[..., None, None]
            return shared - special.polygamma(1, theta)[..., None] * np.eye(2)

        theta = start if not free.any() else newton_ascent(
            start, 1e-10, 1.0 / self.floor, value, slope, curvature, free=free, steps=self.newton_steps)
        params = {name: np.broadcast_to(np.asarray(hold[name], dtype=float), (K, D)).copy() if name in hold
                  else keep_empty(
            theta[..., i], before.get(name), fallback[name], empty) for i, name in enumerate(names)}
        capped = ((theta >= (1.0 - 1e-9) / self.floor) & free).any(axis=-1) & ~empty
        floored = [(int(k), float(2 * spread[k][capped[k]].min())) for k in np.flatnonzero(capped.any(axis=1))]
        return params, floored

    def default_params(self, K: int, D: int) -> Params:
        return {"alpha": np.ones((K, D)), "beta": np.ones((K, D))}

    def n_free_params(self, K: int, D: int) -> int:
        return K * D * ((self._alpha is None) + (self._beta is None))

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "alpha", where, low=0.0)
        check_range(params, "beta", where, low=0.0)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        return (x <= 0) | (x >= 1), "Beta data must lie strictly between 0 and 1 (0 and 1 themselves are outside)"

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return rng.beta(params["alpha"][labels], params["beta"][labels])

    def expected_value(self, params: Params) -> np.ndarray:
        return params["alpha"] / (params["alpha"] + params["beta"])

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        alpha, beta = (np.asarray(values[p], dtype=float)[:, None] for p in ("alpha", "beta"))

        def density(grid: np.ndarray) -> np.ndarray:
            x = np.asarray(grid, dtype=float)[None, :]
            inside = (x > 0) & (x < 1)
            safe = np.where(inside, x, 0.5)
            log_p = (special.xlogy(alpha - 1, safe) + special.xlog1py(beta - 1, -safe)
                     - betaln(alpha, beta))
            return np.where(inside, np.exp(log_p), 0.0)

        return Marginal(mean=(alpha / (alpha + beta))[:, 0], density=density)
