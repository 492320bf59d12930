"""Partly labelled latents: a data variable named like the latent clamps the known samples (issue 8)."""

import numpy as np
import pytest
import xarray as xr

import emdsl as em

IRIS_STATES = ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_iris()
    return data.data, np.array(IRIS_STATES, dtype=object)[data.target]


def iris_model() -> em.Model:
    return em.Model().latent("species", em.Categorical(IRIS_STATES)).observe("x", em.MultivariateNormal)


def test_every_label_known_gives_the_supervised_estimates(iris):
    X, species = iris
    ds = xr.Dataset({"x": (("sample", "feature"), X), "species": ("sample", species)})
    fit = iris_model().fit(ds, seed=0)
    for k, state in enumerate(IRIS_STATES):
        rows = X[species == state]
        np.testing.assert_allclose(fit.params["x"]["mean"].sel(species=state), rows.mean(0), rtol=1e-12)
        np.testing.assert_allclose(fit.params["x"]["covariance"].sel(species=state),
                                   np.cov(rows.T, bias=True), rtol=1e-10)
    np.testing.assert_allclose(fit.params["species"]["probs"], [1 / 3] * 3, rtol=1e-12)
    # the posterior of a labelled sample is its label, and ℓ is log p(x, labels)
    assert (fit.posterior.argmax("species").values == np.searchsorted(IRIS_STATES, species)).all()
    assert fit.loglik == pytest.approx(float(fit.score_samples(ds).sum()), rel=1e-12)


def accuracy_either_way(predicted: np.ndarray, truth: np.ndarray) -> float:
    return max(float((predicted == truth).mean()), float((predicted == 1 - truth).mean()))


def test_a_few_labels_raise_the_accuracy_on_the_others():
    # The class lives in x2 (means ±1.2, sd 1: the Bayes accuracy is Φ(1.2) = 0.885); x1 is
    # bimodal and unrelated to the class, and unlabelled EM from this seed splits along it.
    rng = np.random.default_rng(1)
    n = 600
    z = rng.integers(0, 2, n)
    X = np.c_[rng.choice([-3.0, 3.0], n) + rng.normal(0, 1, n), rng.normal(np.where(z, 1.2, -1.2), 1.0, n)]
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal(covariance="diag"))
    unsupervised = accuracy_either_way(model.fit(ds, seed=1).predict(ds).values, z)
    known = np.where(rng.random(n) < 0.1, z.astype(float), np.nan)
    fit = model.fit(ds.assign(z=("sample", known)), seed=1)
    unknown = np.isnan(known)
    guided = float((fit.predict(ds).values == z)[unknown].mean())
    # 0.80 is about six standard errors (√(0.885·0.115/540) ≈ 0.014) below the Bayes rate;
    # the unlabelled fit is near chance (0.5), so the margin cannot come from luck.
    assert unsupervised < 0.6 and guided > 0.80


def test_labels_may_be_state_names_codes_or_missing(iris):
    X, species = iris
    partial = species.copy()
    partial[::3] = None
    ds = xr.Dataset({"x": (("sample", "feature"), X), "species": ("sample", partial)})
    fit = iris_model().fit(ds, seed=0)
    labelled = np.flatnonzero(partial != None)  # noqa: E711
    assert (fit.posterior.isel(sample=labelled).max("species") == 1.0).all()
    codes = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal).fit(
        xr.Dataset({"x": (("sample", "feature"), X), "z": ("sample", np.where(np.arange(150) % 2, np.nan, 1.0))}),
        seed=0)
    assert (codes.predict(xr.Dataset({"x": (("sample", "feature"), X[::2])})).values == 1).mean() > 0.3
    assert (codes.posterior.isel(sample=slice(0, None, 2)).sel(z=1) == 1.0).all()


def test_a_label_that_is_not_a_state_is_named(iris):
    X, species = iris
    bad = species.copy()
    bad[17] = "rose"
    ds = xr.Dataset({"x": (("sample", "feature"), X), "species": ("sample", bad)})
    with pytest.raises(em.ModelError, match=r"'rose' at sample=17.*states are \['setosa'"):
        iris_model().fit(ds)


def _three_with_two_labelled(n: int = 900) -> xr.Dataset:
    """Three Normals at −2, 0, 2; 10% of the first two states' samples labelled, none of the third's."""
    rng = np.random.default_rng(1)
    z = rng.choice(3, n)
    x = np.array([-2.0, 0.0, 2.0])[z] + rng.normal(size=n)
    return xr.Dataset({"x": ("sample", x), "z": ("sample", np.where((rng.random(n) < 0.1) & (z < 2), z, np.nan))})


def test_the_start_numbers_its_clusters_as_the_labels_do():
    # k-means numbers clusters arbitrarily; with labels for only some states the start takes the
    # numbering that agrees with the labelled samples, so every seed starts on the labels' side
    ds = _three_with_two_labelled()
    known = ~np.isnan(ds["z"].values)
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.Normal)
    logliks = []
    for seed in range(6):
        start = model.fit(ds, seed=seed, max_iter=0)
        means = start.params["x"]["mean"].values
        labelled = [ds["x"].values[known & (ds["z"].values == k)].mean() for k in (0, 1)]
        # each labelled state starts nearer its own labelled samples' mean than the other one does
        assert abs(means[0] - labelled[0]) < abs(means[1] - labelled[0])
        assert abs(means[1] - labelled[1]) < abs(means[0] - labelled[1])
        logliks.append(model.fit(ds, seed=seed, tol=1e-10).loglik)
    np.testing.assert_allclose(logliks, max(logliks), rtol=1e-9)
    lazy = model.fit(ds.chunk(sample=200), seed=3, max_iter=0)
    np.testing.assert_allclose(lazy.params["x"]["mean"], model.fit(ds, seed=3, max_iter=0).params["x"]["mean"],
                               rtol=1e-12)


def test_each_of_several_latents_starts_numbered_as_its_labels():
    rng = np.random.default_rng(8)
    n = 600
    a, b = rng.choice(2, n, p=[0.4, 0.6]), rng.choice(3, n)
    ds = xr.Dataset({"x": ("sample", np.array([-1.0, 1.0])[a] + rng.normal(size=n)),
                     "y": ("sample", np.array([-5.0, 0.0, 5.0])[b] + rng.normal(size=n)),
                     "a": ("sample", np.where(rng.random(n) < 0.1, a, np.nan))})
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)))
    for seed in range(6):
        for data in (ds, ds.chunk(sample=150)):
            means = model.fit(data, seed=seed, max_iter=0).params["x"]["mean"].values
            assert means[0] < means[1], (seed, means)  # the labels put state 0 at −1 and state 1 at +1
