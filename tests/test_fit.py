"""Model.fit and Fit: the API the core issue fixes."""

import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import emdsl as em
from tests.conftest import as_dataset, blobs


@pytest.fixture
def faithful_model():
    return em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal, name="x")


def test_quick_start_shapes_and_labels(faithful, faithful_model):
    fit = faithful_model.fit(faithful, seed=0)
    assert fit.params["z"]["probs"].dims == ("z",)
    mean = fit.params["x"]["mean"]
    assert mean.dims == ("z", "feature") and list(mean["feature"].values) == ["eruptions", "waiting"]
    assert fit.params["x"]["covariance"].dims == ("z", "feature", "feature_")
    assert fit.posterior.dims == ("sample", "z") and fit.posterior.shape == (272, 2)
    np.testing.assert_allclose(fit.posterior.sum("z"), 1.0)
    assert set(fit.trace.data_vars) == {"loglik", "elbo", "kl", "time"}
    assert fit.converged and fit.trace.sizes["iteration"] == fit.n_iter + 1
    assert fit.loglik == fit.trace["loglik"].values[-1]
    assert fit.n_params == 1 + 2 * 2 + 2 * 3


def test_max_iter_counts_m_steps_and_tol_zero_runs_them_all(faithful, faithful_model):
    for n in (0, 1, 7):
        fit = faithful_model.fit(faithful, max_iter=n, tol=0, seed=0)
        assert fit.n_iter == n and fit.trace["loglik"].size == n + 1
        assert not fit.converged


def test_tol_stops_at_relative_change(faithful, faithful_model):
    fit = faithful_model.fit(faithful, tol=1e-4, seed=0)
    ll = fit.trace["loglik"].values
    assert ll[-1] - ll[-2] <= 1e-4 * abs(ll[-1])
    assert np.all(np.diff(ll)[:-1] > 1e-4 * np.abs(ll[1:-1]))


def test_not_converging_warns(faithful, faithful_model):
    with pytest.warns(em.ConvergenceWarning, match="max_iter=2"):
        fit = faithful_model.fit(faithful, max_iter=2, seed=0)
    assert not fit.converged


def test_restarts_keep_best_and_all_traces(faithful):
    model = em.Model().latent("z", em.Categorical(3)).observe(["eruptions", "waiting"], em.MultivariateNormal)
    fit = model.fit(faithful, n_init=4, init="random", seed=3, max_iter=200)
    finals = fit.traces["loglik"].groupby("restart").map(lambda s: s.isel(step=-1))
    assert fit.n_init == 4 and finals.size == 4
    assert fit.loglik == finals.max()
    assert fit.restart == int(finals.values.argmax())


def test_seed_reproduces_and_is_recorded(faithful, faithful_model):
    a = faithful_model.fit(faithful, init="random", seed=11)
    b = faithful_model.fit(faithful, init="random", seed=11)
    xr.testing.assert_identical(a.params["x"].to_dataset(), b.params["x"].to_dataset())
    c = faithful_model.fit(faithful, init="random")
    d = faithful_model.fit(faithful, init="random", seed=c.seed)
    assert c.loglik == d.loglik


def test_init_from_responsibilities_fit_and_mapping(faithful, faithful_model):
    first = faithful_model.fit(faithful, seed=0)
    again = faithful_model.fit(faithful, init=first)
    assert again.n_iter <= 2 and again.loglik == pytest.approx(first.loglik, rel=1e-9)
    from_resp = faithful_model.fit(faithful, init=first.posterior)
    assert from_resp.loglik == pytest.approx(first.loglik, rel=1e-9)
    means = first.params["x"]["mean"]
    partial = faithful_model.fit(faithful, init={"x": {"mean": means}})
    assert partial.loglik == pytest.approx(first.loglik, rel=1e-9)
    np.testing.assert_allclose(partial.params["x"]["mean"], means, rtol=1e-5)


def test_mapping_init_is_theta_zero(faithful, faithful_model):
    start = {"z": {"probs": [0.5, 0.5]},
             "x": {"mean": [[2.0, 55.0], [4.5, 80.0]], "covariance": [np.diag([0.1, 30.0]), np.diag([0.2, 40.0])]}}
    fit = faithful_model.fit(faithful, init=start, max_iter=0)
    np.testing.assert_allclose(fit.params["x"]["mean"], start["x"]["mean"])
    np.testing.assert_allclose(fit.params["x"]["covariance"], start["x"]["covariance"])
    assert fit.trace["kl"].item() == 0.0


def test_labelled_init_is_aligned_by_coordinate(faithful, faithful_model):
    fit = faithful_model.fit(faithful, seed=0)
    mean = fit.params["x"]["mean"]
    shuffled = mean.isel(feature=[1, 0]).transpose("feature", "z")
    again = faithful_model.fit(faithful, init={"x": {"mean": shuffled}}, max_iter=0)
    np.testing.assert_allclose(again.params["x"]["mean"], mean)


def test_fixed_parameters_are_not_learned(faithful):
    model = em.Model().latent("z", em.Categorical(2, probs=[0.5, 0.5])).observe("waiting", em.Normal(tied="variance"))
    fit = model.fit(faithful, seed=0)
    np.testing.assert_array_equal(fit.params["z"]["probs"], [0.5, 0.5])
    assert fit.params["waiting"]["variance"].dims == ()
    assert fit.n_params == 2 + 1
    with pytest.raises(em.ModelError, match="fixed by the declaration"):
        model.fit(faithful, init={"z": {"probs": [0.3, 0.7]}})


def test_fixed_mean_learns_variance_around_it(faithful):
    model = em.Model().observe("waiting", em.Normal(mean=70.0))
    fit = model.fit(faithful)
    w = faithful["waiting"].values
    assert fit.params["waiting"]["mean"].item() == 70.0
    assert fit.params["waiting"]["variance"].item() == pytest.approx(np.mean((w - 70.0) ** 2), rel=1e-12)


def test_model_without_latent_is_the_mle(faithful):
    fit = em.Model().observe(["eruptions", "waiting"], em.MultivariateNormal, name="x").fit(faithful)
    X = np.column_stack([faithful["eruptions"], faithful["waiting"]])
    np.testing.assert_allclose(fit.params["x"]["mean"], X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(fit.params["x"]["covariance"], np.cov(X.T, bias=True), rtol=1e-10)
    assert fit.params["x"]["mean"].dims == ("feature",)
    with pytest.raises(em.ModelError, match="no latent"):
        fit.predict(faithful)


def test_predictions(faithful, faithful_model):
    fit = faithful_model.fit(faithful, seed=0)
    proba = fit.predict_proba(faithful)
    labels = fit.predict(faithful)
    np.testing.assert_array_equal(labels.values, proba.argmax("z").values)
    np.testing.assert_allclose(proba, fit.posterior)
    scores = fit.score_samples(faithful)
    assert scores.dims == ("sample",)
    assert fit.score(faithful) == pytest.approx(fit.loglik / 272, rel=1e-12)
    assert fit.bic() == pytest.approx(-2 * fit.loglik + fit.n_params * np.log(272))
    assert fit.bic(faithful) == pytest.approx(fit.bic(), rel=1e-12)
    assert fit.aic() == pytest.approx(-2 * fit.loglik + 2 * fit.n_params)
    one = fit.predict(faithful.isel(sample=[5]))
    assert one.values[0] == labels.values[5]


def test_predict_uses_state_labels(faithful):
    model = em.Model().latent("kind", em.Categorical(["short", "long"])).observe("eruptions", em.Normal)
    fit = model.fit(faithful, seed=0)
    assert set(fit.predict(faithful).values) == {"short", "long"}
    assert list(fit.posterior["kind"].values) == ["short", "long"]


def test_sample_is_shaped_like_the_data(faithful, faithful_model):
    fit = faithful_model.fit(faithful, seed=0)
    draws = fit.sample(5000, seed=1)
    assert set(draws.data_vars) == {"eruptions", "waiting"}
    assert draws["waiting"].dims == ("sample",) and draws.sizes["sample"] == 5000
    xr.testing.assert_identical(draws, fit.sample(5000, seed=1))
    share = (draws["z"] == 1).mean().item()
    assert share == pytest.approx(fit.params["z"]["probs"].values[1], abs=0.03)
    mean = draws["waiting"].where(draws["z"] == 1, drop=True).mean().item()
    assert mean == pytest.approx(fit.params["x"]["mean"].sel(z=1, feature="waiting").item(), abs=0.5)


def test_sample_draws_in_the_dtypes_the_data_had(tmp_path):
    # counts as the integers they were, 0/1 as bool, float32 as float32; a Normal fitted to integer
    # data draws non-integers, which stay float64 rather than be rounded; labels stay labels
    rng = np.random.default_rng(0)
    n = 300
    ds = xr.Dataset({"counts": ("sample", rng.poisson(3, n).astype(np.int32)), "flag": ("sample", rng.random(n) < 0.3),
                     "size": ("sample", rng.normal(size=n).astype(np.float32)), "score": ("sample", rng.integers(0, 9, n)),
                     "kind": ("sample", rng.choice(["a", "b"], n))})
    model = (em.Model().latent("z", em.Categorical(2)).observe("counts", em.Poisson).observe("flag", em.Bernoulli)
             .observe("size", em.Normal).observe("score", em.Normal).observe("kind", em.Categorical))
    fit = model.fit(ds, seed=0)
    fit.save(tmp_path / "fit.nc")
    for one in (fit, em.load(tmp_path / "fit.nc")):
        draws = one.sample(50, seed=1)
        assert {v: draws[v].dtype for v in draws.data_vars} == {
            "counts": np.int32, "flag": np.bool_, "size": np.float32, "score": np.float64, "kind": ds["kind"].dtype}
        assert np.all(draws["counts"] >= 0) and draws["flag"].any() and not draws["flag"].all()
        xr.testing.assert_identical(draws, fit.sample(50, seed=1))
    chain = (em.Model().latent("z", em.Categorical(2), markov="time").observe("counts", em.Poisson)
             .fit(ds[["counts"]].rename(sample="time"), seed=0))
    assert chain.sample(2, length=30, seed=0)["counts"].dtype == np.int32


def test_sample_keeps_extra_dims():
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"x": (("sample", "station", "hour"), rng.normal(size=(100, 2, 3)))},
                    coords={"station": ["a", "b"], "hour": [0, 6, 12]})
    fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal).fit(ds, seed=0)
    assert fit.params["x"]["mean"].dims == ("z", "station", "hour")
    draws = fit.sample(10, seed=0)
    assert draws["x"].dims == ("sample", "station", "hour")
    assert list(draws["station"].values) == ["a", "b"]


def test_save_load_round_trip(tmp_path, faithful):
    model = (em.Model().latent("z", em.Categorical(["a", "b", "c"])).observe(["eruptions", "waiting"],
             em.MultivariateNormal(covariance="diag"), name="x"))
    fit = model.fit(faithful, seed=0, n_init=2)
    fit.save(tmp_path / "fit.nc")
    back = em.load(tmp_path / "fit.nc")
    assert back.model == model
    for name in fit.params.children:
        xr.testing.assert_identical(back.params[name].to_dataset(), fit.params[name].to_dataset())
    xr.testing.assert_identical(back.traces, fit.traces)
    xr.testing.assert_identical(back.trace, fit.trace)
    assert (back.loglik, back.n_iter, back.converged, back.seed, back.restart, back.n_params) == \
        (fit.loglik, fit.n_iter, fit.converged, fit.seed, fit.restart, fit.n_params)
    xr.testing.assert_identical(back.predict_proba(faithful), fit.predict_proba(faithful))
    xr.testing.assert_identical(back.predict(faithful), fit.predict(faithful))
    xr.testing.assert_identical(back.score_samples(faithful), fit.score_samples(faithful))
    xr.testing.assert_identical(back.sample(50, seed=2), fit.sample(50, seed=2))
    with pytest.raises(em.ModelError, match="predict_proba"):
        _ = back.posterior


def test_model_with_fixed_arrays_round_trips_through_json(tmp_path, faithful):
    mean = xr.DataArray([[2.0, 55.0], [4.0, 80.0]], dims=("z", "feature"),
                        coords={"feature": ["eruptions", "waiting"]})
    model = (em.Model().latent("z", em.Categorical(2, probs=[0.4, 0.6]))
             .observe(["eruptions", "waiting"], em.MultivariateNormal(mean=mean), name="x"))
    fit = model.fit(faithful, seed=0)
    np.testing.assert_allclose(fit.params["x"]["mean"], mean)
    fit.save(tmp_path / "fixed.nc")
    assert em.load(tmp_path / "fixed.nc").model == model


@pytest.mark.parametrize("kind", ["dataarray", "dataframe", "numpy"])
def test_other_input_types_give_the_same_fit(kind, blob_data):
    X = blob_data["x"].values
    reference = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal).fit(blob_data, seed=0)
    if kind == "dataarray":
        data = blob_data["x"]
        model = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal)
    elif kind == "numpy":
        data = X
        model = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal)
    else:
        data = pd.DataFrame(X, columns=["f0", "f1"])
        model = em.Model().latent("z", em.Categorical(3)).observe(["f0", "f1"], em.MultivariateNormal, name="x")
    fit = model.fit(data, seed=0)
    np.testing.assert_allclose(fit.params["x"]["mean"].values, reference.params["x"]["mean"].values, rtol=1e-12)
    assert fit.loglik == pytest.approx(reference.loglik, rel=1e-12)


def test_sample_dim_can_be_named_and_need_not_come_first():
    X = blobs(n=120)
    ds = xr.Dataset({"x": (("feature", "time"), X.T)})
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal(dim="feature"))
    fit = model.fit(ds, seed=0)
    assert fit.posterior.dims == ("time", "z")
    reference = model.fit(as_dataset(X).rename(sample="time"), seed=0)
    assert fit.loglik == pytest.approx(reference.loglik, rel=1e-12)


def test_callbacks_receive_every_iteration_and_can_stop(faithful, faithful_model):
    seen = []

    def stop_at_three(event):
        seen.append(event)
        if event.iteration == 3:
            event.request_stop()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = faithful_model.fit(faithful, callbacks=[stop_at_three], max_iter=50, tol=0, seed=0)
    assert [e.iteration for e in seen] == [0, 1, 2, 3]
    assert fit.n_iter == 3 and fit.stopped and not fit.converged
    assert seen[2].loglik == fit.trace["loglik"].values[2]
    assert seen[0].delta is None and seen[1].delta == pytest.approx(seen[1].loglik - seen[0].loglik)
    assert float(seen[3].params["z"]["probs"].sum()) == pytest.approx(1.0)


def test_callback_object_hears_start_and_end(faithful, faithful_model):
    class Recorder(em.Callback):
        def __init__(self):
            self.calls = []

        def on_fit_start(self, info):
            self.calls.append(("start", info.n_init, info.max_iter))

        def on_iteration(self, event):
            self.calls.append(("iteration", event.restart))

        def on_fit_end(self, fit):
            self.calls.append(("end", fit.converged))

    recorder = Recorder()
    faithful_model.fit(faithful, callbacks=[recorder], n_init=2, seed=0)
    assert recorder.calls[0] == ("start", 2, 1000)
    assert recorder.calls[-1] == ("end", True)
    assert {c[1] for c in recorder.calls if c[0] == "iteration"} == {0, 1}


def test_keyboard_interrupt_returns_best_so_far(faithful, faithful_model):
    def interrupt(event):
        if event.iteration == 2:
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted"):
        fit = faithful_model.fit(faithful, callbacks=[interrupt], max_iter=50, tol=0, seed=0)
    assert fit.stopped and not fit.converged and fit.n_iter == 2


def test_monitor_outside_notebook_prints_text(faithful, faithful_model, capsys):
    faithful_model.fit(faithful, monitor=True, seed=0)
    assert "loglik" in capsys.readouterr().err


def test_reprs(faithful, faithful_model):
    assert "latent   z ~ Categorical(2)" in repr(faithful_model)
    assert "MultivariateNormal" in faithful_model._repr_html_()
    fit = faithful_model.fit(faithful, seed=0)
    assert "converged" in repr(fit) and f"{fit.loglik:.6g}" in repr(fit)
    assert "<table" in fit._repr_html_()


def test_a_stop_in_a_later_restart_marks_the_fit_not_converged(faithful, faithful_model):
    def stop_in_second_restart(event):
        if event.restart == 1 and event.iteration == 2:
            event.request_stop()

    fit = faithful_model.fit(faithful, callbacks=[stop_in_second_restart], n_init=3, seed=0)
    assert fit.stopped and not fit.converged
    assert fit.n_init == 2
    assert fit.traces.attrs["converged"].split(",")[0] == "1"
