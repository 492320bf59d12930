"""fit.plot for models with regression nodes: each state's fitted line or mean curve against a covariate."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import xarray as xr
from scipy.special import expit

import emdsl as em
from emdsl.errors import ModelError


def regimes(n: int = 300, seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    dose, state = rng.uniform(0, 10, n), rng.random(n) < 0.5
    group = rng.choice(["a", "b", "c"], n)
    exposure = np.log(rng.uniform(0.5, 2, n))
    trials = rng.integers(1, 12, n)
    return xr.Dataset({
        "y": ("sample", np.where(state, 5 - 0.8 * dose, 1 + 0.6 * dose) + (group == "b") + rng.normal(0, 0.7, n)),
        "count": ("sample", rng.poisson(np.exp(np.where(state, 0.5 + 0.2 * dose, 2 - 0.15 * dose) + exposure))),
        "hits": ("sample", rng.binomial(trials, expit(np.where(state, -2 + 0.5 * dose, 2 - 0.5 * dose)))),
        "flag": ("sample", rng.binomial(1, expit(np.where(state, -2 + 0.5 * dose, 2 - 0.5 * dose)))),
        "other": ("sample", np.where(state, 0.0, 4.0) + rng.normal(0, 1, n)),
        "dose": ("sample", dose), "group": ("sample", group), "log_exposure": ("sample", exposure),
        "trials": ("sample", trials)})


def lines(ax) -> dict[str, object]:
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


def test_a_mixture_of_normal_regressions_shows_each_state_s_line():
    ds = regimes()
    fit = em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal, covariates=["dose", "group"]).fit(
        ds, seed=0)
    fig = fit.plot.components()
    (ax,) = fig.axes
    drawn = lines(ax)
    assert set(drawn) == {"line-0", "line-1"}
    coef = fit.params["y"]["coef"].values
    # the other terms at their mean over the data: group[b] and group[c] at their shares
    shares = [np.mean(ds["group"].values == level) for level in ("b", "c")]
    colors = []
    for k in range(2):
        x, y = drawn[f"line-{k}"].get_data()
        expected = coef[k, 0] + coef[k, 1] * x + coef[k, 2] * shares[0] + coef[k, 3] * shares[1]
        np.testing.assert_allclose(y, expected, rtol=1e-12)
        assert x.min() < ds["dose"].min() and x.max() > ds["dose"].max()
        colors.append(tuple(np.asarray(drawn[f"line-{k}"].get_color(), dtype=float)))
    assert colors[0] != colors[1]
    bands = [c for c in ax.collections if (c.get_gid() or "").startswith("band-")]
    assert len(bands) == 2  # ±1σ per state
    (points,) = [c for c in ax.collections if c.get_gid() == "data"]
    assert len(points.get_offsets()) == ds.sizes["sample"]
    assert ax.get_xlabel() == "dose" and ax.get_ylabel() == "y"
    # the same picture by name, in either order, and against the categorical covariate
    for call in (lambda: fit.plot.components("y"), lambda: fit.plot.components(x="dose", y="y"),
                 lambda: fit.plot.components(x="y", y="dose")):
        np.testing.assert_allclose(lines(call().axes[0])["line-1"].get_ydata(), drawn["line-1"].get_ydata())
    by_group = fit.plot.components(x="group", y="y").axes[0]
    assert [t.get_text() for t in by_group.get_xticklabels()] == ["a", "b", "c"]
    np.testing.assert_allclose(lines(by_group)["line-0"].get_ydata(),
                               coef[0, 0] + coef[0, 1] * ds["dose"].values.mean() + np.r_[0, coef[0, 2], coef[0, 3]])


@pytest.mark.parametrize("kind", ["poisson", "binomial", "bernoulli"])
def test_glm_mixtures_show_each_state_s_mean_curve(kind):
    ds = regimes(seed=1)
    model = em.Model().latent("z", em.Categorical(2))
    if kind == "poisson":
        model = model.observe("count", em.Poisson, covariates=["dose"], offset="log_exposure")
    elif kind == "binomial":
        model = model.observe("hits", em.Binomial(trials="trials"), covariates=["dose"])
    else:
        model = model.observe("flag", em.Bernoulli, covariates=["dose"])
    fit = model.fit(ds, seed=0)
    name = fit.model.observed[0].name
    ax = fit.plot.components().axes[0]
    drawn = lines(ax)
    assert set(drawn) == {"line-0", "line-1"}
    coef = fit.params[name]["coef"].values
    for k in range(2):
        x, y = drawn[f"line-{k}"].get_data()
        eta = coef[k, 0] + coef[k, 1] * x
        np.testing.assert_allclose(y, np.exp(eta) if kind == "poisson" else expit(eta), rtol=1e-9)
    (points,) = [c for c in ax.collections if c.get_gid() == "data"]
    shown = points.get_offsets()[:, 1]
    if kind == "poisson":  # counts per unit exposure, against the rate curves
        np.testing.assert_allclose(shown, ds["count"].values * np.exp(-ds["log_exposure"].values))
    elif kind == "binomial":  # the observed share of successes
        np.testing.assert_allclose(shown, ds["hits"].values / ds["trials"].values)
    else:
        np.testing.assert_array_equal(shown, ds["flag"].values)


def test_concomitant_weights_and_mixed_models_plot():
    ds = regimes(seed=2)
    model = (em.Model().latent("z", em.Categorical(2), covariates=["dose"])
             .observe("other", em.Normal).observe("y", em.Normal, covariates=["dose"]))
    fit = model.fit(ds, seed=0)
    # the first continuous element is a plain Normal: its histogram, as before (weights: the mean posterior)
    ax = fit.plot.components().axes[0]
    assert {"density-0", "density-1", "mixture"} <= set(lines(ax))
    assert lines(fit.plot.components("y").axes[0]).keys() == {"line-0", "line-1"}
    assert len(fit.plot.posterior().axes) == 2
    assert len(fit.plot.convergence().axes) == 2
    with pytest.raises(ModelError, match="regression on \\['dose'\\]"):
        fit.plot.components(x="other", y="y")


def test_a_regression_plot_on_new_data_and_on_given_axes():
    ds = regimes(seed=3)
    fit = em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal, covariates=["dose"]).fit(ds, seed=0)
    from emdsl.plot import new_figure

    ax = new_figure().add_subplot()
    assert fit.plot.components(ax=ax, data=ds.isel(sample=slice(0, 50))) is ax
    (points,) = [c for c in ax.collections if c.get_gid() == "data"]
    assert len(points.get_offsets()) == 50
    with pytest.raises(ModelError, match="dose"):
        fit.plot.components(data=ds.drop_vars("dose"))


def test_a_switching_regression_over_padded_sequences_draws_the_observed_steps():
    """Sequences of different lengths (NaN padding in response and covariate alike): the fit skips
    the padding, and so does the plot (it refused the padding's missing covariates)."""
    rng = np.random.default_rng(0)
    u = rng.uniform(-2, 2, (3, 60))
    y = np.where((np.arange(60) // 15) % 2 == 0, 1 + 2 * u, -1 - u) + rng.normal(0, 0.3, (3, 60))
    y[1, 50:] = u[1, 50:] = np.nan
    y[2, 40:] = u[2, 40:] = np.nan
    ds = xr.Dataset({"y": (("seq", "time"), y), "u": (("seq", "time"), u)})
    fit = (em.Model().latent("z", em.Categorical(2), markov="time").observe("y", em.Normal, covariates=["u"])
           .fit(ds, seed=0))
    fig = fit.plot.components()
    points = sum(len(c.get_offsets()) for c in fig.axes[0].collections if c.get_gid() == "data")
    assert points == 60 + 50 + 40
