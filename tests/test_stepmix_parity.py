"""Same data with holes, same starting parameters: emdsl's EM equals StepMix's (FIML) EM.

StepMix (https://github.com/Labo-Lacourse/stepmix) fits latent class models with
"full information maximum likelihood" emissions: ``gaussian_diag_nan``,
``gaussian_spherical_nan``, ``binary_nan`` and ``categorical_nan`` skip a missing
cell in the E-step and average each parameter over the rows where its element is
observed in the M-step. That is exactly EM for data missing at random with
independent elements, which is what ``em.Normal``, ``em.Bernoulli`` and observed
``em.Categorical`` do with NaN, so the two are compared iterate for iterate: same
θ⁽⁰⁾, 30 EM steps each (plain EM: ``accelerate=None``, as StepMix has no
extrapolation), then log-likelihood, parameters and posteriors. Measured
agreement is ~1e-15 (relative for the log-likelihood, absolute for parameters);
the tests ask for 1e-9.

StepMix has no warm start: its ``em`` always calls ``_initialize_parameters``
(k-means or random responsibilities). The tests replace that one method on the
instance with ``set_parameters(θ⁽⁰⁾)``, so everything after it — StepMix's own
E-steps, M-steps, weights and scoring — runs unchanged.

Where the models match but the algorithms differ: ``em.MultivariateNormal(covariance=
"diag" | "spherical")`` with holes treats the missing part of an event as latent
(the conditional Gaussian, so the M-step also imputes E[x_miss] and its variance),
while StepMix's ``gaussian_*_nan`` maximizes over the observed cells directly. Both
climb the same observed-data likelihood, so their iterates differ but their fixed
points are the same: those are compared after both have converged (well separated
data, 150 steps, both at the fixed point to rounding; measured agreement ~1e-14).

Not comparable with StepMix (it has no such emission): Poisson and the other count
and continuous families, full or tied covariance with holes (``gaussian_full`` and
``gaussian_tied`` reject NaN), Binomial/Multinomial. StepMix's non-NaN Gaussian
emissions add scikit-learn's ``reg_covar`` and are covered by the scikit-learn tests.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
from stepmix import StepMix

import emdsl as em

K = 3
LEVELS = 4  # levels of each categorical item


def mixed_data(n: int, seed: int, missing: float = 0.15):
    """Gaussian (3 features), binary (3 items), categorical (2 items × 4 levels), each cell MCAR-missing."""
    rng = np.random.default_rng(seed)
    z = rng.integers(K, size=n)
    x = rng.normal(np.array([[0, 0, 0], [2, 1, -1], [-1, 3, 1]])[z], [1.0, 0.7, 1.5])
    b = (rng.random((n, 3)) < np.array([[0.2, 0.5, 0.8], [0.7, 0.3, 0.4], [0.5, 0.9, 0.1]])[z]).astype(float)
    level_probs = rng.dirichlet(np.ones(LEVELS), size=(K, 2))
    cum = level_probs[z].cumsum(-1)  # (n, item, level)
    c = (rng.random((n, 2, 1)) > cum).sum(-1).astype(float)
    for a in (x, b, c):
        a[rng.random(a.shape) < missing] = np.nan
    # Rows with whole blocks missing, and rows with nothing observed at all: both
    # contribute log p = 0 for the missing block in either implementation.
    x[:6] = np.nan
    b[:3] = b[6:9] = np.nan
    c[:3] = np.nan  # rows 0-2: nothing observed
    return x, b, c


def observed_mean(a: np.ndarray, resp: np.ndarray) -> np.ndarray:
    """Responsibility-weighted mean of each column over the rows where it is observed: (K, D)."""
    seen = ~np.isnan(a)
    return (resp.T @ np.nan_to_num(a)) / (resp.T @ seen)


def starting_point(x, b, c, seed: int) -> dict:
    """θ⁽⁰⁾: one M-step from random soft responsibilities (neither library's own initialiser)."""
    resp = np.random.default_rng(seed).dirichlet(np.ones(K), size=len(x))
    mean = observed_mean(x, resp)
    levels = np.where(np.isnan(c)[..., None], np.nan, (c[..., None] == np.arange(LEVELS)).astype(float))
    level_probs = np.stack([observed_mean(levels[:, j], resp) for j in range(c.shape[1])], axis=1)
    return {"weights": resp.mean(0), "mean": mean, "variance": observed_mean(x**2, resp) - mean**2,
            "binary": observed_mean(b, resp), "levels": level_probs}


def stepmix_from(theta: dict, measurement, n_iter: int, **params) -> StepMix:
    """A StepMix whose EM starts from ``theta`` (a dict in ``StepMix.get_parameters()``'s layout)."""
    model = StepMix(n_components=K, measurement=measurement, max_iter=n_iter, abs_tol=0.0, rel_tol=0.0,
                    progress_bar=0, verbose=0, **params)
    # StepMix.em re-initialises every restart through this method; with tolerances
    # 0 it then runs exactly n_iter of its own E- and M-steps.
    model._initialize_parameters = lambda X, random_state: model.set_parameters(theta)
    return model


def run_stepmix(model: StepMix, X: np.ndarray, sample_weight=None) -> StepMix:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": tolerances are 0 on purpose
        return model.fit(X, sample_weight=sample_weight)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_thirty_iterations_with_holes_equal_stepmix(seed, weighted):
    x, b, c = mixed_data(1200, seed)
    theta = starting_point(x, b, c, seed + 10)
    weights = np.random.default_rng(seed + 20).uniform(0.2, 3.0, len(x)) if weighted else None
    n_iter = 30

    ds = xr.Dataset({"x": (("sample", "feature"), x), "b": (("sample", "item"), b),
                     "c": (("sample", "question"), c)})
    if weighted:
        ds["w"] = ("sample", weights)
    model = (em.Model().latent("z", em.Categorical(K)).observe("x", em.Normal)
             .observe("b", em.Bernoulli).observe("c", em.Categorical))
    fit = model.fit(ds, init={"z": {"probs": theta["weights"]},
                              "x": {"mean": theta["mean"], "variance": theta["variance"]},
                              "b": {"probs": theta["binary"]}, "c": {"probs": theta["levels"]}},
                    max_iter=n_iter, tol=0, weights="w" if weighted else None, accelerate=None)
    assert fit.n_iter == n_iter

    measurement = {"x": {"model": "gaussian_diag_nan", "n_columns": 3},
                   "b": {"model": "binary_nan", "n_columns": 3},
                   "c": {"model": "categorical_nan", "n_columns": 2}}
    start = {"weights": theta["weights"].copy(), "measurement_in": 8, "measurement": {
        "x": {"means": theta["mean"].copy(), "covariances": theta["variance"].copy()},
        "b": {"pis": theta["binary"].copy()},
        "c": {"pis": theta["levels"].reshape(K, -1).copy(), "max_n_outcomes": LEVELS,
              "total_outcomes": 2 * LEVELS}}}
    X = np.hstack([x, b, c])
    ref = run_stepmix(stepmix_from(start, measurement, n_iter), X, weights)
    assert ref.n_iter_ == n_iter
    got = ref.get_parameters()

    np.testing.assert_allclose(fit.params["z"]["probs"], got["weights"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fit.params["x"]["mean"], got["measurement"]["x"]["means"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fit.params["x"]["variance"], got["measurement"]["x"]["covariances"],
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(fit.params["b"]["probs"], got["measurement"]["b"]["pis"], rtol=0, atol=1e-9)
    assert fit.params["c"]["probs"].dims == ("z", "question", "level")
    np.testing.assert_allclose(fit.params["c"]["probs"], got["measurement"]["c"]["pis"].reshape(K, 2, LEVELS),
                               rtol=0, atol=1e-9)

    # StepMix.score is the (weighted) mean log-likelihood at the final parameters.
    total = weights.sum() if weighted else len(X)
    ours = fit.score_samples(ds).values
    np.testing.assert_allclose(ours[:3], 0, atol=1e-12)  # nothing observed: log p(∅) = log Σπ = 0, as StepMix counts it
    assert float(np.sum(ours * (weights if weighted else 1))) == pytest.approx(
        ref.score(X, sample_weight=weights) * total, rel=1e-10)
    assert fit.loglik == pytest.approx(ref.score(X, sample_weight=weights) * total, rel=1e-10)
    np.testing.assert_allclose(fit.predict_proba(ds), ref.predict_proba(X), rtol=0, atol=1e-9)


@pytest.mark.parametrize("covariance, emission", [("diag", "gaussian_diag_nan"),
                                                  ("spherical", "gaussian_spherical_nan")])
def test_multivariate_normal_with_holes_reaches_stepmix_fixed_point(covariance, emission):
    rng = np.random.default_rng(3)
    n = 800
    z = rng.integers(K, size=n)
    x = rng.normal(np.array([[0, 0, 0], [4, 2, -3], [-3, 5, 2]])[z], [1.0, 0.7, 1.5])
    x[rng.random(x.shape) < 0.1] = np.nan
    # A start near, but not at, the truth: half one-hot on the true state, half noise.
    resp = 0.5 * rng.dirichlet(np.ones(K), size=n) + 0.5 * np.eye(K)[z]
    mean = observed_mean(x, resp)
    variance = observed_mean(x**2, resp) - mean**2
    if covariance == "spherical":
        variance = np.repeat(variance.mean(1, keepdims=True), 3, axis=1)
    n_iter = 150

    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    fit = (em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal(covariance=covariance))
           .fit(ds, init={"z": {"probs": resp.mean(0)},
                          "x": {"mean": mean, "covariance": variance if covariance == "diag" else variance[:, 0]}},
                max_iter=n_iter, tol=0, accelerate=None))
    loglik = fit.trace["loglik"].values
    assert abs(loglik[-1] - loglik[-11]) < 1e-10 * abs(loglik[-1])  # at the fixed point, not on the way

    start = {"weights": resp.mean(0), "measurement_in": 3,
             "measurement": {"means": mean.copy(), "covariances": variance.copy()}}
    ref = run_stepmix(stepmix_from(start, emission, n_iter), x)
    got = ref.get_parameters()
    ours_cov = fit.params["x"]["covariance"].values
    ours_cov = ours_cov if covariance == "diag" else np.repeat(ours_cov[:, None], 3, axis=1)

    np.testing.assert_allclose(fit.params["z"]["probs"], got["weights"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(fit.params["x"]["mean"], got["measurement"]["means"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours_cov, got["measurement"]["covariances"], rtol=0, atol=1e-9)
    assert fit.score(ds) == pytest.approx(ref.score(x), rel=1e-10)
