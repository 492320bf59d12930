"""Multivariate normal distribution over one event dimension."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from emdsl import priors
from emdsl.errors import ModelError
from emdsl.families import _mclust, normal
from emdsl.families._base import (
    Axes,
    BoundPrior,
    Floored,
    Marginal,
    ObservedFamily,
    Params,
    as_float,
    check_number,
    empty_components,
    keep_empty,
    safe_counts,
)

CovarianceType = Literal["full", "diag", "spherical", "tied", "EII", "EEI", "VEI", "EVI", "VEE", "EVE", "VVE",
                         "EEV", "VEV", "EVV"]
_TYPES = ("full", "diag", "spherical", "tied", *_mclust.MODELS)
#: mclust's names of the structures scikit-learn names too (volume, shape, orientation: Equal or Variable)
MCLUST_NAMES = {"VVV": "full", "EEE": "tied", "VII": "spherical", "VVI": "diag"}
#: the weak prior's scale is the data's covariance unless its condition number exceeds 1 / this
_SINGULAR = 1e-10


class MultivariateNormal(ObservedFamily):
    r"""Multivariate normal distribution over one event dimension of size D.

    .. math::

        p(x \mid \mu, \Sigma) = (2\pi)^{-D/2} |\Sigma|^{-1/2}
            \exp\!\left(-\tfrac12 (x-\mu)^\top \Sigma^{-1} (x-\mu)\right)

        \phi(x) = \left(x,\ (x_i x_j)_{i \le j}\right), \quad
        \eta = \left(\Lambda\mu,\ (-\tfrac12\Lambda_{ii},\ -\Lambda_{ij})_{i<j}\right), \quad
        A(\eta) = \tfrac12 \mu^\top\Lambda\mu + \tfrac12\log|\Sigma|, \quad
        \log h(x) = -\tfrac D2 \log 2\pi

    with Λ = Σ⁻¹. The statistics are the upper triangle of x xᵀ (``"full"``,
    ``"tied"``), the squares x_i² (``"diag"`` and mclust's other diagonal models, the
    same mathematics as :class:`Normal`) or their sum Σ_i x_i² (``"spherical"``).
    M-step: μ_k = S_x / N_k and Σ_k = S_xx / N_k − μ_k μ_kᵀ; ``"tied"`` pools the scatter
    over states, ``"spherical"`` averages the diagonal over the D elements.

    mclust's constrained models (Celeux & Govaert 1995): Σ_k = λ_k D_k A_k D_kᵀ with a
    volume λ_k, a shape A_k (diagonal, determinant 1) and an orientation D_k, each Equal
    across states, Variable, or (orientation) the Identity: ``"EII"`` (σ² I), ``"EEI"``
    (one diagonal), ``"VEI"`` (λ_k B), ``"EVI"`` (λ B_k), ``"VEE"`` (λ_k C), ``"EVE"`` (λ D A_k Dᵀ),
    ``"VVE"`` (D Λ_k Dᵀ), ``"EEV"`` (λ D_k A D_kᵀ),
    ``"VEV"`` (λ_k D_k A D_kᵀ) and ``"EVV"`` (λ C_k); their M-steps are in
    :mod:`emdsl.families._mclust`. The diagonal ones are stored in the ``"diag"`` layout
    (K, D), the others as full matrices. mclust's names ``"VVV"``, ``"EEE"``, ``"VII"``
    and ``"VVI"`` are accepted for ``"full"``, ``"tied"``, ``"spherical"`` and ``"diag"``.

    Parameters
    ----------
    dim : str, optional
        The event dimension. Inferred when the variable has exactly one dimension
        besides the sample dimension, or when several 1-D variables are stacked
        (``observe(["a", "b"], ...)``, dimension ``"feature"``).
    covariance : str or array_like, default "full"
        The covariance structure: ``"full"``, ``"diag"``, ``"spherical"``, ``"tied"`` or one
        of mclust's constrained models (above), with the parameter stored in scikit-learn's
        ``covariances_`` layout: full (K, D, D), diag (K, D), spherical (K,),
        tied (D, D); mclust's constrained models as diag or full.
        An array instead *fixes* the covariance; its shape selects the
        structure as in that layout (a square 2-D array is read as tied).
    mean : array_like, optional
        Fixed means, broadcast to (K, D).
    floor : float, default 1e-6
        Lower bound on the covariance's eigenvalues, as a fraction of each
        feature's variance in the data (the exact M-step under that constraint:
        eigenvalues below it are raised to it). A collapsing component is held at
        the floor and named in a :class:`~emdsl.DegenerateComponentWarning`.
    prior : emdsl.priors.NormalInverseWishart, optional
        A conjugate prior on (mean, covariance) in the data's units; the M-step becomes
        the MAP estimate. ``"full"`` and ``"tied"`` use its inverse-Wishart, ``"diag"`` an
        inverse-gamma per element and ``"spherical"`` one pooled over the elements (see
        :class:`~emdsl.priors.NormalInverseWishart`). Not for mclust's constrained
        models (``fit(prior="weak")`` leaves them without one).

    Examples
    --------
    >>> import emdsl as em
    >>> em.MultivariateNormal(covariance="diag")
    MultivariateNormal(covariance='diag')
    >>> em.MultivariateNormal(covariance="VVI")  # mclust's name
    MultivariateNormal(covariance='diag')
    >>> em.MultivariateNormal(covariance="VEI").layout
    'diag'
    """

    param_names = ("mean", "covariance")
    standardize = True
    continuous = True
    multivariate = True
    prior_type = priors.NormalInverseWishart

    def __init__(
        self,
        dim: Hashable | None = None,
        covariance: CovarianceType | ArrayLike = "full",
        *,
        mean: ArrayLike | None = None,
        floor: float = 1e-6,
        prior: priors.NormalInverseWishart | None = None,
    ) -> None:
        if dim is not None and not (isinstance(dim, str) and dim):
            raise ModelError(f"MultivariateNormal(dim=...): expected the name of a dimension (a string), got {dim!r}")
        if isinstance(covariance, str):
            covariance = MCLUST_NAMES.get(covariance, covariance)
            if covariance not in _TYPES:
                raise ModelError(f"MultivariateNormal(covariance=...): expected one of {_TYPES} (or mclust's "
                                 f"{tuple(MCLUST_NAMES)}), got {covariance!r}")
            self.covariance_type: CovarianceType = covariance
            self._covariance = None
        else:
            as_float(covariance, "MultivariateNormal(covariance=...)")  # numbers, not a ragged list
            self.covariance_type = _type_of_fixed(covariance)
            self._covariance = covariance
        #: how the covariance is stored and enters the statistics: mclust's diagonal models as "diag"
        self.layout: str = ("diag" if self.covariance_type in _mclust.DIAGONAL else
                            "full" if self.covariance_type in _mclust.ORIENTED else self.covariance_type)
        if self._covariance is not None:
            self.check_params({"covariance": as_float(covariance, "MultivariateNormal(covariance=...)")},
                              "MultivariateNormal(covariance=<array>)")
        self.floor = check_number(floor, "MultivariateNormal(floor=...)", low=0.0)
        if mean is not None:
            self.check_params({"mean": as_float(mean, "MultivariateNormal(mean=...)")},
                              "MultivariateNormal(mean=...)")
        self.dim = dim
        self._mean = mean
        # One scale for every element keeps a spherical covariance spherical in internal units, equal
        # eigenvalues equal (EEV, VEV) and shared eigenvectors shared (EVE, VVE): a scale per element
        # would change them unequally.
        self.pool_scale = self.covariance_type in ("spherical", "EII", "EEV", "VEV", "EVE", "VVE")
        if prior is not None and self.covariance_type in _mclust.MODELS:
            raise ModelError(f"MultivariateNormal(covariance={self.covariance_type!r}, prior=...): mclust's "
                             "constrained models have no conjugate M-step here; use covariance='diag', "
                             "'spherical', 'full' or 'tied' with a prior")
        self.accept_prior(prior)

    def arguments(self) -> dict[str, Any]:
        covariance = self.covariance_type if self._covariance is None else self._covariance
        return self.with_prior({"dim": self.dim, "covariance": covariance, "mean": self._mean,
                                "floor": self.floor})

    @property
    def fixed(self) -> dict[str, Any]:
        held = {"mean": self._mean, "covariance": self._covariance}
        return {name: value for name, value in held.items() if value is not None}

    def param_axes(self) -> dict[str, Axes]:
        covariance: Axes = {
            "full": ("latent", "event", "event_"),
            "diag": ("latent", "event"),
            "spherical": ("latent",),
            "tied": ("event", "event_"),
        }[self.layout]
        return {"mean": ("latent", "event"), "covariance": covariance}

    # -- statistics and natural parameters ---------------------------------------
    # Rows of Φ: one presence row (1 where the whole event is observed), then the
    # statistics. An event with holes writes zeros here; its observed block enters
    # through the conditional Gaussian of ``missing.py``.
    def n_stats(self, D: int) -> int:
        """Sufficient statistics of one complete event."""
        return {"diag": 2 * D, "spherical": D + 1}.get(self.layout, D + D * (D + 1) // 2)

    def n_rows(self, D: int) -> int:
        return 1 + self.n_stats(D)

    def statistics(self, x: np.ndarray, out: np.ndarray, aux: Mapping[str, np.ndarray]) -> None:
        D = x.shape[0]
        complete = ~np.isnan(x).any(axis=0)
        out[0] = complete
        out[1:1 + D] = x
        if not complete.all():
            out[1:1 + D, ~complete] = 0.0
        self.second_moments(out[1:], D)

    def second_moments(self, out: np.ndarray, D: int) -> None:
        """Fill ``out[D:]`` with the second-moment statistics of ``out[:D]`` (x)."""
        x = out[:D]
        if self.layout == "diag":
            np.multiply(x, x, out=out[D:])
        elif self.layout == "spherical":
            np.einsum("ij,ij->j", x, x, out=out[D])
        else:
            # Row i of the upper triangle, x_i * x_{i..D-1}, is one broadcast multiply.
            row = D
            for i in range(D):
                np.multiply(x[i:], x[i], out=out[row:row + D - i])
                row += D - i

    def log_base_measure(self, x: np.ndarray, aux: Mapping[str, np.ndarray]) -> np.ndarray:
        return -0.5 * normal.LOG_2PI * (~np.isnan(x)).sum(axis=0)

    def natural(self, params: Params) -> np.ndarray:
        eta, log_partition = self.eta(params)
        return np.hstack([-log_partition[:, None], eta])

    def eta(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        """η (K × n_stats) and A(η) (K,) of the complete event."""
        mean, cov = params["mean"], params["covariance"]
        K, D = mean.shape
        if self.layout in ("diag", "spherical"):
            variance = np.broadcast_to(cov if cov.ndim == 2 else cov[:, None], (K, D))
            eta_x, eta_xx, log_partition = normal.natural_parameters(mean, variance)
            if self.layout == "spherical":
                eta_xx = eta_xx[:, :1]
            return np.hstack([eta_x, eta_xx]), log_partition.sum(axis=1)
        cov = np.broadcast_to(cov, (K, D, D))
        chol = np.linalg.cholesky(cov)
        eye = np.broadcast_to(np.eye(D), (K, D, D))
        precision = np.linalg.solve(cov, eye)
        precision = 0.5 * (precision + np.swapaxes(precision, 1, 2))
        eta_x = np.einsum("kij,kj->ki", precision, mean)
        # −½ xᵀΛx = Σ_i −½Λ_ii x_i² + Σ_{i<j} −Λ_ij x_i x_j
        rows, cols, factors = _upper_triangle(D)
        eta_xx = factors * precision[:, rows, cols]
        log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        log_partition = 0.5 * np.einsum("ki,ki->k", eta_x, mean) + 0.5 * log_det
        return np.hstack([eta_x, eta_xx]), log_partition

    # -- M-step ---------------------------------------------------------------
    def m_step(self, stats: np.ndarray, hold: Params, previous: Params | None,
               prior: BoundPrior | None = None) -> tuple[Params, Floored]:
        if prior is not None:
            return self._posterior_mode(stats, hold, prior)
        K = stats.shape[0]
        nk, stats = stats[:, 0], stats[:, 1:]
        D = _event_size(stats.shape[1], self.layout)
        s_x, s_xx = stats[:, :D], stats[:, D:]
        empty = empty_components(nk)
        counts = safe_counts(nk)
        fallback = self.default_params(K, D)
        before = previous or {}
        if "mean" in hold:
            mean = np.broadcast_to(hold["mean"], (K, D)).astype(float)
        else:
            mean = keep_empty(s_x / counts[:, None], before.get("mean"), fallback["mean"], empty)
        if "covariance" in hold:
            return {"mean": mean, "covariance": np.asarray(hold["covariance"], dtype=float)}, []
        if self.covariance_type in _mclust.MODELS:
            return self._constrained_step(s_x, s_xx, nk, mean, before.get("covariance"), fallback["covariance"],
                                          empty)

        if self.covariance_type in ("diag", "spherical"):
            if self.covariance_type == "spherical":
                spread = s_xx[:, 0] - 2.0 * np.einsum("kd,kd->k", mean, s_x) + nk * np.einsum("kd,kd->k", mean, mean)
                raw = spread / (counts * D)
                mean_square = s_xx[:, 0] / (counts * D)
            else:
                raw = normal.scatter(s_x, s_xx, nk, mean) / counts[:, None]
                mean_square = s_xx / counts[:, None]
            raw = keep_empty(raw, before.get("covariance"), fallback["covariance"], empty)
            mean_square = keep_empty(mean_square, None, np.zeros_like(raw), empty)
            cov, low = normal.apply_floor(raw, self.floor, mean_square=mean_square, kind=self.kind)
            low_any = low if low.ndim == 1 else low.any(axis=1)
            smallest = raw if raw.ndim == 1 else raw.min(axis=1)
            return {"mean": mean, "covariance": cov}, [(int(k), float(smallest[k])) for k in np.flatnonzero(low_any)]

        second, spread = _scatter(s_x, s_xx, nk, mean, D)
        if self.covariance_type == "tied":
            total = max(float(nk.sum()), 1e-300)
            cov, smallest = _floor_eigenvalues(spread.sum(axis=0) / total, self.floor,
                                               np.trace(second.sum(axis=0)) / total, "the shared (tied) covariance")
            return {"mean": mean, "covariance": cov}, [] if smallest is None else [(-1, smallest)]
        raw = keep_empty(spread / counts[:, None, None], before.get("covariance"), fallback["covariance"], empty)
        floored, cov = [], np.empty_like(raw)
        for k in range(K):
            reference = 0.0 if empty[k] else float(np.trace(second[k])) / counts[k]
            cov[k], smallest = _floor_eigenvalues(raw[k], self.floor, reference, f"component {k}")
            if smallest is not None:
                floored.append((k, smallest))
        return {"mean": mean, "covariance": cov}, floored

    def _constrained_step(self, s_x: np.ndarray, s_xx: np.ndarray, nk: np.ndarray, mean: np.ndarray,
                          previous: np.ndarray | None, fallback: np.ndarray,
                          empty: np.ndarray) -> tuple[Params, Floored]:
        """The covariance of one of mclust's constrained models (:mod:`._mclust`), under the floor.

        The floor bounds every variance (diagonal layout) or eigenvalue (full). EII's and EEI's
        shared variances are raised to it, the exact constrained maximum as for "diag" (Q is
        concave in each precision). The other models couple states and elements, and clamping
        one value would leave the model: a state under the floor makes the covariance keep its
        previous value instead, which with the new means still raises Q (a generalized-EM
        step), and the state is named in the warning as any floored one.
        """
        K, D = mean.shape
        kind = self.covariance_type
        previous = None if previous is None else np.broadcast_to(np.asarray(previous, dtype=float), fallback.shape)
        if self.layout == "diag":
            scatter = normal.scatter(s_x, s_xx, nk, mean)
            mean_square = s_xx / safe_counts(nk)[:, None]
        else:
            second, scatter = _scatter(s_x, s_xx, nk, mean, D)
            mean_square = np.trace(second, axis1=1, axis2=2) / safe_counts(nk)
        if kind == "EII":
            mean_square = np.full(mean_square.shape, mean_square.mean())
        state_counts = nk[:, None] if self.layout == "diag" else nk
        # eigenvalues below the rounding resolution of Σ r x xᵀ are zero to within rounding: see _raised_scatter
        scatter = _raised_scatter(scatter, normal.RESOLUTION * np.maximum(state_counts * mean_square, 0.0),
                                  self.layout)
        with np.errstate(divide="ignore", invalid="ignore"):
            cov = _mclust.covariances(kind, scatter, nk, previous, empty)
        finite = bool(np.all(np.isfinite(cov)))
        if self.layout == "diag":
            raw = cov if finite else np.zeros_like(cov)
            clamped, low = normal.apply_floor(raw, self.floor, mean_square=mean_square, kind=self.kind)
            low_rows = low.any(axis=1)
            smallest = raw.min(axis=1)
        else:
            clamped = np.empty_like(cov)
            smallest = np.zeros(K)
            low_rows = np.zeros(K, dtype=bool)
            for k in range(K):
                matrix = cov[k] if finite else fallback[k]
                clamped[k], lowest = _floor_eigenvalues(matrix, self.floor, float(mean_square[k]), f"component {k}")
                low_rows[k] = lowest is not None
                smallest[k] = np.nan if lowest is None else lowest
        if finite and not low_rows.any():
            out = cov
        elif finite and kind in ("EII", "EEI"):
            out = clamped
        elif previous is not None:
            out = previous.copy()
        elif finite:  # the first M-step: nothing to keep; the model's step on scatters raised to the floor
            out = self._first_floored_step(scatter, nk, mean_square, empty)
        else:
            out = _mclust.project(kind, np.broadcast_to(fallback, cov.shape).copy())
        floored = [(int(k), float(smallest[k])) for k in np.flatnonzero(low_rows | (not finite))]
        return {"mean": mean, "covariance": out}, floored

    def _first_floored_step(self, scatter: np.ndarray, nk: np.ndarray, mean_square: np.ndarray,
                            empty: np.ndarray) -> np.ndarray:
        """The first M-step of a constrained model with a state under the floor (there is no previous
        covariance to keep): the model's step on each state's scatter with its eigenvalues (variances,
        diagonal layout) raised to N_k times the floor, then floored and projected onto the model.

        Clamping the model's estimate from the raw scatters instead started from a matrix with an
        eigenvalue at the rounding level whenever the data are singular (a duplicated column), whose
        shared orientation or shape the iterative steps resolve only to ~1e-8; divided by that
        eigenvalue, a change of the sums' order by 1e-15 (dask's chunks) moved the start by 1e-2.
        """
        kind = self.covariance_type
        state_counts = nk[:, None] if self.layout == "diag" else nk
        raised = _raised_scatter(scatter, state_counts * np.maximum(self.floor, normal.RESOLUTION * mean_square),
                                 self.layout)
        with np.errstate(divide="ignore", invalid="ignore"):
            cov = _mclust.covariances(kind, raised, nk, None, empty)
        if self.layout == "diag":
            clamped, _ = normal.apply_floor(cov, self.floor, mean_square=mean_square, kind=self.kind)
        else:
            clamped = np.array([_floor_eigenvalues(cov[k], self.floor, float(mean_square[k]))[0]
                                for k in range(len(cov))])
        return _mclust.project(kind, clamped)

    def within_m_step_bounds(self, params: Params) -> bool:
        """A constrained model's M-step outputs keep its structure (what the states share); an
        accelerated proposal that breaks it is not a point of the model."""
        cov = params.get("covariance")
        if cov is None or self.covariance_type not in _mclust.MODELS:
            return super().within_m_step_bounds(params)
        return _mclust.has_structure(self.covariance_type, np.asarray(cov, dtype=float))

    def project(self, params: Params) -> Params:
        """The covariance moved onto a constrained model's structure (:func:`._mclust.project`); given
        starting values and accelerated proposals land here before they are used."""
        cov = params.get("covariance")
        if cov is None or self.covariance_type not in _mclust.MODELS:
            return params
        cov = np.asarray(cov, dtype=float)
        valid = np.all(np.linalg.eigvalsh(cov) > 0) if self.layout == "full" else np.all(cov > 0)
        if not (np.all(np.isfinite(cov)) and valid):
            return params  # invalid: the checks that follow refuse it
        return {**params, "covariance": _mclust.project(self.covariance_type, cov)}

    # -- coordinates of the constrained models' covariance (standard errors) -----------------------
    @property
    def constraints(self) -> dict[str, str]:
        """mclust's constrained models map their covariance's free coordinates themselves."""
        return {"covariance": "structured"} if self.covariance_type in _mclust.MODELS else {}

    def structure_coordinates(self, cov: np.ndarray) -> np.ndarray:
        """The covariance's free coordinates at the fit (:func:`._mclust.coordinates`)."""
        return _mclust.coordinates(self.covariance_type, np.asarray(cov, dtype=float))

    def structure_array(self, psi: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The covariance at coordinates ψ around the fit's covariance ``at``."""
        return _mclust.from_coordinates(self.covariance_type, psi, np.asarray(at, dtype=float))

    def structure_indices(self, shape: tuple[int, ...]) -> np.ndarray:
        """An entry of the covariance per coordinate, to name it in messages."""
        return _mclust.indices(self.covariance_type, shape)

    def _posterior_mode(self, stats: np.ndarray, hold: Params, prior: BoundPrior) -> tuple[Params, Floored]:
        """The MAP M-step under a normal-inverse-Wishart prior (formulas on :class:`~emdsl.priors.NormalInverseWishart`).

        The prior's pseudo-observations join every state's sums, so a state without
        responsibility takes the prior's mode; floors apply as in the maximum-likelihood step.
        """
        K = stats.shape[0]
        nk, stats = stats[:, 0], stats[:, 1:]
        D = _event_size(stats.shape[1], self.layout)
        s_x, s_xx = stats[:, :D], stats[:, D:]
        m, psi = prior["mean"], prior["scale"]
        kappa, dof = float(prior["kappa"]), float(prior["dof"])
        if "mean" in hold:
            mean = np.broadcast_to(hold["mean"], (K, D)).astype(float)
        else:
            mean = (kappa * m + s_x) / (kappa + nk)[:, None]
        if "covariance" in hold:
            return {"mean": mean, "covariance": np.asarray(hold["covariance"], dtype=float)}, []
        # A held mean has no prior term: the normal factor N(μ; m, Σ/κ) leaves the covariance's step.
        normal_factor = "mean" not in self.fixed
        offset = (mean - m) * normal_factor
        if self.covariance_type in ("diag", "spherical"):
            if self.covariance_type == "spherical":
                spread = s_xx[:, 0] - 2.0 * np.einsum("kd,kd->k", mean, s_x) + nk * np.einsum("kd,kd->k", mean, mean)
                raw = (spread + kappa * np.einsum("kd,kd->k", offset, offset) + np.trace(psi) / D) / (
                    D * nk + D * normal_factor + dof + 2.0)
            else:
                raw = (normal.scatter(s_x, s_xx, nk, mean) + kappa * offset**2 + np.diagonal(psi)) / (
                    nk + dof + 2.0 + normal_factor)[:, None]
            cov, low = normal.apply_floor(raw, self.floor, kind=self.kind)
            low_any = low if low.ndim == 1 else low.any(axis=1)
            smallest = raw if raw.ndim == 1 else raw.min(axis=1)
            return {"mean": mean, "covariance": cov}, [(int(k), float(smallest[k])) for k in np.flatnonzero(low_any)]
        second, spread = _scatter(s_x, s_xx, nk, mean, D)
        spread += kappa * np.einsum("ki,kj->kij", offset, offset)
        if self.covariance_type == "tied":
            denominator = float(nk.sum()) + K * normal_factor + dof + D + 1.0
            cov, smallest = _floor_eigenvalues((spread.sum(axis=0) + psi) / denominator, self.floor,
                                               float(np.trace(second.sum(axis=0))) / denominator,
                                               "the shared (tied) covariance")
            return {"mean": mean, "covariance": cov}, [] if smallest is None else [(-1, smallest)]
        denominator = nk + dof + D + 1.0 + normal_factor
        raw = (spread + psi) / denominator[:, None, None]
        floored, cov = [], np.empty_like(raw)
        for k in range(K):
            cov[k], smallest = _floor_eigenvalues(raw[k], self.floor, float(np.trace(second[k])) / denominator[k],
                                                  f"component {k}")
            if smallest is not None:
                floored.append((k, smallest))
        return {"mean": mean, "covariance": cov}, floored

    # -- conjugate prior ----------------------------------------------------------
    def prior_axes(self) -> dict[str, Axes]:
        return {"mean": ("event",), "kappa": (), "dof": (), "scale": ("event", "event_")}

    def standard_prior(self, values: Mapping[str, np.ndarray], center: np.ndarray | None,
                       scale: np.ndarray | None) -> Params:
        assert center is not None and scale is not None
        return {"mean": (values["mean"] - center) / scale, "kappa": values["kappa"], "dof": values["dof"],
                "scale": values["scale"] / np.multiply.outer(scale, scale)}

    def check_prior(self, values: Mapping[str, np.ndarray], where: str) -> None:
        D = len(values["mean"])
        dof = float(values["dof"])
        if self.covariance_type in ("full", "tied") and not dof > D - 1:
            raise ModelError(f"{where}: dof must be > D - 1 = {D - 1} for a {self.covariance_type} covariance "
                             f"over {D} elements (an inverse-Wishart needs it), got {dof:g}")

    def prior_jacobian(self, scale: np.ndarray | None, K: int) -> float:
        # μ = c + S μ' (|S| = Π s); Σ = S Σ' S has Jacobian |S|^(D+1) over symmetric matrices;
        # a diagonal variance s_d² σ'², a spherical one s² σ'² (one pooled s).
        log_scale = float(np.log(scale).sum()) if scale is not None else 0.0
        D = len(scale) if scale is not None else 1
        per_covariance = {"full": (D + 1) * log_scale, "tied": (D + 1) * log_scale,
                          "diag": 2 * log_scale, "spherical": 2 * log_scale / D}[self.covariance_type]
        n_covariances = 1 if self.covariance_type == "tied" else K
        # held parameters have no prior term, and no Jacobian
        fixed = self.fixed
        return -(K * log_scale * ("mean" not in fixed) + n_covariances * per_covariance * ("covariance" not in fixed))

    def weak_prior(self, stats: np.ndarray, scale: np.ndarray | None, K: int) -> BoundPrior | None:
        if self.covariance_type in _mclust.MODELS:
            return None  # no conjugate M-step for mclust's constrained models
        return super().weak_prior(stats, scale, K)

    def weak_prior_values(self, stats: np.ndarray, K: int) -> Params:
        """m = the data's mean, κ = 0.01, ν = D + 2, Ψ = ν · var(x) / K^(2/D).

        mclust's ``defaultPrior`` with its scale var(x) / K^(2/D) multiplied by ν: the prior
        mean of the precision, E[Σ⁻¹] = ν Ψ⁻¹, is then the precision of var(x) / K^(2/D) (a
        K-th of the data's volume). mclust's Ψ makes the prior *mean* E[Σ] that matrix,
        but the MAP is pulled towards the mode Ψ / (ν + D + 1), 2D + 3 times smaller: in
        many dimensions a handful of points then outscore a true cluster (docs/design.md,
        "The weak prior").

        var(x) is the covariance of the complete events (their diagonal when there are no
        more of them than D, or when it is singular: condition number above 1e10) for ``"full"``
        and ``"tied"``; each
        element's variance for ``"diag"``; their average times I for ``"spherical"``.
        """
        n, rest = float(stats[0]), stats[1:]
        D = _event_size(len(rest), self.layout)
        s_x, s_xx = rest[:D], rest[D:]
        count = n if n > 0 else 1.0
        mean = s_x / count if n > 0 else np.zeros(D)
        if self.covariance_type == "spherical":
            pooled = (float(s_xx[0]) / count - float(mean @ mean)) / D if n > 0 else 1.0
            scale = np.eye(D) * (pooled if pooled > 0 else 1.0)
        else:
            if self.covariance_type == "diag":
                cov = np.diag(s_xx / count - mean * mean)
            else:
                cov = _unpack_upper(s_xx[None], D)[0] / count - np.multiply.outer(mean, mean)
            variance = np.diagonal(cov) if n > 0 else np.ones(D)
            scale = np.diag(np.where(variance > 0, variance, 1.0))
            if self.covariance_type in ("full", "tied") and n > D:
                symmetric = 0.5 * (cov + cov.T)
                eigenvalues = np.linalg.eigvalsh(symmetric)
                # A covariance singular up to rounding counts as singular: with a duplicated column,
                # rounding left its smallest eigenvalue at +6e-16, and the inverse-Wishart's
                # normalizer, log |Ψ|, came out −∞, and with it every log-posterior.
                if eigenvalues[0] > _SINGULAR * eigenvalues[-1]:
                    scale = symmetric
        dof = D + 2.0
        return {"mean": mean, "kappa": normal.WEAK_KAPPA, "dof": dof, "scale": dof * K ** (-2.0 / D) * scale}

    def log_prior(self, params: Params, prior: BoundPrior) -> tuple[float, float]:
        mean, cov = params["mean"], params["covariance"]
        m, psi = prior["mean"], prior["scale"]
        kappa, dof = float(prior["kappa"]), float(prior["dof"])
        D = mean.shape[1]
        if self.covariance_type in ("full", "tied"):
            terms = priors.normal_inverse_wishart_terms(mean, cov, m, kappa, dof, psi)
        elif self.covariance_type == "diag":
            terms = priors.normal_inverse_gamma_terms(mean, cov, m, kappa, dof / 2.0, np.diagonal(psi) / 2.0)
        else:
            terms = priors.normal_terms(mean, m, cov[:, None] / kappa)
            terms += priors.inverse_gamma_terms(cov, dof / 2.0, np.trace(psi) / (2.0 * D))
        # the first three terms are the normal factor of the means, the others the covariances' (inverse-
        # gamma or inverse-Wishart): a held parameter has no prior term
        fixed = self.fixed
        terms = ([] if "mean" in fixed else terms[:3]) + ([] if "covariance" in fixed else terms[3:])
        value, size = priors.total(terms)
        return value + prior.log_jacobian, size + abs(prior.log_jacobian)

    def default_params(self, K: int, D: int) -> Params:
        cov = {"full": np.broadcast_to(np.eye(D), (K, D, D)).copy(), "diag": np.ones((K, D)),
               "spherical": np.ones(K), "tied": np.eye(D)}[self.layout]
        return {"mean": np.zeros((K, D)), "covariance": cov}

    def n_free_params(self, K: int, D: int) -> int:
        n_mean = 0 if self._mean is not None else K * D
        if self._covariance is not None:
            return n_mean
        if self.covariance_type in _mclust.MODELS:
            return n_mean + _mclust.free_params(self.covariance_type, K, D)
        return n_mean + {"full": K * D * (D + 1) // 2, "diag": K * D, "spherical": K,
                         "tied": D * (D + 1) // 2}[self.covariance_type]

    # -- units ------------------------------------------------------------------
    def to_original(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        return {"mean": center + scale * params["mean"],
                "covariance": _scale_covariance(params["covariance"], scale, self.layout)}

    def to_standard(self, params: Params, center: np.ndarray, scale: np.ndarray) -> Params:
        out = {}
        if "mean" in params:
            out["mean"] = (params["mean"] - center) / scale
        if "covariance" in params:
            out["covariance"] = _scale_covariance(params["covariance"], 1.0 / scale, self.layout)
        return out

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> None:
        if "mean" in params and not np.all(np.isfinite(params["mean"])):
            raise ModelError(f"{where}: mean must be finite")
        cov = params.get("covariance")
        if cov is None:
            return
        if not np.all(np.isfinite(cov)):
            raise ModelError(f"{where}: covariance must be finite")
        if self.layout in ("diag", "spherical"):
            if np.any(cov <= 0):
                raise ModelError(f"{where}: {self.covariance_type} covariance must be positive, "
                                 f"got smallest value {cov.min():.6g}")
            return
        if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
            raise ModelError(f"{where}: {self.covariance_type} covariance must be D × D matrices, "
                             f"got shape {cov.shape}")
        matrices = cov.reshape((-1,) + cov.shape[-2:])
        _check_symmetric(matrices, where, per_state=cov.ndim == 3)
        for k, matrix in enumerate(matrices):
            smallest = np.linalg.eigvalsh(matrix)[0]
            if smallest <= 0:
                which = f" for state {k}" if cov.ndim == 3 else ""
                raise ModelError(f"{where}: covariance{which} is not positive definite "
                                 f"(smallest eigenvalue {smallest:.6g})")

    def tidy_params(self, params: Mapping[str, np.ndarray]) -> Params:
        out = dict(params)
        cov = out.get("covariance")
        if cov is not None and self.layout in ("full", "tied"):
            cov = np.asarray(cov, dtype=float)
            out["covariance"] = 0.5 * (cov + np.swapaxes(cov, -1, -2))
        return out

    def expected_value(self, params: Params) -> np.ndarray:
        return params["mean"]

    def patterns(self, params: Params, observed: np.ndarray) -> PatternTerms:
        """The conditional Gaussian of the holes of one pattern (``observed``: D booleans)."""
        return PatternTerms(self, params, observed)

    def second_moment_correction(self, missing: np.ndarray, C: np.ndarray, D: int) -> np.ndarray:
        """What E[x xᵀ] adds to φ(E[x]) when x_m has covariance C: the statistics rows after x."""
        out = np.zeros(self.n_stats(D))
        if self.layout == "diag":
            out[D + missing] = np.diagonal(C)
        elif self.layout == "spherical":
            out[D] = np.trace(C)
        else:
            full = np.zeros((D, D))
            full[np.ix_(missing, missing)] = C
            out[D:] = full[np.triu_indices(D)]
        return out

    def impute(self, params: Params, x: np.ndarray, resp: np.ndarray,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each hole becomes Σ_k r_nk E[x_m | x_o, z=k], the conditional Gaussian mean."""
        out = x.copy()
        holes = np.isnan(x)
        if not holes.any():
            return out
        keys, inverse = np.unique(holes.T, axis=0, return_inverse=True)
        for g, pattern in enumerate(keys):
            cols = np.flatnonzero(inverse.ravel() == g)
            if not pattern.any():
                continue
            if pattern.all():
                out[:, cols] = (resp[cols] @ params["mean"]).T
                continue
            terms = self.patterns(params, ~pattern)
            out[np.ix_(pattern, cols)] = terms.conditional_mean(x[~pattern][:, cols], resp[cols])
        return out

    def marginal(self, values: Mapping[str, np.ndarray]) -> Marginal:
        return normal.gaussian_marginal(values["mean"], values["covariance"])

    def sample(self, params: Params, labels: np.ndarray, rng: np.random.Generator,
               aux: Mapping[str, np.ndarray]) -> np.ndarray:
        mean = params["mean"]
        K, D = mean.shape
        cov = params["covariance"]
        if self.layout in ("diag", "spherical"):
            sd = np.sqrt(np.broadcast_to(cov if cov.ndim == 2 else cov[:, None], (K, D)))
            return mean[labels] + sd[labels] * rng.standard_normal((len(labels), D))
        chol = np.linalg.cholesky(np.broadcast_to(cov, (K, D, D)))
        noise = rng.standard_normal((len(labels), D))
        return mean[labels] + np.einsum("nij,nj->ni", chol[labels], noise)


def _type_of_fixed(covariance: ArrayLike) -> CovarianceType:
    """Covariance structure from a fixed value's shape (scikit-learn's layout)."""
    dims = getattr(covariance, "dims", None)
    ndim = np.ndim(covariance)
    if ndim == 3:
        return "full"
    if ndim == 1:
        return "spherical"
    if ndim == 2:
        shape = np.shape(covariance)
        if dims is not None:
            return "tied" if str(dims[1]) == f"{dims[0]}_" else "diag"
        return "tied" if shape[0] == shape[1] else "diag"
    raise ModelError("MultivariateNormal(covariance=<array>): a fixed covariance must have shape "
                     f"(K, D, D), (D, D), (K, D) or (K,), got {np.shape(covariance)}")


def _event_size(n_stats: int, covariance_type: str) -> int:
    if covariance_type == "diag":
        return n_stats // 2
    if covariance_type == "spherical":
        return n_stats - 1
    return int(round((-3 + np.sqrt(9 + 8 * n_stats)) / 2))  # n = D + D(D+1)/2


def _scatter(s_x: np.ndarray, s_xx: np.ndarray, nk: np.ndarray, mean: np.ndarray, D: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Σ r x xᵀ (K × D × D) and the scatter about ``mean``, Σ r (x − μ)(x − μ)ᵀ, from the summed statistics."""
    second = _unpack_upper(s_xx, D)
    cross = np.einsum("ki,kj->kij", s_x, mean)
    return second, second - cross - np.swapaxes(cross, 1, 2) + nk[:, None, None] * np.einsum("ki,kj->kij", mean, mean)


def _raised_scatter(scatter: np.ndarray, level: np.ndarray, layout: str) -> np.ndarray:
    """Each state's scatter with its eigenvalues (its variances, diagonal layout) raised to ``level``
    ((K,), or (K, D) per element in the diagonal layout); scatters above it are returned untouched
    (bit for bit).

    At the rounding resolution of Σ r x xᵀ (:data:`~emdsl.families.normal.RESOLUTION` times its
    trace) it removes what rounding decides: an eigenvalue that is zero to within rounding (a
    state of one sample, or fewer than D + 1) may come out exactly 0 or a hair below or above,
    depending on the order of the sums (chunks of dask data against memory). The models that
    share a shape or an orientation normalize by determinants, so a zero there turned *every*
    state's covariance into NaN, the step fell back to the data's covariance for all of them,
    and dask and memory diverged. Such a state is under any floor either way, and the floor's
    rule handles it. At N_k times the floor it gives the first step's well-conditioned scatters
    (``_first_floored_step``).
    """
    if layout == "diag":
        return np.maximum(scatter, level) if (scatter < level).any() else scatter
    out = scatter
    for k in range(scatter.shape[0]):
        values, vectors = np.linalg.eigh(scatter[k])
        if values[0] < level[k]:
            if out is scatter:
                out = scatter.copy()
            raised = (vectors * np.maximum(values, level[k])) @ vectors.T
            out[k] = 0.5 * (raised + raised.T)
    return out


def _unpack_upper(packed: np.ndarray, D: int) -> np.ndarray:
    """Symmetric (K, D, D) matrices from their packed upper triangles (K, D(D+1)/2)."""
    full = np.zeros((packed.shape[0], D, D))
    rows, cols = np.triu_indices(D)
    full[:, rows, cols] = packed
    full[:, cols, rows] = packed
    return full


def _floor_eigenvalues(cov: np.ndarray, floor: float, mean_square: float = 0.0,
                       which: str = "a component") -> tuple[np.ndarray, float | None]:
    """Raise eigenvalues below ``floor`` to it: the maximiser of the Gaussian Q over Σ ⪰ floor·I.

    Eigenvalues are only resolved down to the rounding error of Σ = S_xx/N − μμᵀ, about
    ``RESOLUTION`` times the mean square ``tr(S_xx)/N`` (and D·ε times the largest
    eigenvalue, for the Cholesky factorisation of the result): below that, a covariance
    is singular. A ``floor`` under that level is raised to it, so that Σ stays positive
    definite in floating point; with ``floor=0`` a singular covariance is a ``ModelError``.
    """
    values, vectors = np.linalg.eigh(cov)
    D = len(values)
    noise = max(normal.RESOLUTION * mean_square, 8 * D * np.finfo(float).eps * max(float(values[-1]), 0.0))
    if floor <= 0:
        if not values[0] > noise:
            raise ModelError(f"MultivariateNormal(floor=0): the covariance of {which} became singular (smallest "
                             f"eigenvalue {float(values[0]):.3g} in units of the data's variance, zero to within "
                             "rounding: the component collapsed onto a point or a line) and floor=0 allows no "
                             "correction. Use floor > 0 (the default 1e-6 holds it at a millionth of the data's "
                             "variance and names it in a DegenerateComponentWarning), or fewer components")
        return cov, None
    lowest = max(floor, noise)
    if values[0] >= lowest:
        return cov, None
    floored = (vectors * np.maximum(values, lowest)) @ vectors.T
    return 0.5 * (floored + floored.T), float(values[0])


def _scale_covariance(cov: np.ndarray, scale: np.ndarray, covariance_type: str) -> np.ndarray:
    if covariance_type == "diag":
        return cov * scale**2
    if covariance_type == "spherical":
        return cov * float(scale[0]) ** 2
    return cov * np.multiply.outer(scale, scale)


#: how asymmetric a given covariance may be, relative to the largest variance of its matrix (it is
#: then symmetrized): single precision's rounding of a matrix computed elsewhere (another
#: library's float32 Σ xxᵀ), far below any asymmetry that is a mistake
SYMMETRY_TOLERANCE = 1e-6


def _check_symmetric(matrices: np.ndarray, where: str, per_state: bool) -> None:
    """Raise ``ModelError`` naming the first entry where a (n × D × D) stack is not symmetric."""
    scale = np.abs(np.diagonal(matrices, axis1=1, axis2=2)).max(axis=1)
    gap = np.abs(matrices - np.swapaxes(matrices, 1, 2))
    bad = np.argwhere(gap > SYMMETRY_TOLERANCE * scale[:, None, None])
    if len(bad):
        k, i, j = (int(v) for v in bad[0])
        which = f" of state {k}" if per_state else ""
        raise ModelError(f"{where}: covariance must be symmetric; entry [{i}, {j}]{which} is "
                         f"{matrices[k, i, j]:.10g} but [{j}, {i}] is {matrices[k, j, i]:.10g}")


class PatternTerms:
    """The conditional Gaussian of one pattern of holes, per component (DESIGN.md §2).

    For observed block o and missing block m of x under component k:
    x_o ~ N(μ_o, Σ_oo), and x_m | x_o ~ N(μ_m + B (x_o − μ_o), C) with B = Σ_mo Σ_oo⁻¹
    and C = Σ_mm − B Σ_om. The E-step then needs log N(x_o) for L, and the expected
    statistics E[φ(x) | x_o, k], which are φ(x̂) (x̂ the data with the holes filled by
    their conditional mean) plus C in the second moments of the missing block.
    """

    def __init__(self, family: MultivariateNormal, params: Params, observed: np.ndarray) -> None:
        mean = params["mean"]
        K, D = mean.shape
        cov = _full_covariance(params["covariance"], family.layout, K, D)
        o, m = np.flatnonzero(observed), np.flatnonzero(~observed)
        self.family, self.D, self.o, self.m, self.mean = family, D, o, m, mean
        s_oo = cov[:, o[:, None], o[None, :]]
        self.chol = np.linalg.cholesky(s_oo)
        self.log_det_oo = 2.0 * np.log(np.diagonal(self.chol, axis1=1, axis2=2)).sum(axis=1)
        s_mo = cov[:, m[:, None], o[None, :]]
        self.B = np.linalg.solve(s_oo, np.swapaxes(s_mo, 1, 2)).swapaxes(1, 2)
        C = cov[:, m[:, None], m[None, :]] - self.B @ np.swapaxes(s_mo, 1, 2)
        self.C = 0.5 * (C + np.swapaxes(C, 1, 2))
        self.log_det_c = np.linalg.slogdet(self.C)[1]

    def log_density(self, x_o: np.ndarray) -> np.ndarray:
        """log N(x_o | μ_o, Σ_oo) + ½|o| log 2π for each column of x_o (|o| × n): K × n (log h is apart)."""
        out = np.empty((len(self.chol), x_o.shape[1]))
        for k, chol in enumerate(self.chol):
            white = np.linalg.solve(chol, x_o - self.mean[k, self.o, None])
            out[k] = -0.5 * np.einsum("in,in->n", white, white) - 0.5 * self.log_det_oo[k]
        return out

    def expected_statistics(self, x_o: np.ndarray, resp: np.ndarray) -> tuple[np.ndarray, float]:
        """Σ_n r_nk E[(1, φ(x_n)) | x_o, k] (K × rows of the node) and Σ_nk r_nk ℍ[x_m | x_o, k] − ½|m| log 2π·Σr.

        The second term is what the ELBO gains from the holes: the entropy of their
        conditional Gaussian, less the part of log h that the missing elements would carry.
        """
        family, D = self.family, self.D
        K, n = resp.shape
        stats = np.empty((K, family.n_rows(D)))
        phi = np.empty((family.n_rows(D), n))
        phi[0] = 1.0
        mass = resp.sum(axis=1)
        for k in range(K):
            phi[1 + self.o] = x_o
            phi[1 + self.m] = self.mean[k, self.m, None] + self.B[k] @ (x_o - self.mean[k, self.o, None])
            family.second_moments(phi[1:], D)
            stats[k] = phi @ resp[k]
            stats[k, 1:] += mass[k] * family.second_moment_correction(self.m, self.C[k], D)
        entropy = float(mass @ (0.5 * len(self.m) + 0.5 * self.log_det_c))
        return stats, entropy

    def conditional_mean(self, x_o: np.ndarray, resp: np.ndarray) -> np.ndarray:
        """Σ_k r_nk E[x_m | x_o, k] for each column: |m| × n."""
        filled = np.zeros((len(self.m), x_o.shape[1]))
        for k in range(len(self.chol)):
            filled += resp[:, k] * (self.mean[k, self.m, None] + self.B[k] @ (x_o - self.mean[k, self.o, None]))
        return filled


def _full_covariance(cov: np.ndarray, covariance_type: str, K: int, D: int) -> np.ndarray:
    """Any covariance layout as (K, D, D) matrices."""
    if covariance_type == "diag":
        return np.einsum("kd,de->kde", cov, np.eye(D))
    if covariance_type == "spherical":
        return cov[:, None, None] * np.eye(D)
    return np.broadcast_to(cov, (K, D, D))


@functools.lru_cache(maxsize=64)
def _upper_triangle(D: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The upper triangle's (rows, cols) of a D × D matrix and the factors (−½ on the diagonal, −1 off
    it) of −½ xᵀΛx in its entries; cached: the quasi-Newton differences call η thousands of times."""
    rows, cols = np.triu_indices(D)
    return rows, cols, np.where(rows == cols, -0.5, -1.0)
