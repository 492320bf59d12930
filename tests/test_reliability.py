"""Reliability (issue 7): no NaN in results, no crash instead of an error, no misleading message.

One test (or a parametrized family of them) per class of failure, each checking the
root cause rather than the one example that exposed it: the same inputs at other
magnitudes, in other families and through the other public calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import emdsl as em
from emdsl import labels
from emdsl.errors import ModelError
from emdsl.families._base import _FAMILIES

# -- NaN never reaches results -------------------------------------------------------


def _one_hot(assignment) -> xr.DataArray:
    assignment = np.asarray(assignment)
    return xr.DataArray(np.eye(2)[assignment], dims=("sample", "z"))


def _collapsing_case(family: str):
    """Data and starting responsibilities that put component 1 on a single value (or a line)."""
    rng = np.random.default_rng(1)
    spread = rng.normal(size=(20, 2))
    if family == "mvn-full":
        t = rng.normal(size=8)
        collapsed = np.c_[t, 2 * t + 1]  # a line: a singular covariance, though no feature is constant
    elif family == "mvn-diag":
        collapsed = np.c_[np.full(8, 0.5), rng.normal(size=8)]  # one feature constant within the component
    else:
        collapsed = np.full((8, 2), 0.5)
    x = np.vstack([spread, collapsed])
    return x, _one_hot([0] * 20 + [1] * 8)


@pytest.mark.parametrize("family, make", [
    ("normal", lambda: em.Normal(floor=0)),
    ("mvn-full", lambda: em.MultivariateNormal(floor=0)),
    ("mvn-diag", lambda: em.MultivariateNormal(covariance="diag", floor=0)),
    ("mvn-spherical", lambda: em.MultivariateNormal(covariance="spherical", floor=0)),
])
def test_floor_zero_on_a_collapsing_component_is_an_error_not_nan(family, make):
    x, start = _collapsing_case(family)
    model = em.Model().latent("z", em.Categorical(2)).observe("x", make())
    with pytest.raises(ModelError, match=r"floor=0.*component 1.*collapsed.*floor > 0"):
        model.fit(x, init=start)
    # the same data with the default floor fits, with finite parameters, and names the component
    default = em.Model().latent("z", em.Categorical(2)).observe("x", type(make())(
        **{k: v for k, v in make().arguments().items() if k != "floor"}))
    with pytest.warns(em.DegenerateComponentWarning, match="z=1"):
        fit = default.fit(x, init=start, max_iter=5, tol=0)
    assert all(np.isfinite(da.values).all() for node in fit.params.children.values()
               for da in node.to_dataset().data_vars.values())
    assert np.isfinite(fit.loglik)


@pytest.mark.parametrize("make", [lambda: em.Normal(tied="variance", floor=0),
                                  lambda: em.MultivariateNormal(covariance="tied", floor=0)])
def test_floor_zero_with_a_shared_covariance_that_collapses_is_an_error(make):
    # two distinct points, two components: each component sits on one point, the pooled scatter is 0
    x = np.repeat([[0.0, 1.0], [3.0, -2.0]], 10, axis=0)
    model = em.Model().latent("z", em.Categorical(2)).observe("x", make())
    with pytest.raises(ModelError, match=r"floor=0.*(shared|tied).*floor > 0"):
        model.fit(x, init=_one_hot([0] * 10 + [1] * 10))


def test_floor_zero_without_collapse_fits_as_without_floor():
    rng = np.random.default_rng(2)
    x = np.r_[rng.normal(0, 1, 60), rng.normal(6, 1, 60)]
    fits = [em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal(floor=f)).fit(x, seed=0)
            for f in (0, 1e-6)]
    assert fits[0].loglik == pytest.approx(fits[1].loglik, rel=1e-12)


@pytest.fixture(scope="module")
def small_fits():
    rng = np.random.default_rng(3)
    x1 = np.r_[rng.normal(0, 1, 40), rng.normal(5, 1, 40)]
    x2 = np.vstack([rng.normal(0, 1, (40, 2)), rng.normal(5, 1, (40, 2))])
    z = em.Model().latent("z", em.Categorical(2))
    return {"normal": (z.observe("x", em.Normal).fit(x1, seed=0), 1),
            "mvn": (z.observe("x", em.MultivariateNormal).fit(x2, seed=0), 2)}


@pytest.mark.parametrize("kind", ["normal", "mvn"])
@pytest.mark.parametrize("value", [1e155, -1e200, 1.7e308, -1.7976931348623157e308])
@pytest.mark.parametrize("call", ["predict", "predict_proba", "score_samples", "score"])
def test_far_new_values_are_refused_by_name_not_scored_nan(small_fits, kind, value, call):
    fit, width = small_fits[kind]
    new = np.array([1.0, value, 0.5]) if width == 1 else np.array([[1.0, 0.0], [0.0, value], [0.5, 0.5]])
    with pytest.raises(ModelError, match=rf"variable 'x'.*{re.escape(repr(value))} at sample=1.*cannot score"):
        getattr(fit, call)(new)


@pytest.mark.parametrize("kind", ["normal", "mvn"])
@pytest.mark.parametrize("value", [1e20, -1e90])
def test_far_but_representable_new_values_get_finite_answers(small_fits, kind, value):
    fit, width = small_fits[kind]
    new = np.array([1.0, value]) if width == 1 else np.array([[1.0, 0.0], [0.0, value]])
    scores = fit.score_samples(new).values
    assert np.isfinite(scores).all() and scores[1] < scores[0]
    proba = fit.predict_proba(new).values
    assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1)
    assert set(fit.predict(new).values.tolist()) <= {0, 1}


@pytest.mark.parametrize("where", ["init", "fixed"])
@pytest.mark.parametrize("mean", [1e300, -1e300, 1e120])
def test_means_too_far_from_the_data_are_refused(where, mean):
    x = np.random.default_rng(4).normal(size=50)
    if where == "init":
        model, kwargs = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal), {
            "init": {"x": {"mean": [mean, 0.0]}}}
    else:
        model, kwargs = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal(mean=[mean, 0.0])), {}
    with pytest.raises(ModelError, match=rf"\['x'\]\['mean'\]: {re.escape(repr(mean))}.*standard deviations"):
        model.fit(x, seed=0, **kwargs)


def test_a_fixed_mean_far_but_within_range_fits_with_finite_results():
    x = np.random.default_rng(4).normal(size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.DegenerateComponentWarning)  # component 0 gets nothing
        fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal(mean=[1e40, 0.0])).fit(x, seed=0)
    assert np.isfinite(fit.loglik)
    assert float(fit.score_samples(x).sum()) == pytest.approx(fit.loglik, rel=1e-9)


def test_a_fixed_variance_that_underflows_in_the_data_units_is_refused():
    x = np.random.default_rng(5).normal(size=50) * 1e100
    with pytest.raises(ModelError, match=r"variance.*spread"):
        em.Model().observe("x", em.Normal(variance=1e-300)).fit(x)


# -- crashes become errors that name the culprit ----------------------------------------


@pytest.mark.parametrize("family", [em.Normal, em.MultivariateNormal, em.Poisson, em.Categorical])
def test_a_zero_length_event_dimension(family):
    with pytest.raises(ModelError, match=r"variable 'x' has an empty dimension 'feature'"):
        em.Model().observe("x", family).fit(np.zeros((10, 0)))


@pytest.mark.parametrize("names", [0, 1.5, None, {"a": 1}, {"a", "b"}, [0], ["a", 1], [""], b"x"])
def test_variable_names_that_are_not_strings(names):
    with pytest.raises(ModelError, match=r"observe\(.*(string|name)"):
        em.Model().observe(names, em.Normal)


@pytest.mark.parametrize("name", [0, "", "a/b", ".", "..", ("a",)])
def test_node_and_latent_names_that_cannot_name_a_group(name):
    with pytest.raises(ModelError, match="names of latents and nodes"):
        em.Model().latent(name, em.Categorical(2))
    with pytest.raises(ModelError, match="names of latents and nodes"):
        em.Model().observe("x", em.Normal, name=name)


_BAD_ARGUMENTS = [None, "a", [1, "b"], object(), {}, [[1, 2], [3]], float("nan"), float("inf"), -1, True, 2**70]


# Found by this test in code owned elsewhere; remove a mark when its family is fixed.
_KNOWN: dict[tuple[str, str], str] = {}


def _argument_cases():
    for name, cls in sorted(_FAMILIES.items()):
        for parameter in inspect.signature(cls.__init__).parameters.values():
            if parameter.name != "self":
                known = _KNOWN.get((name, parameter.name))
                marks = [pytest.mark.xfail(strict=True, reason=known)] if known else []
                yield pytest.param(cls, parameter.name, id=f"{name}-{parameter.name}", marks=marks)


@pytest.mark.parametrize("cls, argument", list(_argument_cases()))
def test_every_family_argument_accepts_or_names_a_bad_value(cls, argument):
    """Each family's constructor either takes a value or raises ModelError naming the argument."""
    required = {"trials": 3} if cls.__name__ == "Binomial" and argument != "trials" else {}
    for value in _BAD_ARGUMENTS:
        try:
            family = cls(**required, **{argument: value})
        except ModelError as error:
            assert argument in str(error) or cls.__name__ in str(error), str(error)
            continue
        repr(family), family == family, hash(family)  # an accepted value must not break these either


def test_init_with_a_fit_of_another_model_names_the_nodes():
    rng = np.random.default_rng(6)
    other = em.Model().latent("z", em.Categorical(2)).observe("y", em.Normal).fit(
        xr.Dataset({"y": ("sample", rng.normal(size=40))}), seed=0)
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    with pytest.raises(ModelError, match=r"'y' is not a node of this model.*'x'"):
        model.fit(rng.normal(size=40), init=other)


@pytest.mark.parametrize("latent, model_data", [
    ("sample", lambda m: (m.observe("x", em.Normal), np.zeros((10, 2)) + np.arange(10)[:, None])),
    ("feature", lambda m: (m.observe("x", em.MultivariateNormal), np.random.default_rng(0).normal(size=(10, 2)))),
    ("feature", lambda m: (m.observe("x", em.Normal), np.random.default_rng(0).normal(size=(10, 2)))),
    ("feature", lambda m: (m.observe(["a", "b"], em.MultivariateNormal),
                           xr.Dataset({"a": ("sample", np.arange(10.0)), "b": ("sample", np.arange(10.0) ** 2)}))),
    ("feature_", lambda m: (m.observe("x", em.MultivariateNormal), np.random.default_rng(0).normal(size=(10, 2)))),
    ("level", lambda m: (m.observe("c", em.Categorical), xr.Dataset({"c": ("sample", list("abab" * 3))}))),
    ("time", lambda m: (m.observe("x", em.Normal),
                        xr.Dataset({"x": (("sample", "time"), np.random.default_rng(0).normal(size=(10, 3)))}))),
])
def test_a_latent_named_like_a_data_dimension_is_refused_at_fit_time(latent, model_data):
    model, data = model_data(em.Model().latent(latent, em.Categorical(2)))
    with pytest.raises(ModelError, match=rf"latent\('{latent}'.*{latent}.*another name"):
        model.fit(data, seed=0)


def test_a_latent_named_like_a_covariance_axis_is_fine_for_elementwise_families():
    x = np.random.default_rng(0).normal(size=(20, 2))
    fit = em.Model().latent("feature_", em.Categorical(2)).observe("x", em.Normal).fit(x, seed=0)
    assert fit.params["x"]["mean"].dims == ("feature_", "feature")


@pytest.mark.parametrize("states", [[np.nan, 1.0], [float("nan"), float("nan")], [None, "a"],
                                    ["a", pd.NA], ["a", pd.NaT], [[1, 2], [3]], [("a", "b"), "c"],
                                    [np.float64("nan"), 2.0]])
def test_missing_state_labels_are_refused(states):
    with pytest.raises(ModelError, match=r"Categorical\(k\)"):
        em.Categorical(states)


# -- messages say what is wrong ------------------------------------------------------


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e-300, 1e160])
@pytest.mark.parametrize("family", [em.Normal, em.MultivariateNormal])
def test_data_at_an_extreme_scale_are_not_called_constant(scale, family):
    x = np.random.default_rng(7).normal(size=(30, 2)) * scale
    with pytest.raises(ModelError) as caught:
        em.Model().observe("x", family).fit(x)
    message = str(caught.value)
    assert "constant" not in message
    assert "standard deviation" in message and ("overflows" if scale > 1 else "underflows") in message
    # the advice works: rescaled as told, the data fit
    factor = float(message.rsplit("1e", 1)[1])
    rescaled = x / 10**factor if scale > 1 else x * 10**factor
    assert np.isfinite(em.Model().observe("x", family).fit(rescaled).loglik)


@pytest.mark.parametrize("scale", [1e140, 1e-140, 1e100])
def test_data_at_large_but_representable_scales_fit_like_unit_data(scale):
    rng = np.random.default_rng(8)
    x = np.r_[rng.normal(0, 1, 40), rng.normal(5, 1, 40)]
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    # tol=0: the same iterations on both sides (tol·|ℓ| would stop them at different points)
    unit, scaled = model.fit(x, seed=0, tol=0, max_iter=30), model.fit(x * scale, seed=0, tol=0, max_iter=30)
    # the log-likelihood of scaled data shifts by −N log(scale) (the Jacobian)
    assert scaled.loglik == pytest.approx(unit.loglik - len(x) * np.log(scale), rel=1e-9)
    np.testing.assert_allclose(scaled.params["x"]["mean"].values / scale, unit.params["x"]["mean"].values,
                               rtol=1e-8)
    assert np.isfinite(scaled.params["x"]["variance"].values).all()


@pytest.mark.parametrize("values", [[1.7e308, -1.7e308, 1.0], [-1.7976931348623157e308, 1e308, 0.0]])
def test_values_near_the_largest_float_are_printed_not_called_inf(values):
    x = np.array(values * 5)
    with pytest.raises(ModelError, match=r"ranges from .*e\+308 to .*e\+308") as caught:
        em.Model().observe("x", em.Normal).fit(x)
    assert "inf" not in str(caught.value)


@pytest.mark.parametrize("value", [1.0, 1e300, -3e-200, 0.0])
def test_constant_data_are_called_constant_with_their_value(value):
    with pytest.raises(ModelError, match=rf"is constant \(every value is {re.escape(repr(value))}\)"):
        em.Model().observe("x", em.Normal).fit(np.full(20, value))


def test_almost_constant_data_say_they_vary_in_the_last_digits():
    x = 1e8 + np.random.default_rng(0).integers(0, 2, 20) * 1e-7  # 1 ulp ≈ 1.5e-8
    with pytest.raises(ModelError, match="constant to within rounding.*last digits"):
        em.Model().observe("x", em.Normal).fit(x)


@pytest.mark.parametrize("coords", [np.array(["f0", "f1"]), pd.Index(["f0", "f1"]), ["f0", "f1"]])
def test_labels_in_messages_are_plain(coords):
    x = np.c_[np.ones(10), np.arange(10.0)]
    ds = xr.Dataset({"x": (("sample", "feature"), x)}, coords={"feature": coords})
    with pytest.raises(ModelError) as caught:
        em.Model().observe("x", em.MultivariateNormal).fit(ds)
    assert "feature='f0'" in str(caught.value) and "np." not in str(caught.value)
    bad = ds.assign(x=ds.x.where(ds.sample != 3, np.inf))
    with pytest.raises(ModelError) as caught:
        em.Model().observe("x", em.Normal).fit(bad)
    assert "sample=3, feature='f0'" in str(caught.value) and "np." not in str(caught.value)


def test_dates_in_messages_are_iso_strings():
    times = pd.date_range("2024-01-01", periods=10)
    ds = xr.Dataset({"x": ("time", np.r_[np.arange(9.0), np.inf])}, coords={"time": times})
    with pytest.raises(ModelError, match=r"time='2024-01-10T00:00:00"):
        em.Model().observe("x", em.Normal).fit(ds)


# -- everyday tables ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def wine_like() -> pd.DataFrame:
    rng = np.random.default_rng(9)
    return pd.DataFrame({"alcohol": np.r_[rng.normal(12, 0.5, 30), rng.normal(14, 0.5, 30)],
                         "od280/od315_of_diluted_wines": np.r_[rng.normal(2, 0.3, 30), rng.normal(3, 0.3, 30)]})


def test_any_column_name_can_be_observed(wine_like, tmp_path):
    columns = list(wine_like.columns)
    model = em.Model().latent("z", em.Categorical(2)).observe(columns, em.MultivariateNormal)
    assert model.observed[0].name == "alcohol+od280_od315_of_diluted_wines"
    fit = model.fit(wine_like, seed=0)
    assert fit.params[model.observed[0].name]["mean"]["feature"].values.tolist() == columns
    single = em.Model().observe("od280/od315_of_diluted_wines", em.Normal).fit(wine_like)
    assert single.params["od280_od315_of_diluted_wines"]["mean"].values == pytest.approx(
        wine_like["od280/od315_of_diluted_wines"].mean())
    fit.save(tmp_path / "wine.nc")
    loaded = em.load(tmp_path / "wine.nc")
    np.testing.assert_array_equal(loaded.predict(wine_like).values, fit.predict(wine_like).values)


@pytest.mark.parametrize("names", [["year", "site"], [None, None]])
def test_a_dataframe_with_a_multiindex(wine_like, names):
    frame = wine_like.copy()
    frame.index = pd.MultiIndex.from_product([range(20), ["a", "b", "c"]], names=names)
    model = em.Model().latent("z", em.Categorical(2)).observe(list(frame.columns), em.MultivariateNormal)
    fit = model.fit(frame, seed=0)
    flat = model.fit(wine_like, seed=0)  # the same rows with a plain index
    assert fit.loglik == pytest.approx(flat.loglik, rel=1e-12)
    predicted = fit.predict(frame)
    assert predicted.dims == ("sample",)
    assert predicted["sample"].values.tolist() == list(frame.index)
    np.testing.assert_array_equal(predicted.values, flat.predict(wine_like).values)


def test_a_series_is_a_one_column_table():
    series = pd.Series(np.random.default_rng(0).normal(size=30), name="waiting")
    fit = em.Model().observe("waiting", em.Normal).fit(series)
    assert fit.params["waiting"]["mean"].values == pytest.approx(series.mean())


@pytest.mark.parametrize("frame, match", [
    (pd.DataFrame(np.ones((3, 2)), columns=[1, "1"]), "several columns named '1'"),
    (pd.DataFrame({"x": [1.0, 2.0]}, index=pd.Index([0, 1], name="x")), "index and one of its columns"),
])
def test_tables_that_cannot_become_datasets(frame, match):
    with pytest.raises(ModelError, match=match):
        em.Model().observe("x", em.Normal).fit(frame)


def test_as_dataset_like_maps_array_columns_to_the_model_variables(wine_like):
    model = em.Model().observe(["alcohol"], em.Normal).observe("od280/od315_of_diluted_wines", em.Normal)
    array = wine_like.to_numpy()
    ds = labels.as_dataset(array, like=model)
    for i, column in enumerate(["alcohol", "od280/od315_of_diluted_wines"]):
        np.testing.assert_array_equal(ds[column].values, array[:, i])
        assert ds[column].dims == ("sample",)
    one = em.Model().observe("alcohol", em.Normal)
    assert list(labels.as_dataset(array[:, 0], like=one).data_vars) == ["alcohol"]
    # other widths, and models that read the array as "x", keep the default
    assert list(labels.as_dataset(array[:, :1].repeat(3, axis=1), like=model).data_vars) == ["x"]
    assert list(labels.as_dataset(array, like=em.Model().observe("x", em.Normal)).data_vars) == ["x"]


def test_a_fit_on_a_dataframe_predicts_a_numpy_array_of_its_columns(wine_like):
    fit = em.Model().latent("z", em.Categorical(2)).observe(list(wine_like.columns), em.MultivariateNormal).fit(
        wine_like, seed=0)
    np.testing.assert_array_equal(fit.predict(wine_like.to_numpy()).values, fit.predict(wine_like).values)
    np.testing.assert_allclose(fit.score_samples(wine_like.to_numpy()).values,
                               fit.score_samples(wine_like).values)


# -- families fitted in the data's units, at the ends of the float range -------------------


@pytest.mark.parametrize("family, make", [
    ("Poisson", lambda x: (em.Poisson(), x[:, :1].ravel(), {})),
    ("Binomial", lambda x: (em.Binomial("n"), x[:, :1].ravel(), {"n": np.full(len(x), 2e12)})),
    ("Multinomial", lambda x: (em.Multinomial("cat"), x, {})),
])
@pytest.mark.parametrize("huge", [1.7e308, 2.0**60, 1e13])
def test_counts_beyond_what_float64_em_represents_are_refused_by_name(family, make, huge):
    x = np.random.default_rng(10).poisson(3.0, (30, 3)).astype(float)
    x[7, 0] = huge
    declared, values, extra = make(x)
    dims = ("sample", "cat") if values.ndim == 2 else ("sample",)
    ds = xr.Dataset({"x": (dims, values), **{k: ("sample", v) for k, v in extra.items()}})
    with pytest.raises(ModelError, match=r"variable '(x|n)'.*(counts|trials|totals).* above 1e12.*float64"):
        em.Model().latent("z", em.Categorical(2)).observe("x", declared).fit(ds, seed=0)


@pytest.mark.parametrize("family", [em.Poisson, em.Multinomial])
def test_large_representable_counts_fit_consistently(family):
    rng = np.random.default_rng(11)
    x = rng.poisson(rng.choice([1e9, 3e9], 40)[:, None] * [1.0, 2.0]).astype(float)
    data = xr.DataArray(x, dims=("sample", "cat")) if family is em.Multinomial else x[:, 0]
    fit = em.Model().latent("z", em.Categorical(2)).observe("x", family).fit(data, seed=0)
    slack = float(fit.traces.slack.max())
    assert np.isfinite(fit.loglik) and np.isfinite(slack)
    assert float(fit.score_samples(data).sum()) == pytest.approx(fit.loglik, rel=1e-9, abs=slack)


@pytest.mark.parametrize("family", [em.Gamma, em.Exponential, em.LogNormal])
@pytest.mark.parametrize("scale", [1e300, 1e306, 1e-300])
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_positive_families_at_extreme_scales_fit_with_finite_results(family, scale, init):
    x = np.exp(np.random.default_rng(12).normal(size=40)) * scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.DegenerateComponentWarning)
        fit = em.Model().latent("z", em.Categorical(3)).observe("x", family).fit(x, seed=0, init=init)
    traces = fit.traces
    assert np.isfinite(traces.loglik.values).all() and np.isfinite(traces.slack.values).all()
    assert np.all(np.diff(traces.loglik.values) >= -traces.slack.values[1:])
    assert all(np.isfinite(da.values).all() for da in fit.params["x"].to_dataset().data_vars.values())
    assert float(fit.score_samples(x).sum()) == pytest.approx(fit.loglik, rel=1e-9,
                                                              abs=float(traces.slack.max()))


def test_exponential_far_from_one_keeps_its_log_partition():
    # the mean 1e300 gives λ ≈ 1e-300: A = −log λ must not be clipped there (a false MonotonicityError)
    x = np.exp(np.random.default_rng(13).normal(size=30)) * 1e300
    fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Exponential).fit(x, seed=0, tol=0, max_iter=30)
    unit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Exponential).fit(
        x / 1e300, seed=0, tol=0, max_iter=30)
    assert fit.loglik == pytest.approx(unit.loglik - len(x) * np.log(1e300), rel=1e-9)


@pytest.mark.parametrize("family", [em.Gamma, em.Exponential, em.Poisson])
def test_sums_that_overflow_are_refused_naming_the_variable(family):
    x = np.full(40, 1e307) * np.exp(np.random.default_rng(14).normal(size=40) * 0.1)
    if family is em.Poisson:
        x = np.round(x)
    with pytest.raises(ModelError, match=r"variable 'x'.*(overflow|above 1e12)"):
        em.Model().latent("z", em.Categorical(2)).observe("x", family).fit(x, seed=0)


@pytest.mark.parametrize("scale", [1e-305, 1e-310, 1e-320])
def test_gamma_on_data_too_small_for_its_rate_says_to_rescale(scale):
    x = np.exp(np.random.default_rng(15).normal(size=40) * 0.01) * scale
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Gamma)
    with pytest.raises(ModelError, match=r"observe\('x', Gamma\).*rate.*overflows.*multiply the data by 1e") as caught:
        model.fit(x, seed=0)
    factor = float(str(caught.value).rsplit("1e", 1)[1])
    assert np.isfinite(model.fit(x * 10**factor, seed=0).loglik)


def test_a_sample_error_names_the_node():
    x = np.random.default_rng(16).multinomial(10, [0.2, 0.3, 0.5], 30).astype(float)
    fit = em.Model().observe("counts", em.Multinomial("cat")).fit(
        xr.Dataset({"counts": (("sample", "cat"), x)}))
    with pytest.raises(ModelError, match=r"sample: node 'counts'.*total count"):
        fit.sample(3)


# -- held parameters get no prior term ---------------------------------------------------------

def _mixed_table(seed: int = 20) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    z = rng.integers(2, size=80)
    x = rng.normal(np.array([0.0, 4.0])[z], 1.0)
    levels = np.where(z == 0, rng.integers(0, 2, 80), 1 + rng.integers(0, 2, 80))
    return xr.Dataset({
        "x": ("sample", x), "pos": ("sample", np.exp(x / 3)), "count": ("sample", rng.poisson(np.exp(x / 3))),
        "flag": ("sample", (x > 2).astype(float)), "label": ("sample", np.array(list("abc"))[levels]),
        "pair": (("sample", "f"), np.c_[x, x + rng.normal(size=80)]),
        "tally": (("sample", "cat"), np.array([rng.multinomial(5, [0.2, 0.3, 0.5] if k else [0.5, 0.5, 0.0])
                                               for k in z])),
        "hits": ("sample", rng.binomial(10, np.where(z, 0.7, 0.0)))})


# every parameter held, zeros included: a Dirichlet or Beta on them would be −inf
_ALL_HELD = [
    ("label", lambda: em.Categorical(["a", "b", "c"], probs=[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])),
    ("flag", lambda: em.Bernoulli(probs=[0.0, 1.0])),
    ("hits", lambda: em.Binomial(10, probs=[0.0, 0.7])),
    ("tally", lambda: em.Multinomial("cat", probs=[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])),
    ("count", lambda: em.Poisson(rate=[1.0, 4.0])),
    ("pos", lambda: em.Exponential(rate=[1.0, 0.2])),
    ("x", lambda: em.Normal(mean=[0.0, 4.0], variance=[1.0, 1.0])),
    ("pos", lambda: em.LogNormal(mean=[0.0, 1.3], variance=0.1)),
    ("pair", lambda: em.MultivariateNormal(mean=[[0, 0], [4, 4]], covariance=np.eye(2))),
]


@pytest.mark.parametrize("variable, make", _ALL_HELD, ids=[f"{v}-{m().kind}" for v, m in _ALL_HELD])
@pytest.mark.parametrize("accelerate", ["auto", None])
def test_a_prior_on_held_parameters_adds_nothing(variable, make, accelerate):
    """prior='weak' (or a declared prior) on a node and a latent whose parameters are all fixed: no term at all."""
    ds = _mixed_table()
    model = em.Model().latent("z", em.Categorical(2, probs=[1.0, 0.0])).observe(variable, make())
    plain = model.fit(ds, accelerate=accelerate, max_iter=3)
    for prior in ("weak", None):
        family = make()
        if prior is None:  # a declared prior instead of the weak one
            kind = family.prior_type.__name__
            hyper = {"Dirichlet": {"alpha": 2.0}, "Beta": {"a": 2.0, "b": 2.0}, "Gamma": {"shape": 2.0, "rate": 1.0},
                     "NormalInverseGamma": {"mean": 0.0, "kappa": 0.1, "shape": 2.0, "scale": 1.0},
                     "NormalInverseWishart": {"mean": [0.0, 0.0], "kappa": 0.1, "dof": 4.0, "scale": np.eye(2)}}[kind]
            family = type(family)(**{**family.arguments(), "prior": getattr(em.priors, kind)(**hyper)})
        latent = em.Categorical(2, probs=[1.0, 0.0], prior=em.priors.Dirichlet(3.0) if prior is None else None)
        fit = em.Model().latent("z", latent).observe(variable, family).fit(
            ds, prior=prior, accelerate=accelerate, max_iter=3)
        trace = fit.traces
        logpost = trace["logpost"].values if "logpost" in trace.coords else trace["loglik"].values
        np.testing.assert_array_equal(logpost, trace["loglik"].values)
        assert fit.loglik == plain.loglik


def test_fixed_level_probabilities_with_zeros_under_the_weak_prior():
    """The reported case: a weak Dirichlet on fixed probabilities with zeros made the log-posterior −inf."""
    ds = _mixed_table()
    model = (em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
             .observe("label", em.Categorical(["a", "b", "c"], probs=[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])))
    for accelerate in ("auto", None):
        with warnings.catch_warnings():
            warnings.simplefilter("error", em.ConvergenceWarning)  # a −inf objective never converged
            fit = model.fit(ds, prior="weak", seed=0, accelerate=accelerate)
        logpost = fit.traces["logpost"].values
        assert np.isfinite(logpost).all() and np.all(np.diff(logpost) >= -fit.traces["slack"].values[1:])
        np.testing.assert_array_equal(fit.params["label"]["probs"].values,
                                      [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])


@pytest.mark.parametrize("make", [
    lambda: em.Normal(mean=[0.3, 5.0]), lambda: em.Normal("variance", mean=[0.3, 6.0]),
    lambda: em.LogNormal(mean=[0.0, 1.3]),
    *[lambda c=c: em.MultivariateNormal(covariance=c, mean=[[0, 0], [4, 5]])
      for c in ("full", "diag", "spherical", "tied")]])
def test_a_held_mean_has_no_prior_term_and_the_map_step_matches(make):
    """A held mean drops the normal factor N(μ; m, Σ/κ): the covariance's MAP step maximizes Q + log p without it."""
    family = make()
    variable = "pair" if family.kind == "MultivariateNormal" else ("pos" if family.kind == "LogNormal" else "x")
    ds = _mixed_table()
    fit = em.Model().latent("z", em.Categorical(2)).observe(variable, family).fit(
        ds, prior="weak", seed=0, accelerate=None, max_iter=50)
    logpost = fit.traces["logpost"].values
    assert np.isfinite(logpost).all() and np.all(np.diff(logpost) >= -fit.traces["slack"].values[1:])
    # the M-step is the maximizer of Q + log p over the free parameter: no step along it gains
    from emdsl.compile import compile_plan, start_values
    from emdsl.engine.estep import EStep
    from emdsl.engine.mstep import (
        expected_complete_loglik,
        log_prior,
        maximize,
        natural_matrix,
    )

    plan = compile_plan(fit.model, ds, prior="weak")  # the fit's units and its weak prior
    theta = start_values(plan, labels.tree_values(fit.params), "fit parameters")
    stats = EStep(plan).summarize(natural_matrix(plan, theta), theta).stats
    new, _ = maximize(plan, stats, theta)
    name = "covariance" if family.kind == "MultivariateNormal" else "variance"

    def objective(scale: float) -> float:
        moved = {**new, variable: {**new[variable], name: new[variable][name] * scale}}
        return expected_complete_loglik(natural_matrix(plan, moved), stats) + log_prior(plan, moved)[0]

    assert objective(1.0) >= max(objective(1.001), objective(0.999))
    # the prior's mean m enters only the held mean's factor, which is gone
    node = plan.nodes[0]
    before = log_prior(plan, new)[0]
    node.prior = dataclasses.replace(node.prior, values={**node.prior.values, "mean": node.prior["mean"] + 10.0})
    assert log_prior(plan, new)[0] == before


def test_a_fixed_transition_with_structural_zeros_has_no_prior_term():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(3, 30)) + np.repeat([0.0, 3.0, 6.0], 10)
    ds = xr.Dataset({"x": (("run", "time"), x)})
    left_right = np.array([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]])
    for fixed in ({"transition": left_right}, {"transition": left_right, "initial": [1.0, 0.0, 0.0]}):
        model = em.Model().latent("z", em.Categorical(3, **fixed), markov="time").observe("x", em.Normal)
        for accelerate in ("auto", None):
            fit = model.fit(ds, prior="weak", seed=0, accelerate=accelerate)
            trace = fit.traces
            assert np.isfinite(trace["logpost"].values).all()
            np.testing.assert_array_equal(fit.params["z"]["transition"].values, left_right)
            if "initial" in fixed:  # the chain learns nothing: its prior term is gone; the node's is left
                weak = em.Model().latent("z", em.Categorical(3, **fixed), markov="time").observe(
                    "x", em.Normal(mean=fit.params["x"]["mean"].values, variance=fit.params["x"]["variance"].values))
                held = weak.fit(ds, prior="weak", max_iter=0)
                assert held.traces["logpost"].values[0] == held.traces["loglik"].values[0]


# -- the accelerated trace's coordinates are validated on load ----------------------------------

@pytest.mark.parametrize("variable, change, match", [
    ("logpost", lambda v: v * np.nan, r"traces/logpost.*not finite"),
    ("slack", lambda v: -v - 1.0, r"traces/slack.*>= 0"),
    ("slack", lambda v: v + np.inf, r"traces/slack.*not finite"),
    ("e_steps", lambda v: v * 0, r"traces/e_steps.*>= 1"),
])
def test_crafted_trace_coordinates_are_refused_naming_the_field(tmp_path, variable, change, match):
    netCDF4 = pytest.importorskip("netCDF4")
    rng = np.random.default_rng(22)
    x = np.r_[rng.normal(0, 1, 30), rng.normal(5, 1, 30)]
    path = tmp_path / "fit.nc"
    em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal).fit(x, seed=0, prior="weak").save(path)
    em.load(path)
    with netCDF4.Dataset(path, "a") as nc:
        var = nc.groups["traces"].variables[variable]
        var.set_auto_mask(False)
        var[...] = change(np.array(var[...]))
    with pytest.raises(ModelError, match=match):
        em.load(path)


def test_compiling_a_wide_covariance_scans_phi_in_bounded_blocks():
    """Φ of a full 20-D covariance has 231 statistics per sample: the scans over it (the E-step's
    rounding bound) take blocks of bounded bytes, not 65,536 rows (92 MB here, 12× the data)."""
    import tracemalloc

    from emdsl.compile import SCAN_PHI_BYTES, compile_plan

    X = np.random.default_rng(0).normal(size=(50_000, 20))
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        plan = compile_plan(model, ds)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert plan.n_stats > 1 + 20 + 200  # the counts, x, the upper triangle of x xᵀ
    assert peak < 3 * X.nbytes + 2 * SCAN_PHI_BYTES, peak / 2**20


@pytest.mark.parametrize("method", ["em", "stepwise"])
def test_a_start_whose_log_likelihood_is_not_finite_names_the_node(method):
    """A starting variance of 1e-320 is positive, but its reciprocal overflows: the fit ran to max_iter
    with ℓ = NaN; now it is refused, naming the node."""
    x = np.r_[np.zeros(5), np.linspace(1.0, 2.0, 20)]
    start = {"x": {"mean": np.array([0.0, 1.5]), "variance": np.array([1e-320, 1.0])}, "z": {"probs": [0.5, 0.5]}}
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflow itself, which the error explains
        with pytest.raises(ModelError, match=r"starting parameters is nan.*observe\('x', Normal\).*not finite"):
            model.fit(x, init=start, method=method)
