"""Categorical distribution: a latent with K states (the mixture weights), or observed levels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emdsl.errors import ModelError
from emdsl.families._base import (
    Axes,
    ElementwiseFamily,
    Floored,
    LatentFamily,
    Marginal,
    Params,
    as_float,
    empty_components,
    held_or,
    keep_empty,
    safe_counts,
)

# Probabilities are floored at this value inside log p only, so that a state or level
# whose probability reached exactly 0 contributes log p = −690 (and r = 0) instead of
# −inf, which would turn 0 · log p into NaN in the E-step's matrix product.
_TINY = 1e-300


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log p with probabilities floored at 1e-300, so that log 0 stays finite."""
    return np.log(np.maximum(probs, _TINY))


class Categorical(LatentFamily):
    r"""A categorical distribution: a latent with K states, or observed data with L levels.

    .. math::

        p(z = k) = \pi_k, \qquad \phi(z) = \mathrm{onehot}(z), \qquad
        \eta_k = \log \pi_k

    As a latent (``latent("z", em.Categorical(3))``) the parameter ``probs`` holds the
    mixture weights π and the M-step is π_k = N_k / N. Observed
    (``observe("plan", em.Categorical)``) every element has its own level
    probabilities per latent state, ``probs`` over (state, element, level), and the
    M-step is p_kdl = Σ_n r_nk [x_nd = l] / N_kd over the samples where it is observed.
    The levels are learned from the data when not given: codes, strings or pandas
    categories (their categories, in order); a missing value (NaN, None, ``pd.NA``)
    is not observed.

    Parameters
    ----------
    k : int or sequence of hashable, optional
        Number of states (latent) or levels (observed), or their labels, used as the
        coordinate of the latent dimension or of the ``level`` dimension. Observed
        data without ``k`` get their levels from the data.
    probs : array_like, optional
        Fixed probabilities: the weights (K,) of a latent, or (states × levels) for
        observed data; held, not learned. Rows must sum to 1.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Categorical(3)
    Categorical(3)
    >>> em.Categorical(["low", "high"], probs=[0.5, 0.5]).states
    ('low', 'high')
    """

    param_names = ("probs",)
    positional = ("k",)

    def __init__(self, k: int | Sequence[Hashable] | None = None, probs: ArrayLike | None = None) -> None:
        if k is None:
            states: tuple[Any, ...] = ()
        elif isinstance(k, bool) or not isinstance(k, int | np.integer | Sequence) or isinstance(k, str):
            raise ModelError(f"Categorical(k): k must be a number of states or a list of state labels, got {k!r}")
        elif isinstance(k, Sequence):
            states = tuple(v.item() if isinstance(v, np.generic) else v for v in k)
            if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in states):
                raise ModelError(f"Categorical(k): state labels must not be missing (None or NaN), got {list(states)!r}")
            if len(set(states)) != len(states):
                raise ModelError(f"Categorical(k): state labels must be distinct, got {list(states)!r}")
            if len(states) < 1:
                raise ModelError("Categorical(k): need at least one state, got an empty list")
        else:
            if int(k) < 1:
                raise ModelError(f"Categorical(k): need at least one state, got k={k!r}")
            states = tuple(range(int(k)))
        self._probs = probs
        if probs is not None:
            value = as_float(probs, "Categorical(probs=...)")
            if k is None and value.ndim >= 1:
                states = tuple(range(value.shape[-1])) if value.ndim > 1 else tuple(range(value.shape[0]))
            if value.ndim == 1:
                self.check_params({"probs": value}, "Categorical(probs=...)", size=len(states))
            else:
                _check_rows(value, "Categorical(probs=...)", len(states))
        self.k = len(states)
        self.states = states
        self._k_arg = None if k is None else (k if not isinstance(k, Sequence) else list(states))

    def arguments(self) -> dict[str, Any]:
        return {"k": self._k_arg, "probs": self._probs}

    def param_axes(self) -> dict[str, Axes]:
        return {"probs": ("latent",)}

    def observed_form(self) -> _ObservedCategorical:
        """This declaration as a family of observed data (used by ``Model.observe``)."""
        return _ObservedCategorical(self._k_arg, self._probs)

    def check_latent(self, where: str) -> None:
        """Raise ``ModelError`` unless this declaration can serve as a latent variable."""
        if self._k_arg is None and self._probs is None:
            raise ModelError(f"{where}: a latent Categorical needs its number of states, e.g. em.Categorical(3)")
        if self._probs is not None and np.ndim(self._probs) != 1:
            raise ModelError(f"{where}: a latent's probs are its K weights (1-D), got shape {np.shape(self._probs)}")

    def log_weights(self, params: Params) -> np.ndarray:
        """log π (K,), with weights floored at 1e-300 so that log 0 stays finite."""
        return log_probs(params["probs"])

    def weights_m_step(self, nk: np.ndarray, hold: Params) -> Params:
        """π_k = N_k / N unless the weights are held."""
        if "probs" in hold:
            return {"probs": np.asarray(hold["probs"], dtype=float)}
        return {"probs": nk / nk.sum()}

    def n_free_params(self) -> int:  # type: ignore[override]
        return 0 if self._probs is not None else self.k - 1

    def check_params(self, params: Mapping[str, np.ndarray], where: str, size: int | None = None) -> None:
        probs = params.get("probs")
        if probs is None:
            return
        size = self.k if size is None else size
        if probs.shape != (size,):
            raise ModelError(f"{where}: probs must have one weight per state ({size}), got shape {probs.shape}")
        _check_rows(probs, where, size)

    def draw(self, params: Params, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw n state indices."""
        return rng.choice(self.k, size=n, p=params["probs"] / params["probs"].sum())


class _ObservedCategorical(Categorical, ElementwiseFamily):
    """The observed form of :class:`Categorical`: level probabilities per state and element.

    Rows of Φ: a presence row per element, then the one-hot indicator of level l of
    element d at row ``D·(1+l) + d``; η = log p and A(η) = log Σ_l p_l = 0.
    """

    role = "observed"  # type: ignore[assignment]
    categorical = True

    def __init__(self, k: int | Sequence[Hashable] | None = None, probs: ArrayLike | None = None) -> None:
        super().__init__(k, probs)
        self.levels: tuple[Any, ...] | None = self.states if (k is not None or probs is not None) else None

    @property
    def kind(self) -> str:
        return "Categorical"

    @property
    def n_suff(self) -> int:  # type: ignore[override]
        if self.levels is None:
            raise RuntimeError("Categorical: levels are not bound to data yet")
        return len(self.levels)

    def bound(self, levels: Sequence[Any]) -> _ObservedCategorical:
        """A copy with the levels found in (or declared for) the data."""
        out = _ObservedCategorical(self._k_arg, self._probs)
        out.levels = tuple(levels)
        return out

    def param_axes(self) -> dict[str, Axes]:
        return {"probs": ("latent", "event", "level")}

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        return [(x == level).astype(float) for level in range(self.n_suff)]

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        log_p = log_probs(params["probs"])
        return [log_p[..., level] for level in range(log_p.shape[-1])], np.zeros(log_p.shape[:-1])

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        K, D = nk.shape
        counts = np.stack(sums, axis=-1)
        empty = empty_components(nk)
        fallback = self.default_params(K, D)["probs"]
        probs = held_or(hold, "probs", (K, D, self.n_suff), lambda: keep_empty(
            counts / safe_counts(nk)[..., None], (previous or {}).get("probs"), fallback, empty))
        return {"probs": probs}, []

    def default_params(self, K: int, D: int) -> Params:
        return {"probs": np.full((K, D, self.n_suff), 1.0 / self.n_suff)}

    def n_free_params(self, K: int, D: int) -> int:  # type: ignore[override]
        return 0 if self._probs is not None else K * D * (self.n_suff - 1)

    def check_params(self, params: Mapping[str, np.ndarray], where: str, size: int | None = None) -> None:
        if "probs" in params:
            _check_rows(np.asarray(params["probs"], dtype=float), where, None)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        # Codes come from the compiler; an unknown label is reported there, by name.
        return None

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        cumulative = np.cumsum(params["probs"][labels], axis=-1)
        u = rng.random(cumulative.shape[:-1] + (1,))
        return np.minimum((u > cumulative).sum(axis=-1), self.n_suff - 1).astype(float)

    def expected_value(self, params: Params) -> np.ndarray:
        # The mean of level codes means nothing: the most probable level stands in for it.
        return np.argmax(params["probs"], axis=-1).astype(float)

    def impute(self, params: Params, x: np.ndarray, resp: np.ndarray,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each hole becomes the most probable level of Σ_k r_nk p_kd (the posterior predictive)."""
        mixed = np.einsum("nk,kdl->dnl", resp, params["probs"])
        return np.where(np.isnan(x), np.argmax(mixed, axis=-1).astype(float), x)

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        probs = np.asarray(values["probs"], dtype=float)

        def density(grid: np.ndarray) -> np.ndarray:
            index = np.asarray(grid, dtype=int)
            inside = (index >= 0) & (index < probs.shape[-1])
            return np.where(inside, probs[:, np.clip(index, 0, probs.shape[-1] - 1)], 0.0)

        mean = probs @ np.arange(probs.shape[-1], dtype=float)
        return Marginal(mean=mean, density=density, discrete=True, levels=self.levels)


def _check_rows(probs: np.ndarray, where: str, size: int | None) -> None:
    """Probabilities over the last axis: finite, non-negative, summing to 1."""
    if size is not None and size and probs.shape[-1] != size:
        raise ModelError(f"{where}: probs must have {size} entries along its last axis, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ModelError(f"{where}: probs must be finite and non-negative, got {probs.tolist()}")
    sums = probs.sum(axis=-1)
    if not np.allclose(sums, 1.0, rtol=0, atol=1e-8):
        bad = np.ravel(sums)[np.flatnonzero(~np.isclose(np.ravel(sums), 1.0, rtol=0, atol=1e-8))[0]]
        raise ModelError(f"{where}: probs must sum to 1 over the last axis, a row sums to {bad:.10g}")
