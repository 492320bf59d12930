"""Fit.impute: regression (GLM) responses filled by their conditional expectation, and dask-backed data.

A hole in a regression's response y_n becomes Σ_k p(z=k | the sample's observed data) E[y_n | x_n, z=k],
checked against the same sum computed by hand from the fitted parameters; on dask-backed data the
result is lazy, keeps the data's chunks and equals the in-memory result to 1e-10.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
from scipy.special import expit, logsumexp
from scipy.stats import norm

import emdsl as em


def regression_data(n: int = 400, seed: int = 0) -> xr.Dataset:
    """Two regimes seen by a Normal ``x``; a Poisson count with an offset, a Binomial and a Normal response."""
    rng = np.random.default_rng(seed)
    state = rng.random(n) < 0.4
    dose = rng.uniform(0, 2, n)
    exposure = np.log(rng.uniform(0.5, 3, n))
    trials = rng.integers(1, 15, n)
    x = np.where(state, 3.0, -1.0) + rng.normal(0, 1, n)
    count = rng.poisson(np.exp(np.where(state, 0.3 + 0.9 * dose, 1.8 - 0.7 * dose) + exposure)).astype(float)
    success = rng.binomial(trials, expit(np.where(state, -1 + 1.5 * dose, 1 - dose))).astype(float)
    y = np.where(state, 1 + 2 * dose, 4 - dose) + rng.normal(0, 0.5, n)
    for values, every in ((count, 7), (success, 9), (y, 11)):
        values[::every] = np.nan
    return xr.Dataset({"x": ("sample", x), "count": ("sample", count), "success": ("sample", success),
                       "y": ("sample", y), "dose": ("sample", dose), "log_exposure": ("sample", exposure),
                       "trials": ("sample", trials)})


def posterior_by_hand(fit: em.Fit, ds: xr.Dataset, rows: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """p(z | x) for the given rows, from x alone (the rows' responses are missing): (len(rows) × K)."""
    mean, variance = fit.params["x"]["mean"].values.ravel(), fit.params["x"]["variance"].values.ravel()
    log_joint = log_prior + norm.logpdf(ds["x"].values[rows, None], mean, np.sqrt(variance))
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))


def fit_regressions(ds: xr.Dataset, concomitant: bool = False) -> em.Fit:
    model = (em.Model().latent("z", em.Categorical(2), covariates=["dose"] if concomitant else None)
             .observe("x", em.Normal)
             .observe("count", em.Poisson, covariates=["dose"], offset="log_exposure")
             .observe("success", em.Binomial(trials="trials"), covariates=["dose"])
             .observe("y", em.Normal, covariates=["dose"]))
    return model.fit(ds, seed=0, n_init=2)


@pytest.mark.parametrize("concomitant", [False, True])
def test_regression_holes_are_their_conditional_expectations(concomitant):
    ds = regression_data()
    fit = fit_regressions(ds, concomitant)
    filled = fit.impute()
    dose, offset, trials = ds["dose"].values, ds["log_exposure"].values, ds["trials"].values
    if concomitant:
        gamma = fit.params["z"]["coef"].values  # (z, term): π_nk ∝ exp(γ_k0 + γ_k1 dose)
        log_prior = np.column_stack([gamma[k, 0] + gamma[k, 1] * dose for k in range(2)])
        log_prior -= logsumexp(log_prior, axis=1, keepdims=True)
    else:
        log_prior = np.broadcast_to(np.log(fit.params["z"]["probs"].values), (len(dose), 2))
    design = np.column_stack([np.ones_like(dose), dose])
    means = {
        "count": lambda coef: np.exp(design @ coef.T + offset[:, None]),
        "success": lambda coef: trials[:, None] * expit(design @ coef.T),
        "y": lambda coef: design @ coef.T,
    }
    for name, mean in means.items():
        holes = np.flatnonzero(np.isnan(ds[name].values))
        assert len(holes) > 10
        # the posterior of a hole's row comes from x and that row's other observed responses; where all
        # three responses are missing (row 0: the strides 7, 9, 11 meet), from x and the weights alone
        others = [other for other in means if other != name]
        alone = holes[np.all([np.isnan(ds[other].values[holes]) for other in others], axis=0)]
        informed = holes[~np.isin(holes, alone)]
        resp = fit.predict_proba(ds).values
        expected = (resp[holes] * mean(fit.params[name]["coef"].values)[holes]).sum(axis=1)
        np.testing.assert_allclose(filled[name].values[holes], expected, rtol=1e-10)
        if len(alone):  # where the responses are all missing, p(z | x) is the prior times the Normal alone
            by_hand = posterior_by_hand(fit, ds, alone, log_prior[alone])
            np.testing.assert_allclose(resp[alone], by_hand, rtol=1e-9)
        assert len(informed)
        observed = ~np.isnan(ds[name].values)
        np.testing.assert_array_equal(filled[name].values[observed], ds[name].values[observed])
    # covariates, the offset and the trials are data, not holes: returned as they are
    for name in ("dose", "log_exposure", "trials", "x"):
        xr.testing.assert_identical(filled[name], ds[name])


def test_a_hole_in_a_glm_response_uses_the_posterior_from_the_other_nodes():
    """Fully by hand: a Poisson regression node and a Normal node; the count's holes are Σ_k r_nk e^{x_nᵀβ_k + o_n}."""
    ds = regression_data(seed=3).drop_vars(["success", "y"])
    model = (em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
             .observe("count", em.Poisson, covariates=["dose"], offset="log_exposure"))
    fit = model.fit(ds, seed=0)
    holes = np.flatnonzero(np.isnan(ds["count"].values))
    resp = posterior_by_hand(fit, ds, holes, np.log(fit.params["z"]["probs"].values))
    coef = fit.params["count"]["coef"].values
    dose, offset = ds["dose"].values[holes], ds["log_exposure"].values[holes]
    expected = (resp * np.exp(coef[:, 0] + coef[:, 1] * dose[:, None] + offset[:, None])).sum(axis=1)
    np.testing.assert_allclose(fit.impute()["count"].values[holes], expected, rtol=1e-10)


def mixed_data(n: int = 330, seed: int = 1) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    state = rng.random(n) < 0.5
    income = np.exp(np.where(state, 10.0, 11.0) + rng.normal(0, 0.3, n))
    visits = rng.poisson(np.where(state, 2.0, 7.0)).astype(float)
    plan = np.where(state, rng.choice(["basic", "plus"], n, p=[0.8, 0.2]),
                    rng.choice(["basic", "plus", "pro"], n, p=[0.1, 0.3, 0.6])).astype(object)
    xy = np.column_stack([np.where(state, 0.0, 3.0), np.where(state, 1.0, -2.0)]) + rng.normal(0, 1, (n, 2))
    income[::6] = np.nan
    visits[::5] = np.nan
    plan[::8] = None
    xy[::4, 0] = np.nan
    xy[::9, 1] = np.nan
    return xr.Dataset({"income": ("sample", income), "visits": ("sample", visits), "plan": ("sample", plan),
                       "xy": (("sample", "feature"), xy)}, coords={"feature": ["a", "b"]})


def assert_same_imputation(lazy: xr.Dataset, eager: xr.Dataset, chunked: xr.Dataset, names: list[str]) -> None:
    for name in names:
        assert lazy[name].chunks is not None, name  # dask-backed
        assert lazy[name].chunks == chunked[name].chunks, name
        values = lazy[name].values
        if values.dtype.kind in "OU":
            np.testing.assert_array_equal(values, eager[name].values)
        else:
            np.testing.assert_allclose(values, eager[name].values, rtol=1e-10, atol=1e-12)
        assert lazy[name].dims == eager[name].dims


@pytest.mark.parametrize("chunk", [50, 330, 97])
def test_impute_on_dask_data_is_lazy_with_the_data_chunks_and_equals_numpy(chunk):
    pytest.importorskip("dask")
    ds = mixed_data()
    model = (em.Model().latent("segment", em.Categorical(2))
             .observe("income", em.LogNormal).observe("visits", em.Poisson).observe("plan", em.Categorical)
             .observe("xy", em.MultivariateNormal))
    fit = model.fit(ds, seed=0)
    eager = fit.impute(ds)
    chunked = ds.chunk({"sample": chunk})
    lazy = fit.impute(chunked)
    assert_same_imputation(lazy, eager, chunked, ["income", "visits", "plan", "xy"])
    assert not np.isnan(eager["xy"].values).any()


def test_impute_on_dask_data_with_a_normal_regression_and_no_latent():
    pytest.importorskip("dask")
    ds = regression_data(n=250, seed=5)[["y", "dose"]]
    for model in (em.Model().observe("y", em.Normal, covariates=["dose"]),
                  em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal, covariates=["dose"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", em.DegenerateComponentWarning)
            fit = model.fit(ds, seed=0)
        chunked = ds.chunk({"sample": 60})
        assert_same_imputation(fit.impute(chunked), fit.impute(ds), chunked, ["y"])
