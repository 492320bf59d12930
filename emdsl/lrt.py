"""The parametric bootstrap likelihood-ratio test between two nested fits (McLachlan 1987).

The number of components is not a regular hypothesis: under "K components" the "K + 1"
model's extra component sits on the boundary of its space (a weight of 0) or is not
identified, so 2(ℓ₁ − ℓ₀) has no χ² law. McLachlan's bootstrap draws data sets from the
null fit, refits both models to each, and reads the p-value off the replicates'
statistics: mclust's ``mclustBootstrapLRT`` and mixtools' ``boot.comp`` do the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.bootstrap import learned_start, parametric_source, quiet_refit, run_replicates
from emdsl.errors import ConvergenceWarning, ModelError

if TYPE_CHECKING:
    from emdsl.model import Model
    from emdsl.results import Fit

_WHERE = "bootstrap_lrt"


def bootstrap_lrt(
    null: Fit,
    alternative: Fit,
    data: Any = None,
    n: int = 99,
    *,
    seed: int | None = None,
    n_jobs: int | None = None,
    progress: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> xr.Dataset:
    """Test a fit against a larger nested one by the parametric bootstrap of the likelihood ratio.

    The statistic is LRTS = 2(ℓ(alternative) − ℓ(null)). Each of the ``n`` replicates is a
    data set of the data's size drawn from ``null``; both models are refitted to it, each
    from its own fit's parameters (as mclust's ``mclustBootstrapLRT`` does), and the p-value
    is (1 + #{replicates whose statistic ≥ LRTS}) / (n + 1). The usual question is the
    number of components (or of a hidden Markov model's states): ``null`` with K, the
    ``alternative`` with K + 1, where the χ² law of the statistic does not hold.

    Parameters
    ----------
    null, alternative : Fit
        Fits of two nested models to the same data: ``alternative`` has more free parameters
        and contains ``null`` (e.g. the same declaration with one more component). What the
        models are is not checked beyond the number of parameters and of samples.
    data : Dataset or what :meth:`Model.fit` accepts, optional
        The data both were fitted to (default: ``null``'s training data).
    n : int, default 99
        Number of replicates (mclust's default is 999).
    seed : int, optional
        Seed of every draw and refit; the same seed gives the same replicates, whatever ``n_jobs``.
    n_jobs : int, optional
        Worker processes (default: one per CPU; 1 runs in this process).
    progress : bool, default False
        Print a progress line to stderr.
    max_iter, tol : int, float
        Passed to each refit.

    Returns
    -------
    xarray.Dataset
        ``statistic`` (the data's LRTS) and ``p_value``; over ``replicate``, each replicate's
        ``lrts``, ``loglik_null`` and ``loglik_alternative``, and whether both refits
        ``converged`` and whether either was ``degenerate``. The attributes hold ``n``,
        ``seed`` and the free-parameter counts ``n_params_null`` and ``n_params_alternative``.

    Notes
    -----
    Draws follow :func:`emdsl.bootstrap` with ``kind="parametric"``: ``null.sample`` of the
    data's size, or, with covariates or a Markov latent, responses or paths drawn at the data's
    covariates and along its sequences. A replicate whose refit of the alternative ends below
    the null's (a local optimum) keeps its negative statistic, as in mclust; with priors the
    statistic still compares log-likelihoods (at the MAP fits).

    Examples
    --------
    >>> import emdsl as em
    >>> ds = em.datasets.load("faithful")
    >>> one, two = (em.Model().latent("z", em.Categorical(k)).observe("waiting", em.Normal).fit(ds, seed=0)
    ...             for k in (1, 2))
    >>> test = em.bootstrap_lrt(one, two, n=9, seed=0, n_jobs=1)
    >>> float(test["p_value"])
    0.1
    """
    from emdsl.results import Fit

    for name, fit in (("null", null), ("alternative", alternative)):
        if not isinstance(fit, Fit):
            raise ModelError(f"{_WHERE}({name}=...): expected a Fit, got {type(fit).__name__}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ModelError(f"{_WHERE}(n=...): the number of replicates must be a positive integer, got {n!r}")
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer) or n_jobs < 1):
        raise ModelError(f"{_WHERE}(n_jobs=...): must be a positive integer or None, got {n_jobs!r}")
    if alternative.n_params <= null.n_params:
        raise ModelError(f"{_WHERE}: the alternative must be the larger model, with more free parameters than "
                         f"the null; got {alternative.n_params} against {null.n_params} (swap them?)")
    if alternative.n_samples != null.n_samples or alternative.weight_total != null.weight_total:
        raise ModelError(f"{_WHERE}: the two fits were fitted to different data ({null.n_samples} samples of "
                         f"total weight {null.weight_total:g} for the null, {alternative.n_samples} of "
                         f"{alternative.weight_total:g} for the alternative); fit both to the same data")
    if data is None:
        data = null.data
        if data is None:
            raise ModelError(f"{_WHERE}: the null fit was loaded from a file and holds no training data; "
                             "pass the data")
    ds = labels.as_dataset(data)
    statistic = 2.0 * (alternative.loglik - null.loglik)
    if statistic < 0:
        warnings.warn(f"{_WHERE}: the alternative's log-likelihood is below the null's by {-statistic / 2:.4g}, "
                      "so its fit stopped at a local optimum; refit it (more n_init, or from the null's "
                      "parameters) before testing", ConvergenceWarning, stacklevel=2)
    seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)
    children = np.random.SeedSequence(seed).spawn(int(n))
    job = _Job([_Refit.of(null, ds), _Refit.of(alternative, ds)], parametric_source(null, ds, _WHERE),
               max_iter, tol)
    results = run_replicates(job, children, n_jobs, progress, _WHERE)
    return _collect(results, statistic, seed, null.n_params, alternative.n_params)


class _Refit:
    """One model's refit on a replicate: its declaration, start and the options its fit used."""

    def __init__(self, model: Model, start: dict[str, dict[str, Any]], refit_dim: Any, prior: str | None) -> None:
        self.model, self.start, self.refit_dim, self.prior = model, start, refit_dim, prior

    @classmethod
    def of(cls, fit: Fit, ds: xr.Dataset) -> _Refit:
        latent = fit.model.latent_var
        chain = latent is not None and latent.markov is not None
        # a chain's refit runs over the data's sequences, as the fit did
        refit_dim: Hashable | tuple[Hashable, ...] | None = (tuple(fit._sequence_dims_in(ds)) or None) if chain \
            else fit.sample_dim
        return cls(fit.model, learned_start(fit), refit_dim, fit.prior)

    def run(self, data: xr.Dataset, seed: int, max_iter: int, tol: float) -> tuple[float, bool, bool]:
        fit, converged, degenerate = quiet_refit(lambda: self.model.fit(
            data, init=self.start, max_iter=max_iter, tol=tol, seed=seed, sample_dim=self.refit_dim,
            prior=self.prior))
        return fit.loglik, converged, degenerate


class _Job:
    """A replicate: a draw from the null fit, refitted by both models (picklable, sent once to each worker)."""

    def __init__(self, refits: list[_Refit], source: Any, max_iter: int, tol: float) -> None:
        self.refits, self.source, self.max_iter, self.tol = refits, source, max_iter, tol

    def run(self, seed: np.random.SeedSequence) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        data = self.source.draw(rng)
        (null, converged0, degenerate0), (alternative, converged1, degenerate1) = (
            refit.run(data, int(rng.integers(2**32)), self.max_iter, self.tol) for refit in self.refits)
        return {"null": null, "alternative": alternative, "converged": converged0 and converged1,
                "degenerate": degenerate0 or degenerate1}


def _collect(results: list[dict[str, Any]], statistic: float, seed: int, n_null: int, n_alternative: int
             ) -> xr.Dataset:
    null = np.array([r["null"] for r in results])
    alternative = np.array([r["alternative"] for r in results])
    lrts = 2.0 * (alternative - null)
    p_value = (1.0 + float(np.sum(lrts >= statistic))) / (len(results) + 1.0)
    out = xr.Dataset(
        {"statistic": ((), statistic, {"description": "2 (loglik(alternative) - loglik(null)) on the data"}),
         "p_value": ((), p_value, {"description": "(1 + #{lrts >= statistic}) / (n + 1)"}),
         "lrts": ("replicate", lrts, {"description": "the statistic on each replicate drawn from the null fit"}),
         "loglik_null": ("replicate", null),
         "loglik_alternative": ("replicate", alternative),
         "converged": ("replicate", np.array([r["converged"] for r in results])),
         "degenerate": ("replicate", np.array([r["degenerate"] for r in results]))},
        coords={"replicate": np.arange(len(results))},
        attrs={"n": len(results), "seed": seed, "n_params_null": n_null, "n_params_alternative": n_alternative,
               "description": "parametric bootstrap likelihood-ratio test (McLachlan 1987)"})
    failed = int((~out["converged"]).sum())
    if failed:
        warnings.warn(f"{_WHERE}: in {failed} of {len(results)} replicates a refit did not converge (see the "
                      "'converged' variable); raise max_iter", ConvergenceWarning, stacklevel=3)
    return out
