"""Normal: log-density through η·φ(x) − A(η) + log h(x) against scipy.stats."""

import numpy as np
import pytest
import scipy.stats as st

import emdsl as em
from emdsl.errors import ModelError


@pytest.mark.parametrize("seed", range(5))
def test_log_density_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    K, D, n = 3, 4, 50
    params = {"mean": rng.normal(0, 3, (K, D)), "variance": rng.uniform(0.05, 5, (K, D))}
    x = rng.normal(0, 4, (n, D))
    ours = em.Normal().log_prob(x, params)
    ref = st.norm.logpdf(x[:, None, :], params["mean"], np.sqrt(params["variance"])).sum(-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=0)


def test_tied_variance_broadcasts_over_states():
    rng = np.random.default_rng(1)
    params = {"mean": rng.normal(size=(2, 3)), "variance": rng.uniform(0.5, 2, 3)}
    x = rng.normal(size=(10, 3))
    ref = st.norm.logpdf(x[:, None, :], params["mean"], np.sqrt(params["variance"])).sum(-1)
    np.testing.assert_allclose(em.Normal(tied="variance").log_prob(x, params), ref, rtol=1e-10)


def test_m_step_is_weighted_moment_matching():
    rng = np.random.default_rng(2)
    x = rng.normal(2, 3, (200, 2))
    resp = rng.dirichlet([1, 1, 1], size=200)
    family = em.Normal()
    phi = np.empty((family.n_rows(2), 200))
    family.statistics(x.T, phi, {})
    params, floored = family.m_step(resp.T @ phi.T, {}, None)
    mean = (resp.T @ x) / resp.sum(0)[:, None]
    var = np.stack([np.average((x - mean[k]) ** 2, axis=0, weights=resp[:, k]) for k in range(3)])
    np.testing.assert_allclose(params["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(params["variance"], var, rtol=1e-10)
    assert floored == []


def test_variance_floor_is_applied_and_reported():
    family = em.Normal(floor=1e-3)
    stats = np.array([[2.0, 2.0, 2.0 * 1.0 + 1e-9]])  # N_k = 2, both points at x = 1
    params, floored = family.m_step(stats, {}, None)
    assert params["variance"][0, 0] == 1e-3
    assert floored and floored[0][0] == 0


@pytest.mark.parametrize("bad", [dict(tied="mean"), dict(floor=-1.0), dict(variance=-1.0)])
def test_bad_arguments_are_named(bad):
    with pytest.raises(ModelError, match="Normal"):
        em.Normal(**bad)
