r"""Conjugate priors for MAP-EM (``em.priors``), declared in the data's units.

A prior is part of a family's declaration::

    em.Normal(prior=em.priors.NormalInverseGamma(mean=0.0, kappa=0.01, shape=1.5, scale=0.5))

A conjugate prior is a set of pseudo-observations added to the sufficient statistics
(DESIGN.md §1), so the M-step becomes the posterior mode (MAP estimate) in closed form,
and EM climbs the log-posterior ℓ(θ) + log p(θ) instead of the log-likelihood ℓ(θ): the
engine checks that *it* never decreases, and the trace records it as ``logpost`` next to
``loglik``. log p(θ) is the full, normalized log density of the prior (in the data's
units), so log-posteriors are comparable across fits. BIC and AIC stay based on ℓ(θ).

==============================  ==========================================================
family                          prior (one per element and state unless said otherwise)
==============================  ==========================================================
Normal, LogNormal (of log x)    :class:`NormalInverseGamma` on (mean, variance); with
                                ``tied="variance"`` one inverse-gamma for the shared variance
MultivariateNormal              :class:`NormalInverseWishart` on (mean, covariance);
                                ``"full"``: per state, ``"tied"``: one inverse-Wishart,
                                ``"diag"``: an inverse-gamma IG(dof/2, scale_dd/2) per element,
                                ``"spherical"``: one IG(dof/2, trace(scale)/(2D)) per state
Poisson (rate), Exponential     :class:`Gamma` on the rate
Bernoulli, Binomial             :class:`Beta` on the probability of a success
Categorical (latent weights,    :class:`Dirichlet` over the states, or over the levels of
observed levels), Multinomial   each element, or over the categories
Gamma, Beta, VonMises           none: no conjugate prior is available (``prior=`` is an error)
Normal, Poisson, Bernoulli,     :class:`Normal` on the coefficients (per term, every state),
Binomial with ``covariates=``   a MAP (ECM / penalized IRLS) step, not a conjugate update
==============================  ==========================================================

``Model.fit(..., prior="weak")`` puts a weakly informative prior, scaled from the data,
on every node that takes one and declares none (see :meth:`emdsl.Model.fit`).

Every prior below needs its MAP estimate to exist: Gamma shapes, Beta parameters and
Dirichlet concentrations are at least 1 (below 1 the density is unbounded at the edge
of the parameter space, where the "mode" would sit), and κ, scales and rates are > 0.

Examples
--------
>>> import emdsl as em
>>> em.priors.Beta(2, 2)
Beta(a=2, b=2)
>>> em.Poisson(prior=em.priors.Gamma(shape=2.0, rate=0.5))
Poisson(prior=Gamma(shape=2.0, rate=0.5))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import gammaln, multigammaln, xlog1py, xlogy

from emdsl._special import betaln
from emdsl.errors import ModelError

__all__ = ["Beta", "Dirichlet", "Gamma", "Normal", "NormalInverseGamma", "NormalInverseWishart", "Prior"]

LOG_2PI = float(np.log(2 * np.pi))

_PRIORS: dict[str, type[Prior]] = {}


class Prior:
    """Base of the conjugate priors: an immutable declaration of hyperparameters.

    Hyperparameters are in the data's units (a prior on a Normal's mean is in the
    units of x); they may be scalars, arrays over the variable's elements, or
    DataArrays labelled like the data. The fit converts them to its internal
    (standardized) units.
    """

    #: the hyperparameters, in the order of the constructor
    names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _PRIORS[cls.__name__] = cls

    @property
    def kind(self) -> str:
        """The prior's public name (its class name)."""
        return type(self).__name__

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments that recreate this prior (values as given)."""
        return {name: getattr(self, name) for name in self.names}

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(f'{k}={_short(v)}' for k, v in self.arguments().items())})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        mine, theirs = self.arguments(), other.arguments()  # type: ignore[attr-defined]
        return all(np.array_equal(np.asarray(mine[k], dtype=float), np.asarray(theirs[k], dtype=float))
                   for k in mine)

    def __hash__(self) -> int:
        return hash(self.kind)

    def _number(self, name: str, value: Any, *, low: float = -np.inf, low_open: bool = False,
                scalar: bool = False) -> Any:
        """Validate one hyperparameter: finite numbers above ``low`` (all of them, for an array)."""
        where = f"{self.kind}({name}=...)"
        if isinstance(value, bool | str) or value is None:
            raise ModelError(f"{where}: expected a number, got {value!r}")
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: expected numbers, got {value!r}") from None
        if scalar and array.ndim:
            raise ModelError(f"{where}: expected one number, got shape {array.shape}")
        if array.size == 0:
            raise ModelError(f"{where}: expected numbers, got an empty array")
        bad = ~np.isfinite(array) | ((array <= low) if low_open else (array < low))
        if bad.any():
            first = float(array[bad].ravel()[0])
            rule = f"finite and {'>' if low_open else '>='} {low:g}" if np.isfinite(low) else "finite"
            raise ModelError(f"{where}: must be {rule}, got {first!r}")
        return value


class NormalInverseGamma(Prior):
    r"""Normal–inverse-gamma prior on a normal's (mean μ, variance σ²), per element.

    .. math::

        \mu \mid \sigma^2 \sim N(m, \sigma^2/\kappa), \qquad
        \sigma^2 \sim \mathrm{InvGamma}(a, b)
        \quad(\text{density } \tfrac{b^a}{\Gamma(a)}\,\sigma^{-2(a+1)} e^{-b/\sigma^2})

    MAP M-step from counts N and sums S_x, S_xx of one state:
    μ = (κ m + S_x) / (κ + N) and
    σ² = (2b + Σ_n r_n (x_n − μ)² + κ (μ − m)²) / (N + 2a + 3). With a variance shared
    by K states: σ² = (2b + Σ_k [...]) / (Σ_k N_k + K + 2a + 2). κ counts
    pseudo-observations of the mean, 2a + 3 those of the variance (mclust's
    ``priorControl`` uses a = dof/2 and b = scale/2).

    Parameters
    ----------
    mean : float or array_like
        m, in the data's units (for LogNormal: of log x).
    kappa : float or array_like
        κ > 0, pseudo-observations of the mean.
    shape : float or array_like
        a > 0.
    scale : float or array_like
        b > 0, in squared units of the data.

    Examples
    --------
    >>> import emdsl as em
    >>> em.Normal(prior=em.priors.NormalInverseGamma(mean=0.0, kappa=0.01, shape=1.5, scale=0.5))
    Normal(prior=NormalInverseGamma(mean=0.0, kappa=0.01, shape=1.5, scale=0.5))
    """

    names = ("mean", "kappa", "shape", "scale")

    def __init__(self, mean: ArrayLike, kappa: ArrayLike, shape: ArrayLike, scale: ArrayLike) -> None:
        self.mean = self._number("mean", mean)
        self.kappa = self._number("kappa", kappa, low=0.0, low_open=True)
        self.shape = self._number("shape", shape, low=0.0, low_open=True)
        self.scale = self._number("scale", scale, low=0.0, low_open=True)


class NormalInverseWishart(Prior):
    r"""Normal–inverse-Wishart prior on a multivariate normal's (mean μ, covariance Σ).

    .. math::

        \mu \mid \Sigma \sim N(m, \Sigma/\kappa), \qquad \Sigma \sim \mathrm{InvWishart}(\nu, \Psi)

    MAP M-step (``covariance="full"``), from count N, sum S_x and scatter
    W = Σ_n r_n (x_n − μ)(x_n − μ)ᵀ of one state: μ = (κ m + S_x) / (κ + N) and
    Σ = (Ψ + W + κ (μ − m)(μ − m)ᵀ) / (N + ν + D + 2) (Fraley & Raftery, 2007). The
    other structures use the same hyperparameters:

    * ``"tied"``: one inverse-Wishart for the shared Σ, and every state's mean given it:
      Σ = (Ψ + Σ_k [W_k + κ (μ_k − m)(μ_k − m)ᵀ]) / (Σ_k N_k + K + ν + D + 1);
    * ``"diag"``: each variance σ²_d ~ InvGamma(ν/2, Ψ_dd/2), with μ_d | σ²_d ~ N(m_d, σ²_d/κ):
      σ²_kd = (Ψ_dd + W_kdd + κ (μ_kd − m_d)²) / (N_k + ν + 3);
    * ``"spherical"``: σ²_k ~ InvGamma(ν/2, tr(Ψ)/(2D)), with μ_k | σ²_k ~ N(m, σ²_k I/κ):
      σ²_k = (tr(Ψ)/D + tr W_k + κ ‖μ_k − m‖²) / (D N_k + D + ν + 2).

    Parameters
    ----------
    mean : float or array_like
        m (D,), in the data's units (a number is used for every element).
    kappa : float
        κ > 0, pseudo-observations of the mean.
    dof : float
        ν; above D − 1 for ``"full"`` and ``"tied"`` (a proper inverse-Wishart), above 0
        for ``"diag"`` and ``"spherical"``.
    scale : float, array_like (D,) or array_like (D, D)
        Ψ, in squared units of the data: a symmetric positive definite matrix, or its
        diagonal (a vector), or a number c for c·I.

    Examples
    --------
    >>> import emdsl as em
    >>> em.MultivariateNormal(prior=em.priors.NormalInverseWishart(mean=0.0, kappa=0.01, dof=4, scale=1.0))
    MultivariateNormal(prior=NormalInverseWishart(mean=0.0, kappa=0.01, dof=4, scale=1.0))
    """

    names = ("mean", "kappa", "dof", "scale")

    def __init__(self, mean: ArrayLike, kappa: float, dof: float, scale: ArrayLike) -> None:
        self.mean = self._number("mean", mean)
        if np.ndim(mean) > 1:
            raise ModelError(f"NormalInverseWishart(mean=...): expected a number or a vector, got shape "
                             f"{np.shape(mean)}")
        self.kappa = self._number("kappa", kappa, low=0.0, low_open=True, scalar=True)
        self.dof = self._number("dof", dof, low=0.0, low_open=True, scalar=True)
        self.scale = self._number("scale", scale)
        check_scale_matrix(np.asarray(scale, dtype=float), "NormalInverseWishart(scale=...)")


class Normal(Prior):
    r"""Gaussian prior on a regression's coefficients (``covariates=``): β_kt ~ N(m_t, s_t²), independently.

    The same prior for every latent state; one mean and one standard deviation per term
    (``"intercept"``, each numeric covariate, each level of a categorical one), in the units
    of the coefficients (the response's units per unit of the covariate; for a GLM, of the
    linear predictor). ``scale=np.inf`` leaves a term unpenalized (a flat, improper prior:
    it adds nothing to log p(θ)), as ridge regression usually leaves the intercept.

    Accepted by the families that take covariates, used with ``covariates=``::

        em.Model().observe("y", em.Normal(prior=em.priors.Normal(mean=0, scale=[np.inf, 1, 1])),
                           covariates=["dose", "age"])
        em.Model().observe("events", em.Poisson(prior=em.priors.Normal(0, 2.5)), covariates=["dose"])

    With Λ = diag(s²) (0 in Λ⁻¹ where s = ∞):

    * Normal: an ECM step (Meng & Rubin 1993). Given the current σ²_k, the ridge-like MAP
      β_k = (XᵀR_kX + σ²_k Λ⁻¹)⁻¹ (XᵀR_ky + σ²_k Λ⁻¹ m); then σ²_k = RSS_k(β_k) / N_k. Each
      of the two conditional maximizations raises ℓ + log p(θ), so it never falls; with a
      fixed variance (``em.Normal(variance=...)``) the step is the exact MAP.
    * Poisson, Bernoulli, Binomial: the IRLS (minorizer) step gains the prior's curvature and
      gradient: β_k = (B_k + Λ⁻¹)⁻¹ (B_kβ_k^old + g_k + Λ⁻¹ m), within the same trust region.

    ``fit(prior="weak")`` puts no prior on coefficients (docs/design.md says why).

    Parameters
    ----------
    mean : float or array_like
        m: one number for every term, one per term (in the fit's term order), or a DataArray
        over ``term``.
    scale : float or array_like
        s > 0, the prior standard deviation of each coefficient (``np.inf``: no prior on it).

    Examples
    --------
    >>> import emdsl as em
    >>> em.Poisson(prior=em.priors.Normal(mean=0.0, scale=2.5))
    Poisson(prior=Normal(mean=0.0, scale=2.5))
    """

    names = ("mean", "scale")
    #: a prior on a regression's coefficients (families accept it only with covariates=)
    on_coefficients = True

    def __init__(self, mean: ArrayLike = 0.0, scale: ArrayLike = 1.0) -> None:
        self.mean = self._number("mean", mean)
        if isinstance(scale, bool | str) or scale is None:
            raise ModelError(f"Normal(scale=...): expected a number, got {scale!r}")
        try:
            array = np.asarray(getattr(scale, "values", scale), dtype=float)
        except (TypeError, ValueError):
            raise ModelError(f"Normal(scale=...): expected numbers, got {scale!r}") from None
        if array.size == 0 or np.any(np.isnan(array)) or np.any(array <= 0):
            raise ModelError(f"Normal(scale=...): must be > 0 (np.inf: no prior on that term), got {scale!r}")
        self.scale = scale


class Gamma(Prior):
    r"""Gamma prior on a rate λ (Poisson, Exponential), per element.

    .. math:: p(\lambda) = \frac{\beta^\alpha}{\Gamma(\alpha)} \lambda^{\alpha-1} e^{-\beta\lambda}

    MAP M-step: Poisson λ = (S_x + α − 1) / (N + β); Exponential λ = (N + α − 1) / (S_x + β).

    Parameters
    ----------
    shape : float or array_like
        α ≥ 1.
    rate : float or array_like
        β > 0 (in the units of x for an Exponential, of 1/x's count for a Poisson).

    Examples
    --------
    >>> import emdsl as em
    >>> em.priors.Gamma(shape=2.0, rate=1.0)
    Gamma(shape=2.0, rate=1.0)
    """

    names = ("shape", "rate")

    def __init__(self, shape: ArrayLike, rate: ArrayLike) -> None:
        self.shape = self._number("shape", shape, low=1.0)
        self.rate = self._number("rate", rate, low=0.0, low_open=True)


class Beta(Prior):
    r"""Beta prior on a success probability p (Bernoulli, Binomial), per element.

    .. math:: p(p) = \frac{p^{a-1}(1-p)^{b-1}}{B(a, b)}

    MAP M-step: p = (S_x + a − 1) / (N + a + b − 2), N the trials.

    Parameters
    ----------
    a, b : float or array_like
        Both ≥ 1 (``Beta(1, 1)`` is uniform: the MAP is the MLE).

    Examples
    --------
    >>> import emdsl as em
    >>> em.Bernoulli(prior=em.priors.Beta(2, 2))
    Bernoulli(prior=Beta(a=2, b=2))
    """

    names = ("a", "b")

    def __init__(self, a: ArrayLike, b: ArrayLike) -> None:
        self.a = self._number("a", a, low=1.0)
        self.b = self._number("b", b, low=1.0)


class Dirichlet(Prior):
    r"""Dirichlet prior on probabilities over categories: latent weights, levels, Multinomial.

    .. math:: p(\pi) = \frac{\Gamma(\sum_l \alpha_l)}{\prod_l \Gamma(\alpha_l)} \prod_l \pi_l^{\alpha_l-1}

    MAP M-step: π_l = (S_l + α_l − 1) / (Σ_l S_l + Σ_l α_l − L) with S_l the counts
    (the responsibilities N_k for latent weights).

    On a Markov latent (``latent(..., markov=dim)``) it is a Dirichlet over the initial
    distribution π and one over each row of the transition matrix A, as hmmlearn's
    ``startprob_prior`` and ``transmat_prior``: α_ij − 1 pseudo-transitions from i to j. A
    matrix α gives each row its own (a sticky chain: a large diagonal), and ``initial``
    π's own α.

    Parameters
    ----------
    alpha : float or array_like
        α_l ≥ 1: one number for every category, or one per category (states, levels
        in their order, or the Multinomial's categories). On a Markov latent also a
        K × K matrix (over the latent and ``<latent>_next``): row i is the Dirichlet of A's row i.
    initial : float or array_like, optional
        Markov latents only: the α of π (a number or one per state). Default: ``alpha``
        when that is a number or a vector, else 1 (flat).

    Examples
    --------
    >>> import emdsl as em
    >>> em.Categorical(3, prior=em.priors.Dirichlet(2.0))
    Categorical(3, prior=Dirichlet(alpha=2.0))
    >>> sticky = em.priors.Dirichlet(1.0 + 20.0 * np.eye(2), initial=2.0)
    >>> em.Model().latent("z", em.Categorical(2, prior=sticky), markov="time").latent_var.markov
    'time'
    """

    names = ("alpha", "initial")

    def __init__(self, alpha: ArrayLike, *, initial: ArrayLike | None = None) -> None:
        self.alpha = self._number("alpha", alpha, low=1.0)
        if np.ndim(alpha) > 2:
            raise ModelError(f"Dirichlet(alpha=...): expected a number, a vector or (a Markov latent's "
                             f"transitions, row by row) a matrix, got shape {np.shape(alpha)}")
        self.initial = None if initial is None else self._number("initial", initial, low=1.0)
        if np.ndim(initial) > 1:
            raise ModelError(f"Dirichlet(initial=...): expected a number or a vector, got shape {np.shape(initial)}")

    def arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha, **({} if self.initial is None else {"initial": self.initial})}


def prior_class(name: str) -> type[Prior]:
    """The prior class registered under ``name``."""
    if name not in _PRIORS or name == "Prior":
        raise ValueError(f"unknown prior {name!r}; known: {', '.join(sorted(set(_PRIORS) - {'Prior'}))}")
    return _PRIORS[name]


def check_scale_matrix(scale: np.ndarray, where: str) -> None:
    """A scale Ψ: a positive number, a positive vector (a diagonal), or a symmetric positive definite matrix."""
    if scale.ndim > 2 or (scale.ndim == 2 and scale.shape[0] != scale.shape[1]):
        raise ModelError(f"{where}: expected a number, a vector or a square matrix, got shape {scale.shape}")
    if scale.ndim < 2:
        if np.any(scale <= 0):
            raise ModelError(f"{where}: must be > 0, got {float(scale[scale <= 0].ravel()[0])!r}")
        return
    size = float(np.abs(scale).max())
    if not np.allclose(scale, scale.T, rtol=1e-10, atol=1e-12 * size):
        raise ModelError(f"{where}: the scale matrix must be symmetric")
    smallest = float(np.linalg.eigvalsh(scale)[0])
    if smallest <= 0:
        raise ModelError(f"{where}: the scale matrix must be positive definite (smallest eigenvalue {smallest:.6g})")


# -- log densities, as lists of additive terms ------------------------------------------------
# Each returns the terms whose sum is the log density, so that the engine can bound the
# rounding of the sum by the sum of their magnitudes (the objective's slack).

Terms = list[np.ndarray]


def total(terms: Sequence[Any]) -> tuple[float, float]:
    """(Σ terms, Σ |terms|): a log density and the magnitude its rounding scales with."""
    arrays = [np.asarray(t, dtype=float) for t in terms]
    return float(sum(a.sum() for a in arrays)), float(sum(np.abs(a).sum() for a in arrays))


def normal_terms(x: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> Terms:
    """log N(x; mean, variance), elementwise."""
    x, mean, variance = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, mean, variance)))
    return [np.full(x.shape, -0.5 * LOG_2PI), -0.5 * np.log(variance), -0.5 * (x - mean) ** 2 / variance]


def inverse_gamma_terms(x: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> Terms:
    """log InvGamma(x; shape a, scale b) = a log b − log Γ(a) − (a + 1) log x − b / x."""
    x, shape, scale = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, shape, scale)))
    return [shape * np.log(scale), -gammaln(shape), -(shape + 1.0) * np.log(x), -scale / x]


def gamma_terms(x: np.ndarray, shape: np.ndarray, rate: np.ndarray) -> Terms:
    """log Gamma(x; shape α, rate β), with 0 · log 0 = 0 (α = 1 at x = 0)."""
    x, shape, rate = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x, shape, rate)))
    return [shape * np.log(rate), -gammaln(shape), xlogy(shape - 1.0, x), -rate * x]


def beta_terms(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> Terms:
    """log Beta(p; a, b), with 0 · log 0 = 0."""
    p, a, b = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (p, a, b)))
    return [xlogy(a - 1.0, p), xlog1py(b - 1.0, -p), -betaln(a, b)]


def dirichlet_terms(p: np.ndarray, alpha: np.ndarray) -> Terms:
    """log Dirichlet(p; α) over the last axis, one value per leading index; 0 · log 0 = 0."""
    p, alpha = np.broadcast_arrays(np.asarray(p, dtype=float), np.asarray(alpha, dtype=float))
    return [gammaln(alpha.sum(axis=-1)), -gammaln(alpha).sum(axis=-1), xlogy(alpha - 1.0, p).sum(axis=-1)]


def normal_inverse_gamma_terms(mean: np.ndarray, variance: np.ndarray, m: np.ndarray, kappa: np.ndarray,
                               shape: np.ndarray, scale: np.ndarray) -> Terms:
    """log N(mean; m, variance/κ) + log InvGamma(variance; a, b), elementwise."""
    return normal_terms(mean, m, np.asarray(variance) / kappa) + inverse_gamma_terms(variance, shape, scale)


def normal_inverse_wishart_terms(mean: np.ndarray, cov: np.ndarray, m: np.ndarray, kappa: float,
                                 dof: float, scale: np.ndarray) -> Terms:
    """Σ_k log N(μ_k; m, Σ_k/κ) + log InvWishart(Σ_k; ν, Ψ) for means (K, D) and covariances (K, D, D).

    With one covariance (D, D) shared by the K means (``"tied"``), the inverse-Wishart
    term is counted once.
    """
    mean = np.atleast_2d(mean)
    K, D = mean.shape
    tied = cov.ndim == 2
    covs = np.broadcast_to(cov, (K, D, D))
    chol = np.linalg.cholesky(covs)
    log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    white = np.linalg.solve(chol, (mean - m)[..., None])[..., 0]
    terms = [np.full(K, -0.5 * D * LOG_2PI + 0.5 * D * np.log(kappa)), -0.5 * log_det,
             -0.5 * kappa * np.einsum("kd,kd->k", white, white)]
    inverse_scale = np.linalg.solve(covs[:1] if tied else covs, np.broadcast_to(scale, (1 if tied else K, D, D)))
    log_det_cov = log_det[:1] if tied else log_det
    log_det_scale = np.linalg.slogdet(scale)[1]  # Ψ is positive definite: its sign is +1
    terms += [np.full(len(log_det_cov), 0.5 * dof * log_det_scale - 0.5 * dof * D * np.log(2.0)
                      - multigammaln(0.5 * dof, D)),
              -0.5 * (dof + D + 1.0) * log_det_cov,
              -0.5 * np.trace(inverse_scale, axis1=1, axis2=2)]
    return terms


def _short(value: Any) -> str:
    """A hyperparameter as shown in a repr: numbers and short lists in full, arrays by shape."""
    if np.ndim(value) == 0:
        return repr(value.item() if isinstance(value, np.generic) else value)
    if isinstance(value, list | tuple) and len(value) <= 8 and all(np.ndim(v) == 0 for v in value):
        return repr([v.item() if isinstance(v, np.generic) else v for v in value])
    return f"<{np.shape(value)} array>"
