"""Covariates on the mixture weights: the concomitant (multinomial logit) model, flexmix's ``concomitant=``."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from emdsl.errors import ModelError
from emdsl.families._base import Axes, Floored, LatentFamily, ObservedFamily, Params
from emdsl.regression.design import (
    LazyDesign,
    Terms,
    _chunks_of,
    check_design,
    design_matrix,
    design_summary,
    lazy,
    lazy_design_matrix,
    within_reach,
)


def check_concomitant(where: str, family: LatentFamily, markov: str | None, covariates: Any) -> tuple[str, ...]:
    """Validate ``latent(..., covariates=)``; return the names."""
    if markov is not None:
        raise ModelError(f"{where}: covariates on a Markov latent (transition rows that depend on covariates) "
                         "are not supported; drop markov= or covariates=")
    if family.k < 2:
        raise ModelError(f"{where}: covariates move the weights of several states; {family!r} has one")
    if family.fixed:
        raise ModelError(f"{where}: fixed weights {family!r} cannot depend on covariates")
    if isinstance(covariates, str):
        covariates = [covariates]
    if not hasattr(covariates, "__iter__") or isinstance(covariates, Mapping | set | frozenset | bytes):
        raise ModelError(f"{where}: covariates must be a list of data variable names, got {covariates!r}")
    names = tuple(covariates)
    if not names:
        raise ModelError(f"{where}: covariates=[] is the plain mixture; leave covariates out")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ModelError(f"{where}: covariates must be data variable names (non-empty strings), got {name!r}")
    if len(set(names)) != len(names):
        raise ModelError(f"{where}: a covariate is listed twice in {list(names)}")
    return names


class _ConcomitantWeights(LatentFamily):
    r"""A latent's weights as a multinomial logit of covariates (a concomitant model, a mixture of experts).

    π_nk = exp(γ_kᵀx_n) / Σ_j exp(γ_jᵀx_n), with γ over (latent, term) and the first state as
    the reference (γ_0 = 0). The per-row log-weights and the M-step's sums come from a hidden
    node of the plan (:class:`_ConcomitantLogit`, named like the latent); this family only
    stands for the parameters in the declaration's place: H's weight column is 0.
    """

    constraints: ClassVar[dict[str, str]] = {"coef": "reference"}

    def __init__(self, base: LatentFamily, terms: tuple[str, ...]) -> None:
        self.base, self.terms = base, terms
        self.k, self.states = base.k, base.states

    @property
    def kind(self) -> str:
        return self.base.kind

    def arguments(self) -> dict[str, Any]:
        return self.base.arguments()

    @property
    def fixed(self) -> dict[str, Any]:
        return {}

    def param_axes(self) -> dict[str, Axes]:
        return {"coef": ("latent", "term")}  # type: ignore[dict-item]

    def log_weights(self, params: Params) -> np.ndarray:
        return np.zeros(self.k)  # each sample's log-weights enter through the hidden node

    def weights_m_step(self, nk: np.ndarray, hold: Params, prior: Any = None) -> Params:
        return {}  # the hidden node's M-step, run after this one, sets the coefficients

    def n_free_params(self) -> int:
        return (self.k - 1) * len(self.terms)

    def check_params(self, params: Mapping[str, np.ndarray], where: str, size: int | None = None) -> None:
        coef = params.get("coef")
        if coef is not None and not np.all(np.isfinite(coef)):
            raise ModelError(f"{where}: coef must be finite")


class _ConcomitantLogit(ObservedFamily):
    r"""The hidden node of a concomitant latent: log π_nk(γ) per row, and the M-step of γ.

    Q(γ) = Σ_n Σ_k r_nk log π_nk(γ) is raised by a step on a quadratic minorizer valid in a
    trust region |x_nᵀΔγ_k| ≤ δ: there π'_k ≤ e^{2δ} π_k, so the multinomial logit's curvature
    at any point of the region is below e^{2δ} Σ_n w_n (diag π_n − π_nπ_nᵀ) ⊗ x_n x_nᵀ (the
    variance of the one-hot state under π' is at most e^{2δ} times its spread under π). With
    g_k = Σ_n (r_nk − w_n π_nk) x_n, S(γ) = Q(γ⁰) + gᵀΔ − ½ΔᵀBΔ: its coefficients are sums over
    rows (this node's block of the statistics, with H_k = [1, γ_k, −½ vec(γ_k γ_lᵀ) for every l]),
    and the M-step solves for its maximizer over the free γ_1..γ_{K−1} (γ_0 = 0), shortened to the
    trust region: generalized EM, as for the GLM nodes.
    """

    param_names = ("coef",)
    multivariate = False
    #: every row takes the per-row path (its first column, a design's, is never missing)
    row_by_row = True
    delta = 0.5

    def __init__(self, latent: _ConcomitantWeights, design: np.ndarray | None = None) -> None:
        self.latent = latent
        self.terms = latent.terms
        self.K = latent.k
        self.floor = 0.0
        self.design = design

    @property
    def kind(self) -> str:
        return "Categorical"

    def arguments(self) -> dict[str, Any]:
        return {}

    @property
    def T(self) -> int:
        return len(self.terms)

    def param_axes(self) -> dict[str, Axes]:
        return {"coef": ("latent", "term")}  # type: ignore[dict-item]

    def n_rows(self, D: int) -> int:
        return 1 + D + 1 + self.T + self.K * self.T * self.T

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        out[...] = 0.0

    def natural(self, params: Params) -> np.ndarray:
        coef = np.asarray(params["coef"], dtype=float)
        K, T = coef.shape
        quadratic = -0.5 * np.einsum("kt,ls->klts", coef, coef).reshape(K, K * T * T)
        return np.hstack([np.zeros((K, 1 + T)), np.ones((K, 1)), coef, quadratic])

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.zeros(x.shape[1])

    def patterns(self, params: Params, observed: np.ndarray) -> _ConcomitantTerms:
        return _ConcomitantTerms(self, np.asarray(params["coef"], dtype=float))

    def second_moments(self, out: np.ndarray, D: int) -> None:
        out[D:] = 0.0  # the start's M-step reads only the counts (see m_step)

    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: Any = None) -> tuple[Params, Floored]:
        K, T = self.K, self.T
        if "coef" in hold:
            return {"coef": np.broadcast_to(np.asarray(hold["coef"], dtype=float), (K, T)).copy()}, []
        nk = stats[:, 0]
        if previous is None or "coef" not in previous:
            # The start: the intercepts of the weights the responsibilities give, the slopes 0.
            coef = np.zeros((K, T))
            if self.terms and self.terms[0] == "intercept":
                share = np.maximum(nk, 1e-12 * max(float(nk.sum()), 1.0))
                coef[:, 0] = np.log(share) - np.log(share[0])
            return {"coef": coef}, []
        start = 2 + T
        v = stats[:, start:start + T]
        curvature = stats[:, start + T:].reshape(K, K, T, T)  # B_kl
        free = np.transpose(curvature[1:, 1:], (0, 2, 1, 3)).reshape((K - 1) * T, (K - 1) * T)
        old = np.asarray(previous["coef"], dtype=float)
        try:
            target = np.linalg.solve(free, v[1:].ravel()).reshape(K - 1, T)
        except np.linalg.LinAlgError:
            target = np.linalg.lstsq(free, v[1:].ravel(), rcond=None)[0].reshape(K - 1, T)
        coef = np.zeros((K, T))
        coef[1:] = old[1:] + within_reach(self.design, target - old[1:], self.delta)
        return {"coef": coef}, []

    def default_params(self, K: int, D: int) -> Params:
        return {"coef": np.zeros((K, self.T))}

    def n_free_params(self, K: int, D: int) -> int:
        return 0  # counted once, by the latent

    def log_weights_per_row(self, coef: np.ndarray, X: np.ndarray) -> np.ndarray:
        """log π_nk (K × n) for design columns X (T × n)."""
        eta = coef @ X
        return eta - np.logaddexp.reduce(eta, axis=0)

    def expected_value(self, params: Params) -> np.ndarray:
        raise ModelError("a concomitant model has no expected value")


class _ConcomitantTerms:
    """One γ's per-row terms: log π_nk, and the minorizer's sums."""

    def __init__(self, family: _ConcomitantLogit, coef: np.ndarray) -> None:
        self.family, self.coef = family, coef
        self.o = np.arange(family.T)

    def log_density(self, x: np.ndarray) -> np.ndarray:
        return self.family.log_weights_per_row(self.coef, x)

    def expected_statistics(self, x: np.ndarray, resp: np.ndarray) -> tuple[np.ndarray, float]:
        family = self.family
        K, T = family.K, family.T
        log_pi = family.log_weights_per_row(self.coef, x)
        pi = np.exp(log_pi)
        w = resp.sum(axis=0)
        g = (resp - pi * w) @ x.T  # (K × T)
        inflation = np.exp(2 * family.delta)
        diagonal = np.einsum("n,kn,tn,sn->kts", w, pi, x, x)
        cross = np.einsum("n,kn,ln,tn,sn->klts", w, pi, pi, x, x)
        curvature = -cross
        curvature[np.arange(K), np.arange(K)] += diagonal
        curvature *= inflation  # B_kl (K × K × T × T)
        m_old = np.einsum("klts,ls->kt", curvature, self.coef)
        stats = np.zeros((K, family.n_rows(T)))
        stats[:, 0] = resp.sum(axis=1)
        stats[:, 1:1 + T] = resp @ x.T
        q = (resp * log_pi).sum(axis=1)
        stats[:, 1 + T] = q - np.einsum("kt,kt->k", g, self.coef) - 0.5 * np.einsum("kt,kt->k", self.coef, m_old)
        stats[:, 2 + T:2 + 2 * T] = g + m_old
        stats[:, 2 + 2 * T:] = curvature.reshape(K, K * T * T)
        return stats, 0.0


def bind_concomitant(plan: Any, covariates: Sequence[str], ds: xr.Dataset, sample_dim: Hashable,
                     terms: Sequence[str] | None, fitting: bool) -> Any:
    """The hidden node of ``latent(name, ..., covariates=[...])``; the plan's latent family becomes the logit's."""
    from emdsl.compile import Node

    latent = plan.latent
    where = f"latent({latent.name!r}, ..., covariates={list(covariates)!r})"
    for name in covariates:
        if name not in ds.data_vars:
            available = ", ".join(map(repr, ds.data_vars)) or "none"
            raise ModelError(f"{where}: the covariate {name!r} is not in the data{' (new data)' if not fitting else ''}"
                             f"; available: {available}")
    if lazy(ds, covariates):  # dask-backed: the design stays lazy, with the covariates' chunks
        import dask.array as da

        chunks = _chunks_of(ds, covariates, plan.n_samples)
        design, found = lazy_design_matrix(ds, covariates, True, sample_dim, where, terms, chunks)
        summary = design_summary(design) if fitting else None
        if summary is not None:
            check_design(summary, found, covariates, True, where)
        reach: Any = LazyDesign(design, summary.low, summary.high) if summary is not None else None
        rows = da.arange(plan.n_samples, chunks=(chunks,), dtype=np.intp)
        pattern = da.zeros(plan.n_samples, chunks=(chunks,), dtype=np.intp)
    else:
        design, found = design_matrix(ds, covariates, True, sample_dim, where, terms)
        if fitting:
            check_design(design, found, covariates, True, where)
        reach = design
        rows = np.arange(plan.n_samples, dtype=np.intp)
        pattern = np.zeros(plan.n_samples, dtype=np.intp)
    family = _ConcomitantWeights(latent.family, Terms(found))
    latent.family = family
    T = len(found)
    node = Node(latent.name, _ConcomitantLogit(family, reach), tuple(covariates), True, ("column",), (T,),
                {"column": list(found)}, [design], np.zeros(T), np.ones(T))
    # Every row takes the per-row path (on dask data each chunk's task finds its own rows again).
    node.partial_rows, node.partial_pattern = rows, pattern
    node.patterns = [np.ones(T, dtype=bool)]
    return node
