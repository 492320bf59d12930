"""Regressions (covariates=) on dask-backed data equal the in-memory fit; their outputs stay lazy.

GLM and concomitant nodes take the engine's per-row path: each chunk's task finds its own rows
with an observed response, the design is built chunk by chunk from lazy covariates (categorical
ones one-hot with the levels of one pass), and only the per-chunk sums (XᵀRX, XᵀRy, the IRLS
minorizer's pieces) travel. The reference is the numpy path of the same model, data and seed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.errors import ModelError
from tests.engine.test_monotone import check_trace

dask = pytest.importorskip("dask")
pytest.importorskip("dask.array")

N = 1003  # chunks of 97 leave a ragged last chunk of 33 rows
CHUNKINGS = [N, 250, 97, (500, 3, 500)]


def regimes(n: int = N, seed: int = 0) -> xr.Dataset:
    """Two regimes (the upper one more likely with age) of a line, a Poisson rate with exposure,
    a 0/1 flag and a binomial share in dose; holes in every response; a categorical covariate."""
    rng = np.random.default_rng(seed)
    age, dose = rng.uniform(20, 70, n), rng.uniform(0, 4, n)
    group = rng.choice(["a", "b", "c"], n).astype(object)
    upper = rng.random(n) < 1 / (1 + np.exp(-(-3 + 0.08 * age)))
    y = np.where(upper, 5 - 0.8 * dose, 1 + 0.6 * dose) + 0.5 * (group == "b") + rng.normal(0, 0.7, n)
    log_exposure = np.log(rng.uniform(0.5, 3, n))
    counts = rng.poisson(np.exp(np.where(upper, 1.5 - 0.3 * dose, 0.2 + 0.4 * dose) + log_exposure)).astype(float)
    flag = (rng.random(n) < 1 / (1 + np.exp(-np.where(upper, 1 - 0.8 * dose, -1 + 0.7 * dose)))).astype(float)
    tosses = rng.integers(1, 12, n)
    heads = rng.binomial(tosses, 1 / (1 + np.exp(-np.where(upper, 0.5 - 0.5 * dose, -1 + 0.6 * dose))))
    heads = heads.astype(float)
    for values in (y, counts, flag, heads):
        values[rng.random(n) < 0.06] = np.nan
    return xr.Dataset({"y": ("sample", y), "counts": ("sample", counts), "flag": ("sample", flag),
                       "heads": ("sample", heads), "tosses": ("sample", tosses), "dose": ("sample", dose),
                       "age": ("sample", age), "group": ("sample", group), "log_exposure": ("sample", log_exposure),
                       "w": ("sample", rng.uniform(0.5, 2.0, n))}, coords={"sample": np.arange(n) * 10})


def _z(**kwargs):
    return em.Model().latent("z", em.Categorical(2), **kwargs)


MODELS = {
    "normal": _z().observe("y", em.Normal, covariates=["dose", "group"]),
    "poisson-offset": _z().observe("counts", em.Poisson, covariates=["dose"], offset="log_exposure"),
    "bernoulli": _z().observe("flag", em.Bernoulli, covariates=["dose", "group"]),
    "binomial": _z().observe("heads", em.Binomial(trials="tosses"), covariates=["dose"]),
    "concomitant": _z(covariates=["age"]).observe("y", em.Normal, covariates=["dose"]),
    "everything": (_z(covariates=["age"]).observe("y", em.Normal, covariates=["dose", "group"])
                   .observe("counts", em.Poisson, covariates=["dose"], offset="log_exposure")
                   .observe("heads", em.Binomial(trials="tosses"), covariates=["dose"])),
}
#: the Bernoulli mixture's likelihood is flat along a ridge (hundreds of iterations): SQUAREM's
#: extrapolations amplify rounding differences of 1e-13 between two sums taken in a different
#: order into 1e-5 in the parameters there, so that comparison runs plain EM for a fixed number of steps
OPTIONS = {name: {} for name in MODELS} | {"bernoulli": {"accelerate": None, "max_iter": 60}}


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    return regimes()


def _fit(name: str, ds: xr.Dataset) -> em.Fit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        return MODELS[name].fit(ds, seed=3, weights="w", **OPTIONS[name])


@pytest.fixture(scope="module")
def references(data: xr.Dataset) -> dict[str, em.Fit]:
    return {name: _fit(name, data) for name in MODELS}


def assert_same_fit(got: em.Fit, want: em.Fit, rtol: float = 1e-10) -> None:
    assert got.n_iter == want.n_iter
    np.testing.assert_allclose(got.trace["loglik"].values, want.trace["loglik"].values, rtol=rtol, atol=0)
    np.testing.assert_allclose(got.trace["elbo"].values, want.trace["elbo"].values, rtol=rtol, atol=0)
    for node in want.params.children:
        for key, value in want.params[node].data_vars.items():
            scale = float(np.abs(value).max()) or 1.0
            np.testing.assert_allclose(got.params[node][key].values, value.values, rtol=rtol,
                                       atol=rtol * scale, err_msg=f"{node}.{key}")


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=["one", "regular", "ragged", "uneven"])
@pytest.mark.parametrize("name", list(MODELS))
def test_regression_on_dask_equals_numpy(data: xr.Dataset, references: dict[str, em.Fit], name: str,
                                         chunks: int | tuple) -> None:
    fit = _fit(name, data.chunk({"sample": chunks}))
    assert_same_fit(fit, references[name])
    check_trace(fit)  # generalized EM's guarantee, checked at run time too


def _computations(fit_it) -> tuple[list[bool], object]:
    from dask.callbacks import Callback

    passes: list[bool] = []

    class Count(Callback):
        def _start(self, dsk: dict) -> None:
            passes.append(any("_summarize_chunk" in str(key) for key in dsk))

    with Count():
        result = fit_it()
    return passes, result


@pytest.mark.parametrize("name", ["poisson-offset", "binomial", "concomitant"])
def test_one_dask_computation_per_e_step_and_the_data_stay_lazy(data: xr.Dataset, name: str) -> None:
    """Each E-step is one computation; the IRLS steps add none here (their box bound shows every step
    is within the trust region); the rest are the compile-time scans (a handful)."""
    chunked = data.chunk({"sample": 97})
    passes, fit = _computations(lambda: _fit(name, chunked))
    assert sum(passes) == int(fit.trace["e_steps"].values[-1])
    assert len(passes) - sum(passes) <= 12
    plan = fit._compiled(chunked)[0]
    from emdsl.data import is_dask

    for node in plan.nodes:  # nothing was loaded: the design, the GLM's columns and its rows are lazy
        assert all(is_dask(source) for source in node.sources)
        assert all(is_dask(value) for value in node.aux.values())


def test_trust_region_passes_keep_the_numpy_steps() -> None:
    """Far from the optimum the trust region binds: the M-step then reads the exact reach of its steps
    (one extra pass for all states); the steps, and the fit, are still the in-memory ones."""
    from emdsl import regression

    rng = np.random.default_rng(7)
    n = 700
    x = rng.uniform(-2, 3, n)
    z = rng.uniform(0, 1, n)
    ds = xr.Dataset({"x": ("sample", x), "z": ("sample", z),
                     "y": ("sample", rng.poisson(np.exp(0.5 + 1.2 * x - 0.8 * z)).astype(float))})
    model = em.Model().observe("y", em.Poisson, covariates=["x", "z"])
    init = {"y": {"coef": [3.0, -1.0, 2.0]}}  # far off: the first steps are shortened
    want = model.fit(ds, init=init, accelerate=None)
    calls = []
    original = regression.LazyDesign.reaches

    def counted(self, steps, delta):
        before = self.passes
        out = original(self, steps, delta)
        calls.append(self.passes - before)
        return out

    regression.LazyDesign.reaches = counted
    try:
        passes, got = _computations(lambda: model.fit(ds.chunk({"sample": 97}), init=init, accelerate=None))
    finally:
        regression.LazyDesign.reaches = original
    assert sum(calls) >= 3  # the exact reach was needed in several M-steps ...
    assert sum(calls) < got.n_iter  # ... but not near the optimum
    assert len(passes) - sum(passes) <= 12 + sum(calls)
    assert_same_fit(got, want)
    check_trace(got)


@pytest.mark.parametrize("name", ["everything", "bernoulli"])
def test_outputs_on_dask_are_lazy_and_equal_numpy(data: xr.Dataset, references: dict[str, em.Fit],
                                                  name: str) -> None:
    chunked = data.chunk({"sample": 97})
    fit, reference = _fit(name, chunked), references[name]
    proba, scores, states = fit.predict_proba(chunked), fit.score_samples(chunked), fit.predict(chunked)
    for result in (proba, scores, states, fit.posterior):
        assert result.chunks is not None and result.chunks[0] == chunked.chunks["sample"]
    np.testing.assert_allclose(proba.values, reference.predict_proba(data).values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fit.posterior.values, reference.posterior.values, rtol=0, atol=1e-10)
    # a sample with nothing observed scores log Σ π = 0 up to rounding (-1.1e-16 on one path, 0.0
    # on the other), which no relative tolerance admits
    np.testing.assert_allclose(scores.values, reference.score_samples(data).values, rtol=1e-10, atol=1e-13)
    assert (states.values == reference.predict(data).values).all()
    filled, want = fit.impute(chunked), reference.impute(data)
    for variable in {v for decl in MODELS[name].observed for v in decl.variables}:
        assert filled[variable].chunks is not None
        np.testing.assert_allclose(filled[variable].values, want[variable].values, rtol=1e-10, atol=1e-12)


def test_new_dask_data_with_an_unseen_level_is_refused(data: xr.Dataset, references: dict[str, em.Fit]) -> None:
    new = data.copy()
    group = new["group"].values.copy()
    group[[5, 600]] = ["d", "e"]
    new["group"] = ("sample", group)
    for ds in (new, new.chunk({"sample": 97})):  # the in-memory message, from one pass over the chunks
        with pytest.raises(ModelError, match=r"covariate 'group' has levels \['d', 'e'\] that the fit "
                                             r"did not see \(it knows \['a', 'b', 'c'\]\)"):
            references["normal"].predict(ds)


def test_missing_covariate_in_a_chunk_is_named(data: xr.Dataset) -> None:
    bad = data.copy()
    bad["dose"] = bad["dose"].where(bad["sample"] != 10 * 700)
    with pytest.raises(ModelError, match=r"covariate 'dose' has 1 missing value \(first at sample=7000\)"):
        MODELS["poisson-offset"].fit(bad.chunk({"sample": 97}))


def test_collinear_dask_covariates_are_named(data: xr.Dataset) -> None:
    bad = data.assign(double=2 * data["dose"] + 1)
    model = em.Model().observe("counts", em.Poisson, covariates=["dose", "double"])
    with pytest.raises(ModelError, match=r"the terms \['intercept', 'dose', 'double'\] are collinear"):
        model.fit(bad.chunk({"sample": 97}))
    with pytest.raises(ModelError, match=r"the covariate 'dose' is constant"):
        model.fit(data.assign(dose=data["dose"] * 0 + 2, double=data["age"]).chunk({"sample": 97}))


def test_infinite_offset_on_dask_is_refused(data: xr.Dataset) -> None:
    bad = data.copy()
    bad["log_exposure"] = bad["log_exposure"].where(bad["sample"] != 30, -np.inf)
    with pytest.raises(ModelError, match=r"the offset 'log_exposure' must be finite numbers"):
        MODELS["poisson-offset"].fit(bad.chunk({"sample": 97}))


@pytest.mark.parametrize("chunks", [97, (500, 3, 500)], ids=["ragged", "uneven"])
def test_coefficient_priors_on_dask_equal_numpy(data: xr.Dataset, chunks: int | tuple) -> None:
    """MAP-EM with Gaussian priors on the coefficients (ECM for the Normal, penalized IRLS for the GLMs)."""
    model = (_z(covariates=["age"])
             .observe("y", em.Normal(prior=em.priors.Normal(0.0, [np.inf, 0.5, 1.0, 1.0])), covariates=["dose", "group"])
             .observe("counts", em.Poisson(prior=em.priors.Normal(0.0, 0.3)), covariates=["dose"],
                      offset="log_exposure"))
    want = model.fit(data, seed=3, weights="w")
    got = model.fit(data.chunk({"sample": chunks}), seed=3, weights="w")
    assert_same_fit(got, want)
    np.testing.assert_allclose(got.trace["logpost"].values, want.trace["logpost"].values, rtol=1e-10)
    assert np.all(got.trace["logpost"].values != got.trace["loglik"].values)


def test_simulate_on_dask_data_is_lazy_and_one_chunk_gives_the_in_memory_draws():
    """emdsl.regression.simulate draws chunk by chunk from the seed and each chunk's first row: lazy
    variables with the data's chunks, the in-memory draws from one chunk, the same draws each call."""
    from emdsl.regression import simulate

    ds = regimes()
    model = MODELS["everything"].observe("colour", em.Categorical)
    ds = ds.assign(colour=("sample", np.where(ds["dose"].values > 2, "red", "blue").astype(object)))
    fit = model.fit(ds, seed=1, max_iter=30)
    in_memory = simulate(fit, ds, seed=5)
    one_chunk = simulate(fit, ds.chunk({"sample": N}), seed=5)
    for name in ("y", "counts", "flag", "heads", "colour"):
        np.testing.assert_array_equal(one_chunk[name].values, in_memory[name].values, err_msg=name)
    np.testing.assert_array_equal(one_chunk["z"].values, in_memory["z"].values)
    chunked = simulate(fit, ds.chunk({"sample": 97}), seed=5)
    for name in ("y", "counts", "flag", "heads", "colour"):
        assert chunked[name].chunks == ((97,) * 10 + (33,),), name
        np.testing.assert_array_equal(chunked[name].values, simulate(fit, ds.chunk({"sample": 97}), seed=5)[name].values)
    values = chunked.compute()
    assert set(np.unique(values["colour"].values)) <= {"red", "blue"}
    observed = values["counts"].values
    assert np.all(observed >= 0) and np.all(observed == np.round(observed))
    assert np.all((values["heads"].values >= 0) & (values["heads"].values <= ds["tosses"].values))
    # the draws follow the fit: the states' shares match its posterior's within sampling error
    share = np.mean(values["z"].values == fit.params["z"].coords["z"].values[1])
    assert abs(share - float(fit.posterior.isel(z=1).mean())) < 4 * np.sqrt(0.25 / N)
