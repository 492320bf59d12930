"""Conjugate priors and MAP-EM, against closed forms and scipy.stats written out here.

* One component with a conjugate prior: the fit equals the textbook posterior mode
  (written below from Murphy, *Machine Learning: a Probabilistic Perspective*, §4.6 and
  §3.3–3.4, and Fraley & Raftery 2007 for the Gaussian covariance structures); for the
  Normal the formula itself is checked against a numerical maximizer of the log-posterior.
* ``logpost − loglik`` is the prior's normalized log density at the fitted parameters in
  the data's units (scipy.stats), which also checks the units conversion of the priors.
* A prior that weakens approaches the maximum-likelihood fit; the log-posterior never
  decreases in K = 3 mixtures with priors and holes; ``prior="weak"`` has the documented
  hyperparameters.
* Priors round-trip through ``Model.to_dict`` and ``em.load``; bad input is a ``ModelError``
  naming the prior (or family, or option) and what is wrong.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.stats as st
import xarray as xr
from scipy.optimize import minimize

import emdsl as em
from emdsl import priors

RNG = np.random.default_rng(20261202)


def one(values: xr.DataArray) -> np.ndarray:
    """A single component's parameter as a plain array."""
    return np.asarray(values.values, dtype=float)


def fit_one(family: em.families.ObservedFamily, x: np.ndarray, **kwargs) -> em.Fit:
    """Fit one component (no latent) to x (n,) or (n, D)."""
    dims = ("sample",) if x.ndim == 1 else ("sample", "feature")
    ds = xr.Dataset({"x": (dims, x)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", em.ConvergenceWarning)
        return em.Model().observe("x", family).fit(ds, seed=0, **kwargs)


# -- one component: the posterior mode in closed form ---------------------------------------


def test_normal_map_is_the_normal_inverse_gamma_mode():
    x = RNG.normal(40.0, 7.0, size=60)
    m, kappa, a, b = 35.0, 3.0, 2.5, 80.0
    fit = fit_one(em.Normal(prior=priors.NormalInverseGamma(mean=m, kappa=kappa, shape=a, scale=b)), x)
    n, xbar = len(x), x.mean()
    ss = ((x - xbar) ** 2).sum()
    # Murphy §4.6.3 (NIG in the (μ, σ²) parameterization), joint mode:
    mean = (kappa * m + n * xbar) / (kappa + n)
    variance = (2 * b + ss + kappa * n / (kappa + n) * (xbar - m) ** 2) / (n + 2 * a + 3)
    np.testing.assert_allclose(one(fit.params["x"]["mean"]), mean, rtol=1e-12)
    np.testing.assert_allclose(one(fit.params["x"]["variance"]), variance, rtol=1e-12)

    # ... and that formula is the argmax over (μ, σ²) of log N(x | μ, σ²) + log NIG(μ, σ²), found numerically.
    best = minimize(lambda t: -(st.norm.logpdf(x, t[0], np.sqrt(t[1])).sum()
                                + st.norm.logpdf(t[0], m, np.sqrt(t[1] / kappa))
                                + st.invgamma.logpdf(t[1], a, scale=b)),
                    x0=[xbar, x.var()], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
    np.testing.assert_allclose(best.x, [mean, variance], rtol=1e-6)
    # logpost − loglik is the prior's log density at the estimate, in the data's units.
    prior = st.norm.logpdf(mean, m, np.sqrt(variance / kappa)) + st.invgamma.logpdf(variance, a, scale=b)
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]), prior, rtol=1e-10)


def niw_case(D: int = 3, n: int = 40) -> tuple[np.ndarray, dict]:
    """Data far from 0 and on unequal scales (so the units conversion matters), and a NIW prior."""
    scales = np.array([1.0, 50.0, 0.02])[:D]
    A = RNG.normal(size=(D, D))
    x = (RNG.normal(size=(n, D)) @ (np.eye(D) + 0.5 * A)) * scales + np.array([100.0, -3000.0, 0.5])[:D]
    psi = np.diag(scales**2) * 2.0 + 0.3 * np.outer(scales, scales)
    hyper = {"mean": np.array([101.0, -2990.0, 0.4])[:D], "kappa": 2.0, "dof": D + 3.0, "scale": psi}
    return x, hyper


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_multivariate_normal_map_is_the_normal_inverse_wishart_mode(covariance):
    x, h = niw_case()
    n, D = x.shape
    fit = fit_one(em.MultivariateNormal(covariance=covariance, prior=priors.NormalInverseWishart(**h)), x)
    m, kappa, nu, psi = h["mean"], h["kappa"], h["dof"], h["scale"]
    xbar = x.mean(axis=0)
    S = (x - xbar).T @ (x - xbar)
    shrink = kappa * n / (kappa + n) * np.outer(xbar - m, xbar - m)
    mean = (kappa * m + n * xbar) / (kappa + n)
    # Murphy §4.6.3.4 (NIW joint mode), and Fraley & Raftery (2007) Table 2 for the others:
    expected = {
        "full": (psi + S + shrink) / (n + nu + D + 2),
        "tied": (psi + S + shrink) / (n + 1 + nu + D + 1),  # K = 1 state
        "diag": (np.diag(psi) + np.diag(S) + np.diag(shrink)) / (n + nu + 3),
        "spherical": (np.trace(psi) / D + np.trace(S) + np.trace(shrink)) / (n * D + D + nu + 2),
    }[covariance]
    np.testing.assert_allclose(one(fit.params["x"]["mean"]), mean, rtol=1e-10)
    np.testing.assert_allclose(one(fit.params["x"]["covariance"]), expected, rtol=1e-9)
    cov = one(fit.params["x"]["covariance"])
    if covariance in ("full", "tied"):
        prior = st.multivariate_normal.logpdf(mean, m, cov / kappa) + st.invwishart.logpdf(cov, df=nu, scale=psi)
    elif covariance == "diag":
        prior = (st.norm.logpdf(mean, m, np.sqrt(cov / kappa)).sum()
                 + st.invgamma.logpdf(cov, nu / 2, scale=np.diag(psi) / 2).sum())
    else:
        prior = (st.norm.logpdf(mean, m, np.sqrt(cov / kappa)).sum()
                 + st.invgamma.logpdf(cov, nu / 2, scale=np.trace(psi) / (2 * D)))
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]), prior, rtol=1e-9)


def test_count_and_label_maps_are_their_conjugate_modes():
    counts = RNG.poisson(3.5, size=50).astype(float)
    fit = fit_one(em.Poisson(prior=priors.Gamma(shape=4.0, rate=2.0)), counts)
    rate = (counts.sum() + 4.0 - 1) / (len(counts) + 2.0)  # Gamma(α, β) mode, Murphy §3.3
    np.testing.assert_allclose(one(fit.params["x"]["rate"]), rate, rtol=1e-12)
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]),
                               st.gamma.logpdf(rate, 4.0, scale=1 / 2.0), rtol=1e-12)

    waits = RNG.exponential(2.0, size=50)
    fit = fit_one(em.Exponential(prior=priors.Gamma(shape=3.0, rate=1.5)), waits)
    np.testing.assert_allclose(one(fit.params["x"]["rate"]), (50 + 3.0 - 1) / (waits.sum() + 1.5), rtol=1e-12)

    coins = (RNG.random(40) < 0.8).astype(float)
    fit = fit_one(em.Bernoulli(prior=priors.Beta(3.0, 5.0)), coins)
    p = (coins.sum() + 3.0 - 1) / (len(coins) + 3.0 + 5.0 - 2)  # Beta mode, Murphy §3.3.3
    np.testing.assert_allclose(one(fit.params["x"]["probs"]), p, rtol=1e-12)
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]), st.beta.logpdf(p, 3.0, 5.0),
                               rtol=1e-12)

    successes = RNG.binomial(12, 0.3, size=30).astype(float)
    fit = fit_one(em.Binomial(12, prior=priors.Beta(2.0, 2.0)), successes)
    np.testing.assert_allclose(one(fit.params["x"]["probs"]), (successes.sum() + 1) / (12 * 30 + 2), rtol=1e-12)

    labels = RNG.choice(["a", "b", "c"], p=[0.6, 0.3, 0.1], size=45).astype(object)
    alpha = np.array([2.0, 1.0, 4.0])
    fit = fit_one(em.Categorical(["a", "b", "c"], prior=priors.Dirichlet(alpha)), labels)
    tally = np.array([(labels == level).sum() for level in "abc"])
    probs = (tally + alpha - 1) / (len(labels) + alpha.sum() - 3)  # Dirichlet mode, Murphy §3.4
    np.testing.assert_allclose(one(fit.params["x"]["probs"]).ravel(), probs, rtol=1e-12)
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]),
                               st.dirichlet.logpdf(probs, alpha), rtol=1e-12)

    events = RNG.multinomial(10, [0.5, 0.3, 0.2], size=25).astype(float)
    fit = fit_one(em.Multinomial(prior=priors.Dirichlet([3.0, 1.0, 2.0])), events)
    total = events.sum(axis=0) + np.array([3.0, 1.0, 2.0]) - 1
    np.testing.assert_allclose(one(fit.params["x"]["probs"]).ravel(), total / total.sum(), rtol=1e-12)

    sizes = RNG.lognormal(1.0, 0.5, size=40)
    fit = fit_one(em.LogNormal(prior=priors.NormalInverseGamma(mean=0.0, kappa=1.0, shape=2.0, scale=1.0)), sizes)
    y = np.log(sizes)
    mean = y.sum() / (1.0 + len(y))
    variance = (2.0 + ((y - y.mean()) ** 2).sum() + len(y) / (1 + len(y)) * y.mean() ** 2) / (len(y) + 4 + 3)
    np.testing.assert_allclose(one(fit.params["x"]["mean"]), mean, rtol=1e-12)
    np.testing.assert_allclose(one(fit.params["x"]["variance"]), variance, rtol=1e-12)


def test_latent_weights_map_is_the_dirichlet_mode():
    # Two clusters so far apart that every responsibility is exactly 0 or 1.
    x = np.concatenate([RNG.normal(0.0, 1.0, 30), RNG.normal(1000.0, 1.0, 70)])
    ds = xr.Dataset({"x": ("sample", x)})
    start = xr.DataArray(np.eye(2)[(x > 500).astype(int)], dims=("sample", "z"))
    model = em.Model().latent("z", em.Categorical(2, prior=priors.Dirichlet([3.0, 5.0]))).observe("x", em.Normal)
    fit = model.fit(ds, init=start)
    np.testing.assert_allclose(fit.params["z"]["probs"].values, [(30 + 2) / 106, (70 + 4) / 106], rtol=1e-12)
    probs = fit.params["z"]["probs"].values
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]),
                               st.dirichlet.logpdf(probs, [3.0, 5.0]), rtol=1e-10)


def test_tied_variance_has_one_inverse_gamma_prior():
    x = np.concatenate([RNG.normal(10.0, 2.0, 25), RNG.normal(900.0, 2.0, 35)])
    ds = xr.Dataset({"x": ("sample", x)})
    start = xr.DataArray(np.eye(2)[(x > 500).astype(int)], dims=("sample", "z"))
    m, kappa, a, b = 400.0, 0.5, 2.0, 10.0
    model = em.Model().latent("z", em.Categorical(2)).observe(
        "x", em.Normal(tied="variance", prior=priors.NormalInverseGamma(m, kappa, a, b)))
    fit = model.fit(ds, init=start)
    groups = [x[x < 500], x[x > 500]]
    means = [(kappa * m + g.sum()) / (kappa + len(g)) for g in groups]
    spread = sum(((g - g.mean()) ** 2).sum() + kappa * len(g) / (kappa + len(g)) * (g.mean() - m) ** 2
                 for g in groups)
    variance = (2 * b + spread) / (len(x) + 2 + 2 * a + 2)  # Fraley & Raftery (2007), model "E"
    np.testing.assert_allclose(fit.params["x"]["mean"].values.ravel(), means, rtol=1e-12)
    np.testing.assert_allclose(one(fit.params["x"]["variance"]), variance, rtol=1e-12)
    prior = (st.norm.logpdf(means, m, np.sqrt(variance / kappa)).sum() + st.invgamma.logpdf(variance, a, scale=b))
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]), prior, rtol=1e-10)


# -- weak priors approach maximum likelihood; BIC stays the likelihood's --------------------


def test_a_weakening_prior_approaches_the_maximum_likelihood_fit():
    n = 300
    z = RNG.random(n) < 0.4
    ds = xr.Dataset({"c": ("sample", RNG.poisson(np.where(z, 2.0, 9.0)).astype(float)),
                     "b": (("sample", "item"), (RNG.random((n, 3)) < np.where(z, 0.2, 0.7)[:, None]).astype(float)),
                     "k": ("sample", np.where(z, RNG.choice(["u", "v"], n, p=[0.8, 0.2]),
                                              RNG.choice(["u", "v"], n, p=[0.3, 0.7])).astype(object))})

    def model(t):
        if t is None:
            return em.Model().latent("z", em.Categorical(2)).observe("c", em.Poisson).observe(
                "b", em.Bernoulli).observe("k", em.Categorical)
        return (em.Model()
                .latent("z", em.Categorical(2, prior=priors.Dirichlet(1 + t)))
                .observe("c", em.Poisson(prior=priors.Gamma(1 + 5 * t, t)))
                .observe("b", em.Bernoulli(prior=priors.Beta(1 + t, 1 + 2 * t)))
                .observe("k", em.Categorical(prior=priors.Dirichlet([1 + 3 * t, 1 + t]))))

    mle = model(None).fit(ds, seed=1, tol=1e-13)
    gaps = []
    for t in (1.0, 0.1, 0.01, 0.001):
        fit = model(t).fit(ds, init=mle, tol=1e-13)
        gaps.append({(node, p): float(np.max(np.abs(fit.params[node][p].values - mle.params[node][p].values)))
                     for node, p in [("z", "probs"), ("c", "rate"), ("b", "probs"), ("k", "probs")]})
    for key in gaps[0]:
        series = [g[key] for g in gaps]
        assert all(later < earlier for earlier, later in itertools.pairwise(series)), (key, series)
        assert series[-1] < 1e-4 * max(1.0, float(np.max(mle.params[key[0]][key[1]].values)))
    # BIC and AIC stay the log-likelihood's, never the log-posterior's.
    assert fit.loglik == float(fit.trace.loglik[-1]) != float(fit.trace.logpost[-1])
    assert fit.bic() == pytest.approx(-2 * fit.loglik + fit.n_params * np.log(n), rel=1e-12)


def test_a_weakening_normal_inverse_gamma_leaves_the_joint_modes_three_pseudo_counts():
    """The mean tends to x̄; the variance to S / (n + 3), not S / n: the mode of p(μ, σ²) counts
    σ²'s own prior (a + 1) and μ's (½) whatever their scale (mclust's VVI/V denominators)."""
    x = RNG.normal(5.0, 2.0, size=30)
    n, xbar, ss = len(x), x.mean(), ((x - x.mean()) ** 2).sum()
    previous = np.inf
    for t in (1.0, 1e-2, 1e-4, 1e-6):
        fit = fit_one(em.Normal(prior=priors.NormalInverseGamma(0.0, t, t, t)), x)
        gap = max(abs(one(fit.params["x"]["mean"]) - xbar) / abs(xbar),
                  abs(one(fit.params["x"]["variance"]) - ss / (n + 3)) / (ss / n))
        assert gap < previous
        previous = gap
    assert previous < 1e-5


# -- the log-posterior never decreases ---------------------------------------------------------


def holed(x: np.ndarray, share: float) -> np.ndarray:
    x = np.array(x, dtype=float)
    x[RNG.random(x.shape) < share] = np.nan
    return x


def mixed_data(n: int = 240) -> xr.Dataset:
    z = RNG.integers(3, size=n)
    centers = np.array([[0, 0, 0], [3, -2, 1], [-3, 2, 4]], dtype=float)
    x = centers[z] + RNG.normal(size=(n, 3)) @ np.array([[1, 0.4, 0], [0, 1, 0.3], [0, 0, 1]])
    return xr.Dataset({
        "x": (("sample", "feature"), holed(x, 0.1)),
        "y": ("sample", holed(np.array([-2.0, 0.0, 3.0])[z] + RNG.normal(size=n), 0.1)),
        "c": ("sample", holed(RNG.poisson(np.array([1.0, 4.0, 9.0])[z]).astype(float), 0.1)),
        "b": ("sample", holed((RNG.random(n) < np.array([0.1, 0.5, 0.9])[z]).astype(float), 0.1)),
        "s": ("sample", holed(RNG.lognormal(np.array([0.0, 1.0, 2.0])[z], 0.4), 0.1)),
        "w": ("sample", holed(RNG.exponential(np.array([1.0, 0.3, 3.0])[z]), 0.1)),
        "k": ("sample", np.where(RNG.random(n) < 0.1, None,
                                 np.array(["u", "v", "w"], dtype=object)[(z + (RNG.random(n) < 0.3)) % 3])),
        "m": (("sample", "word"), RNG.multinomial(8, [0.2, 0.3, 0.5], size=n).astype(float)),
    })


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical", "tied"])
@pytest.mark.parametrize("how", ["declared", "weak"])
def test_log_posterior_never_decreases_with_priors_and_holes(covariance, how):
    ds = mixed_data()
    niw = priors.NormalInverseWishart(mean=0.0, kappa=0.5, dof=5.0, scale=[1.0, 2.0, 0.5])
    declared = how == "declared"
    model = (em.Model()
             .latent("z", em.Categorical(3, prior=priors.Dirichlet(2.0) if declared else None))
             .observe("x", em.MultivariateNormal(covariance=covariance, prior=niw if declared else None))
             .observe("y", em.Normal(prior=priors.NormalInverseGamma(0.0, 0.1, 2.0, 1.0) if declared else None))
             .observe("c", em.Poisson(prior=priors.Gamma(2.0, 0.5) if declared else None))
             .observe("b", em.Bernoulli(prior=priors.Beta(2.0, 2.0) if declared else None))
             .observe("s", em.LogNormal(prior=priors.NormalInverseGamma(1.0, 0.1, 2.0, 0.5) if declared else None))
             .observe("w", em.Exponential(prior=priors.Gamma(1.5, 1.0) if declared else None))
             .observe("k", em.Categorical(prior=priors.Dirichlet(1.5) if declared else None))
             .observe("m", em.Multinomial(prior=priors.Dirichlet([2.0, 2.0, 2.0]) if declared else None)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        fit = model.fit(ds, seed=3, n_init=2, max_iter=60, prior=None if declared else "weak")
    traces = fit.traces
    for r in np.unique(traces["restart"].values):
        one_run = traces.isel(step=np.flatnonzero(traces["restart"].values == r))
        logpost, slack = one_run["logpost"].values, one_run["slack"].values
        assert np.all(np.diff(logpost) >= -slack[1:])
        assert np.all(logpost != one_run["loglik"].values)  # a prior is present at every step
    # The kept restart is the one highest on the objective EM climbed.
    finals = [traces["logpost"].values[np.flatnonzero(traces["restart"].values == r)[-1]]
              for r in np.unique(traces["restart"].values)]
    assert float(fit.trace.logpost[-1]) == max(finals)


# -- prior="weak": documented hyperparameters--------------------------------


def test_weak_prior_has_the_documented_hyperparameters():
    """logpost − loglik at the fit equals the documented weak prior's density (scipy), in the data's units."""
    x = np.concatenate([RNG.normal([0, 0], [1, 3], size=(80, 2)), RNG.normal([4, 20], [2, 1], size=(60, 2))])
    x = x @ np.array([[1.0, 0.3], [0.0, 1.0]]) + [10.0, -50.0]
    y = np.concatenate([RNG.poisson(2.0, 80), RNG.poisson(7.0, 60)]).astype(float)
    ds = xr.Dataset({"x": (("sample", "feature"), x), "y": ("sample", y)})
    K, D = 2, 2
    fit = (em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal).observe("y", em.Poisson)
           .fit(ds, seed=0, prior="weak"))
    p = {name: {k: v.values for k, v in fit.params[name].items()} for name in ("z", "x", "y")}
    cov = np.cov(x.T, bias=True)
    expected = st.dirichlet.logpdf(p["z"]["probs"], np.full(K, 1 + 0.01 / K))
    for k in range(K):
        expected += st.multivariate_normal.logpdf(p["x"]["mean"][k], x.mean(axis=0), p["x"]["covariance"][k] / 0.01)
        # ν = D + 2 and Ψ = ν · cov / K^(2/D): ν times mclust's scale, E[Σ⁻¹] = (cov / K^(2/D))⁻¹
        expected += st.invwishart.logpdf(p["x"]["covariance"][k], df=D + 2, scale=(D + 2) * cov * K ** (-2 / D))
        expected += st.gamma.logpdf(p["y"]["rate"][k], 1 + 0.01 * y.mean(), scale=1 / 0.01)
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]), expected, rtol=1e-9)


@pytest.mark.parametrize("covariance", ["full", "tied"])
def test_weak_prior_of_collinear_columns_takes_their_variances(covariance):
    """A duplicated column makes the data's covariance singular (rounding left its smallest eigenvalue at
    +6e-16 in a fuzz case): Ψ is then ν · diag(var(x)) / K^(2/D), as documented, and the log-posterior is
    finite. It was −∞ at every iteration (log |Ψ| = −∞), with an infinite rounding slack (found by a fuzz
    run; 23 of 40 draws of these data)."""
    rng = np.random.default_rng(3)
    a = np.r_[rng.normal(-2, 1, 60), rng.normal(2, 1, 60)]
    x = np.column_stack([a, a, a + rng.normal(size=120)])
    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    K, D = 2, 3
    fit = (em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal(covariance=covariance, floor=0.01))
           .fit(ds, seed=0, prior="weak"))
    assert np.isfinite(fit.traces["logpost"].values).all() and np.isfinite(fit.traces["slack"].values).all()
    assert np.all(np.diff(fit.trace.logpost.values) >= -fit.trace.slack.values[1:])
    p = {name: {k: v.values for k, v in fit.params[name].items()} for name in ("z", "x")}
    covs = np.broadcast_to(p["x"]["covariance"], (K, D, D))
    scale = (D + 2) * np.diag(x.var(axis=0)) * K ** (-2 / D)
    expected = st.dirichlet.logpdf(p["z"]["probs"], np.full(K, 1 + 0.01 / K))
    for k in range(K):
        expected += st.multivariate_normal.logpdf(p["x"]["mean"][k], x.mean(axis=0), covs[k] / 0.01)
        if covariance == "full" or k == 0:  # one inverse-Wishart for the tied Σ
            expected += st.invwishart.logpdf(covs[k], df=D + 2, scale=scale)
    np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]), expected, rtol=1e-9)


def test_weak_prior_of_a_normal_is_the_multivariate_one_in_one_dimension():
    """Normal: NIG(mean, 0.01, 3/2, 3 var / (2K²)), which is the MultivariateNormal's weak prior with D = 1."""
    x = np.concatenate([RNG.normal(0.0, 1.0, 70), RNG.normal(6.0, 2.0, 50)]) * 10.0 + 3.0
    ds = xr.Dataset({"x": ("sample", x)})
    K = 2

    def expected(probs, mean, variance):
        return (st.dirichlet.logpdf(probs, np.full(K, 1 + 0.01 / K))
                + (st.norm.logpdf(mean, x.mean(), np.sqrt(variance / 0.01))
                   + st.invgamma.logpdf(variance, 1.5, scale=3 * x.var() / (2 * K**2))).sum())

    fits = [em.Model().latent("z", em.Categorical(K)).observe("x", em.Normal).fit(ds, seed=0, prior="weak"),
            em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal)
            .fit(ds.expand_dims(feature=1, axis=1), seed=0, prior="weak")]
    for fit in fits:
        p = fit.params
        variance = p["x"]["variance"] if "variance" in p["x"] else p["x"]["covariance"]
        want = expected(p["z"]["probs"].values, np.ravel(p["x"]["mean"].values), np.ravel(variance.values))
        np.testing.assert_allclose(float(fit.trace.logpost[-1] - fit.trace.loglik[-1]), want, rtol=1e-9)


def test_weighted_weak_prior_equals_the_expanded_table():
    x = RNG.normal(size=30)
    counts = RNG.integers(1, 4, size=30)
    start = {"z": {"probs": [0.5, 0.5]}, "x": {"mean": [-0.5, 0.5], "variance": [1.0, 1.0]}}
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    # plain EM (accelerate=None): the same M-steps on both sides, so the same stopping iteration
    weighted = model.fit(xr.Dataset({"x": ("sample", x), "n": ("sample", counts.astype(float))}),
                         weights="n", init=start, prior="weak", accelerate=None)
    expanded = model.fit(xr.Dataset({"x": ("sample", np.repeat(x, counts))}), init=start, prior="weak",
                         accelerate=None)
    for node, param in [("z", "probs"), ("x", "mean"), ("x", "variance")]:
        np.testing.assert_allclose(weighted.params[node][param].values, expanded.params[node][param].values,
                                   rtol=1e-9)
    np.testing.assert_allclose(float(weighted.trace.logpost[-1]), float(expanded.trace.logpost[-1]), rtol=1e-11)



def test_priors_round_trip_through_the_declaration_and_files(tmp_path):
    label_alpha = xr.DataArray([1.0, 2.0, 3.0], dims="level", coords={"level": ["u", "v", "w"]})
    model = (em.Model()
             .latent("z", em.Categorical(3, prior=priors.Dirichlet([2.0, 3.0, 4.0])))
             .observe("x", em.MultivariateNormal(prior=priors.NormalInverseWishart(
                 mean=[0.0, 1.0, 2.0], kappa=0.5, dof=6, scale=np.eye(3))))
             .observe("y", em.Normal(prior=priors.NormalInverseGamma(0.0, 0.1, 2.0, 1.0)))
             .observe("c", em.Poisson(prior=priors.Gamma(2.0, 0.5)))
             .observe("k", em.Categorical(prior=priors.Dirichlet(label_alpha))))
    back = em.Model.from_json(model.to_json())
    assert back == model and repr(back) == repr(model)
    assert back.observed[0].family.prior == model.observed[0].family.prior
    ds = mixed_data()
    fit = model.fit(ds, seed=0, max_iter=20, tol=0)
    path = tmp_path / "fit.nc"
    fit.save(path)
    loaded = em.load(path)
    assert loaded.model == model
    np.testing.assert_array_equal(loaded.trace["logpost"].values, fit.trace["logpost"].values)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: priors.NormalInverseGamma(0.0, 0.0, 1.0, 1.0), r"NormalInverseGamma\(kappa=\.\.\.\): must be finite and > 0, got 0\.0"),
    (lambda: priors.NormalInverseGamma(np.nan, 1.0, 1.0, 1.0), r"NormalInverseGamma\(mean=\.\.\.\): must be finite"),
    (lambda: priors.NormalInverseGamma(0.0, 1.0, [1.0, -2.0], 1.0), r"NormalInverseGamma\(shape=\.\.\.\).*-2\.0"),
    (lambda: priors.NormalInverseGamma(0.0, 1.0, 1.0, "big"), r"NormalInverseGamma\(scale=\.\.\.\): expected a number"),
    (lambda: priors.NormalInverseWishart(0.0, 1.0, 5, [[1.0, 2.0], [2.0, 1.0]]),
     r"NormalInverseWishart\(scale=\.\.\.\): the scale matrix must be positive definite"),
    (lambda: priors.NormalInverseWishart(0.0, [1.0, 2.0], 5, 1.0), r"NormalInverseWishart\(kappa=\.\.\.\): expected one number"),
    (lambda: priors.Gamma(0.5, 1.0), r"Gamma\(shape=\.\.\.\): must be finite and >= 1, got 0\.5"),
    (lambda: priors.Gamma(2.0, 0.0), r"Gamma\(rate=\.\.\.\): must be finite and > 0"),
    (lambda: priors.Beta(0.5, 2.0), r"Beta\(a=\.\.\.\): must be finite and >= 1"),
    (lambda: priors.Dirichlet([1.0, 0.2]), r"Dirichlet\(alpha=\.\.\.\): must be finite and >= 1, got 0\.2"),
    (lambda: em.Gamma(prior=priors.Gamma(2.0, 1.0)), r"Gamma\(prior=\.\.\.\): no conjugate prior is available for Gamma"),
    (lambda: em.Beta(prior=priors.Beta(2.0, 2.0)), r"Beta\(prior=\.\.\.\): no conjugate prior is available for Beta"),
    (lambda: em.VonMises(prior=priors.Gamma(2.0, 1.0)), r"VonMises\(prior=\.\.\.\): no conjugate prior is available"),
    (lambda: em.Normal(prior=priors.Gamma(2.0, 1.0)), r"Normal\(prior=\.\.\.\): Normal takes an em\.priors\.NormalInverseGamma"),
    (lambda: em.Poisson(prior="weak"), r"Poisson\(prior=\.\.\.\): Poisson takes an em\.priors\.Gamma, got 'weak'"),
])
def test_bad_priors_are_model_errors_naming_what_is_wrong(make, message):
    with pytest.raises(em.ModelError, match=message):
        make()


def test_bad_priors_found_against_the_data_and_unknown_options():
    ds = xr.Dataset({"x": (("sample", "feature"), RNG.normal(size=(50, 3)))})
    few = em.MultivariateNormal(prior=priors.NormalInverseWishart(0.0, 1.0, dof=1.5, scale=1.0))
    with pytest.raises(em.ModelError, match=r"observe\('x', MultivariateNormal\).*dof must be > D - 1 = 2"):
        em.Model().observe("x", few).fit(ds)
    wrong = em.MultivariateNormal(prior=priors.NormalInverseWishart([0.0, 1.0], 1.0, dof=5, scale=1.0))
    with pytest.raises(em.ModelError, match=r"NormalInverseWishart\(mean=\.\.\.\): expected shape \(3,\)"):
        em.Model().observe("x", wrong).fit(ds)
    levels = xr.Dataset({"k": ("sample", np.array(["a", "b", "a", "c"], dtype=object))})
    with pytest.raises(em.ModelError, match=r"Dirichlet\(alpha=\.\.\.\): expected shape \(3,\)"):
        em.Model().observe("k", em.Categorical(prior=priors.Dirichlet([1.0, 2.0]))).fit(levels)
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal)
    with pytest.raises(em.ModelError, match=r"fit\(prior=\.\.\.\): expected None or 'weak'.*got 'strong'"):
        model.fit(ds, prior="strong")
    with pytest.raises(em.ModelError, match=r"fit\(prior=\.\.\.\).*part of its family's declaration"):
        model.fit(ds, prior=priors.Dirichlet(2.0))


def test_the_convergence_warning_names_the_log_posterior_it_tested(faithful):
    model = (em.Model().latent("z", em.Categorical(2))
             .observe(["eruptions", "waiting"], em.MultivariateNormal, name="x"))
    with pytest.warns(em.ConvergenceWarning, match=r"log-posterior.*tol·\|ℓ \+ log p\(θ\)\|") as caught:
        fit = model.fit(faithful, seed=0, prior="weak", max_iter=2, accelerate=None)
    change = float(np.diff(fit.trace["logpost"].values)[-1])
    assert f"{change:.3g}" in str(caught[0].message)
    with pytest.warns(em.ConvergenceWarning, match=r"log-likelihood.*tol·\|ℓ\|"):
        model.fit(faithful, seed=0, max_iter=2, accelerate=None)
