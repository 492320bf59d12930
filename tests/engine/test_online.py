"""Stepwise and incremental EM (engine/online.py) against the batch optimum, and their checks.

Tolerance for stepwise EM (Cappé & Moulines 2009). The running statistics move by
s_t = (1 − γ_t) s_{t−1} + γ_t ŝ_t with ŝ_t the average over a minibatch of B rows, whose
covariance is Σ/B. Near a fixed point, with γ slowly varying, s_t fluctuates with covariance
≈ γ_t Σ / (2B), and so does the parameter estimate (through the M-step's map, whose
Jacobian is the inverse of Σ in the mean parametrization). The log-likelihood is flat at
the optimum, so what is lost is quadratic: per sample, (ℓ* − ℓ(θ_T)) / N ≈ ½ tr(I Cov θ_T)
≈ p γ_T / (4B) for p free parameters (the complete-data information stands in for the
observed one, which is smaller, so this overstates the gap: over seeds 0–3 the measured
gaps are 2e-5 to 1.3e-4 per sample against 3.9e-4 here). A wrong step size, a wrong
scaling of the statistics or a stale θ gives a gap that does not shrink with γ_T / B.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.engine import online
from emdsl.errors import ModelError, MonotonicityError

N, B, EPOCHS = 8000, 250, 8


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(0, 1, (N // 2, 2)), rng.normal(3, 1.2, (N // 2, 2))])
    return xr.Dataset({"x": (("sample", "feature"), rng.permutation(x))})


MODEL = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal)


@pytest.fixture(scope="module")
def batch(data: xr.Dataset) -> em.Fit:
    return MODEL.fit(data, seed=0, tol=1e-12, max_iter=2000)


def bound(fit: em.Fit, steps: int, batch_size: int, decay: float = online.STEP_DECAY) -> float:
    """p γ_T / (4B): the per-sample gap stepwise EM may keep after T steps (module docstring)."""
    return fit.n_params * (steps + 1) ** -decay / (4 * batch_size)


def test_stepwise_reaches_the_batch_optimum(data: xr.Dataset, batch: em.Fit) -> None:
    fit = MODEL.fit(data, seed=0, method="stepwise", batch_size=B, max_iter=EPOCHS, tol=0)
    steps = int(fit.trace["e_steps"].values[-2] - 1)  # minibatch steps before the final full pass
    gap = (batch.loglik - fit.loglik) / N
    assert 0 <= gap <= bound(fit, steps, B)
    assert fit.trace.attrs["method"] == "stepwise"
    # the last trace entry is the exact ℓ(θ̂) of a full pass, the others running objectives
    assert fit.loglik == pytest.approx(float(fit.score_samples(data).sum()), rel=1e-12)


@pytest.mark.parametrize("method", ["stepwise", "incremental"])
def test_n_iter_counts_epochs_not_the_final_pass(data: xr.Dataset, method: str, tmp_path) -> None:
    # the trace's last entry is the full pass at θ̂; like every fit, n_iter never exceeds max_iter
    events: list[int] = []
    fit = MODEL.fit(data, seed=0, method=method, batch_size=B, max_iter=3, tol=0, n_init=2,
                    callbacks=[lambda event: events.append(event.iteration)])
    assert fit.trace.sizes["iteration"] == 5 and fit.n_iter == 3
    assert fit.restarts["n_iter"].values.tolist() == [3, 3]
    assert max(events) == 3
    fit.save(tmp_path / "fit.nc")
    assert em.load(tmp_path / "fit.nc").n_iter == 3
    if method == "stepwise":
        assert fit.partial_fit(data.isel(sample=slice(0, 1000))).n_iter == 4


def test_stepwise_on_dask_chunks(data: xr.Dataset, batch: em.Fit) -> None:
    pytest.importorskip("dask.array")
    fit = MODEL.fit(data.chunk({"sample": B}), seed=0, method="stepwise", max_iter=EPOCHS // 2, tol=0)
    steps = int(fit.trace["e_steps"].values[-2] - 1)
    assert 0 <= (batch.loglik - fit.loglik) / N <= bound(fit, steps, B)


def test_partial_fit_on_a_stream(data: xr.Dataset, batch: em.Fit) -> None:
    """Chunks arriving one by one; the first fit's units and levels are kept."""
    fit = MODEL.fit(data.isel(sample=slice(0, 1000)), seed=0, method="stepwise", batch_size=B)
    before = fit.n_iter
    for epoch in range(3):
        for start in range(0, N, 1000):
            fit = fit.partial_fit(data.isel(sample=slice(start, start + 1000)))
    assert fit.n_iter == before + 3 * N // 1000
    steps = fit._online.state.steps
    gap = (batch.loglik - float(fit.score_samples(data).sum())) / N
    assert 0 <= gap <= bound(fit, steps, B)


def test_partial_fit_continues_a_batch_em_fit_from_its_own_statistics(data: xr.Dataset, batch: em.Fit,
                                                                        tmp_path) -> None:
    """A batch-EM fit has no running statistics: its own E-step over its training data stands in
    for them (one epoch of minibatches). The stream restarted from the chunk's first minibatch
    alone before, which threw the fit away (a component's variance fell to the floor)."""
    fit = MODEL.fit(data.isel(sample=slice(0, 4000)), seed=0, tol=1e-12, max_iter=2000)
    for start in range(4000, N, 1000):  # the rest of the stream, in chunks
        fit = fit.partial_fit(data.isel(sample=slice(start, start + 1000)))
    assert fit._online.state.steps == 32 + 4 * 8  # one epoch of the fit's minibatches, then 8 per chunk
    gap = (batch.loglik - float(fit.score_samples(data).sum())) / N
    assert 0 <= gap <= bound(fit, fit._online.state.steps, 4000 // 32)
    fit.save(tmp_path / "fit.nc")
    with pytest.raises(ModelError, match="partial_fit: this fit was loaded from a file"):
        em.load(tmp_path / "fit.nc").partial_fit(data.isel(sample=slice(0, 100)))


def test_partial_fit_continues_an_incremental_fit_from_its_final_statistics(data: xr.Dataset) -> None:
    """An incremental fit hands partial_fit every minibatch's latest statistics and its update count;
    it handed over those of its starting point, with a count of 0."""
    fit = MODEL.fit(data, seed=0, method="incremental", batch_size=B, max_iter=30)
    state = fit._online.state
    assert state.steps == fit.trace["e_steps"].values[-2] - 1  # every minibatch update (before the final pass)
    means = fit.params["x"]["mean"].values.copy()
    fit.partial_fit(data.isel(sample=slice(0, B)))  # one minibatch of its own data: a step of γ ≈ 0.01
    np.testing.assert_allclose(fit.params["x"]["mean"].values, means, atol=0.02)


def test_incremental_em_is_monotone_and_exact(data: xr.Dataset, batch: em.Fit) -> None:
    """Neal & Hinton: the ELBO never decreases, and the fixed point is EM's."""
    fit = MODEL.fit(data, seed=0, method="incremental", batch_size=1000, max_iter=40, tol=1e-10)
    elbo = fit.trace["elbo"].values[:-1]
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[1:]))
    assert fit.loglik == pytest.approx(batch.loglik, rel=1e-7)


def test_a_wrong_m_step_is_caught(data: xr.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stepwise check: the M-step must not lower the running surrogate."""
    real = online.maximize

    def shifted(plan, stats, previous, hold=None):  # noqa: ANN001, ANN202
        theta, floored = real(plan, stats, previous, hold)
        if previous is not None:
            theta["x"] = {**theta["x"], "mean": theta["x"]["mean"] + 0.5}
        return theta, floored

    monkeypatch.setattr(online, "maximize", shifted)
    with pytest.raises(MonotonicityError, match="lowered the running surrogate"):
        MODEL.fit(data, seed=0, method="stepwise", batch_size=B, max_iter=1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "online"}, r"method=...\): expected one of \['em', 'stepwise', 'incremental'\]"),
    ({"method": "stepwise", "batch_size": 0}, r"batch_size=...\): must be a positive integer"),
    ({"method": "stepwise", "step_decay": 0.5}, r"step_decay=...\): must be in \(0.5, 1\]"),
    ({"method": "stepwise", "accelerate": "squarem"}, r"Use one or the other"),
    ({"dtype": "float16"}, r"dtype=...\): expected 'float64' or 'float32'"),
])
def test_bad_settings(data: xr.Dataset, kwargs: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        MODEL.fit(data, **kwargs)


@pytest.fixture(scope="module")
def sequences() -> xr.Dataset:
    """60 sequences of a 2-state chain, 80 steps each."""
    rng = np.random.default_rng(3)
    z = np.zeros((60, 80), int)
    z[:, 0] = rng.integers(2, size=60)
    for t in range(1, 80):
        z[:, t] = (rng.random(60)[:, None] > np.cumsum(np.array([[0.9, 0.1], [0.2, 0.8]])[z[:, t - 1]], axis=-1)).sum(-1)
    return xr.Dataset({"y": (("seq", "time"), rng.normal(np.array([0.0, 1.5])[z], 0.7))})


CHAIN = em.Model().latent("z", em.Categorical(2), markov="time").observe("y", em.Normal)


def test_online_em_over_a_chain_takes_minibatches_of_whole_sequences(sequences: xr.Dataset) -> None:
    """A chain's independent units are its sequences: a minibatch is a run of whole ones (about
    batch_size steps). Incremental EM reaches batch EM's optimum; stepwise EM comes within the
    module's bound, with B the minibatch's steps divided by the chain's integrated
    autocorrelation time (1 + λ₂)/(1 − λ₂) (λ₂ = 0.7 here: consecutive steps share their state,
    so a minibatch varies like 5.7 times fewer independent rows); dask chunks (of whole
    sequences) are minibatches."""
    batch = CHAIN.fit(sequences, seed=0, tol=1e-12)
    second = float(np.trace(batch.params["z"]["transition"].values)) - 1.0  # λ₂ of a 2-state chain
    per_unit = (1 + second) / (1 - second)
    incremental = CHAIN.fit(sequences, seed=0, method="incremental", batch_size=400, max_iter=60, tol=0)
    assert incremental.loglik == pytest.approx(batch.loglik, rel=1e-9)
    np.testing.assert_allclose(incremental.params["z"]["transition"], batch.params["z"]["transition"], rtol=1e-5)
    elbo = incremental.trace["elbo"].values[1:-1]
    assert np.all(np.diff(elbo) >= -1e-9 * np.abs(elbo[1:]))
    N = sequences["y"].size
    for data, size in ((sequences, 400), (sequences.chunk(seq=5), 400)):
        fit = CHAIN.fit(data, seed=0, method="stepwise", batch_size=None if data.chunks else size, max_iter=8, tol=0)
        steps = int(fit.trace["e_steps"].values[-2] - 1)
        assert 0 <= (batch.loglik - fit.loglik) / N <= bound(fit, steps, size / per_unit)
    # a stream of whole sequences, after a batch fit
    best = batch.loglik
    fit = batch.partial_fit(sequences.isel(seq=slice(0, 20)))
    assert fit.n_iter == batch.trace.sizes["iteration"] - 1 and fit.trace.sizes["iteration"] >= 2
    state = fit._online.state
    assert 0 <= (best - float(fit.score_samples(sequences).sum())) / N <= bound(fit, state.steps,
                                                                              state.batch_size / per_unit)
    with pytest.raises(ModelError, match="minibatches of whole sequences.*one sequence"):
        CHAIN.fit(sequences.isel(seq=0), method="stepwise")
