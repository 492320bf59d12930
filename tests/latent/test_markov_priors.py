"""Dirichlet priors on a Markov latent's initial distribution and transition rows (MAP-EM).

The states are made observable (an emission Categorical fixed to the identity), so the
expected counts are the path's own counts and the posterior mode has a closed form:
A_ij = (n_ij + α_j − 1) / Σ_j (n_ij + α_j − 1), π_k = (n⁰_k + α_k − 1) / Σ (…).
"""

import itertools

import numpy as np
import pytest
import scipy.stats as st
import xarray as xr

import emdsl as em
from emdsl import priors

PATHS = np.array([[0, 0, 1, 1, 1, 0, 2], [1, 1, 0, 0, 0, 1, 1], [2, 2, 2, 0, 0, 1, 1]])


def _observed_states(paths, K=3, prior=None):
    ds = xr.Dataset({"s": (("sequence", "time"), np.asarray(paths, dtype=float))})
    model = (em.Model().latent("z", em.Categorical(K, prior=prior), markov="time")
             .observe("s", em.Categorical(K, probs=np.eye(K))))
    return model, ds


def _counts(paths, K=3):
    transitions, first = np.zeros((K, K)), np.zeros(K)
    for row in paths:
        first[row[0]] += 1
        for a, b in itertools.pairwise(row):
            transitions[a, b] += 1
    return first, transitions


def _log_dirichlet(initial, transition, alpha):
    return st.dirichlet.logpdf(initial, alpha) + sum(st.dirichlet.logpdf(row, alpha) for row in transition)


@pytest.mark.parametrize("alpha", [2.0, [2.0, 1.5, 3.0]], ids=["number", "per-state"])
def test_closed_form_posterior_mode_on_a_tiny_chain(alpha):
    model, ds = _observed_states(PATHS, prior=priors.Dirichlet(alpha))
    fit = model.fit(ds, seed=0)
    a = np.broadcast_to(np.asarray(alpha, dtype=float), 3)
    first, transitions = _counts(PATHS)
    want_A = transitions + a - 1
    want_A /= want_A.sum(axis=1, keepdims=True)
    want_pi = (first + a - 1) / (first + a - 1).sum()
    np.testing.assert_allclose(fit.params["z"]["transition"].values, want_A, rtol=1e-12)
    np.testing.assert_allclose(fit.params["z"]["initial"].values, want_pi, rtol=1e-12)
    # logpost − loglik is the prior's normalized density: Dirichlet on π and on each row of A
    prior = float(fit.trace.logpost[-1] - fit.trace.loglik[-1])
    assert prior == pytest.approx(_log_dirichlet(want_pi, want_A, a), rel=1e-10)
    assert fit.n_params == 2 + 6  # a prior does not change the count of free parameters


def test_log_posterior_never_decreases_with_gaussian_emissions_and_holes():
    rng = np.random.default_rng(3)
    paths = np.zeros((6, 80), dtype=int)
    A = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    for s in range(6):
        for t in range(1, 80):
            paths[s, t] = rng.choice(3, p=A[paths[s, t - 1]])
    x = rng.normal(np.array([-1.0, 0.5, 2.0])[paths], 1.0)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[2, 60:] = np.nan  # a shorter sequence (padding)
    ds = xr.Dataset({"x": (("sequence", "time"), x)})
    for prior, options in ((priors.Dirichlet(3.0), {}), (None, {"prior": "weak"})):
        model = em.Model().latent("z", em.Categorical(3, prior=prior), markov="time").observe("x", em.Normal)
        fit = model.fit(ds, seed=1, n_init=2, max_iter=40, tol=0, **options)
        logpost, slack = fit.traces["logpost"].values, fit.traces["slack"].values
        restart = fit.traces["restart"].values
        for r in np.unique(restart):
            mine = restart == r
            assert np.all(np.diff(logpost[mine]) >= -slack[mine][1:]), np.diff(logpost[mine]).min()
        assert np.all(np.isfinite(logpost)) and np.any(logpost != fit.traces["loglik"].values)


def test_structural_zeros_stay_zero_under_a_prior():
    rng = np.random.default_rng(6)
    x = np.r_[rng.normal(0, 1, 50), rng.normal(4, 1, 50), rng.normal(8, 1, 50)]
    ds = xr.Dataset({"x": ("time", x)})
    left_right = np.array([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]])
    start = {"z": {"initial": [1.0, 0.0, 0.0], "transition": left_right}, "x": {"mean": [1.0, 3.0, 7.0]}}
    model = em.Model().latent("z", em.Categorical(3, prior=priors.Dirichlet(2.0)), markov="time").observe(
        "x", em.Normal)
    fit = model.fit(ds, init=start, max_iter=50)
    A = fit.params["z"]["transition"].values
    assert np.all(A[left_right == 0] == 0) and np.all(A[left_right > 0] > 0)
    np.testing.assert_array_equal(fit.params["z"]["initial"].values, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(A[2], [0.0, 0.0, 1.0])
    # the density is over each row's support: finite, and the log-posterior climbed
    assert np.isfinite(fit.trace.logpost.values).all()
    assert np.all(np.diff(fit.trace.logpost.values) >= -fit.trace.slack.values[1:])


def test_weak_prior_cures_an_empty_row_and_a_zero_count():
    # state 2 only ever ends a sequence (its row has no counts), and 0 → 2 never happens
    paths = np.array([[0, 0, 1, 1, 0, 0, 1, 2], [1, 1, 0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 1, 1, 2]])
    # states observed through fixed, well-separated Gaussians (a fixed Categorical's zeros would
    # meet the weak prior of fit(prior="weak") on its probs)
    fixed = em.Normal(mean=[0.0, 10.0, 20.0], variance=[0.01] * 3)
    model = em.Model().latent("z", em.Categorical(3), markov="time").observe("s", fixed)
    ds = xr.Dataset({"s": (("sequence", "time"), paths * 10.0)})
    mle = model.fit(ds, seed=0)
    weak = model.fit(ds, seed=0, prior="weak")
    first, transitions = _counts(paths)
    A_mle, A_weak = mle.params["z"]["transition"].values, weak.params["z"]["transition"].values
    # maximum likelihood: 0 → 2 is (numerically) impossible, and row 2 is a leftover of the start
    assert A_mle[0, 2] < 1e-250
    np.testing.assert_allclose(A_mle[2], [0.05, 0.05, 0.9])  # the sticky default, not learned
    # the weak prior Dirichlet(1 + 0.01/K): the empty row is its mode (uniform), 0 → 2 is small but possible
    c = 0.01 / 3
    np.testing.assert_allclose(A_weak[2], [1 / 3] * 3, rtol=1e-9)
    np.testing.assert_allclose(A_weak[0], (transitions[0] + c) / (transitions[0].sum() + 0.01), rtol=1e-9)
    np.testing.assert_allclose(weak.params["z"]["initial"].values, (first + c) / (first.sum() + 0.01), rtol=1e-9)
    # a new sequence with the unseen transition 0 → 2 scores sensibly under the weak prior only
    new = xr.Dataset({"s": (("sequence", "time"), np.array([[0.0, 0.0, 20.0, 20.0]]))})
    assert weak.score(new) > -20 and mle.score(new) < -500


def test_declared_prior_round_trips_and_bad_alpha(tmp_path):
    model, ds = _observed_states(PATHS, prior=priors.Dirichlet([2.0, 1.5, 3.0]))
    fit = model.fit(ds, seed=0)
    assert "prior=Dirichlet" in repr(fit.model)
    fit.save(tmp_path / "chain.nc")
    loaded = em.load(tmp_path / "chain.nc")
    assert loaded.model.latent_var.family.prior == priors.Dirichlet([2.0, 1.5, 3.0])
    np.testing.assert_allclose(loaded.params["z"]["transition"].values, fit.params["z"]["transition"].values)
    bad, _ = _observed_states(PATHS, prior=priors.Dirichlet([2.0, 1.5]))
    with pytest.raises(em.ModelError, match="alpha"):
        bad.fit(ds)
