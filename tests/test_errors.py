"""Bad input gets a clear error naming the variable, what was expected and what arrived."""

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.errors import ModelError


@pytest.fixture
def model():
    return em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal, name="x")


def test_unknown_variable(faithful):
    with pytest.raises(ModelError, match=r"observe\('duration', Normal\).*no variable 'duration'.*eruptions"):
        em.Model().observe("duration", em.Normal).fit(faithful)


@pytest.mark.parametrize("declare, match", [
    (lambda m: m.latent("z", em.Categorical(2)).latent("z", em.Categorical(3)), "'z' is already declared"),
    (lambda m: m.observe("a", em.Normal).observe("a", em.Normal), "'a' is already declared"),
    (lambda m: m.observe("a", em.Normal).observe(["a", "b"], em.MultivariateNormal), "'a' is already"),
    (lambda m: m.latent("z", em.Categorical(2)).observe("z", em.Normal), "'z' is already declared"),
    (lambda m: m.observe(["a", "a"], em.MultivariateNormal), "listed twice"),
    (lambda m: m.latent("z", em.Categorical(2)).latent("w", em.Categorical(2), markov="t"), "only latent"),
    (lambda m: m.latent("z", em.Normal), "latent needs a latent family"),
    (lambda m: m.latent("z", em.Categorical), "needs its number of states"),
    (lambda m: m.latent("z", em.Categorical(2, probs=[[0.5, 0.5], [0.1, 0.9]])), "probs are its K weights"),
    (lambda m: m.observe("x", int), "expected an emdsl family"),
    (lambda m: m.observe("", em.Normal), "non-empty"),
])
def test_bad_declarations(declare, match):
    with pytest.raises(ModelError, match=match):
        declare(em.Model())


def test_model_is_immutable():
    base = em.Model()
    with_latent = base.latent("z", em.Categorical(2))
    assert base.latents == () and len(with_latent.latents) == 1
    with pytest.raises(AttributeError):
        base.latents = ()


def test_dims_that_do_not_match_the_declaration():
    ds = xr.Dataset({"x": (("sample", "a", "b"), np.zeros((5, 2, 2))), "y": ("time", np.zeros(5))})
    with pytest.raises(ModelError, match=r"MultivariateNormal needs exactly one dimension.*\('sample', 'a', 'b'\)"):
        em.Model().observe("x", em.MultivariateNormal).fit(ds)
    with pytest.raises(ModelError, match="without the event dim 'c'"):
        em.Model().observe("x", em.MultivariateNormal(dim="c")).fit(ds)
    with pytest.raises(ModelError, match="no dimension is shared"):
        em.Model().observe("x", em.Normal).observe("y", em.Normal).fit(ds)
    with pytest.raises(ModelError, match=r"stacked variables must each be 1-D over 'sample'; 'x' has dims"):
        em.Model().observe(["x", "w"], em.MultivariateNormal).fit(ds.assign(w=("sample", np.arange(5.0))))
    with pytest.raises(ModelError, match="sample_dim='time'.*'x'"):
        em.Model().observe("x", em.Normal).fit(ds, sample_dim="time")


def test_new_data_with_other_dims_is_rejected(faithful):
    ds = xr.Dataset({"x": (("sample", "feature"), np.random.default_rng(0).normal(size=(50, 3)))},
                    coords={"feature": ["a", "b", "c"]})
    fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal).fit(ds, seed=0)
    with pytest.raises(ModelError, match="coordinate 'feature'"):
        fit.predict(ds.assign_coords(feature=["a", "b", "d"]))
    with pytest.raises(ModelError, match="dimension 'feature' has size 3, expected 2"):
        fit.predict(ds.isel(feature=[0, 1]).assign_coords(feature=["a", "b"]).drop_vars("feature"))


def test_more_states_than_samples(faithful):
    with pytest.raises(ModelError, match=r"latent\('z'.*300 states but the data have only 272 samples"):
        em.Model().latent("z", em.Categorical(300)).observe("waiting", em.Normal).fit(faithful)


def test_empty_data(faithful):
    with pytest.raises(ModelError, match="'sample' is empty"):
        em.Model().observe("waiting", em.Normal).fit(faithful.isel(sample=slice(0, 0)))
    with pytest.raises(ModelError, match="nothing is observed"):
        em.Model().latent("z", em.Categorical(2)).fit(faithful)


def test_non_numeric_variable():
    ds = xr.Dataset({"colour": ("sample", np.array(["red", "blue", "red"]))})
    with pytest.raises(ModelError, match=r"variable 'colour' is not numeric \(dtype <U4\)"):
        em.Model().observe("colour", em.Normal).fit(ds)


def test_nan_is_missing_not_an_error(faithful):
    ds = faithful.copy(deep=True)
    ds["waiting"][[17, 40, 41]] = np.nan
    fit = em.Model().observe(["eruptions", "waiting"], em.MultivariateNormal).fit(ds)
    assert np.isfinite(fit.loglik) and np.isfinite(fit.score_samples(ds).values).all()


def test_inf_says_how_many_and_where():
    ds = xr.Dataset({"x": (("sample", "feature"), np.ones((6, 2)) * np.arange(6)[:, None])},
                    coords={"feature": ["a", "b"], "sample": list("uvwxyz")})
    ds["x"][4, 1] = -np.inf
    with pytest.raises(ModelError, match=r"'x' has 1 infinite value \(±inf\), first at sample='y', feature='b'"):
        em.Model().observe("x", em.Normal).fit(ds)


def test_constant_variable(faithful):
    ds = faithful.assign(flat=("sample", np.full(272, 3.0)))
    with pytest.raises(ModelError, match="'flat' is constant"):
        em.Model().observe(["waiting", "flat"], em.MultivariateNormal).fit(ds)


@pytest.mark.parametrize("init, match", [
    ({"x": {"covariance": [[[1.0, 2.0], [2.0, 1.0]], np.eye(2)]}}, "state 0 is not positive definite"),
    ({"x": {"mean": [1.0, 2.0, 3.0]}}, r"init\['x'\]\['mean'\]: expected shape \(2, 2\)"),
    ({"y": {"mean": [1.0]}}, "'y' is not a node of this model"),
    ({"x": {"scale": [1.0]}}, r"unknown parameter\(s\) \['scale'\]"),
    ({"z": {"probs": [0.2, 0.2]}}, "sum to 1"),
    ("spectral", "expected 'kmeans\\+\\+', 'random'"),
])
def test_bad_init(faithful, model, init, match):
    with pytest.raises(ModelError, match=match):
        model.fit(faithful, init=init)


def test_bad_responsibilities(faithful, model):
    resp = xr.DataArray(np.full((272, 2), 0.7), dims=("sample", "z"))
    with pytest.raises(ModelError, match="sum to 1"):
        model.fit(faithful, init=resp)
    with pytest.raises(ModelError, match=r"dims \('sample', 'z'\)"):
        model.fit(faithful, init=resp.rename(z="k"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_init=0), "n_init"), (dict(max_iter=-1), "max_iter"), (dict(tol=np.nan), "tol"),
])
def test_bad_settings(faithful, model, kwargs, match):
    with pytest.raises(ModelError, match=match):
        model.fit(faithful, **kwargs)


def test_collapsing_component_is_floored_and_named():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(60, 2)), np.tile([[5.0, 5.0]], (6, 1))])  # six identical points
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal)
    start = {"x": {"mean": [[0.0, 0.0], [5.0, 5.0]]}}
    with pytest.warns(em.DegenerateComponentWarning, match=r"observe\('x', MultivariateNormal\): component z=1 collapsed"):
        fit = model.fit(ds, init=start, seed=0)
    cov = fit.params["x"]["covariance"].sel(z=1).values
    data_var = X.var(axis=0)
    assert np.all(np.isfinite(cov))
    np.testing.assert_allclose(np.linalg.eigvalsh(cov / np.sqrt(np.outer(data_var, data_var))).min(), 1e-6, rtol=1e-6)
    for value in (fit.loglik, *fit.posterior.values.ravel(), *fit.trace["loglik"].values):
        assert np.isfinite(value)


def test_empty_component_keeps_its_parameters():
    X = np.vstack([np.random.default_rng(1).normal(size=(50, 1))])
    ds = xr.Dataset({"x": (("sample",), X[:, 0])})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    start = {"z": {"probs": [1.0, 0.0]}, "x": {"mean": [0.0, 100.0], "variance": [1.0, 1.0]}}
    with pytest.warns(em.DegenerateComponentWarning, match=r"component\(s\) \[1\] lost all responsibility"):
        fit = model.fit(ds, init=start, max_iter=5, tol=0)
    assert fit.params["x"]["mean"].values[1] == pytest.approx(100.0)
    assert np.isfinite(fit.loglik)


def test_fewer_distinct_points_than_states_is_explained():
    ds = xr.Dataset({"x": ("sample", np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0]))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = em.Model().latent("z", em.Categorical(3)).observe("x", em.Normal).fit(ds, seed=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, em.DegenerateComponentWarning)]
    assert "fewer distinct points than the 3 states of 'z'" in messages[0]
    assert all("collapsed" in m or "lost all responsibility" in m for m in messages[1:])
    assert len(messages) == len(caught)
    assert np.isfinite(fit.loglik) and np.isfinite(fit.posterior.values).all()
