"""Gamma, LogNormal, Beta and VonMises beyond the contract: their M-steps against scipy's fits
(also with a parameter held), generalized-EM steps that never lower Q, collapsed components
held finite, extreme scales, and end-to-end weighted fits with missing values.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import xarray as xr
from scipy import integrate

from emdsl.errors import ModelError
from emdsl.families.beta import Beta
from emdsl.families.gamma import Gamma
from emdsl.families.lognormal import LogNormal
from emdsl.families.von_mises import VonMises


def stats_of(family, x: np.ndarray, resp: np.ndarray | None = None) -> np.ndarray:
    """The node's block of R Φᵀ (K × rows) for data x (n × D); one component when resp is None."""
    phi = np.empty((family.n_rows(x.shape[1]), x.shape[0]))
    family.statistics(x.T, phi, {})
    return phi.sum(axis=1)[None] if resp is None else resp.T @ phi.T


def expected_q(family, params: dict, stats: np.ndarray) -> float:
    """Q(θ) = Σ_k [η_k · S_k − N_k A(η_k)], the M-step's objective (log h left out: it has no θ)."""
    return float((family.natural(params) * stats).sum())


# -- the M-step of one component is scipy's maximum-likelihood fit ----------------------------
# (shape, rate) / (alpha, beta) / (kappa, mean) per element, and a tolerance for scipy's own
# solver: gamma and vonmises fits solve their 1-D equation to rounding; beta's uses fsolve.
FITS = {
    "gamma": (Gamma, lambda rng, n: rng.gamma([0.3, 2.0, 40.0], [5.0, 1.0, 0.01], (n, 3)),
              lambda c: dict(zip(("shape", "rate"), (lambda r: (r[0], 1 / r[2]))(st.gamma.fit(c, floc=0)))),
              1e-10),
    "lognormal": (LogNormal, lambda rng, n: rng.lognormal([-3.0, 0.0, 5.0], [0.1, 1.0, 2.0], (n, 3)),
                  lambda c: (lambda r: {"mean": np.log(r[2]), "variance": r[0] ** 2})(st.lognorm.fit(c, floc=0)),
                  1e-10),
    "beta": (Beta, lambda rng, n: rng.beta([0.7, 2.0, 30.0], [0.9, 5.0, 10.0], (n, 3)),
             lambda c: dict(zip(("alpha", "beta"), st.beta.fit(c, floc=0, fscale=1)[:2])), 1e-8),
    "vonmises": (VonMises, lambda rng, n: rng.vonmises([3.0, -1.0, 0.5], [0.3, 2.0, 200.0], (n, 3)),
                 lambda c: dict(zip(("kappa", "mean"), st.vonmises.fit(c, fscale=1)[:2])), 1e-10),
}


@pytest.mark.parametrize("name", FITS)
@pytest.mark.parametrize("seed", range(3))
def test_one_component_m_step_equals_scipy_fit(name, seed):
    cls, draw, fit, rtol = FITS[name]
    x = draw(np.random.default_rng(seed), 2000)
    family = cls()
    params, floored = family.m_step(stats_of(family, x), {}, None)
    assert floored == []
    for d in range(x.shape[1]):
        for param, expected in fit(x[:, d]).items():
            np.testing.assert_allclose(params[param][0, d], expected, rtol=rtol, err_msg=f"{param}[{d}]")


def test_m_steps_with_a_held_parameter_equal_scipy_fits_with_it_fixed():
    rng = np.random.default_rng(7)
    x = rng.gamma(3.0, 0.5, (3000, 1))
    held, _ = Gamma().m_step(stats_of(Gamma(), x), {"rate": np.array(1.5)}, None)
    np.testing.assert_allclose(held["shape"][0, 0], st.gamma.fit(x[:, 0], floc=0, fscale=1 / 1.5)[0], rtol=1e-10)
    held, _ = Gamma().m_step(stats_of(Gamma(), x), {"shape": np.array(2.0)}, None)
    np.testing.assert_allclose(held["rate"][0, 0], 1 / st.gamma.fit(x[:, 0], 2.0, floc=0, fa=2.0)[2], rtol=1e-10)

    y = rng.beta(2.0, 3.0, (3000, 1))
    held, _ = Beta().m_step(stats_of(Beta(), y), {"alpha": np.array(2.5)}, None)
    np.testing.assert_allclose(held["beta"][0, 0], st.beta.fit(y[:, 0], fa=2.5, floc=0, fscale=1)[1], rtol=1e-8)

    z = rng.vonmises(1.0, 3.0, (3000, 1))
    held, _ = VonMises().m_step(stats_of(VonMises(), z), {"mean": np.array(1.3)}, None)
    np.testing.assert_allclose(held["kappa"][0, 0], st.vonmises.fit(z[:, 0], floc=1.3, fscale=1)[0], rtol=1e-10)
    # A held mean opposite the data: Q falls with κ, so κ stays at its bound 0.
    held, _ = VonMises().m_step(stats_of(VonMises(), z), {"mean": np.array(1.0 + np.pi)}, None)
    assert held["kappa"][0, 0] == 0.0


def test_von_mises_mean_is_in_minus_pi_to_pi():
    x = np.full((5, 1), np.pi)  # atan2(+0, −1) = π, but atan2(−0, −1) = −π
    family = VonMises()
    for data in (x, -x, x + 4 * np.pi):
        params, _ = family.m_step(stats_of(family, data), {}, None)
        assert -np.pi < params["mean"][0, 0] <= np.pi
        np.testing.assert_allclose(np.cos(params["mean"][0, 0]), -1.0)


# -- generalized EM: partial M-steps never lower Q ---------------------------------------------
POOR_STARTS = {
    "gamma-low": (Gamma, lambda rng: rng.gamma(4.0, 2.0, (500, 2)), {"shape": 1e-3, "rate": 1e3}, {}),
    "gamma-high": (Gamma, lambda rng: rng.gamma(0.5, 2.0, (500, 2)), {"shape": 1e6, "rate": 1e-3}, {}),
    "gamma-rate-held": (Gamma, lambda rng: rng.gamma(4.0, 2.0, (500, 2)), {"shape": 1e4, "rate": 0.5},
                        {"rate": 0.5}),
    "beta-low": (Beta, lambda rng: rng.beta(20.0, 5.0, (500, 2)), {"alpha": 1e-3, "beta": 1e-3}, {}),
    "beta-high": (Beta, lambda rng: rng.beta(0.8, 0.9, (500, 2)), {"alpha": 1e5, "beta": 10.0}, {}),
    "beta-alpha-held": (Beta, lambda rng: rng.beta(2.0, 5.0, (500, 2)), {"alpha": 2.0, "beta": 1e4},
                        {"alpha": 2.0}),
    "vonmises-low": (VonMises, lambda rng: rng.vonmises(1.0, 50.0, (500, 2)), {"mean": -2.0, "kappa": 0.0}, {}),
    "vonmises-high": (VonMises, lambda rng: rng.vonmises(1.0, 0.5, (500, 2)), {"mean": 1.0, "kappa": 1e7}, {}),
}


@pytest.mark.parametrize("name", POOR_STARTS)
def test_partial_m_steps_never_lower_q(name):
    cls, draw, start, hold = POOR_STARTS[name]
    rng = np.random.default_rng(11)
    x = draw(rng)
    resp = rng.dirichlet([1.0, 1.0, 1.0], size=x.shape[0])
    family = cls()
    stats = stats_of(family, x, resp)
    hold = {p: np.array(v) for p, v in hold.items()}
    best, _ = family.m_step(stats, hold, None)
    family.newton_steps = 1  # one Newton step per call: each call is a generalized-EM step
    params = {p: np.full((3, 2), v) for p, v in start.items()}
    q = [expected_q(family, params, stats)]
    for _ in range(60):
        params, _ = family.m_step(stats, hold, params)
        assert all(np.isfinite(v).all() for v in params.values())
        q.append(expected_q(family, params, stats))
    q = np.array(q)
    assert np.all(np.diff(q) >= -1e-12 * np.abs(q[1:])), np.diff(q).min()
    np.testing.assert_allclose(q[-1], expected_q(family, best, stats), rtol=1e-12)
    for p in best:
        np.testing.assert_allclose(params[p], best[p], rtol=1e-8, err_msg=p)


# -- collapsed components stay finite ----------------------------------------------------------
COLLAPSED = {
    "gamma": (Gamma(), np.full((8, 1), 3.0), "shape"),
    "beta": (Beta(), np.full((8, 1), 0.2), "beta"),
    "vonmises": (VonMises(), np.full((8, 1), 2.0), "kappa"),
}


@pytest.mark.parametrize("name", COLLAPSED)
def test_a_collapsed_component_is_held_at_the_cap_and_reported(name):
    family, x, capped = COLLAPSED[name]
    params, floored = family.m_step(stats_of(family, x), {}, None)
    assert params[capped][0, 0] == pytest.approx(1.0 / family.floor)
    assert [k for k, _ in floored] == [0] and 0.0 <= floored[0][1] < 1e-12
    assert np.isfinite(family.natural(params)).all()
    assert np.isfinite(family.log_prob(np.array([[x[0, 0]], [np.nan]]), params)).all()
    np.testing.assert_allclose(family.expected_value(params), x[0, 0], rtol=1e-7)


def test_huge_kappa_stays_finite():
    family = VonMises()
    # Angles 1e-9 apart: R̄ rounds to 1 (or above); κ = 1e8 is the cap, reported.
    x = 0.7 + 1e-9 * np.arange(5)[:, None]
    params, floored = family.m_step(stats_of(family, x), {}, None)
    assert params["kappa"][0, 0] == 1e8 and floored and floored[0][0] == 0
    assert np.isfinite(family.natural(params)).all()
    assert np.isfinite(family.log_prob(x, params)).all()
    # Just below the cap, κ is learned (R̄ = 1 − 5e-7 gives κ ≈ 1e6), and a tighter floor moves the cap.
    tight = np.random.default_rng(3).vonmises(0.0, 1e6, (5000, 1))
    params, floored = family.m_step(stats_of(family, tight), {}, None)
    assert floored == [] and 5e5 < params["kappa"][0, 0] < 2e6
    np.testing.assert_allclose(params["kappa"][0, 0], st.vonmises.fit(tight[:, 0], fscale=1)[0], rtol=1e-6)
    assert VonMises(floor=1e-10).m_step(stats_of(family, x), {}, None)[0]["kappa"][0, 0] == 1e10


def test_lognormal_floor_is_absolute_on_the_log_scale():
    family = LogNormal(floor=1e-4)
    x = np.array([[5.0], [5.0 * (1 + 1e-5)]])
    params, floored = family.m_step(stats_of(family, x), {}, None)
    assert params["variance"][0, 0] == 1e-4 and floored[0][0] == 0 and floored[0][1] < 1e-4


def test_empty_components_keep_their_previous_values():
    rng = np.random.default_rng(5)
    for family, x in ((Gamma(), rng.gamma(2.0, 1.0, (50, 2))), (Beta(), rng.beta(2.0, 2.0, (50, 2))),
                      (VonMises(), rng.vonmises(0.0, 2.0, (50, 2))), (LogNormal(), rng.lognormal(0, 1, (50, 2)))):
        resp = np.zeros((50, 2))
        resp[:, 0] = 1.0
        previous = {p: np.full((2, 2), 0.75) for p in family.param_names}
        params, _ = family.m_step(stats_of(family, x, resp), {}, previous)
        for p in family.param_names:
            np.testing.assert_array_equal(params[p][1], 0.75)
            assert np.isfinite(params[p]).all()


# -- units ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e-150, 1e150])
def test_gamma_and_lognormal_at_extreme_scales(scale):
    """Not standardized, so the data enter as they are: shape and the variance of log x do not
    depend on the unit, the rate and the mean of log x move with it."""
    x = np.random.default_rng(9).gamma(2.0, 1.0, (1000, 1))
    base, _ = Gamma().m_step(stats_of(Gamma(), x), {}, None)
    scaled, _ = Gamma().m_step(stats_of(Gamma(), x * scale), {}, None)
    np.testing.assert_allclose(scaled["shape"], base["shape"], rtol=1e-9)
    np.testing.assert_allclose(scaled["rate"] * scale, base["rate"], rtol=1e-9)
    base, _ = LogNormal().m_step(stats_of(LogNormal(), x), {}, None)
    scaled, _ = LogNormal().m_step(stats_of(LogNormal(), x * scale), {}, None)
    np.testing.assert_allclose(scaled["mean"], base["mean"] + np.log(scale), rtol=1e-12)
    np.testing.assert_allclose(scaled["variance"], base["variance"], rtol=1e-8)


# -- marginals, support, constructor -------------------------------------------------------------
MARGINALS = {
    "gamma": (Gamma(), {"shape": np.array([0.8, 5.0]), "rate": np.array([1.0, 2.0])}, (0.0, np.inf)),
    "lognormal": (LogNormal(), {"mean": np.array([0.0, 1.0]), "variance": np.array([0.5, 0.1])}, (0.0, np.inf)),
    "beta": (Beta(), {"alpha": np.array([0.8, 5.0]), "beta": np.array([2.0, 1.5])}, (0.0, 1.0)),
    "vonmises": (VonMises(), {"mean": np.array([3.0, -1.0]), "kappa": np.array([0.0, 20.0])},
                 (-np.pi, np.pi)),
}


@pytest.mark.parametrize("name", MARGINALS)
def test_marginal_densities_integrate_to_one(name):
    family, values, (low, high) = MARGINALS[name]
    marginal = family.marginal(values)
    for k in range(2):
        total = integrate.quad(lambda t: marginal.density(np.array([t]))[k, 0], low, high, limit=200)[0]
        assert total == pytest.approx(1.0, rel=1e-6)
    assert np.isfinite(marginal.mean).all()
    assert (marginal.density(np.array([-1.0, 0.0, 1.0, np.inf])) >= 0).all()


def test_support_messages():
    x = np.array([[0.5, np.nan], [0.0, 1.0]])
    assert Gamma().outside_support(x, {})[0].tolist() == [[False, False], [True, False]]
    assert Beta().outside_support(x, {})[0].tolist() == [[False, False], [True, True]]
    assert "0 and 1" in Beta().outside_support(x, {})[1]
    assert not VonMises().outside_support(np.array([[100.0, -7.0]]), {})[0].any()


@pytest.mark.parametrize("make", [
    lambda: Gamma(floor=0.0), lambda: Gamma(shape=-1.0), lambda: Gamma(rate=[1.0, 0.0]),
    lambda: LogNormal(floor=None), lambda: LogNormal(variance=0.0), lambda: Beta(alpha="a"),
    lambda: Beta(beta=0.0), lambda: VonMises(kappa=-1.0), lambda: VonMises(mean=np.inf),
    lambda: VonMises(floor="1e-8"),
])
def test_bad_arguments_raise_model_error(make):
    with pytest.raises(ModelError):
        make()


def test_fixed_parameters_are_held_and_counted():
    family = VonMises(kappa=2.0)
    assert family.fixed == {"kappa": 2.0} and family.n_free_params(3, 2) == 6
    assert repr(family) == "VonMises(kappa=2.0)"
    assert Gamma().n_free_params(3, 2) == 12 and Beta(alpha=1.0, beta=2.0).n_free_params(3, 2) == 0


# -- end to end ----------------------------------------------------------------------------------
MIXTURES = {
    "gamma": (Gamma, lambda rng, z: np.where(z, rng.gamma(2.0, 1.0, z.size), rng.gamma(12.0, 0.5, z.size)),
              {"shape": [1.0, 4.0], "rate": [1.0, 1.0]}),
    "lognormal": (LogNormal, lambda rng, z: np.where(z, rng.lognormal(0.0, 0.3, z.size),
                                                     rng.lognormal(1.5, 0.4, z.size)),
                  {"mean": [0.2, 1.0], "variance": [1.0, 1.0]}),
    "beta": (Beta, lambda rng, z: np.where(z, rng.beta(2.0, 8.0, z.size), rng.beta(8.0, 2.0, z.size)),
             {"alpha": [1.0, 2.0], "beta": [2.0, 1.0]}),
    "vonmises": (VonMises, lambda rng, z: np.where(z, rng.vonmises(-2.0, 4.0, z.size), rng.vonmises(1.0, 8.0, z.size)),
                 {"mean": [-1.0, 0.5], "kappa": [1.0, 1.0]}),
}


@pytest.mark.parametrize("name", MIXTURES)
def test_weighted_fit_with_missing_values_equals_the_expanded_table(name):
    import emdsl as em

    cls, draw, start = MIXTURES[name]
    rng = np.random.default_rng(21)
    n = 300
    x = draw(rng, rng.random(n) < 0.4)
    x[rng.random(n) < 0.1] = np.nan
    weights = rng.integers(0, 4, n)
    model = em.Model().latent("z", em.Categorical(2)).observe("x", cls())
    # The same θ⁽⁰⁾ for both fits (k-means++ seeding would see different rows).
    init = {"z": {"probs": np.array([0.5, 0.5])}, "x": {p: np.array(v) for p, v in start.items()}}
    data = xr.Dataset({"x": ("sample", x), "w": ("sample", weights.astype(float))})
    fit = model.fit(data, weights="w", max_iter=50, tol=0, init=init)
    expanded = model.fit(xr.Dataset({"x": ("sample", np.repeat(x, weights))}), max_iter=50, tol=0, init=init)
    loglik = fit.trace["loglik"].values
    assert np.isfinite(loglik).all() and loglik.size == 51
    assert np.all(np.diff(loglik) >= -1e-9 * np.maximum(np.abs(loglik[1:]), 1.0))
    np.testing.assert_allclose(fit.loglik, expanded.loglik, rtol=1e-10)
    for node, names in (("z", ["probs"]), ("x", cls.param_names)):
        for p in names:
            ours, theirs = fit.params[node][p].values, expanded.params[node][p].values
            assert np.isfinite(ours).all()
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, err_msg=f"{node}.{p}")
