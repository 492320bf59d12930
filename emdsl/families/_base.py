"""The interface every family implements, and what they share.

A family is both a *declaration* (immutable, with its options and any fixed
parameter values) and the home of its own mathematics (DESIGN.md §1–2).

An observed family owns a block of rows of Φ and the matching columns of H. The
block starts with *presence rows* and continues with the sufficient statistics:

* ``statistics(x, out)``: writes the block for a batch of samples; ``x`` (D × b) holds
  NaN where an element is missing, and a missing element writes 0 in every row, so it
  adds nothing to L and nothing to the node's sums (EM for data missing at random);
* ``natural(params)``: the H block (K × rows): −A(η) in the presence columns, η in
  the statistics columns, so that ``H Φ`` is Σ_v [ηᵀφ(x) − A(η)] over present elements;
* ``log_base_measure(x)``: Σ log h(x) over the present elements (never depends on k);
* ``m_step(stats, hold, previous)``: moment matching from the block's responsibility-
  weighted sums; the presence rows' sums are the node's own counts N_vk.

Arrays here are plain numpy, in the family's *internal* units (``to_original`` and
``to_standard`` map location-scale parameters across).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from emdsl.errors import ModelError
from emdsl.priors import Prior

Params = dict[str, np.ndarray]
Axes = tuple[Literal["latent", "event", "event_", "level"], ...]
Floored = list[tuple[int, float]]

_FAMILIES: dict[str, type[Family]] = {}


@dataclasses.dataclass(frozen=True)
class BoundPrior:
    """A conjugate prior bound to a node: its hyperparameters as arrays in the internal units.

    ``log_jacobian`` is the constant log ``|∂θ_internal / ∂θ_data|`` that turns the prior's
    density over the internal parameters into its density over the parameters in the
    data's units, so that log p(θ) is the same whatever units the fit works in.
    """

    kind: str
    values: Mapping[str, np.ndarray]
    log_jacobian: float = 0.0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]


class Family:
    """Common base of latent and observed families."""

    role: ClassVar[Literal["latent", "observed"]]
    param_names: ClassVar[tuple[str, ...]] = ()
    #: arguments shown without their name in the repr, as users write them
    positional: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and "role" not in cls.__dict__:
            _FAMILIES[cls.__name__] = cls

    @property
    def kind(self) -> str:
        """The family's public name (its class name, as the user writes it)."""
        return type(self).__name__

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments that recreate this family (values as given)."""
        raise NotImplementedError

    def tidy_params(self, params: Mapping[str, np.ndarray]) -> Params:
        """Given values that passed :meth:`check_params` made exact where that check allows for
        rounding: rows of probabilities divided by their sums, covariance matrices symmetrized.

        The checks accept values computed elsewhere in single precision (another library's
        float32 results sum to 1 within a few 1e-8); a fixed value is then used exactly
        normalized, so that its density is one.
        """
        return dict(params)

    @property
    def fixed(self) -> dict[str, Any]:
        """Parameter values given to the constructor; they are held, not learned."""
        args = self.arguments()
        return {name: args[name] for name in self.param_names if args.get(name) is not None}

    def param_axes(self) -> dict[str, Axes]:
        """Symbolic axes of each parameter's internal array (``latent`` = the K states)."""
        raise NotImplementedError

    # -- conjugate prior (MAP-EM) ------------------------------------------------------------
    #: the conjugate prior this family takes (None: it has none, and ``prior=`` is an error)
    prior_type: ClassVar[type[Prior] | None] = None
    #: the declared prior (in the data's units), or None
    prior: Prior | None = None

    def accept_prior(self, prior: Any, where: str | None = None) -> None:
        """Validate and keep the ``prior=`` argument of the constructor."""
        where = where or f"{self.kind}(prior=...)"
        if prior is None:
            self.prior = None
            return
        from emdsl.regression import SUPPORTED

        if getattr(prior, "on_coefficients", False) and self.kind in SUPPORTED:
            self.prior = prior  # on a regression's coefficients: checked with covariates= (emdsl.regression)
            return
        if self.prior_type is None:
            raise ModelError(f"{where}: no conjugate prior is available for {self.kind}, so its M-step "
                             "cannot be a closed-form MAP estimate; fit it without a prior (prior=None)")
        if not isinstance(prior, self.prior_type):
            raise ModelError(f"{where}: {self.kind} takes an em.priors.{self.prior_type.__name__}, "
                             f"got {prior!r}")
        self.prior = prior

    def with_prior(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """``arguments`` plus the declared prior, when there is one (for :meth:`arguments`)."""
        return arguments if self.prior is None else {**arguments, "prior": self.prior}

    def prior_axes(self) -> dict[str, Axes]:
        """Symbolic axes of each hyperparameter of :attr:`prior_type`, as given in the data's units."""
        raise NotImplementedError

    def standard_prior(self, values: Mapping[str, np.ndarray], center: np.ndarray | None,
                       scale: np.ndarray | None) -> Params:
        """Hyperparameters in the data's units → internal units (location-scale families override)."""
        return dict(values)

    def check_prior(self, values: Mapping[str, np.ndarray], where: str) -> None:
        """Raise ``ModelError`` if bound hyperparameters cannot serve (e.g. too few degrees of freedom)."""

    def prior_jacobian(self, scale: np.ndarray | None, K: int) -> float:
        """log ``|∂θ_internal / ∂θ_data|`` of all the parameters (0 for families fitted in the data's units)."""
        return 0.0

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """The weakly informative prior's hyperparameters (internal units) from Σ_n w_n Φ_n of this node."""
        raise NotImplementedError

    def learns_nothing(self) -> bool:
        """Whether every parameter is fixed in the declaration: a prior then has nothing to act on.

        Held parameters get no prior term (a fixed probability of 0 would make a Dirichlet's
        or a Beta's log density −∞); families with several parameters drop the held ones'
        factors in :meth:`log_prior` and in their MAP M-step.
        """
        return set(self.param_axes()) <= set(self.fixed)

    def bind_prior(self, values: Mapping[str, np.ndarray], center: np.ndarray | None, scale: np.ndarray | None,
                   K: int, where: str) -> BoundPrior | None:
        """The declared prior, its hyperparameters (data units, shaped by :meth:`prior_axes`) in internal units.

        None when every parameter is held (:meth:`learns_nothing`): no prior term at all.
        """
        assert self.prior is not None
        if self.learns_nothing():
            return None
        internal = {key: np.asarray(value, dtype=float) for key, value in
                    self.standard_prior(values, center, scale).items()}
        self.check_prior(internal, where)
        return BoundPrior(self.prior.kind, internal, self.prior_jacobian(scale, K))

    def weak_prior(self, stats: np.ndarray, scale: np.ndarray | None, K: int) -> BoundPrior | None:
        """The weakly informative prior of ``fit(prior="weak")``, or None if the family takes no prior.

        None too when every parameter is held (:meth:`learns_nothing`).
        """
        if self.prior_type is None or self.learns_nothing():
            return None
        values = {key: np.asarray(value, dtype=float) for key, value in self.weak_prior_values(stats, K).items()}
        return BoundPrior(self.prior_type.__name__, values, self.prior_jacobian(scale, K))

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        """(log p(θ), the magnitude of its terms): the prior's normalized log density at ``params``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        signature = inspect.signature(type(self).__init__).parameters
        shown = []
        for key, value in self.arguments().items():
            default = signature[key].default if key in signature else None
            if default is not inspect.Parameter.empty and _same_value(value, default):
                continue
            text = _short(value)
            bare = default is inspect.Parameter.empty or key in self.positional
            shown.append(text if bare else f"{key}={text}")
        return f"{self.kind}({', '.join(shown)})"

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


@dataclasses.dataclass(frozen=True)
class Marginal:
    """The distribution of one element given each latent state, for plots.

    ``density(grid)`` returns p(x = grid | z = k) as (K, len(grid)); a discrete
    family sets ``discrete=True`` (drawn with bars at its support, or at its
    ``levels`` when it has labelled levels). ``variance`` is set for Gaussian
    marginals, which also get covariance ellipses.
    """

    mean: np.ndarray
    density: Callable[[np.ndarray], np.ndarray]
    discrete: bool = False
    variance: np.ndarray | None = None
    levels: Sequence[Any] | None = None


class ObservedFamily(Family):
    """An exponential family for observed data, owning a block of rows of Φ.

    ``D`` below is the number of elements the family sees per sample (the size of
    the event dimension, or the product of a variable's non-sample dims).
    """

    role = "observed"
    #: location-scale family fitted on centred and scaled data; ``to_original`` maps back
    standardize: ClassVar[bool] = False
    #: elements form one event over a single dimension (False: independent elements)
    multivariate: ClassVar[bool] = False
    #: usable for k-means++ seeding (continuous, Euclidean geometry)
    continuous: ClassVar[bool] = False
    #: the data are category labels, encoded as level codes 0..L-1 by the compiler
    categorical: ClassVar[bool] = False
    #: one common scale for all elements (needed where a parameter pools elements)
    pool_scale: bool = False
    floor: float = 0.0

    # -- layout ---------------------------------------------------------------------
    def n_rows(self, D: int) -> int:
        """Rows of Φ this node owns: presence rows and sufficient statistics."""
        raise NotImplementedError

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        """Fill ``out`` (rows × b) from ``x`` (D × b, NaN where missing)."""
        raise NotImplementedError

    def natural(self, params: Params) -> np.ndarray:
        """The H block (K × rows): −A(η) in the presence columns, η in the others."""
        raise NotImplementedError

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """Σ log h(x) over the present elements of each column of ``x`` (D × b)."""
        raise NotImplementedError

    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: BoundPrior | None = None) -> tuple[Params, Floored]:
        """Moment matching from the node's block of R Φᵀ (K × rows).

        ``hold`` are parameters not to learn (fixed ones, or starting values given by
        the user); ``previous`` the last parameters, kept for components with no
        responsibility left (a generalized-EM step). With a ``prior`` the step is the
        posterior mode (MAP): the prior's pseudo-observations join the statistics, and
        a component with no responsibility takes the prior's mode. Returns the
        parameters and the ``(component, smallest variance)`` pairs where a variance
        floor was applied.
        """
        raise NotImplementedError

    # -- declaration and data -----------------------------------------------------------
    def data_arguments(self) -> dict[str, str]:
        """Arguments that name data variables read alongside x (e.g. Binomial's trials)."""
        return {}

    def default_params(self, K: int, D: int) -> Params:
        """Parameters for components that never had responsibility."""
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

    def project(self, params: Params) -> Params:
        """``params`` moved onto the set the M-step's outputs lie in, where that set is narrower than
        the valid one (a structure shared across states); unchanged for most families.

        Accelerated proposals (affine combinations of M-step outputs) and given starting values
        pass through here, so that EM's check compares points of the same model.
        """
        return params

    def within_m_step_bounds(self, params: Mapping[str, np.ndarray]) -> bool:
        """Whether learned parameters lie inside the set the M-step maximizes over, where it is
        narrower than the valid set (a cap the M-step does not report as floored).

        Accelerated EM keeps its proposals inside (``engine/accelerate.py``): beyond a bound
        the likelihood can exceed anything the M-step reaches, and the EM step from there
        would lose ground.
        """
        return True

    def check_given(self, **given: Any) -> None:
        """Validate parameter values given to the constructor (held, not learned), naming the argument."""
        for name, value in given.items():
            if value is not None:
                where = f"{self.kind}({name}=...)"
                self.check_params({name: as_float(value, where)}, where)

    def outside_support(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str] | None:
        """Elements of ``x`` (b × D, NaN = missing) outside the support, and what the support is."""
        return None

    @property
    def seeds_kmeans(self) -> bool:
        """Whether k-means++ on this node's values seeds the latent's states: its values are
        continuous and cluster as the states do (a regression's response does not)."""
        return self.continuous

    def seed_features(self, x: np.ndarray) -> np.ndarray:
        """The data (as :meth:`Node.read` gives them, NaN = missing) in the space k-means++ seeds in.

        Where the family's geometry is that of log x (positive families), seeding on x would
        let one far value decide every seed, and squared distances of data near 1e300
        overflow; the engine then centres and scales these features per element.
        """
        return x

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """Draw one sample (n × D) per entry of ``labels`` (component indices)."""
        raise NotImplementedError

    def expected_value(self, params: Params) -> np.ndarray:
        """E[x | z = k] per component (K × D), used to impute missing values."""
        raise NotImplementedError

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        """One element's distribution per state; ``values[p]`` is parameter p for that element (K, ...)."""
        raise NotImplementedError

    def impute(self, params: Params, x: np.ndarray, resp: np.ndarray,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """``x`` (D × n, NaN = missing) with each hole set to Σ_k r_nk E[x_d | z=k] (elements independent given z).

        ``aux`` holds the family's extra data (D × n), for families whose mean depends on it.
        """
        filled = (resp @ self.expected_value(params)).T
        return np.where(np.isnan(x), filled, x)

    def bound(self, levels: Sequence[Any]) -> ObservedFamily:
        """This family with the data's levels bound (only categorical families have levels)."""
        return self

    def log_prob(self, x: np.ndarray, params: Params, aux: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """log p(x | component k) for x (n × D): (n × K), through H Φ + log h.

        Computed from the same pieces the engine uses, so testing it against an
        independent density tests the exponential-family decomposition itself.
        """
        x = np.asarray(x, dtype=float)
        aux = {key: np.asarray(value, dtype=float).T for key, value in (aux or {}).items()}
        phi = np.empty((self.n_rows(x.shape[1]), x.shape[0]))
        self.statistics(x.T, phi, aux)
        return (self.natural(params) @ phi).T + self.log_base_measure(x.T, aux)[:, None]


class ElementwiseFamily(ObservedFamily):
    """A family whose elements are independent given z, each with ``n_suff`` statistics.

    Rows of Φ: one presence row per element (1 where observed; Binomial's is the
    number of trials), then statistic j of element d at row ``D·(1+j) + d``. Parameters
    are (K, D) arrays unless a family says otherwise.
    """

    role = "observed"  # a base, not a family users declare: kept out of the registry
    n_suff: ClassVar[int] = 1
    #: a value inside the support, written where x is missing before φ is computed
    fill: ClassVar[float] = 0.0

    def n_rows(self, D: int) -> int:
        return D * (1 + self.n_suff)

    def suff(self, x: np.ndarray) -> list[np.ndarray]:
        """φ_j(x) for j < n_suff, each shaped like x (D × b)."""
        raise NotImplementedError

    def eta(self, params: Params) -> tuple[list[np.ndarray], np.ndarray]:
        """Natural parameters η_j (each K × D) and the log-partition A (K × D)."""
        raise NotImplementedError

    def log_h(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """log h(x) elementwise (D × b), for x inside the support."""
        return np.zeros_like(x)

    def presence(self, observed: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """The presence rows (D × b): what multiplies −A(η) for each element."""
        return observed.astype(float)

    def mle(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params,
            previous: Params | None) -> tuple[Params, Floored]:
        """Parameters from counts N_kd and sums S_jkd = Σ_n r_nk φ_j(x_nd) (each K × D)."""
        raise NotImplementedError

    def posterior_mode(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params, previous: Params | None,
                       prior: BoundPrior) -> tuple[Params, Floored]:
        """As :meth:`mle`, with the prior's pseudo-observations: the MAP estimate."""
        raise NotImplementedError

    @staticmethod
    def split(stats: np.ndarray, n_suff: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """A block's (or one row's) presence counts and statistic sums, each (K × D) (or (D,))."""
        D = stats.shape[-1] // (1 + n_suff)
        return stats[..., :D], [stats[..., D * (1 + j):D * (2 + j)] for j in range(n_suff)]

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        D = x.shape[0]
        observed = ~np.isnan(x)
        complete = bool(observed.all())
        safe = x if complete else np.where(observed, x, self.fill)
        out[:D] = self.presence(observed, aux)
        for j, phi in enumerate(self.suff(safe)):
            rows = out[D * (1 + j):D * (2 + j)]
            if complete:
                rows[...] = phi
            else:
                np.multiply(phi, observed, out=rows)

    def natural(self, params: Params) -> np.ndarray:
        etas, log_partition = self.eta(params)
        return np.hstack([-log_partition, *etas])

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        observed = ~np.isnan(x)
        safe = np.where(observed, x, self.fill)
        return np.where(observed, self.log_h(safe, aux), 0.0).sum(axis=0)

    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: BoundPrior | None = None) -> tuple[Params, Floored]:
        nk, sums = self.split(stats, self.n_suff)
        if prior is None:
            return self.mle(nk, sums, hold, previous)
        return self.posterior_mode(nk, sums, hold, previous, prior)


def family_class(name: str) -> type[Family]:
    """The family class registered under ``name``."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def keep_empty(new: np.ndarray, previous: np.ndarray | None, fallback: np.ndarray,
               empty: np.ndarray) -> np.ndarray:
    """Per-component parameter ``new`` with empty entries taken from ``previous``.

    ``empty`` has the leading shape of ``new`` (K, or K × D for per-element counts).
    """
    if not empty.any():
        return new
    source = fallback if previous is None else np.broadcast_to(previous, new.shape)
    shape = empty.shape + (1,) * (new.ndim - empty.ndim)
    return np.where(empty.reshape(shape), source, new)


def empty_components(nk: np.ndarray) -> np.ndarray:
    """Entries (components, or component × element) with too little responsibility to estimate from."""
    total = float(nk.sum(axis=0).max()) if nk.ndim > 1 else float(nk.sum())
    return nk <= 1e-12 * max(total, 1.0)


def safe_counts(nk: np.ndarray) -> np.ndarray:
    """N_k with empty entries set to 1, so that divisions stay finite."""
    return np.where(empty_components(nk), 1.0, nk)


def held_or(hold: Params, name: str, shape: tuple[int, ...], estimate: Callable[[], np.ndarray]) -> np.ndarray:
    """A held parameter broadcast to ``shape``, or the estimate."""
    if name in hold:
        return np.broadcast_to(np.asarray(hold[name], dtype=float), shape).copy()
    return estimate()


def check_range(params: Mapping[str, np.ndarray], name: str, where: str, *, low: float = -np.inf,
                high: float = np.inf, low_open: bool = True, high_open: bool = True) -> None:
    """Raise ``ModelError`` unless every value of ``params[name]`` is finite and inside the interval."""
    if name not in params:
        return
    value = np.asarray(params[name], dtype=float)
    ok = np.isfinite(value)
    ok &= (value > low) if low_open else (value >= low)
    ok &= (value < high) if high_open else (value <= high)
    if not ok.all():
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        bad = value[~ok].ravel()[0]
        raise ModelError(f"{where}: {name} must be finite and in {interval}, got {bad!r}"
                         f"{f' (and {int((~ok).sum()) - 1} more)' if (~ok).sum() > 1 else ''}")


def as_float(value: Any, where: str) -> np.ndarray:
    """An array-valued argument as floats, or a ``ModelError`` saying what arrived."""
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ModelError(f"{where}: expected numbers, got {value!r}") from None


def check_number(value: Any, where: str, *, low: float = -np.inf, low_open: bool = False) -> float:
    """A finite real argument (not bool, not str), at least ``low``; else ``ModelError``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ModelError(f"{where}: must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < low or (low_open and value == low):
        raise ModelError(f"{where}: must be a finite number {'>' if low_open else '>='} {low:g}, got {value!r}")
    return value


def _short(value: Any) -> str:
    """A constructor argument as shown in a repr: scalars and short lists in full, arrays by shape."""
    if isinstance(value, str) or np.ndim(value) == 0:
        return repr(value.item() if isinstance(value, np.generic) else value)
    if isinstance(value, list | tuple) and len(value) <= 8 and all(np.ndim(v) == 0 for v in value):
        return repr([v.item() if isinstance(v, np.generic) else v for v in value])
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
