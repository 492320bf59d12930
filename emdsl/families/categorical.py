"""Categorical latent variable: the mixture weights."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emdsl.errors import ModelError
from emdsl.families._base import Axes, LatentFamily, Params

# Weights are floored at this value inside log π only, so that a component whose
# weight reached exactly 0 contributes log π = −690 (and r = 0) instead of −inf,
# which would turn the ELBO's 0 · log π into NaN.
_TINY = 1e-300


class Categorical(LatentFamily):
    r"""A latent variable with K states and weights π (the mixture weights).

    .. math::

        p(z = k) = \pi_k, \qquad \phi(z) = \mathrm{onehot}(z), \qquad
        \eta_k = \log \pi_k

    The M-step is moment matching on the one-hot statistic: π_k = N_k / N, with
    N_k = Σ_n r_nk the responsibility each state received.

    Parameters
    ----------
    k : int or sequence of hashable
        Number of states, or the state labels themselves (used as the coordinate
        of the latent dimension).
    probs : array_like, optional
        Fixed weights (length K, non-negative, summing to 1). When given, the
        weights are held, not learned.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Categorical(3)
    Categorical(3)
    >>> em.Categorical(["low", "high"], probs=[0.5, 0.5]).states
    ('low', 'high')
    """

    param_names = ("probs",)

    def __init__(self, k: int | Sequence[Hashable], probs: ArrayLike | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer | Sequence) or isinstance(k, str):
            raise ModelError(f"Categorical(k): k must be a number of states or a list of state labels, got {k!r}")
        if isinstance(k, Sequence):
            states = tuple(k)
            if len(set(states)) != len(states):
                raise ModelError(f"Categorical(k): state labels must be distinct, got {list(states)!r}")
        else:
            states = tuple(range(int(k)))
        if len(states) < 1:
            raise ModelError(f"Categorical(k): need at least one state, got k={k!r}")
        self.k = len(states)
        self.states = states
        self._k_arg = k if not isinstance(k, Sequence) else list(states)
        self._probs = None if probs is None else probs
        if probs is not None:
            self.check_params({"probs": np.asarray(probs, dtype=float)}, "Categorical(probs=...)")

    def arguments(self) -> dict[str, Any]:
        return {"k": self._k_arg, "probs": self._probs}

    def param_axes(self) -> dict[str, Axes]:
        return {"probs": ("latent",)}

    def log_weights(self, params: Params) -> np.ndarray:
        """log π (K,), with weights floored at 1e-300 so that log 0 stays finite."""
        return np.log(np.maximum(params["probs"], _TINY))

    def m_step(self, nk: np.ndarray, hold: Params) -> Params:
        """π_k = N_k / N unless the weights are held."""
        if "probs" in hold:
            return {"probs": np.asarray(hold["probs"], dtype=float)}
        return {"probs": nk / nk.sum()}

    def n_free_params(self) -> int:
        return 0 if self._probs is not None else self.k - 1

    def check_params(self, params: dict[str, np.ndarray], where: str) -> None:
        probs = params.get("probs")
        if probs is None:
            return
        if probs.shape != (self.k,):
            raise ModelError(f"{where}: probs must have one weight per state ({self.k}), got shape {probs.shape}")
        if not np.all(np.isfinite(probs)) or np.any(probs < 0):
            raise ModelError(f"{where}: probs must be finite and non-negative, got {probs.tolist()}")
        if not np.isclose(probs.sum(), 1.0, rtol=0, atol=1e-8):
            raise ModelError(f"{where}: probs must sum to 1, they sum to {probs.sum():.10g}")

    def sample(self, params: Params, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw n state indices."""
        return rng.choice(self.k, size=n, p=params["probs"] / params["probs"].sum())
