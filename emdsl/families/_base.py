"""The interface every family implements, and what they share.

A family is both a *declaration* (immutable, with its options and any fixed
parameter values) and the home of its own mathematics (DESIGN.md §1–2):

* ``statistics``: the sufficient statistics φ(x), written as rows of Φ;
* ``natural``: the natural parameters η and log-partition A(η) per component,
  written as rows of H and the constant column;
* ``log_base_measure``: log h(x), which never depends on the component;
* ``m_step``: moment matching, responsibility-weighted sums of φ → parameters.

Arrays here are plain numpy and always in the family's *internal* units: a
location-scale family (``standardize = True``) sees centred and scaled data, and
``to_original`` / ``to_standard`` map its parameters across.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np

Params = dict[str, np.ndarray]
Axes = tuple[Literal["latent", "event", "event_"], ...]

_FAMILIES: dict[str, type[Family]] = {}


class Family:
    """Common base of latent and observed families."""

    role: ClassVar[Literal["latent", "observed"]]
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and "role" not in cls.__dict__:
            _FAMILIES[cls.__name__] = cls

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments that recreate this family (values as given)."""
        raise NotImplementedError

    @property
    def fixed(self) -> dict[str, Any]:
        """Parameter values given to the constructor; they are held, not learned."""
        args = self.arguments()
        return {name: args[name] for name in self.param_names if args.get(name) is not None}

    def param_axes(self) -> dict[str, Axes]:
        """Symbolic axes of each parameter's internal array (``latent`` = the K states)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        signature = inspect.signature(type(self).__init__).parameters
        shown = []
        for key, value in self.arguments().items():
            default = signature[key].default
            if default is not inspect.Parameter.empty and _same_value(value, default):
                continue
            text = _short(value)
            shown.append(text if default is inspect.Parameter.empty else f"{key}={text}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        mine, theirs = self.arguments(), other.arguments()  # type: ignore[attr-defined]
        return mine.keys() == theirs.keys() and all(
            _same_value(mine[key], theirs[key]) for key in mine
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.arguments())))


class LatentFamily(Family):
    """A discrete latent variable with K states."""

    role = "latent"
    k: int
    states: tuple[Any, ...]


class ObservedFamily(Family):
    """An exponential family for observed data, with statistics stacked into Φ.

    ``D`` below is the number of elements the family sees per sample (the size of
    the event dimension, or the product of a variable's non-sample dims).
    """

    role = "observed"
    #: fitted on centred and scaled data; ``to_original`` maps parameters back
    standardize: ClassVar[bool] = False
    #: elements form one event over a single dimension (False: independent elements)
    multivariate: ClassVar[bool] = False
    #: usable for k-means++ seeding (continuous, Euclidean geometry)
    continuous: ClassVar[bool] = False
    #: one common scale for all elements (needed where a parameter pools elements)
    pool_scale: bool = False
    floor: float = 0.0

    def n_stats(self, D: int) -> int:
        """Number of sufficient statistics (rows of Φ) for D elements."""
        raise NotImplementedError

    def statistics(self, out: np.ndarray, D: int) -> None:
        """Fill ``out`` (n_stats × b) with φ(x); on entry ``out[:D]`` holds x (D × b)."""
        raise NotImplementedError

    def log_base_measure(self, x: np.ndarray) -> np.ndarray:
        """log h(x) for each column of ``x`` (D × b); it never depends on the component."""
        raise NotImplementedError

    def natural(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        """Natural parameters η (K × n_stats) and log-partition A(η) (K,)."""
        raise NotImplementedError

    def m_step(
        self, stats: np.ndarray, nk: np.ndarray, hold: Params, previous: Params | None
    ) -> tuple[Params, list[tuple[int, float]]]:
        """Moment matching from weighted sums of φ (K × n_stats) and counts N_k (K,).

        ``hold`` are parameters not to learn (fixed ones, or starting values given
        by the user); ``previous`` the last parameters, kept for components with no
        responsibility left (a generalized-EM step). Returns the parameters and the
        ``(component, smallest variance)`` pairs where the variance floor was applied.
        """
        raise NotImplementedError

    def default_params(self, K: int, D: int) -> Params:
        """Standard-normal-like parameters in internal units, for empty components."""
        raise NotImplementedError

    def n_free_params(self, K: int, D: int) -> int:
        """Number of learned scalars (for BIC/AIC), fixed parameters excluded."""
        raise NotImplementedError

    def to_original(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        """Map internal (standardized) parameters to the data's units."""
        return dict(params)

    def to_standard(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        """Map parameters in the data's units to internal units."""
        return dict(params)

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        """Raise ``ModelError`` naming ``where`` if a parameter value is invalid."""

    def check_data(self, x: np.ndarray, where: str) -> None:
        """Raise ``ModelError`` if a block of data (b × D) is outside the support."""

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw one sample (n × D) per entry of ``labels`` (component indices)."""
        raise NotImplementedError

    def log_prob(self, x: np.ndarray, params: Params) -> np.ndarray:
        """log p(x | component k) for x (n × D): (n × K), through η·φ(x) − A(η) + log h(x).

        Computed from the same pieces the engine uses, so testing it against an
        independent density tests the exponential-family decomposition itself.
        """
        x = np.asarray(x, dtype=float)
        D = x.shape[1]
        phi = np.empty((self.n_stats(D), x.shape[0]))
        phi[:D] = x.T
        self.statistics(phi, D)
        eta, log_partition = self.natural(params)
        return (eta @ phi).T - log_partition + self.log_base_measure(x.T)[:, None]


def family_class(name: str) -> type[Family]:
    """The family class registered under ``name``."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def keep_empty(new: np.ndarray, previous: np.ndarray | None, fallback: np.ndarray,
               empty: np.ndarray) -> np.ndarray:
    """Per-component parameter ``new`` with empty components taken from ``previous``."""
    if not empty.any():
        return new
    source = fallback if previous is None else previous
    shape = (-1,) + (1,) * (new.ndim - 1)
    return np.where(empty.reshape(shape), source, new)


def empty_components(nk: np.ndarray) -> np.ndarray:
    """Components whose responsibility is too small to estimate anything from."""
    return nk <= 1e-12 * max(float(nk.sum()), 1.0)


def safe_counts(nk: np.ndarray) -> np.ndarray:
    """N_k with empty components set to 1, so that divisions stay finite."""
    return np.where(empty_components(nk), 1.0, nk)


def _short(value: Any) -> str:
    """A constructor argument as shown in a repr: scalars and short lists in full, arrays by shape."""
    if isinstance(value, str) or np.ndim(value) == 0:
        return repr(value)
    if isinstance(value, list | tuple) and len(value) <= 8 and all(np.ndim(v) == 0 for v in value):
        return repr(list(value))
    return f"<{np.shape(value)} array>"


def _same_value(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except (TypeError, ValueError):
        return a == b
