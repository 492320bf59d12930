"""Von Mises distribution of angles (radians), independent for each element of a variable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

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

LOG_2PI = float(np.log(2 * np.pi))


def log_i0(kappa: np.ndarray) -> np.ndarray:
    """log I₀(κ) = log i0e(κ) + κ, finite for any κ ≥ 0 (I₀ itself overflows past κ ≈ 700)."""
    return np.log(special.i0e(kappa)) + kappa


def mean_resultant(kappa: np.ndarray) -> np.ndarray:
    """A(κ) = I₁(κ)/I₀(κ), the expected mean resultant length."""
    return special.i1e(kappa) / special.i0e(kappa)


def mean_resultant_slope(kappa: np.ndarray) -> np.ndarray:
    """A'(κ) = 1 − A/κ − A² > 0, by series at both ends where that expression cancels."""
    small, large = np.maximum(kappa, 1e-300), np.maximum(kappa, 1e3)
    a = mean_resultant(small)
    u = 1.0 / large
    series = u**2 / 2 + u**3 / 4 + 3 * u**4 / 8 + 25 * u**5 / 32 + 65 * u**6 / 32
    return np.where(kappa < 1e-4, 0.5 - 3 * kappa**2 / 16, np.where(kappa >= 1e3, series, 1 - a / small - a * a))


class VonMises(ElementwiseFamily):
    r"""Von Mises distribution of angles in radians, independent for each element.

    .. math::

        p(x \mid \mu, \kappa) = \frac{e^{\kappa\cos(x - \mu)}}{2\pi I_0(\kappa)}

        \phi(x) = (\cos x,\ \sin x), \quad \eta = \kappa(\cos\mu,\ \sin\mu), \quad
        A(\eta) = \log I_0(\kappa), \quad \log h(x) = -\log 2\pi

    Any finite angle is in the support (x and x + 2π are the same point). M-step:
    μ = atan2(S_sin, S_cos), returned in (−π, π]; κ ≥ 0 solves A(κ) = I₁(κ)/I₀(κ) = R̄,
    R̄ = ``|S|/N`` (or S·(cos μ, sin μ)/N for a held μ; κ = 0 when that is ≤ 0), by safeguarded
    Newton steps from the previous κ (or Best & Fisher's approximation) until
    ``|Δκ| < 1e-12·κ`` or 50 steps (generalized EM: Q never decreases).

    Parameters
    ----------
    mean, kappa : array_like, optional
        Fixed mean direction (radians) and concentration; held, not learned.
    floor : float, default 1e-8
        Lower bound on 1/κ (≈ the variance of the angle for large κ). As R̄ → 1 (a
        component on one angle) κ grows without bound; it is held at 1/floor and
        reported (its spread 2(1 − R̄) ≈ 1/κ).
    prior : None
        VonMises has no conjugate prior (κ has none): ``prior=`` other than None is a
        :class:`~emdsl.ModelError`, and ``fit(prior="weak")`` leaves it unregularized.

    Examples
    --------
    >>> from emdsl.families.von_mises import VonMises
    >>> VonMises(kappa=4.0)
    VonMises(kappa=4.0)
    """

    # Not standardized, and it must not be: only the angle modulo 2π matters, so a shift
    # would be a rotation (harmless but pointless) and a scale would break the period.
    # Data in degrees must be converted to radians by the user.
    param_names = ("mean", "kappa")
    n_suff = 2
    fill: ClassVar[float] = 0.0
    newton_steps: int = 50

    def __init__(self, *, mean: ArrayLike | None = None, kappa: ArrayLike | None = None,
                 floor: float = 1e-8, prior: None = None) -> None:
        self.accept_prior(prior)  # no conjugate prior: any prior is a ModelError that says so
        self.floor = check_number(floor, "VonMises(floor=...)", low=0.0, low_open=True)
        self._mean, self._kappa = mean, kappa
        self.check_given(mean=mean, kappa=kappa)

    def arguments(self) -> dict[str, Any]:
        return {"mean": self._mean, "kappa": self._kappa, "floor": self.floor}

    def param_axes(self) -> dict[str, Axes]:
        return {"mean": ("latent", "event"), "kappa": ("latent", "event")}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.cos(x), np.sin(x)]

    def log_h(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.full_like(x, -LOG_2PI)

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        mean, kappa = np.broadcast_arrays(params["mean"], params["kappa"])
        return [kappa * np.cos(mean), kappa * np.sin(mean)], log_i0(kappa)

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        s_cos, s_sin = sums
        K, D = nk.shape
        empty, fallback, before = empty_components(nk), self.default_params(K, D), previous or {}
        held = {p: np.broadcast_to(np.asarray(hold[p], dtype=float), (K, D)).copy() for p in hold}
        if "mean" in held:
            mean = held["mean"]
        else:
            angle = np.arctan2(s_sin, s_cos)
            mean = keep_empty(np.where(angle <= -np.pi, np.pi, angle), before.get("mean"), fallback["mean"], empty)
        if "kappa" in held:
            return {"mean": mean, "kappa": held["kappa"]}, []
        # The resultant along μ: |S|/N at the optimal μ, possibly ≤ 0 for a held one.
        length = np.where(empty, 0.0, np.clip((np.cos(mean) * s_cos + np.sin(mean) * s_sin) / safe_counts(nk),
                                              -1.0, 1.0))
        start = _start(before.get("kappa"), (K, D), length)
        raw = newton_ascent(
            start[..., None], 0.0, 1.0 / self.floor,
            lambda k: -k[..., 0] * (1.0 - length) - np.log(special.i0e(k[..., 0])),  # κR̄ − log I₀(κ)
            lambda k: length[..., None] - mean_resultant(k),
            lambda k: -mean_resultant_slope(k)[..., None], steps=self.newton_steps)[..., 0]
        kappa = keep_empty(raw, before.get("kappa"), fallback["kappa"], empty)
        capped = (kappa >= (1.0 - 1e-9) / self.floor) & ~empty
        floored = [(int(k), float(2 * (1.0 - length[k][capped[k]].max()))) for k in np.flatnonzero(capped.any(axis=1))]
        return {"mean": mean, "kappa": kappa}, floored

    def default_params(self, K: int, D: int) -> Params:
        return {"mean": np.zeros((K, D)), "kappa": np.zeros((K, D))}

    def n_free_params(self, K: int, D: int) -> int:
        return K * D * ((self._mean is None) + (self._kappa is None))

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        check_range(params, "mean", where)
        check_range(params, "kappa", where, low=0.0, low_open=False)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        return np.isinf(x), "VonMises data must be finite angles in radians"

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        # μ + a draw in [−π, π] (as scipy.stats.vonmises does): not wrapped to (−π, π], so
        # that the draws' plain average estimates μ, which is also expected_value.
        mean = params["mean"][labels]
        return mean + rng.vonmises(0.0, params["kappa"][labels])

    def expected_value(self, params: Params) -> np.ndarray:
        return np.asarray(params["mean"], dtype=float)

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        mean, kappa = (np.asarray(values[p], dtype=float)[:, None] for p in ("mean", "kappa"))

        def density(grid: np.ndarray) -> np.ndarray:
            x = np.asarray(grid, dtype=float)[None, :]
            finite = np.isfinite(x)
            density = np.exp(kappa * (np.cos(np.where(finite, x, 0.0) - mean) - 1.0)) / (2 * np.pi * special.i0e(kappa))
            return np.where(finite, density, 0.0)

        return Marginal(mean=mean[:, 0], density=density)


def _start(previous: np.ndarray | None, shape: tuple[int, int], length: np.ndarray) -> np.ndarray:
    """The previous κ where valid, else Best & Fisher's approximation of A⁻¹(R̄)."""
    r = np.clip(length, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        best = np.where(r < 0.53, 2 * r + r**3 + 5 * r**5 / 6,
                        np.where(r < 0.85, -0.4 + 1.39 * r + 0.43 / (1 - r), 1 / (r**3 - 4 * r**2 + 3 * r)))
    if previous is None:
        return best
    before = np.broadcast_to(np.asarray(previous, dtype=float), shape)
    return np.where(np.isfinite(before) & (before >= 0), before, best)
