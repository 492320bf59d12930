"""Exact EM over dask chunks equals the in-memory fit; lazy outputs; bad input; online EM; float32.

The reference is always the in-memory (numpy) path of the same model on the same data,
with the same seed: the sums over chunks are the sums over blocks in another order, so
parameters, log-likelihoods and traces must agree to rounding (1e-10 relative).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.errors import ModelError

dask = pytest.importorskip("dask")
pytest.importorskip("dask.array")

N = 1003  # ragged: chunks of 97 leave 33 rows in the last one


def mixed_data(n: int = N, seed: int = 0) -> xr.Dataset:
    """Two groups over every family of the representative set, with holes and weights."""
    rng = np.random.default_rng(seed)
    group = rng.random(n) < 0.45
    x = np.where(group[:, None], rng.normal(0, 1, (n, 3)), rng.normal(2.5, 0.7, (n, 3)))
    x[rng.random(x.shape) < 0.1] = np.nan  # holes in the MVN events: the conditional-Gaussian path
    y = np.where(group[:, None], rng.normal(-1, 1, (n, 2)), rng.normal(1, 2, (n, 2)))
    y[rng.random(y.shape) < 0.05] = np.nan
    counts = rng.poisson(np.where(group, 2.0, 7.0)).astype(float)
    counts[rng.random(n) < 0.05] = np.nan
    labels = np.where(group, rng.choice(["red", "green", "blue"], n, p=[.6, .3, .1]),
                      rng.choice(["red", "green", "blue"], n, p=[.1, .3, .6])).astype(object)
    labels[rng.random(n) < 0.05] = None
    trials = rng.integers(1, 12, n)
    successes = rng.binomial(trials, np.where(group, 0.2, 0.7)).astype(float)
    return xr.Dataset(
        {"x": (("sample", "feature"), x), "y": (("sample", "channel"), y), "counts": ("sample", counts),
         "colour": ("sample", labels), "heads": ("sample", successes), "tosses": ("sample", trials),
         "w": ("sample", rng.uniform(0.5, 2.0, n))},
        coords={"sample": np.arange(n) * 10, "feature": ["a", "b", "c"], "channel": ["p", "q"]})


MODEL = (em.Model().latent("z", em.Categorical(2))
         .observe("x", em.MultivariateNormal)
         .observe("y", em.Normal)
         .observe("counts", em.Poisson)
         .observe("colour", em.Categorical)
         .observe("heads", em.Binomial(trials="tosses")))


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    return mixed_data()


@pytest.fixture(scope="module")
def reference(data: xr.Dataset) -> em.Fit:
    return MODEL.fit(data, seed=3, weights="w")


def assert_same_fit(got: em.Fit, want: em.Fit, rtol: float = 1e-10) -> None:
    assert got.n_iter == want.n_iter
    np.testing.assert_allclose(got.trace["loglik"].values, want.trace["loglik"].values, rtol=rtol, atol=0)
    for node in want.params.children:
        for key, value in want.params[node].data_vars.items():
            scale = float(np.abs(value).max()) or 1.0
            np.testing.assert_allclose(got.params[node][key].values, value.values, rtol=rtol,
                                       atol=rtol * scale, err_msg=f"{node}.{key}")


@pytest.mark.parametrize("chunks", [N, 250, 97, (500, 3, 500)], ids=["one", "regular", "ragged", "uneven"])
def test_threaded_equals_numpy(data: xr.Dataset, reference: em.Fit, chunks: int | tuple) -> None:
    fit = MODEL.fit(data.chunk({"sample": chunks}), seed=3, weights="w")
    assert_same_fit(fit, reference)
    assert fit.weight_total == pytest.approx(reference.weight_total, rel=1e-12)
    assert fit.bic() == pytest.approx(reference.bic(), rel=1e-10)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_model_without_a_latent(data: xr.Dataset, init: str) -> None:
    """One component and no ``latent(...)`` at all: the dask start needs no latent to seed
    (it read the latent's family and raised AttributeError, found by the dask fuzz)."""
    model = em.Model().observe("y", em.Normal).observe("counts", em.Poisson)
    want = model.fit(data, seed=0, init=init, weights="w")
    assert_same_fit(model.fit(data.chunk({"sample": 97}), seed=0, init=init, weights="w"), want)


def test_random_start_does_not_depend_on_the_chunks(data: xr.Dataset) -> None:
    """``init="random"`` with a seed is one start, whatever the chunks or the engine's blocks
    (each block was seeded by its own first row, so chunked data started elsewhere: found by
    fuzzing dask against memory)."""
    want = MODEL.fit(data, seed=5, init="random", max_iter=3, tol=0, weights="w")
    for chunks in (97, (500, 3, 500)):
        assert_same_fit(MODEL.fit(data.chunk({"sample": chunks}), seed=5, init="random", max_iter=3, tol=0,
                                  weights="w"), want)
    with em.set_options(block_rows=100):
        assert_same_fit(MODEL.fit(data, seed=5, init="random", max_iter=3, tol=0, weights="w"), want)


@pytest.mark.parametrize("family, markov", [("Gamma", False), ("Gamma", True), ("Exponential", True)])
def test_rounding_slack_next_to_the_largest_float(family: str, markov: bool) -> None:
    """One value at 1.7e308: the states that cannot hold it have L ≈ −1e308 or −∞ there, terms that reach
    neither ℓ nor the statistics. The run-time check's slack leaves them out, on dask as in memory
    (dask kept the cheap bound, ∞, and the Exponential chain's was 5.7e294 on ℓ = −775.6 in both)."""
    rng = np.random.default_rng(7)
    x = np.exp(np.r_[rng.normal(0, 0.5, 20), rng.normal(2, 0.5, 20)] / 2)
    x[5] = 1.7e308
    declared = getattr(em, family)()
    if markov:
        model = em.Model().latent("z", em.Categorical(2), markov="time").observe("v", declared)
        ds = xr.Dataset({"v": (("sample", "time"), x.reshape(4, 10))})
    else:
        model = em.Model().latent("z", em.Categorical(2)).observe("v", declared)
        ds = xr.Dataset({"v": ("sample", x)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the overflow is detected and handled: no warning reaches users
        want = model.fit(ds, seed=1, max_iter=25)
        got = model.fit(ds.chunk({"sample": 2}), seed=1, max_iter=25)
    slack = want.traces["slack"].values
    assert np.all(slack < 0.1), slack  # ℓ is about −750: a check that can fail
    np.testing.assert_allclose(got.traces["slack"].values, slack, rtol=1e-6)
    assert got.loglik == pytest.approx(want.loglik, rel=1e-10)


def test_mixed_dask_and_memory_variables(data: xr.Dataset, reference: em.Fit) -> None:
    """Only some variables dask-backed (and the weights in memory): everything is rechunked alike."""
    mixed = data.copy()
    mixed["x"] = data["x"].chunk({"sample": 300})
    mixed["tosses"] = data["tosses"].chunk({"sample": 77})
    assert_same_fit(MODEL.fit(mixed, seed=3, weights="w"), reference)


def test_event_dimension_split_is_rechunked(data: xr.Dataset, reference: em.Fit) -> None:
    """A chunk must hold whole events: chunks along the feature dim are merged automatically."""
    split = data.chunk({"sample": 200, "feature": 1, "channel": 1})
    assert_same_fit(MODEL.fit(split, seed=3, weights="w"), reference)


def test_one_dask_computation_per_e_step(data: xr.Dataset) -> None:
    from dask.callbacks import Callback

    passes: list[bool] = []

    class Count(Callback):
        def _start(self, dsk: dict) -> None:
            passes.append(any("_summarize_chunk" in str(key) for key in dsk))

    with Count():
        fit = MODEL.fit(data.chunk({"sample": 97}), seed=3, weights="w")
    # one computation per E-step: θ⁽⁰⁾'s and one per M-step (more per iteration when accelerated)
    assert sum(passes) == int(fit.trace["e_steps"].values[-1]) >= fit.n_iter + 1
    # the rest: one pass per scan (values with the units' moments, levels, trials, weights, patterns,
    # seeding, log h); 16 when the units took a pass of their own
    assert len(passes) - sum(passes) <= 14


def test_lazy_outputs_keep_the_chunks(data: xr.Dataset, reference: em.Fit) -> None:
    chunked = data.chunk({"sample": 97})
    fit = MODEL.fit(chunked, seed=3, weights="w")
    proba = fit.predict_proba(chunked)
    scores = fit.score_samples(chunked)
    states = fit.predict(chunked)
    for result in (proba, scores, states, fit.posterior):
        assert result.chunks is not None and result.chunks[0] == chunked.chunks["sample"]
    np.testing.assert_allclose(proba.values, reference.predict_proba(data).values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(scores.values, reference.score_samples(data).values, rtol=1e-10)
    assert (states.values == reference.predict(data).values).all()
    assert (scores["sample"].values == data["sample"].values).all()
    assert fit.score(chunked) == pytest.approx(reference.score(data), rel=1e-10)


def test_distributed_local_cluster_equals_numpy(data: xr.Dataset, reference: em.Fit) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                                  memory_limit="1GiB") as cluster, distributed.Client(cluster):
        chunked = data.chunk({"sample": 250}).persist()  # the chunks live on the workers
        fit = MODEL.fit(chunked, seed=3, weights="w")
        proba = fit.predict_proba(chunked).compute()
    assert_same_fit(fit, reference)
    np.testing.assert_allclose(proba.values, reference.predict_proba(data).values, rtol=0, atol=1e-10)


def test_seeding_on_a_sample_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond SEED_SAMPLE rows, k-means++ runs on a seeded sample; the fit is reproducible and finds the optimum."""
    from emdsl.engine import chunked

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (600, 2)), rng.normal(6, 1, (600, 2))])
    ds = xr.Dataset({"x": (("sample", "feature"), x)})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal)
    monkeypatch.setattr(chunked, "SEED_SAMPLE", 100)
    first = model.fit(ds.chunk({"sample": 128}), seed=5)
    again = model.fit(ds.chunk({"sample": 300}), seed=5)
    assert first.loglik == pytest.approx(again.loglik, rel=1e-10)
    assert first.loglik == pytest.approx(model.fit(ds, seed=5).loglik, rel=1e-9)



def _log_clusters(n: int = 1200) -> xr.Dataset:
    """Three groups apart in log x (LogNormal) and in a Beta variable with holes: families seeded
    in their own units (log x, then centred and scaled per element)."""
    rng = np.random.default_rng(2)
    group = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    x = np.exp(np.array([0.0, 1.5, 3.0])[group] + rng.normal(0, 0.35, n))
    b = np.clip(np.array([0.2, 0.5, 0.8])[group] + rng.normal(0, 0.05, n), 0.01, 0.99)
    b[rng.random(n) < 0.1] = np.nan
    return xr.Dataset({"x": ("sample", x), "b": ("sample", b)})


def test_seeding_is_the_in_memory_one_for_families_in_their_own_units() -> None:
    """Up to SEED_SAMPLE rows the dask start is the in-memory one, holes and seeding features included."""
    ds = _log_clusters()
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.LogNormal).observe("b", em.Beta)
    for seed in range(2):
        assert_same_fit(model.fit(ds.chunk({"sample": 256}), seed=seed, accelerate=None),
                        model.fit(ds, seed=seed, accelerate=None), rtol=1e-9)


def test_rows_beyond_the_seed_sample_are_assigned_in_the_seeding_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond SEED_SAMPLE, every row goes to its nearest k-means centre in the seeding space (log x,
    scaled as the sample was), as in memory: measured over 10 seeds, every start reaches the
    in-memory optimum; nearest seeds on the raw x reached it from 4 of them."""
    from emdsl.engine import chunked

    ds = _log_clusters()
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.LogNormal)
    best = model.fit(ds, seed=0, n_init=5, tol=1e-13).loglik
    monkeypatch.setattr(chunked, "SEED_SAMPLE", 150)
    for seed in range(4):  # tol: the optimum itself, not where one stopping rule or another left the fit
        assert model.fit(ds.chunk({"sample": 256}), seed=seed, tol=1e-13).loglik == pytest.approx(best, rel=1e-9)

# -- bad input ----------------------------------------------------------------------------------
def test_nan_weight_names_the_chunk(data: xr.Dataset) -> None:
    bad = data.copy()
    bad["w"] = bad["w"].where(bad["sample"] != 10 * 420)
    with pytest.raises(ModelError, match=r"1 weight is missing or infinite.*sample=4200 \(chunk 4 of 11 along "
                                         r"'sample' \(rows 388–484\)\)"):
        MODEL.fit(bad.chunk({"sample": 97}), weights="w")


def test_nan_trials_names_the_chunk(data: xr.Dataset) -> None:
    """Binomial's trials forbid NaN (a hole in x is missing; a hole in the trials is an error)."""
    bad = data.copy()
    bad["tosses"] = bad["tosses"].astype(float).where(bad["sample"] != 10 * 1000)
    with pytest.raises(ModelError, match=r"trials='tosses': 1 value\(s\) are not non-negative integers \(first "
                                         r"at sample=10000 \(chunk 10 of 11 along 'sample' \(rows 970–1002\)\)\)"):
        MODEL.fit(bad.chunk({"sample": 97}), weights="w")


def test_infinite_value_names_the_chunk(data: xr.Dataset) -> None:
    bad = data.copy(deep=True)
    bad["x"][500, 1] = np.inf
    with pytest.raises(ModelError, match=r"variable 'x' has 1 infinite value \(±inf\), first at sample=5000, "
                                         r"feature='b' \(chunk 5 of 11"):
        MODEL.fit(bad.chunk({"sample": 97}), weights="w")


def test_unknown_level_in_new_dask_data(data: xr.Dataset, reference: em.Fit) -> None:
    new = data.copy(deep=True)
    new["colour"][700] = "purple"
    with pytest.raises(ModelError, match=r"1 value that is not a known level \(first 'purple' at sample=7000 "
                                         r"\(chunk 7 of 11"):
        reference.predict_proba(new.chunk({"sample": 97}))


def test_tasks_pickle_for_worker_processes(data: xr.Dataset, reference: em.Fit) -> None:
    """What a task ships to a worker process (the data-free plan) pickles and runs there alike."""
    import pickle

    from emdsl.compile import compile_plan
    from emdsl.data import dask_source
    from emdsl.engine.chunked import _summarize_chunk
    from emdsl.engine.mstep import natural_matrix

    plan = compile_plan(MODEL, data.chunk({"sample": 500}), weights="w")
    theta = em.compile.start_values(plan, em.labels.tree_values(reference.params))
    skeleton = pickle.loads(pickle.dumps(dask_source.skeleton(plan)))
    slots, arrays = dask_source.layout(plan)
    blocks = [np.asarray(array[:500]) for array in arrays]
    H = natural_matrix(plan, theta)
    remote = _summarize_chunk(skeleton, slots, 0, H, theta, *blocks)
    local = _summarize_chunk(dask_source.skeleton(plan), slots, 0, H, theta, *blocks)
    np.testing.assert_allclose(remote.stats, local.stats, rtol=1e-14)
    assert remote.loglik == pytest.approx(local.loglik, rel=1e-14)


def test_statistics_that_overflow_are_refused_on_dask_as_in_memory() -> None:
    """1.7e308 in a Gamma variable, weighted 1.14: its sums overflow. In memory that is refused before
    the start; on dask the start's M-step met the overflowed sums first ("cannot convert float NaN to
    integer"). Found by fuzzing dask against memory."""
    ds = xr.Dataset({"v": (("sample", "e"), [[2.07, 1.84], [1.7e308, 3.17]]), "w": ("sample", [0.0, 1.14])})
    model = em.Model().observe("v", em.Gamma())
    for data in (ds, ds.chunk({"sample": 1})):
        with pytest.raises(em.ModelError, match=r"observe\('v', Gamma\): variable 'v' reaches 1.7e\+308, and summed "
                                                r"over the 1.14 \(weighted\) samples its statistics overflow"):
            model.fit(data, weights="w", seed=0)
