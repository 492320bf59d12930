"""Categorical distribution: a latent with K states (the mixture weights), or observed levels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from emdsl import priors
from emdsl.errors import ModelError
from emdsl.families._base import (
    Axes,
    BoundPrior,
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
#: how far from 1 a row of given probabilities may sum (it is then divided by its sum): single
#: precision's rounding over a row of a few hundred entries, not a typo's worth
SUM_TOLERANCE = 1e-6
#: the weak prior's pseudo-samples (fit(prior="weak")): Dirichlet(1 + 0.01 · frequency)
WEAK_COUNT = 0.01


#: the most states (or levels) a Categorical takes: each gets a label, a column of H, a weight
MAX_STATES = 1_000_000


def _state_labels(k: Sequence[Any]) -> tuple[Any, ...]:
    """The labels of ``Categorical(k=[...])``: distinct, present (not None, NaN, ``pd.NA``, NaT) hashable scalars."""
    if len(k) > MAX_STATES:
        raise ModelError(f"Categorical(k): at most {MAX_STATES:,} states or levels, got {len(k):,} labels")
    states = tuple(v.item() if isinstance(v, np.generic) else v for v in k)
    shown = _short_list(states)
    for v in states:
        if isinstance(v, str | bytes) or (np.ndim(v) == 0 and not isinstance(v, Sequence | Mapping | set)):
            try:
                hash(v)
            except TypeError:
                pass
            else:
                if _missing_label(v):
                    raise ModelError(f"Categorical(k): state labels must not be missing (None, NaN or pd.NA), "
                                     f"got {shown}")
                continue
        raise ModelError(f"Categorical(k): state labels must be scalars (numbers or strings), got {v!r} "
                         f"in {shown}")
    if len(states) < 1:
        raise ModelError("Categorical(k): need at least one state, got an empty list")
    if len(set(states)) != len(states):
        raise ModelError(f"Categorical(k): state labels must be distinct, got {shown}")
    return states


def _missing_label(value: Any) -> bool:
    """None, NaN, ``pd.NA`` or NaT: a label that marks a missing value, never a state."""
    if value is None:
        return True
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _short_list(values: Sequence[Any]) -> str:
    return repr(list(values)) if len(values) <= 20 else repr(list(values[:20]))[:-1] + ", …]"


def unit_rows(params: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """``params`` with the rows (last axis) of the arrays ``names`` divided by their sums."""
    out = dict(params)
    for name in names:
        if out.get(name) is not None:
            value = np.asarray(out[name], dtype=float)
            out[name] = value / value.sum(axis=-1, keepdims=True)
    return out


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
    is not observed. With a :class:`~emdsl.priors.Dirichlet` (α) prior the M-steps
    are the posterior modes π_k = (N_k + α_k − 1) / (N + Σα − K) and
    p_kdl = (Σ_n r_nk [x_nd = l] + α_l − 1) / (N_kd + Σα − L).

    Parameters
    ----------
    k : int or sequence of hashable, optional
        Number of states (latent) or levels (observed), or their labels, used as the
        coordinate of the latent dimension or of the ``level`` dimension. Observed
        data without ``k`` get their levels from the data.
    probs : array_like, optional
        Fixed probabilities: the weights (K,) of a latent, or (states × levels) for
        observed data; held, not learned. Rows must sum to 1.
    initial, transition : array_like, optional
        For a Markov latent (``latent(name, em.Categorical(k), markov="time")``): a fixed
        initial distribution (K,) and a fixed transition matrix (K × K, rows sum to 1,
        row i holds p(z_t = j | z_{t-1} = i)); held, not learned.
    prior : emdsl.priors.Dirichlet, optional
        A conjugate prior on the weights (α per state) or on each element's level
        probabilities (α per level); the M-step becomes the MAP estimate. For a Markov
        latent, the same α (per state) is on ``initial`` and on every row of ``transition``.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Categorical(3)
    Categorical(3)
    >>> em.Categorical(["low", "high"], probs=[0.5, 0.5]).states
    ('low', 'high')
    >>> em.Categorical(2, transition=[[0.9, 0.1], [0.0, 1.0]])  # a left-to-right chain
    Categorical(2, transition=<(2, 2) array>)
    """

    param_names = ("probs", "initial", "transition")
    positional = ("k",)
    prior_type = priors.Dirichlet

    def __init__(self, k: int | Sequence[Hashable] | None = None, probs: ArrayLike | None = None, *,
                 initial: ArrayLike | None = None, transition: ArrayLike | None = None,
                 prior: priors.Dirichlet | None = None) -> None:
        if k is None:
            states: tuple[Any, ...] = ()
        elif isinstance(k, bool) or not isinstance(k, int | np.integer | Sequence) or isinstance(k, str):
            raise ModelError(f"Categorical(k): k must be a number of states or a list of state labels, got {k!r}")
        elif isinstance(k, Sequence):
            states = _state_labels(k)
        else:
            if int(k) < 1:
                raise ModelError(f"Categorical(k): need at least one state, got k={k!r}")
            if int(k) > MAX_STATES:
                raise ModelError(f"Categorical(k): at most {MAX_STATES:,} states or levels (one label each), "
                                 f"got k={k!r}")
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
        self._initial, self._transition = initial, transition
        if initial is not None or transition is not None:
            states = _chain_states(states, initial, transition)
        self.k = len(states)
        self.states = states
        self._k_arg = None if k is None else (k if not isinstance(k, Sequence) else list(states))
        self.accept_prior(prior, "Categorical(prior=...)")

    def arguments(self) -> dict[str, Any]:
        args = {"k": self._k_arg, "probs": self._probs}
        if self._initial is not None or self._transition is not None:
            args.update(initial=self._initial, transition=self._transition)
        return self.with_prior(args)

    def param_axes(self) -> dict[str, Axes]:
        return {"probs": ("latent",)}

    def observed_form(self) -> _ObservedCategorical:
        """This declaration as a family of observed data (used by ``Model.observe``)."""
        if self._initial is not None or self._transition is not None:
            raise ModelError("Categorical(initial=..., transition=...): initial and transition are parameters "
                             "of a Markov latent (latent(name, em.Categorical(k, ...), markov=dim)), not of "
                             "observed data")
        return _ObservedCategorical(self._k_arg, self._probs, prior=self.prior)

    def markov_form(self, where: str) -> _MarkovCategorical:
        """This declaration as the states of a Markov chain (used by ``Model.latent(..., markov=dim)``)."""
        if self._probs is not None:
            raise ModelError(f"{where}: a Markov latent has no mixture weights probs; fix its "
                             "initial distribution and transition matrix instead: "
                             "em.Categorical(k, initial=..., transition=...)")
        return _MarkovCategorical(self._k_arg, initial=self._initial, transition=self._transition, prior=self.prior)

    def check_latent(self, where: str) -> None:
        """Raise ``ModelError`` unless this declaration can serve as a latent variable."""
        if self._k_arg is None and self._probs is None and self._initial is None and self._transition is None:
            raise ModelError(f"{where}: a latent Categorical needs its number of states, e.g. em.Categorical(3)")
        if self._probs is not None and np.ndim(self._probs) != 1:
            raise ModelError(f"{where}: a latent's probs are its K weights (1-D), got shape {np.shape(self._probs)}")
        if type(self) is Categorical and (self._initial is not None or self._transition is not None):
            raise ModelError(f"{where}: initial and transition are parameters of a Markov latent; declare "
                             "the dimension the chain runs along, e.g. latent(name, em.Categorical(k, "
                             "transition=...), markov='time')")

    def log_weights(self, params: Params) -> np.ndarray:
        """log π (K,), with weights floored at 1e-300 so that log 0 stays finite."""
        return log_probs(params["probs"])

    def weights_m_step(self, nk: np.ndarray, hold: Params, prior: BoundPrior | None = None) -> Params:
        """π_k = N_k / N unless the weights are held; with a Dirichlet prior (N_k + α_k − 1) / (N + Σα − K)."""
        if "probs" in hold:
            return {"probs": np.asarray(hold["probs"], dtype=float)}
        if prior is not None:
            nk = nk + prior["alpha"] - 1.0  # α ≥ 1, so these stay ≥ 0, and N > 0 keeps their sum > 0
        return {"probs": nk / nk.sum()}

    def prior_axes(self) -> dict[str, Axes]:
        return {"alpha": ("latent",)}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """Dirichlet(1 + 0.01/K): 0.01 of a pseudo-sample, spread evenly over the states."""
        return {"alpha": np.full(K, 1.0 + WEAK_COUNT / K)}

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        return priors.total(priors.dirichlet_terms(params["probs"], prior["alpha"]))

    def n_free_params(self) -> int:  # type: ignore[override]
        return 0 if self._probs is not None else self.k - 1

    def tidy_params(self, params: Mapping[str, np.ndarray]) -> Params:
        return unit_rows(params, ("probs", "initial", "transition"))

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


class _MarkovCategorical(Categorical):
    r"""The states of a first-order Markov chain: ``latent(name, em.Categorical(k), markov=dim)``.

    .. math::

        p(z_0 = k) = \pi_k, \qquad p(z_t = j \mid z_{t-1} = i) = A_{ij}

    Parameters ``initial`` (π, over the latent) and ``transition`` (A, over the latent
    and ``<latent>_next``; rows sum to 1). Either can be fixed in the declaration,
    ``em.Categorical(k, initial=..., transition=...)``; a zero in A (fixed, or in
    starting values) stays zero under EM, so a left-to-right chain stays left-to-right.
    The forward–backward E-step and the M-step live in :mod:`emdsl.latent.markov`.
    Users do not build this class: ``Model.latent(..., markov=dim)`` does.

    ``prior=em.priors.Dirichlet(alpha)`` is, as for a mixture's weights, a Dirichlet over
    the states (α a number, or one per state): here over ``initial`` and over each row
    of ``transition`` (α_j the pseudo-counts of moving *into* state j, from any state).
    A K × K ``alpha`` gives each row of ``transition`` its own (α_ij: from i into j; a
    sticky chain has a large diagonal), and ``Dirichlet(..., initial=α⁰)`` π its own
    (by default ``alpha`` when it is not a matrix, else flat).
    The M-steps become π_k = (N⁰_k + α⁰_k − 1) / Σ (…) and
    A_ij = (ξ_ij + α_ij − 1) / Σ_j (…); a zero of A or π (fixed, or in the starting
    values) stays zero and lies outside the prior's support (the Dirichlet is over the
    row's other entries). ``fit(prior="weak")`` puts Dirichlet(1 + 0.01/K) on both; a fixed
    ``initial`` or ``transition`` gets no prior term.
    """

    param_names = ("initial", "transition")

    def __init__(self, k: int | Sequence[Hashable] | None = None, probs: ArrayLike | None = None, *,
                 initial: ArrayLike | None = None, transition: ArrayLike | None = None,
                 prior: priors.Dirichlet | None = None) -> None:
        if probs is not None:
            raise ModelError("Categorical(probs=...): a Markov latent has no mixture weights; fix initial "
                             "and transition instead")
        super().__init__(k, None, initial=initial, transition=transition, prior=prior)

    @property
    def kind(self) -> str:
        return "Categorical"

    def arguments(self) -> dict[str, Any]:
        return self.with_prior({"k": self._k_arg, "probs": None, "initial": self._initial,
                                "transition": self._transition})

    def param_axes(self) -> dict[str, Axes]:
        return {"initial": ("latent",), "transition": ("latent", "latent_next")}

    def log_weights(self, params: Params) -> np.ndarray:
        """0: a chain's log-probabilities are not a per-sample constant but the structure's business."""
        return np.zeros(self.k)

    def prior_axes(self) -> dict[str, Axes]:
        matrix = self.prior is not None and np.ndim(self.prior.alpha) == 2
        return {"alpha": ("latent", "latent_next") if matrix else ("latent",), "initial": ("latent",)}

    def standard_prior(self, values: Mapping[str, np.ndarray], center: np.ndarray | None,
                       scale: np.ndarray | None) -> Params:
        """α of the rows of A (K × K, a vector repeated on every row) and α⁰ of π (``initial``, else
        ``alpha`` when it is a vector, else 1)."""
        alpha = np.asarray(values["alpha"], dtype=float)
        initial = values.get("initial")
        if initial is None:
            initial = alpha if alpha.ndim == 1 else np.ones(self.k)
        return {"alpha": np.broadcast_to(alpha, (self.k, self.k)).copy(), "initial": np.asarray(initial, dtype=float)}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        alpha = super().weak_prior_values(stats, K)["alpha"]
        return {"alpha": np.broadcast_to(alpha, (K, K)).copy(), "initial": alpha}

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        """log Dirichlet(π; α⁰) + Σ_i log Dirichlet(A_i·; α_i·), each over its support (see the class).

        A fixed ``initial`` or ``transition`` has no prior term (its M-step holds it).
        """
        from emdsl.latent.markov import chain_log_prior

        fixed = self.fixed
        return chain_log_prior({name: value for name, value in params.items() if name not in fixed},
                               prior["initial"], prior["alpha"])

    def n_free_params(self) -> int:  # type: ignore[override]
        initial = 0 if self._initial is not None else self.k - 1
        return initial + (0 if self._transition is not None else self.k * (self.k - 1))

    def check_params(self, params: Mapping[str, np.ndarray], where: str, size: int | None = None) -> None:
        if params.get("initial") is not None:
            _check_distribution(np.asarray(params["initial"], dtype=float), f"{where}: initial",
                                (self.k,), self.states)
        if params.get("transition") is not None:
            _check_distribution(np.asarray(params["transition"], dtype=float), f"{where}: transition",
                                (self.k, self.k), self.states)

    def default_params(self) -> Params:
        """A uniform start and a sticky chain: 0.9 on the diagonal, the rest spread evenly.

        Sticky because hidden states that persist are what a Markov latent is usually
        declared for; a uniform matrix would start EM at a mixture (every row alike).
        """
        k = self.k
        transition = np.full((k, k), 0.1 / (k - 1)) if k > 1 else np.ones((1, 1))
        if k > 1:
            np.fill_diagonal(transition, 0.9)
        return {"initial": np.full(k, 1.0 / k), "transition": transition}

    def draw(self, params: Params, n: int, rng: np.random.Generator) -> np.ndarray:
        raise ModelError("a Markov latent draws whole sequences: use fit.sample(n_sequences, length)")


def _chain_states(states: tuple[Any, ...], initial: Any, transition: Any) -> tuple[Any, ...]:
    """The states, inferred from initial/transition when k is not given; shapes checked against k."""
    for name, value, ndim in (("initial", initial, 1), ("transition", transition, 2)):
        if value is None:
            continue
        array = as_float(value, f"Categorical({name}=...)")
        if array.ndim != ndim or (ndim == 2 and array.shape[0] != array.shape[1]):
            expected = "a vector (k,)" if ndim == 1 else "a square matrix (k, k)"
            raise ModelError(f"Categorical({name}=...): expected {expected}, got shape {array.shape}")
        if not states:
            states = tuple(range(array.shape[0]))
        labels = states
        _check_distribution(array, f"Categorical({name}=...)", (len(states),) * ndim, labels)
    return states


def _check_distribution(value: np.ndarray, where: str, shape: tuple[int, ...], states: Sequence[Any]) -> None:
    """An initial distribution or a transition matrix: shape, finite, non-negative, rows summing to 1."""
    if value.shape != shape:
        raise ModelError(f"{where}: expected shape {shape} (one entry per state), got {value.shape}")
    if not np.all(np.isfinite(value)) or np.any(value < 0):
        raise ModelError(f"{where}: probabilities must be finite and non-negative, got {value.tolist()}")
    sums = np.atleast_1d(value.sum(axis=-1))
    bad = np.flatnonzero(~np.isclose(sums, 1.0, rtol=0, atol=SUM_TOLERANCE))
    if len(bad):
        row = f"row {states[bad[0]]!r} " if value.ndim == 2 else ""
        raise ModelError(f"{where}: {row}sums to {sums[bad[0]]:.10g}; "
                         f"{'each row' if value.ndim == 2 else 'the probabilities'} must sum to 1")


class _ObservedCategorical(Categorical, ElementwiseFamily):
    """The observed form of :class:`Categorical`: level probabilities per state and element.

    Rows of Φ: a presence row per element, then the one-hot indicator of level l of
    element d at row ``D·(1+l) + d``; η = log p and A(η) = log Σ_l p_l = 0.
    """

    role = "observed"  # type: ignore[assignment]
    categorical = True
    param_names = ("probs",)  # initial and transition belong to a Markov latent

    def __init__(self, k: int | Sequence[Hashable] | None = None, probs: ArrayLike | None = None,
                 prior: priors.Dirichlet | None = None) -> None:
        super().__init__(k, probs, prior=prior)
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
        out = _ObservedCategorical(self._k_arg, self._probs, prior=self.prior)
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

    def posterior_mode(self, nk: np.ndarray, sums: list[np.ndarray], hold: Params, previous: Params | None,
                       prior: BoundPrior) -> tuple[Params, Floored]:
        K, D = nk.shape
        counts = np.stack(sums, axis=-1) + prior["alpha"] - 1.0
        total = counts.sum(axis=-1)
        empty = total <= 0  # no sample and α = 1: every p is a mode, keep the previous one
        fallback = self.default_params(K, D)["probs"]
        probs = held_or(hold, "probs", (K, D, self.n_suff), lambda: keep_empty(
            counts / np.where(empty, 1.0, total)[..., None], (previous or {}).get("probs"), fallback, empty))
        return {"probs": probs}, []

    def prior_axes(self) -> dict[str, Axes]:
        return {"alpha": ("level",)}

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """Dirichlet(1 + 0.01 f) per element: 0.01 of a pseudo-sample with the levels' frequencies f."""
        nk, sums = self.split(stats, self.n_suff)
        counts = np.stack(sums, axis=-1)
        frequency = counts / np.where(nk > 0, nk, 1.0)[:, None]
        return {"alpha": 1.0 + WEAK_COUNT * frequency}

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
    if not np.allclose(sums, 1.0, rtol=0, atol=SUM_TOLERANCE):
        bad = np.ravel(sums)[np.flatnonzero(~np.isclose(np.ravel(sums), 1.0, rtol=0, atol=SUM_TOLERANCE))[0]]
        raise ModelError(f"{where}: probs must sum to 1 over the last axis, a row sums to {bad:.10g}")
