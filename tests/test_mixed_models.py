"""Mixed models (several families under one latent), holes, fixed values and imputation,
checked against independent computations: scipy.stats densities summed by hand, the
first EM iteration written out, and parameter recovery within derived standard errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st
import xarray as xr
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp

import emdsl as em

# -- by hand -------------------------------------------------------------------------


def hand_log_joint(ds: xr.Dataset, fit: em.Fit, nodes: dict[str, tuple[str, ...]]) -> np.ndarray:
    """log π_k + Σ_v log p(x_nv | k) over the observed elements only, with scipy.stats: (N, K).

    ``nodes`` maps a node name to its family kind and variables; a MultivariateNormal event
    with holes contributes the density of its observed block, N(x_o | μ_o, Σ_oo).
    """
    p = fit.params
    pi = p["z"]["probs"].values
    K, N = len(pi), ds.sizes["sample"]
    out = np.tile(np.log(pi), (N, 1))
    for name, (kind, *variables) in nodes.items():
        params = p[name]
        for n in range(N):
            for k in range(K):
                if kind == "mvn":
                    x = np.array([ds[v].values[n] for v in variables], dtype=float)
                    o = ~np.isnan(x)
                    if not o.any():
                        continue
                    mean = params["mean"].values[k]
                    cov = params["covariance"].values[k]
                    if cov.ndim == 1:  # diag: the (z, feature) variances
                        cov = np.diag(cov)
                    out[n, k] += st.multivariate_normal(mean[o], cov[np.ix_(o, o)]).logpdf(x[o])
                    continue
                x = ds[variables[0]].values[n]
                if x is None or (isinstance(x, float) and np.isnan(x)):
                    continue
                if kind == "normal":
                    out[n, k] += st.norm(params["mean"].values[k], np.sqrt(params["variance"].values[k])).logpdf(x)
                elif kind == "poisson":
                    out[n, k] += st.poisson(params["rate"].values[k]).logpmf(x)
                elif kind == "categorical":
                    out[n, k] += np.log(params["probs"].sel(level=x).values[k])
                else:
                    raise AssertionError(kind)
    return out


def _tiny_mixed(covariance: str) -> tuple[em.Model, xr.Dataset, dict]:
    """K = 2; Normal, Poisson, Categorical (string levels) and a 2-D MVN, with holes in every variable."""
    rng = np.random.default_rng(11)
    N = 12
    z = np.repeat([0, 1], N // 2)
    a = rng.normal(np.where(z == 0, -1.0, 2.0), 1.0)
    c = rng.poisson(np.where(z == 0, 2.0, 9.0)).astype(float)
    g = np.where(rng.random(N) < np.where(z == 0, 0.8, 0.2), "red", np.where(rng.random(N) < 0.5, "blue", "green"))
    g = g.astype(object)
    u = rng.normal(np.where(z == 0, 0.0, 3.0), 1.0)
    v = 0.6 * u + rng.normal(size=N)
    a[[1, 7]] = np.nan
    c[[2, 9]] = np.nan
    g[[0, 10]] = None
    u[[3, 8, 11]] = np.nan  # row 11: the whole MVN event is missing
    v[[4, 6, 11]] = np.nan
    ds = xr.Dataset({"a": ("sample", a), "c": ("sample", c), "g": ("sample", g), "u": ("sample", u),
                     "v": ("sample", v)})
    model = (em.Model().latent("z", em.Categorical(2)).observe("a", em.Normal).observe("c", em.Poisson)
             .observe("g", em.Categorical).observe(["u", "v"], em.MultivariateNormal(covariance=covariance), name="uv"))
    nodes = {"a": ("normal", "a"), "c": ("poisson", "c"), "g": ("categorical", "g"), "uv": ("mvn", "u", "v")}
    return model, ds, nodes


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_brute_force_enumeration_with_holes_in_every_variable(covariance):
    model, ds, nodes = _tiny_mixed(covariance)
    fit = model.fit(ds, init="random", max_iter=7, tol=0, seed=2)
    joint = hand_log_joint(ds, fit, nodes)
    assert fit.loglik == pytest.approx(logsumexp(joint, axis=1).sum(), rel=1e-10)
    posterior = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
    np.testing.assert_allclose(fit.posterior.transpose("sample", "z").values, posterior, rtol=1e-9, atol=1e-12)


def test_parameter_recovery_with_missing_values():
    rng = np.random.default_rng(20240601)
    N = 3000
    pi = np.array([0.2, 0.3, 0.5])
    mean, sd = np.array([-4.0, 0.0, 4.0]), np.array([1.0, 1.5, 0.8])
    rate = np.array([2.0, 8.0, 20.0])
    flag = np.array([0.2, 0.5, 0.9])
    levels = ["x", "y", "w"]
    level_probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
    z = rng.choice(3, size=N, p=pi)
    g = np.array(levels, dtype=object)[(rng.random((N, 1)) > level_probs[z].cumsum(axis=1)).sum(axis=1)]
    data = {"y": rng.normal(mean[z], sd[z]), "c": rng.poisson(rate[z]).astype(float),
            "b": (rng.random(N) < flag[z]).astype(float), "g": g}
    observed_fraction = 0.8
    for name, values in data.items():  # 20% missing completely at random, independently per variable
        values[rng.random(N) > observed_fraction] = None if values.dtype == object else np.nan
    ds = xr.Dataset({name: ("sample", values) for name, values in data.items()})
    model = (em.Model().latent("z", em.Categorical(3)).observe("y", em.Normal).observe("c", em.Poisson)
             .observe("b", em.Bernoulli).observe("g", em.Categorical))
    fit = model.fit(ds, n_init=3, seed=5)
    p = fit.params
    # cost: distance between true and fitted Poisson rates, in standard deviations of a count
    cost = np.abs(rate[:, None] - p["c"]["rate"].values[None, :]) / np.sqrt(rate)[:, None]
    truth_of, fitted = linear_sum_assignment(cost)
    order = fitted[np.argsort(truth_of)]  # order[k]: the fitted component that matches true component k
    # Tolerances: 5 standard errors of each estimator, from the complete-data (known-label)
    # formulas. The components are far apart (means 4 sd apart, rates 2/8/20), so the
    # posterior is nearly a hard assignment and the latent adds little variance; each
    # per-variable estimate of component k rests on about n_k = N·π_k·0.8 observed values
    # (20% of every variable is missing), the weights on all N samples:
    #   π_k: √(π(1−π)/N);  mean: σ/√n_k;  variance: σ²·√(2/n_k);  Poisson λ: √(λ/n_k);
    #   Bernoulli p and each categorical level's p: √(p(1−p)/n_k).
    n_k = N * pi * observed_fraction
    checks = {
        "weights": (p["z"]["probs"].values[order], pi, np.sqrt(pi * (1 - pi) / N)),
        "normal mean": (p["y"]["mean"].values[order], mean, sd / np.sqrt(n_k)),
        "normal variance": (p["y"]["variance"].values[order], sd**2, sd**2 * np.sqrt(2 / n_k)),
        "poisson rate": (p["c"]["rate"].values[order], rate, np.sqrt(rate / n_k)),
        "bernoulli probs": (p["b"]["probs"].values[order], flag, np.sqrt(flag * (1 - flag) / n_k)),
        "level probs": (p["g"]["probs"].sel(level=levels).values[order], level_probs,
                        np.sqrt(level_probs * (1 - level_probs) / n_k[:, None])),
    }
    for what, (estimate, true, se) in checks.items():
        z_scores = (estimate - true) / se
        assert np.all(np.abs(z_scores) < 5), f"{what}: estimate {estimate}, truth {true}, z-scores {z_scores}"


def test_first_iteration_of_a_binomial_mixture_with_fixed_weights():
    x = np.array([1, 3, 7, 9, 2, 10, 5, 0], dtype=float)
    n = np.array([10, 12, 10, 11, 5, 14, 8, 3], dtype=float)
    ds = xr.Dataset({"x": ("sample", x), "n": ("sample", n)})
    pi, start = np.array([0.4, 0.6]), np.array([0.3, 0.7])
    model = em.Model().latent("z", em.Categorical(2, probs=[0.4, 0.6])).observe("x", em.Binomial(trials="n"))
    fit = model.fit(ds, init={"x": {"probs": [0.3, 0.7]}}, max_iter=1, tol=0)
    assert fit.n_iter == 1

    def log_joint(probs):
        return np.log(pi) + st.binom.logpmf(x[:, None], n[:, None], probs[None, :])

    joint = log_joint(start)
    r = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
    updated = (r * x[:, None]).sum(axis=0) / (r * n[:, None]).sum(axis=0)
    np.testing.assert_allclose(fit.params["x"]["probs"].values, updated, rtol=1e-12)
    np.testing.assert_array_equal(fit.params["z"]["probs"].values, pi)  # held, not re-estimated
    np.testing.assert_allclose(fit.trace["loglik"].values,
                               [logsumexp(joint, axis=1).sum(), logsumexp(log_joint(updated), axis=1).sum()],
                               rtol=1e-12)


def test_max_iter_zero_evaluates_fixed_and_given_parameters():
    a = np.array([-1.2, 0.3, np.nan, 2.5, 1.9, -0.4])
    c = np.array([0, 4, 6, np.nan, 1, 3], dtype=float)
    ds = xr.Dataset({"a": ("sample", a), "c": ("sample", c)})
    pi, mean, variance, rate = np.array([0.3, 0.7]), np.array([-1.0, 2.0]), np.array([1.0, 4.0]), np.array([1.0, 5.0])
    model = (em.Model().latent("z", em.Categorical(2, probs=pi))
             .observe("a", em.Normal(mean=mean, variance=variance)).observe("c", em.Poisson))
    fit = model.fit(ds, init={"c": {"rate": rate}}, max_iter=0)
    assert fit.n_iter == 0
    joint = (np.log(pi) + np.where(np.isnan(a)[:, None], 0.0, st.norm(mean, np.sqrt(variance)).logpdf(a[:, None]))
             + np.where(np.isnan(c)[:, None], 0.0, st.poisson(rate).logpmf(c[:, None])))
    assert fit.loglik == pytest.approx(logsumexp(joint, axis=1).sum(), rel=1e-12)
    # no M-step: every parameter is what was fixed or given
    np.testing.assert_allclose(fit.params["c"]["rate"].values, rate, rtol=1e-14)
    np.testing.assert_allclose(fit.params["a"]["mean"].values, mean, rtol=1e-14)
    np.testing.assert_allclose(fit.params["a"]["variance"].values, variance, rtol=1e-14)
    np.testing.assert_allclose(fit.posterior.values, np.exp(joint - logsumexp(joint, axis=1, keepdims=True)),
                               rtol=1e-12)


# -- observed Categorical: where levels come from ------------------------------------


def _frequencies(values, levels):
    """Relative frequency of each level among the observed values (the MLE without a latent)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return np.array([present.count(level) for level in levels], dtype=float) / len(present)


def test_levels_from_strings_are_sorted_and_holes_skipped():
    g = np.array(["b", "a", None, "c", "a", "b", "a", np.nan], dtype=object)
    fit = em.Model().observe("g", em.Categorical).fit(xr.Dataset({"g": ("sample", g)}))
    probs = fit.params["g"]["probs"]
    assert list(probs["level"].values) == ["a", "b", "c"]
    np.testing.assert_allclose(probs.values, _frequencies(list(g), ["a", "b", "c"]), rtol=1e-12)


def test_levels_from_pandas_categorical_keep_category_order_and_unused_levels():
    categories = ["mid", "low", "high", "unused"]
    values = ["low", "high", None, "mid", "low", "low", "high"]
    df = pd.DataFrame({"g": pd.Categorical(values, categories=categories)})
    fit = em.Model().observe("g", em.Categorical).fit(df)
    probs = fit.params["g"]["probs"]
    assert list(probs["level"].values) == categories
    np.testing.assert_allclose(probs.values, _frequencies(values, categories), rtol=1e-12)
    assert probs.sel(level="unused").item() == 0.0


def test_levels_from_integer_codes_with_holes():
    # pandas stores an integer column with holes as Int64; xarray turns it into floats with NaN
    df = pd.DataFrame({"g": pd.array([0, 1, None, 2, 1, 1, None, 0], dtype="Int64")})
    fit = em.Model().observe("g", em.Categorical).fit(df)
    probs = fit.params["g"]["probs"]
    assert list(probs["level"].values) == [0, 1, 2]
    assert probs["level"].dtype.kind == "i"  # the codes come back as the integers they were, not floats
    np.testing.assert_allclose(probs.values, [2 / 6, 3 / 6, 1 / 6], rtol=1e-12)


def test_unknown_level_at_predict_time_names_variable_value_and_position():
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"y": ("sample", rng.normal(size=20)),
                     "g": ("sample", np.array(["a", "b"] * 10, dtype=object))})
    fit = em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal).observe("g", em.Categorical).fit(
        ds, seed=0)
    new = xr.Dataset({"y": ("sample", [0.1, 0.2, 0.3, 0.4]),
                      "g": ("sample", np.array(["a", "b", "b", "purple"], dtype=object))},
                     coords={"sample": [10, 11, 12, 13]})
    for method in (fit.predict, fit.predict_proba, fit.score_samples):
        with pytest.raises(em.ModelError, match=r"variable 'g'.*1 value.*not a known level.*'purple'.*sample=13"):
            method(new)


def test_fixed_level_probabilities_of_an_observed_categorical_are_held():
    rng = np.random.default_rng(4)
    z = rng.integers(0, 2, size=200)
    held = np.array([[0.9, 0.1], [0.2, 0.8]])
    ds = xr.Dataset({"y": ("sample", rng.normal(3.0 * z, 1.0)),
                     "g": ("sample", (rng.random(200) < held[z, 1]).astype(float))})
    ds["g"][[3, 50]] = np.nan
    model = (em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal)
             .observe("g", em.Categorical(2, probs=held.tolist())))
    fit = model.fit(ds, max_iter=30, tol=0, seed=1)
    np.testing.assert_array_equal(fit.params["g"]["probs"].values, held)
    # its parameters are not counted: 1 weight + 2 means + 2 variances
    assert fit.n_params == 5


# -- imputation ------------------------------------------------------------------------


def _imputation_case() -> tuple[xr.Dataset, em.Fit]:
    """K = 2; a 3-D MVN, a Categorical and a Normal, each with holes (one MVN event with two)."""
    rng = np.random.default_rng(8)
    N = 60
    z = rng.integers(0, 2, size=N)
    u = rng.normal(np.where(z == 0, 0.0, 4.0), 1.0)
    v = 0.8 * u + rng.normal(size=N) * 0.7
    w = -0.5 * u + rng.normal(size=N)
    g = np.where(rng.random(N) < np.where(z == 0, 0.85, 0.15), "on", "off").astype(object)
    a = rng.normal(np.where(z == 0, 10.0, 13.0), 1.0)
    holes = {"u": [0, 5, 9], "v": [0, 7, 12], "w": [3, 7, 20], "g": [1, 5, 14], "a": [2, 9, 30]}
    columns = {"u": u, "v": v, "w": w, "g": g, "a": a}
    for name, rows in holes.items():
        columns[name][rows] = None if name == "g" else np.nan
    ds = xr.Dataset({name: ("sample", values) for name, values in columns.items()})
    model = (em.Model().latent("z", em.Categorical(2)).observe(["u", "v", "w"], em.MultivariateNormal, name="x")
             .observe("g", em.Categorical).observe("a", em.Normal))
    return ds, model.fit(ds, seed=0)


def test_impute_returns_observed_values_unchanged():
    ds, fit = _imputation_case()
    filled = fit.impute()
    for name in ("u", "v", "w", "a", "g"):
        observed = ds[name].notnull().values
        assert filled[name].notnull().all()
        np.testing.assert_array_equal(filled[name].values[observed], ds[name].values[observed], err_msg=name)


def test_impute_uses_conditional_gaussian_means_and_most_probable_levels():
    ds, fit = _imputation_case()
    N = ds.sizes["sample"]
    filled = fit.impute()
    nodes = {"x": ("mvn", "u", "v", "w"), "g": ("categorical", "g"), "a": ("normal", "a")}
    joint = hand_log_joint(ds, fit, nodes)
    r = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
    p = fit.params
    mean, cov = p["x"]["mean"].values, p["x"]["covariance"].values
    n_holes = 0
    for n in range(N):
        x = np.array([ds[v].values[n] for v in ("u", "v", "w")])
        m, o = np.isnan(x), ~np.isnan(x)
        if m.any():  # Σ_k r_nk (μ_km + Σ_k,mo Σ_k,oo⁻¹ (x_o − μ_ko))
            n_holes += 1
            got = np.array([filled[v].values[n] for v in ("u", "v", "w")])
            expected = sum(r[n, k] * (mean[k, m] + cov[k][np.ix_(m, o)] @ np.linalg.solve(
                cov[k][np.ix_(o, o)], x[o] - mean[k, o])) for k in range(2))
            np.testing.assert_allclose(got[m], expected, rtol=1e-10)
    assert n_holes == 7
    levels = list(p["g"]["probs"]["level"].values)
    for n in np.flatnonzero(ds["g"].isnull().values):
        predictive = r[n] @ p["g"]["probs"].transpose("z", "level").values
        assert filled["g"].values[n] == levels[int(np.argmax(predictive))]
    a_holes = np.isnan(ds["a"].values)
    np.testing.assert_allclose(filled["a"].values[a_holes], r[a_holes] @ p["a"]["mean"].values, rtol=1e-12)


def test_impute_picks_a_level_that_differs_by_component():
    """A categorical hole follows the posterior: holes in rows of different components get different levels."""
    rng = np.random.default_rng(3)
    N = 80
    z = np.repeat([0, 1], N // 2)
    g = np.where(rng.random(N) < np.where(z == 0, 0.95, 0.05), "left", "right").astype(object)
    y = rng.normal(np.where(z == 0, -5.0, 5.0), 1.0)
    g[[0, N - 1]] = None
    ds = xr.Dataset({"y": ("sample", y), "g": ("sample", g)})
    fit = em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal).observe("g", em.Categorical).fit(
        ds, seed=0)
    filled = fit.impute()
    assert (filled["g"].values[0], filled["g"].values[N - 1]) == ("left", "right")
