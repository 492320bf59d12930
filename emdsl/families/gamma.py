"""Gamma distribution (shape, rate), independent for each element of a variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

from emdsl.errors import ModelError
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
from emdsl.families._newton import Fn, newton_ascent


def log_minus_digamma(a: np.ndarray) -> np.ndarray:
    """log a − ψ(a), through its asymptotic series for a ≥ 10 (the difference cancels there)."""
    u = 1.0 / np.maximum(a, 10.0)
    series = u / 2 + u**2 / 12 - u**4 / 120 + u**6 / 252 - u**8 / 240 + u**10 / 132 - 691 * u**12 / 32760
    return np.where(a >= 10.0, series, np.log(a) - special.digamma(a))


def trigamma_minus_inverse(a: np.ndarray) -> np.ndarray:
    """ψ'(a) − 1/a (positive), through its asymptotic series for a ≥ 10."""
    u = 1.0 / np.maximum(a, 10.0)
    series = u**2 / 2 + u**3 / 6 - u**5 / 30 + u**7 / 42 - u**9 / 30 + 5 * u**11 / 66 - 691 * u**13 / 2730
    return np.where(a >= 10.0, series, special.polygamma(1, a) - 1.0 / a)


def profile(a: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Q per unit weight at rate = a/x̄, up to a constant: a log a − a − log Γ(a) − a·s."""
    u = 1.0 / np.maximum(a, 10.0)
    remainder = u / 12 - u**3 / 360 + u**5 / 1260 - u**7 / 1680 + u**9 / 1188 - 691 * u**11 / 360360
    stirling = 0.5 * np.log(np.maximum(a, 10.0) / (2 * np.pi)) - remainder
    return np.where(a >= 10.0, stirling, a * np.log(a) - a - special.gammaln(a)) - a * spread


class Gamma(ElementwiseFamily):
    r"""Gamma distribution with shape a and rate b, independent for each element.

    .. math::

        p(x \mid a, b) = \frac{b^a}{\Gamma(a)} x^{a-1} e^{-bx}, \quad x > 0

        \phi(x) = (x,\ \log x), \quad \eta = (-b,\ a - 1), \quad
        A(\eta) = \log\Gamma(a) - a\log b, \quad \log h(x) = 0

    M-step (generalized EM): given a, b = a N / S_x in closed form; a maximizes the
    profile Q(a) = N[a log a − a − log Γ(a) − a s], s = log(S_x/N) − S_log/N ≥ 0, by
    safeguarded Newton steps on log a − ψ(a) = s, started from the previous shape (or
    Minka's approximation) until ``|Δa| < 1e-12·a`` or 50 steps. Q never decreases.

    Parameters
    ----------
    shape, rate : array_like, optional
        Fixed values (broadcast over states and elements); held, not learned.
    floor : float, default 1e-8
        Lower bound on 1/shape, the squared coefficient of variation. A component on
        (nearly) equal values, whose shape would grow without bound, is held at
        shape = 1/floor and reported (its spread is 2s ≈ 1/shape).
    prior : None
        Gamma has no conjugate prior (its shape has none): ``prior=`` other than None is a
        :class:`~emdsl.ModelError`, and ``fit(prior="weak")`` leaves it unregularized.

    Examples
    --------
    >>> from emdsl.families.gamma import Gamma
    >>> Gamma(rate=2.0)
    Gamma(rate=2.0)
    """

    # Not standardized: x enters in the user's units. Sums S_x of values near 1e308
    # overflow, values near 1e-308 are subnormal, and s = log x̄ − mean(log x) loses
    # ε·|log x̄| to cancellation (1.5e-13 at 1e300; it matters only for large shapes).
    # Only a scale x/c is allowed (x > 0): with c the geometric mean it would avoid all
    # three, leave shape and s unchanged and multiply the rate by c (to_original maps it).
    param_names = ("shape", "rate")
    continuous = True
    n_suff = 2
    fill: ClassVar[float] = 1.0
    newton_steps: int = 50

    def __init__(self, *, shape: ArrayLike | None = None, rate: ArrayLike | None = None,
                 floor: float = 1e-8, prior: None = None) -> None:
        self.accept_prior(prior)  # no conjugate prior: any prior is a ModelError that says so
        self.floor = check_number(floor, "Gamma(floor=...)", low=0.0, low_open=True)
        self._shape, self._rate = shape, rate
        self.check_given(shape=shape, rate=rate)

    def arguments(self) -> dict[str, Any]:
        return {"shape": self._shape, "rate": self._rate, "floor": self.floor}

    def param_axes(self) -> dict[str, Axes]:
        return {"shape": ("latent", "event"), "rate": ("latent", "event")}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [x, np.log(x)]

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        shape, rate = np.broadcast_arrays(params["shape"], params["rate"])
        return [-rate, shape - 1.0], special.gammaln(shape) - shape * np.log(rate)

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        K, D = nk.shape
        empty, fallback, before = empty_components(nk), self.default_params(K, D), previous or {}
        held = {p: np.broadcast_to(np.asarray(hold[p], dtype=float), (K, D)).copy() for p in hold}
        # Empty entries get Gamma(1, 1)'s moments, so that they stay finite until keep_empty.
        mean_x = np.where(empty, 1.0, sums[0] / safe_counts(nk))
        mean_log = np.where(empty, -np.euler_gamma, sums[1] / safe_counts(nk))
        spread = np.maximum(np.log(mean_x) - mean_log, 0.0)  # Jensen: ≥ 0, = 0 for equal values
        if "shape" in held:
            shape = held["shape"]
        else:
            start = _start(before.get("shape"), (K, D), spread)
            rate = held.get("rate")
            problem = _shape_given_rate(mean_log + np.log(rate)) if rate is not None else _profile(spread)
            raw = newton_ascent(start[..., None], 1e-10, 1.0 / self.floor, *problem, steps=self.newton_steps)[..., 0]
            shape = keep_empty(raw, before.get("shape"), fallback["shape"], empty)
        if "rate" in held:
            rate = held["rate"]
        else:
            with np.errstate(over="ignore"):
                raw_rate = shape / mean_x
            _check_rate(raw_rate, mean_x, shape, empty)
            rate = keep_empty(raw_rate, before.get("rate"), fallback["rate"], empty)
        capped = (shape >= (1.0 - 1e-9) / self.floor) & ~empty & ("shape" not in held)
        floored = [(int(k), float(2 * spread[k][capped[k]].min())) for k in np.flatnonzero(capped.any(axis=1))]
        return {"shape": shape, "rate": rate}, floored

    def default_params(self, K: int, D: int) -> Params:
        return {"shape": np.ones((K, D)), "rate": np.ones((K, D))}

    def n_free_params(self, K: int, D: int) -> int:
        return K * D * ((self._shape is None) + (self._rate is None))

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "shape", where, low=0.0)
        check_range(params, "rate", where, low=0.0)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        return (x <= 0) | np.isinf(x), "Gamma data must be positive and finite (x > 0)"

    def seed_features(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x)  # the family's own geometry; positive data (checked) give finite logs

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return rng.gamma(params["shape"][labels], 1.0 / params["rate"][labels])

    def expected_value(self, params: Params) -> np.ndarray:
        return params["shape"] / params["rate"]

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        shape, rate = (np.asarray(values[p], dtype=float)[:, None] for p in ("shape", "rate"))

        def density(grid: np.ndarray) -> np.ndarray:
            x = np.asarray(grid, dtype=float)[None, :]
            inside = (x > 0) & np.isfinite(x)
            safe = np.where(inside, x, 1.0)
            log_p = special.xlogy(shape - 1, safe) - rate * safe + shape * np.log(rate) - special.gammaln(shape)
            return np.where(inside, np.exp(log_p), 0.0)

        return Marginal(mean=(shape / rate)[:, 0], density=density)


def _check_rate(rate: np.ndarray, mean_x: np.ndarray, shape: np.ndarray, empty: np.ndarray) -> None:
    """Refuse a rate a/x̄ beyond the float range: data too small (e.g. subnormal) for Gamma in their units."""
    bad = ~np.isfinite(rate) & ~empty
    if bad.any():
        k, d = (int(i[0]) for i in np.nonzero(bad))
        power = int(np.ceil(np.log10(shape[k, d]) - np.log10(mean_x[k, d]) - 300)) if mean_x[k, d] > 0 else 20
        raise ModelError(f"Gamma's rate (shape / mean) overflows floating point for component {k}"
                         f"{f', element {d}' if rate.shape[1] > 1 else ''}: its values' mean is "
                         f"{float(mean_x[k, d])!r}, too small for Gamma fitted in the data's units "
                         f"(whose rate must stay below 1.8e308); multiply the data by 1e{max(power, 10)}")


def _profile(spread: np.ndarray) -> tuple[Fn, Fn, Fn]:
    """Q/N over the shape with the rate at its optimum a/x̄; its slope is log a − ψ(a) − s."""
    return (lambda a: profile(a[..., 0], spread), lambda a: log_minus_digamma(a) - spread[..., None],
            lambda a: -trigamma_minus_inverse(a)[..., None])


def _shape_given_rate(level: np.ndarray) -> tuple[Fn, Fn, Fn]:
    """Q/N over the shape for a held rate b: a·(E log x + log b) − log Γ(a), up to a constant."""
    return (lambda a: a[..., 0] * level - special.gammaln(a[..., 0]), lambda a: level[..., None] - special.digamma(a),
            lambda a: -special.polygamma(1, a)[..., None])


def _start(previous: np.ndarray | None, shape: tuple[int, int], spread: np.ndarray) -> np.ndarray:
    """The previous shape where valid, else Minka's approximation (≈ 1/(2s) for small s)."""
    s = np.maximum(spread, 1e-300)
    minka = (3 - s + np.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    if previous is None:
        return minka
    before = np.broadcast_to(np.asarray(previous, dtype=float), shape)
    return np.where(np.isfinite(before) & (before > 0), before, minka)
