"""Hidden Markov models on dask-backed data: a chunk is a run of whole sequences.

The reference is the in-memory fit of the same model on the same data with the same
seed: the sums over chunks are the sums over blocks of whole sequences in another
order, so parameters, log-likelihoods and traces agree to rounding (1e-10 relative).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em

dask = pytest.importorskip("dask")
pytest.importorskip("dask.array")

from tests.test_dask import assert_same_fit

S, T = 29, 50  # 29 sequences: chunks of 6 leave 5 in the last one


def chains(seed: int = 0) -> xr.Dataset:
    """Sequences from a sticky 3-state chain: a Normal pair and Poisson counts, holes, ragged ends, weights."""
    rng = np.random.default_rng(seed)
    A = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    z = np.zeros((S, T), dtype=int)
    z[:, 0] = rng.integers(3, size=S)
    for t in range(1, T):
        z[:, t] = (rng.random(S)[:, None] > np.cumsum(A[z[:, t - 1]], axis=1)).sum(axis=1)
    x = rng.normal(np.array([[-2.0, 0.0], [0.5, 1.0], [3.0, -1.0]])[z], 0.8)
    counts = rng.poisson(np.array([1.0, 4.0, 9.0])[z]).astype(float)
    x[rng.random(x.shape) < 0.05] = np.nan
    counts[rng.random(counts.shape) < 0.05] = np.nan
    for s, length in ((3, 31), (11, 7), (28, 40)):  # shorter sequences: NaN padding at the end
        x[s, length:] = np.nan
        counts[s, length:] = np.nan
    return xr.Dataset({"x": (("sequence", "time", "channel"), x), "counts": (("sequence", "time"), counts),
                       "w": ("sequence", rng.uniform(0.5, 2.0, S))},
                      coords={"sequence": [f"s{i}" for i in range(S)], "time": np.arange(T) * 0.5,
                              "channel": ["a", "b"]})


MODEL = (em.Model().latent("z", em.Categorical(3), markov="time")
         .observe("x", em.Normal).observe("counts", em.Poisson))


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    return chains()


@pytest.fixture(scope="module")
def reference(data: xr.Dataset) -> em.Fit:
    return MODEL.fit(data, seed=2, weights="w")


@pytest.mark.parametrize("chunks", [S, 10, 6, (20, 1, 8)], ids=["one", "regular", "ragged", "uneven"])
def test_chunked_along_the_sequences_equals_numpy(data: xr.Dataset, reference: em.Fit, chunks) -> None:
    chunked = data.chunk({"sequence": chunks})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chunks along the sequences: nothing to rechunk, nothing to say
        fit = MODEL.fit(chunked, seed=2, weights="w")
    assert_same_fit(fit, reference)
    assert fit.bic() == pytest.approx(reference.bic(), rel=1e-10)


def test_posterior_and_predictions_are_lazy_with_the_sequence_chunks(data: xr.Dataset, reference: em.Fit) -> None:
    chunked = data.chunk({"sequence": 6})
    fit = MODEL.fit(chunked, seed=2, weights="w")
    proba, posterior = fit.predict_proba(chunked), fit.posterior
    path, log_prob = fit.viterbi(chunked)
    states = fit.predict(chunked)
    scores = fit.score_samples(chunked)
    for result in (proba, posterior, path, log_prob, states, scores):
        assert result.chunks is not None and result.chunks[0] == chunked.chunks["sequence"]
    assert proba.dims == ("sequence", "time", "z") and path.dims == ("sequence", "time")
    want_path, want_log_prob = reference.viterbi(data)
    np.testing.assert_allclose(proba.values, reference.predict_proba(data).values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(posterior.values, reference.posterior.values, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(path.values, want_path.values)
    np.testing.assert_array_equal(states.values, want_path.values)
    np.testing.assert_allclose(log_prob.values, want_log_prob.values, rtol=1e-10)
    np.testing.assert_allclose(scores.values, reference.score_samples(data).values, rtol=1e-10)
    assert list(proba["sequence"].values) == list(data["sequence"].values)
    assert fit.score(chunked) == pytest.approx(reference.score(data), rel=1e-10)


def test_chunks_along_the_markov_dim_are_merged_with_a_warning(data: xr.Dataset, reference: em.Fit) -> None:
    split = data.chunk({"sequence": 10, "time": 16})
    with pytest.warns(UserWarning, match=r"chunked along the markov dimension 'time'.*merged"):
        fit = MODEL.fit(split, seed=2, weights="w")
    assert_same_fit(fit, reference)


def test_one_sequence_chunked_along_time(data: xr.Dataset) -> None:
    one = data.isel(sequence=0, drop=True).drop_vars("w")
    want = MODEL.fit(one, seed=1)
    with pytest.warns(UserWarning, match="markov dimension"):
        fit = MODEL.fit(one.chunk({"time": 20}), seed=1)
    assert_same_fit(fit, want)
    with pytest.warns(UserWarning, match="one sequence, which is one chunk"):
        _, log_prob = fit.viterbi(one.chunk({"time": 20}))
    assert isinstance(log_prob, float) and log_prob == pytest.approx(want.viterbi(one)[1], rel=1e-10)


def test_two_sequence_dims_chunked_on_both(data: xr.Dataset) -> None:
    """(run, subject, time): a chunk takes whole runs of subjects; the inner sequence dim is merged."""
    grid = data.isel(sequence=slice(0, 28)).drop_vars("w")
    grid = grid.assign_coords(run=("sequence", np.repeat(np.arange(7), 4)),
                              subject=("sequence", np.tile(np.arange(4), 7)))
    grid = grid.set_index(sequence=["run", "subject"]).unstack("sequence").transpose("run", "subject", "time", ...)
    want = MODEL.fit(grid, seed=4)
    fit = MODEL.fit(grid.chunk({"run": 3, "subject": 2}), seed=4)
    assert_same_fit(fit, want)
    proba = fit.predict_proba(grid.chunk({"run": 3, "subject": 2}))
    assert proba.dims == ("run", "subject", "time", "z") and proba.chunks[0] == (3, 3, 1)
    np.testing.assert_allclose(proba.values, want.predict_proba(grid).values, rtol=0, atol=1e-10)


def test_priors_on_a_chain_over_dask(data: xr.Dataset) -> None:
    model = (em.Model().latent("z", em.Categorical(3, prior=em.priors.Dirichlet(2.0)), markov="time")
             .observe("x", em.Normal).observe("counts", em.Poisson))
    want = model.fit(data, seed=2, weights="w", prior="weak")
    fit = model.fit(data.chunk({"sequence": 7}), seed=2, weights="w", prior="weak")
    assert_same_fit(fit, want)
    np.testing.assert_allclose(fit.trace["logpost"].values, want.trace["logpost"].values, rtol=1e-10)


def test_impossible_sequence_on_dask_names_the_global_sequence(data: xr.Dataset) -> None:
    left_right = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    model = em.Model().latent("z", em.Categorical(3, initial=[1.0, 0.0, 0.0], transition=left_right),
                              markov="time").observe("x", em.Normal(mean=[0.0, 100.0, 200.0], variance=[1.0] * 3))
    x = np.zeros((12, 5))
    x[9] = [0.0, 100.0, 200.0, 0.0, 0.0]  # a left-to-right chain never returns to state 0
    ds = xr.Dataset({"x": (("sequence", "time"), x)}, coords={"sequence": np.arange(12) * 10})
    for chunks in (None, 4):
        with pytest.raises(em.ModelError, match=r"the sequence at sequence=90, time=3 has probability 0"):
            model.fit(ds if chunks is None else ds.chunk({"sequence": chunks}), max_iter=0)


def test_simulate_draws_a_chain_along_each_sequence_in_memory_and_lazily(data: xr.Dataset) -> None:
    """emdsl.regression.simulate on a hidden Markov model with a regression emission: a path of the
    chain along every sequence (holes where a sequence ends are kept), one-chunk dask data give the
    in-memory draws, several chunks lazy draws; the paths' transitions follow the fitted chain."""
    from emdsl.regression import simulate

    rng = np.random.default_rng(3)
    ds = data.assign(dose=(("sequence", "time"), rng.uniform(0, 2, (S, T))))
    ds["y"] = ds["dose"] * 2.0 + ds["x"].isel(channel=0)
    model = (em.Model().latent("z", em.Categorical(3), markov="time")
             .observe("y", em.Normal, covariates=["dose"]).observe("counts", em.Poisson))
    fit = model.fit(ds, seed=2, max_iter=50)
    with pytest.raises(em.ModelError, match=r"regression on \['dose'\].*use emdsl.regression.simulate"):
        fit.sample(3, length=10)
    in_memory = simulate(fit, ds, seed=7)
    assert in_memory["z"].dims == ("sequence", "time")
    for name in ("y", "counts"):
        drawn = in_memory[name].transpose("sequence", "time").values
        assert np.array_equal(np.isnan(drawn[3, 31:]), np.ones(T - 31, bool)), name  # the ended sequence
        assert np.isfinite(drawn[0]).all(), name  # holes inside a sequence are drawn
    assert np.all(in_memory["counts"].values[np.isfinite(in_memory["counts"].values)] % 1 == 0)
    one_chunk = simulate(fit, ds.chunk({"sequence": S}), seed=7)
    for name in ("y", "counts", "z"):
        np.testing.assert_array_equal(one_chunk[name].values, in_memory[name].values, err_msg=name)
    chunked = simulate(fit, ds.chunk({"sequence": 6}), seed=7)
    assert chunked["y"].chunks[0] == (6, 6, 6, 6, 5) and chunked["z"].chunks is not None
    paths = np.concatenate([chunked["z"].values, in_memory["z"].values]).astype(int)
    # transition frequencies of the drawn paths against the fitted matrix (2 × 29 × 49 steps)
    counts = np.zeros((3, 3))
    np.add.at(counts, (paths[:, :-1].ravel(), paths[:, 1:].ravel()), 1)
    fitted = fit.params["z"]["transition"].values
    rows = counts.sum(axis=1, keepdims=True)
    assert np.all(np.abs(counts / rows - fitted) < 5 * np.sqrt(fitted * (1 - fitted) / rows) + 1e-3)
