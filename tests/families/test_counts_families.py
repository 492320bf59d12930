"""Count families beyond the contract: Binomial's trials variable, Multinomial's events,
a hand-computed EM iteration, parameters at the boundary, and end-to-end fits."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import xarray as xr

import emdsl as em
from emdsl.errors import ModelError
from emdsl.families.bernoulli import Bernoulli
from emdsl.families.binomial import Binomial
from emdsl.families.exponential import Exponential
from emdsl.families.multinomial import Multinomial
from emdsl.families.poisson import Poisson


def _phi(family, x: np.ndarray, aux: dict | None = None) -> np.ndarray:
    """Φ (rows × n) for x (n × D), aux as (n × D)."""
    phi = np.empty((family.n_rows(x.shape[1]), x.shape[0]))
    family.statistics(x.T, phi, {k: np.asarray(v, float).T for k, v in (aux or {}).items()})
    return phi


# -- Binomial with a trials variable -------------------------------------------------------
def test_binomial_trials_variable_is_read_from_the_data():
    family = Binomial(trials="n")
    assert family.data_arguments() == {"trials": "n"} and Binomial(trials=5).data_arguments() == {}
    rng = np.random.default_rng(0)
    trials = rng.integers(0, 30, (500, 3)).astype(float)
    probs = rng.uniform(0.05, 0.95, (2, 3))
    x = rng.binomial(trials.astype(int), probs[0]).astype(float)
    x[rng.random(x.shape) < 0.2] = np.nan
    ref = np.stack([np.nansum(np.where(np.isnan(x), np.nan, st.binom.logpmf(np.nan_to_num(x), trials.astype(int),
                                                                            probs[k])), axis=1) for k in range(2)], 1)
    np.testing.assert_allclose(family.log_prob(x, {"probs": probs}, {"trials": trials}), ref, rtol=1e-10, atol=1e-12)
    phi = _phi(family, x, {"trials": trials})
    # presence rows carry the trials where x is observed, so that n·A(η) rides along
    np.testing.assert_array_equal(phi[:3], np.where(np.isnan(x), 0.0, trials).T)
    params, _ = family.m_step(phi.sum(axis=1)[None], {}, None)
    np.testing.assert_allclose(params["probs"][0], np.nansum(x, 0) / np.where(np.isnan(x), 0, trials).sum(0),
                               rtol=1e-12)


def test_binomial_counts_above_trials_are_reported():
    family = Binomial(trials="n")
    x = np.array([[1.0, 2.0], [5.0, np.nan], [0.0, 3.0]])
    trials = np.array([[2.0, 2.0], [4.0, 9.0], [0.0, 3.0]])
    mask, text = family.outside_support(x, {"trials": trials})
    np.testing.assert_array_equal(mask, [[False, False], [True, False], [False, False]])
    assert "counts above trials" in text
    # the compiler passes aux in x's orientation; a D × b array is accepted too
    mask_t, _ = family.outside_support(x, {"trials": trials.T})
    np.testing.assert_array_equal(mask_t, mask)
    mask, text = Binomial(trials=3).outside_support(np.array([[3.0, 4.0]]), {})
    assert mask.tolist() == [[False, True]] and "counts above trials" in text
    # trials that are not counts are reported where x is observed, never where it is missing
    mask, text = family.outside_support(np.array([[1.0, np.nan]]), {"trials": np.array([[np.nan, np.nan]])})
    assert mask.tolist() == [[True, False]] and "number of trials" in text


def test_binomial_samples_with_per_sample_trials():
    family = Binomial(trials="n")
    trials = np.tile([[0.0], [5.0], [50.0]], (1000, 2))
    draws = family.sample({"probs": np.array([[0.3, 0.8]])}, np.zeros(3000, int), np.random.default_rng(0),
                          {"trials": trials})
    assert (draws <= trials).all() and (draws[trials == 0] == 0).all()
    with pytest.raises(ModelError, match="trials"):
        family.sample({"probs": np.array([[0.3, 0.8]])}, np.zeros(3, int), np.random.default_rng(0), {})


def test_binomial_mixture_first_iteration_by_hand():
    """One E-step and M-step of a 2-state mixture with fixed weights, against scipy.stats.binom."""
    rng = np.random.default_rng(7)
    n, D = 200, 3
    trials = rng.integers(1, 25, (n, D)).astype(float)
    truth = np.array([[0.2, 0.5, 0.9], [0.7, 0.1, 0.4]])
    z = rng.integers(0, 2, n)
    x = rng.binomial(trials.astype(int), truth[z]).astype(float)
    x[rng.random((n, D)) < 0.1] = np.nan
    weights, start = np.array([0.3, 0.7]), np.array([[0.4, 0.4, 0.6], [0.6, 0.3, 0.5]])
    present = ~np.isnan(x)

    # by hand: responsibilities from the binomial pmf over the observed elements, then p = Σ r x / Σ r n
    log_joint = np.log(weights) + np.stack([np.where(present, st.binom.logpmf(
        np.nan_to_num(x), trials.astype(int), start[k]), 0.0).sum(axis=1) for k in range(2)], axis=1)
    resp = np.exp(log_joint - np.logaddexp.reduce(log_joint, axis=1, keepdims=True))
    updated = (resp.T @ np.nan_to_num(x)) / (resp.T @ np.where(present, trials, 0.0))
    loglik = np.logaddexp.reduce(log_joint, axis=1).sum()

    # the family's pieces: L = H Φ + log h + log π, then the M-step from R Φᵀ
    family = Binomial(trials="n")
    ours = family.log_prob(x, {"probs": start}, {"trials": trials}) + np.log(weights)
    np.testing.assert_allclose(ours, log_joint, rtol=1e-12)
    stats = resp.T @ _phi(family, x, {"trials": trials}).T
    np.testing.assert_allclose(family.m_step(stats, {}, None)[0]["probs"], updated, rtol=1e-12)

    # and the engine, from the same start, with the weights held
    ds = xr.Dataset({"x": (("sample", "item"), x), "n": (("sample", "item"), trials)})
    fit = em.Model().latent("z", em.Categorical(2, probs=list(weights))).observe("x", family).fit(
        ds, init={"x": {"probs": start}}, max_iter=1, tol=0)
    np.testing.assert_allclose(fit.trace.loglik.values[0], loglik, rtol=1e-12)
    np.testing.assert_allclose(fit.params["x"]["probs"].values, updated, rtol=1e-10)
    np.testing.assert_array_equal(fit.params["z"]["probs"].values, weights)


# -- Multinomial ----------------------------------------------------------------------------
def test_multinomial_with_varying_totals_equals_scipy():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=3)
    totals = rng.integers(0, 40, 300)
    x = np.stack([rng.multinomial(t, probs[i % 3]) for i, t in enumerate(totals)]).astype(float)
    x[::7] = np.nan  # whole events missing
    family = Multinomial()
    ref = np.stack([np.where(np.isnan(x[:, 0]), 0.0, st.multinomial.logpmf(np.nan_to_num(x), totals, probs[k]))
                    for k in range(3)], axis=1)
    np.testing.assert_allclose(family.log_prob(x, {"probs": probs}), ref, rtol=1e-10, atol=1e-12)
    resp = rng.dirichlet(np.ones(3), size=300)
    params, _ = family.m_step(resp.T @ _phi(family, x).T, {}, None)
    counts = resp.T @ np.nan_to_num(x)
    np.testing.assert_allclose(params["probs"], counts / counts.sum(axis=1, keepdims=True), rtol=1e-12)


def test_multinomial_partial_events_are_an_error():
    family = Multinomial()
    x = np.array([[1.0, 2.0, 3.0], [np.nan, np.nan, np.nan], [4.0, np.nan, 1.0], [0.0, 0.0, 0.0]])
    mask, text = family.outside_support(x, {})
    np.testing.assert_array_equal(mask, [[False] * 3, [False] * 3, [True, False, True], [False] * 3])
    assert "partial" in text.lower() or "some but not all" in text
    assert "cannot be marginalized for a multinomial" in text
    assert not family.outside_support(x[[0, 1, 3]], {})[0].any()


def test_multinomial_declared_total_is_checked_and_sampled():
    family = Multinomial(trials=6)
    mask, text = family.outside_support(np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [np.nan] * 3]), {})
    assert mask.tolist() == [[False] * 3, [True] * 3, [False] * 3] and "6" in text
    draws = family.sample({"probs": np.array([[0.2, 0.3, 0.5]])}, np.zeros(50, int), np.random.default_rng(0), {})
    assert draws.shape == (50, 3) and (draws.sum(axis=1) == 6).all()
    with pytest.raises(ModelError, match="total count"):
        Multinomial().sample({"probs": np.array([[0.5, 0.5]])}, np.zeros(2, int), np.random.default_rng(0), {})


def test_multinomial_state_without_counts_keeps_its_previous_probs():
    family = Multinomial()
    stats = np.array([[3.0, 0.0, 0.0, 0.0], [2.0, 1.0, 5.0, 2.0]])  # state 0: 3 events, all empty
    previous = {"probs": np.array([[0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]])}
    params, _ = family.m_step(stats, {}, previous)
    np.testing.assert_array_equal(params["probs"][0], previous["probs"][0])
    np.testing.assert_allclose(params["probs"][1], [0.125, 0.625, 0.25])


# -- boundaries, declarations ---------------------------------------------------------------
BOUNDARY = [
    (Poisson(), {"rate": np.array([[0.0, 3.0]])}, np.array([[0.0, 2.0], [4.0, 0.0]]), {}),
    (Bernoulli(), {"probs": np.array([[0.0, 1.0]])}, np.array([[0.0, 1.0], [1.0, 0.0]]), {}),
    (Binomial(trials=4), {"probs": np.array([[0.0, 1.0]])}, np.array([[0.0, 4.0], [3.0, 1.0]]), {}),
    (Binomial(trials="n"), {"probs": np.array([[1.0, 0.0]])}, np.array([[0.0, 0.0], [3.0, 1.0]]),
     {"trials": np.array([[0.0, 0.0], [5.0, 2.0]])}),
    (Exponential(), {"rate": np.array([[1e-300, 1e100]])}, np.array([[0.0, 0.0], [1e5, 2.0]]), {}),
    (Multinomial(), {"probs": np.array([[0.0, 1.0]])}, np.array([[0.0, 3.0], [2.0, 1.0]]), {}),
]


@pytest.mark.parametrize(("family", "params", "x", "aux"), BOUNDARY, ids=lambda v: repr(v)[:24])
def test_parameters_at_the_boundary_stay_finite(family, params, x, aux):
    with np.errstate(all="raise"):
        assert np.isfinite(family.natural(params)).all()
        assert np.isfinite(family.log_prob(x, params, aux)).all()
        # an impossible value gets a very low, finite log-density; a certain one gets 0
    assert family.log_prob(x, params, aux).min() < -600


def test_boundary_estimates_are_kept():
    # a state that saw only zeros: rate 0, p = 0; an Exponential state at 0 is capped, not infinite
    assert Poisson().m_step(np.array([[5.0, 0.0]]), {}, None)[0]["rate"].item() == 0.0
    assert Bernoulli().m_step(np.array([[5.0, 5.0]]), {}, None)[0]["probs"].item() == 1.0
    rate = Exponential().m_step(np.array([[5.0, 0.0]]), {}, None)[0]["rate"]
    assert np.isfinite(rate).all() and rate.item() == 1e100
    # no responsibility: previous values stay
    previous = {"rate": np.array([[2.5]])}
    assert Poisson().m_step(np.array([[0.0, 0.0]]), {}, previous)[0]["rate"].item() == 2.5


@pytest.mark.parametrize("make", [
    lambda: Poisson(rate=-1.0), lambda: Poisson(rate="a"), lambda: Exponential(rate=0.0),
    lambda: Exponential(rate=[1.0, -2.0]), lambda: Bernoulli(probs=1.5),
    lambda: Bernoulli(probs=[0.5, "x"]), lambda: Binomial(trials=0),
    lambda: Binomial(trials=2.5), lambda: Binomial(trials=None), lambda: Binomial(trials=True),
    lambda: Binomial(trials=""), lambda: Binomial(trials=3, probs=-0.1),
    lambda: Multinomial(probs=[0.5, 0.6]), lambda: Multinomial(probs="a"), lambda: Multinomial(trials=0),
    lambda: Multinomial(trials=2.5), lambda: Multinomial(trials="n"),
])
def test_bad_declarations_raise_model_error(make):
    with pytest.raises(ModelError):
        make()


def test_declarations():
    assert repr(Poisson(rate=[1.0, 5.0])) == "Poisson(rate=[1.0, 5.0])"
    assert Poisson(rate=[1.0, 5.0]).fixed == {"rate": [1.0, 5.0]}
    assert Binomial(trials="n").fixed == {} and Binomial(10) == Binomial(trials=10)
    assert Multinomial("word").dim == "word" and Multinomial.multivariate
    assert Multinomial().param_axes() == {"probs": ("latent", "event")}
    assert Multinomial().n_free_params(3, 4) == 9 and Binomial(3).n_free_params(3, 4) == 12
    assert Bernoulli(probs=0.5).n_free_params(3, 4) == 0


@pytest.mark.parametrize(("family", "values", "support"), [
    (Poisson(), {"rate": np.array([0.5, 4.0])}, np.arange(60)),
    (Bernoulli(), {"probs": np.array([0.2, 1.0])}, np.arange(2)),
    (Binomial(7), {"probs": np.array([0.2, 0.9])}, np.arange(8)),
    (Multinomial(trials=5), {"probs": np.array([0.0, 0.4])}, np.arange(6)),
])
def test_discrete_marginals_are_distributions(family, values, support):
    marginal = family.marginal(values)
    assert marginal.discrete
    mass = marginal.density(support.astype(float))
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(mass @ support, marginal.mean, rtol=1e-10, atol=1e-12)
    assert (marginal.density(np.array([-1.0, 0.5, 1e4])) == 0).all()


def test_exponential_marginal_integrates_to_one():
    marginal = Exponential().marginal({"rate": np.array([0.5, 3.0])})
    grid = np.linspace(0, 80, 400001)
    np.testing.assert_allclose(np.trapezoid(marginal.density(grid), grid, axis=1), 1.0, rtol=1e-6)
    assert (marginal.density(np.array([-1.0])) == 0).all()


# -- end to end ------------------------------------------------------------------------------
def _poisson(rng, n):
    z = rng.integers(0, 2, n)
    x = rng.poisson(np.array([[1.5, 6.0], [8.0, 2.0]])[z]).astype(float)
    return Poisson(), {"x": (("sample", "item"), x)}, {"rate": [[1.0, 4.0], [5.0, 3.0]]}


def _bernoulli(rng, n):
    z = rng.integers(0, 2, n)
    truth = np.array([[0.1, 0.8, 0.3, 0.9, 0.2, 0.6], [0.7, 0.2, 0.9, 0.4, 0.8, 0.1]])
    x = (rng.random((n, 6)) < truth[z]).astype(float)
    return Bernoulli(), {"x": (("sample", "item"), x)}, {"probs": np.full((2, 6), 0.5) + [[-0.1], [0.1]]}


def _binomial(rng, n):
    z = rng.integers(0, 2, n)
    trials = rng.integers(0, 20, (n, 2)).astype(float)
    x = rng.binomial(trials.astype(int), np.array([[0.2, 0.7], [0.6, 0.3]])[z]).astype(float)
    data = {"x": (("sample", "item"), x), "n": (("sample", "item"), trials)}
    return Binomial(trials="n"), data, {"probs": [[0.3, 0.5], [0.5, 0.4]]}


def _binomial_fixed(rng, n):
    z = rng.integers(0, 2, n)
    x = rng.binomial(9, np.array([0.2, 0.75])[z]).astype(float)
    return Binomial(9), {"x": ("sample", x)}, {"probs": [0.4, 0.6]}


def _exponential(rng, n):
    z = rng.integers(0, 2, n)
    x = rng.exponential(1.0 / np.array([[0.5, 3.0], [4.0, 1.0]])[z])
    return Exponential(), {"x": (("sample", "item"), x)}, {"rate": [[1.0, 2.0], [2.0, 1.5]]}


def _multinomial(rng, n):
    z = rng.integers(0, 2, n)
    truth = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.3, 0.1, 0.1]])
    x = np.stack([rng.multinomial(t, truth[k]) for t, k in zip(rng.integers(0, 30, n), z)]).astype(float)
    return Multinomial(), {"x": (("sample", "category"), x)}, {"probs": [[0.3, 0.2, 0.2, 0.3], [0.2, 0.3, 0.3, 0.2]]}


@pytest.mark.parametrize("simulate", [_poisson, _bernoulli, _binomial, _binomial_fixed, _exponential, _multinomial],
                         ids=lambda f: f.__name__[1:])
def test_weighted_fit_is_monotone_and_equals_the_expanded_table(simulate):
    rng = np.random.default_rng(11)
    n = 400
    family, data, start = simulate(rng, n)
    dims, x = data["x"]
    holes = rng.random((n, 1) if family.multivariate or x.ndim == 1 else x.shape) < 0.1
    x[np.broadcast_to(holes if x.ndim > 1 else holes[:, 0], x.shape)] = np.nan
    weights = rng.integers(0, 4, n)
    ds = xr.Dataset({**data, "w": ("sample", weights.astype(float))})
    expanded = ds.drop_vars("w").isel(sample=np.repeat(np.arange(n), weights))
    model = em.Model().latent("z", em.Categorical(2)).observe("x", family)
    init = {"z": {"probs": [0.5, 0.5]}, "x": start}
    fit = model.fit(ds, weights="w", init=init, max_iter=50, tol=0)
    loglik = fit.trace.loglik.values
    assert len(loglik) == 51
    assert (np.diff(loglik) >= -1e-9 * np.maximum(np.abs(loglik[1:]), 1)).all()
    reference = model.fit(expanded, init=init, max_iter=50, tol=0)
    np.testing.assert_allclose(fit.loglik, reference.loglik, rtol=1e-10)
    learned = fit.params["x"][family.param_names[0]].values
    assert np.abs(learned - np.asarray(start[family.param_names[0]])).max() > 0.01  # EM moved
    for node in ("z", "x"):
        for name, value in fit.params[node].data_vars.items():
            assert np.isfinite(value.values).all(), f"{node}.{name} is not finite"
            np.testing.assert_allclose(value.values, reference.params[node][name].values, rtol=1e-10, atol=1e-14,
                                       err_msg=f"{node}.{name}")
