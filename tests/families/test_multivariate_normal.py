"""MultivariateNormal: every covariance type against scipy.stats, M-step against direct formulas."""

import numpy as np
import pytest
import scipy.stats as st

import emdsl as em
from emdsl.errors import ModelError

TYPES = ["full", "diag", "spherical", "tied"]


def random_params(covariance_type, K, D, rng):
    mean = rng.normal(0, 3, (K, D))
    A = rng.normal(size=(K, D, D))
    full = A @ np.swapaxes(A, 1, 2) + 0.5 * np.eye(D)
    cov = {"full": full, "diag": rng.uniform(0.1, 3, (K, D)), "spherical": rng.uniform(0.1, 3, K),
           "tied": full[0]}[covariance_type]
    return {"mean": mean, "covariance": cov}


def dense(covariance_type, cov, K, D):
    if covariance_type == "full":
        return cov
    if covariance_type == "diag":
        return np.stack([np.diag(c) for c in cov])
    if covariance_type == "spherical":
        return np.stack([c * np.eye(D) for c in cov])
    return np.broadcast_to(cov, (K, D, D))


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_log_density_equals_scipy(covariance_type, seed):
    rng = np.random.default_rng(seed)
    K, D = 3, 4
    params = random_params(covariance_type, K, D, rng)
    x = rng.normal(0, 4, (40, D))
    ours = em.MultivariateNormal(covariance=covariance_type).log_prob(x, params)
    covs = dense(covariance_type, params["covariance"], K, D)
    ref = np.stack([st.multivariate_normal(params["mean"][k], covs[k]).logpdf(x) for k in range(K)], axis=1)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("covariance_type", TYPES)
def test_m_step_equals_weighted_moments(covariance_type):
    rng = np.random.default_rng(3)
    n, D, K = 300, 3, 2
    x = rng.normal(size=(n, D)) @ rng.normal(size=(D, D))
    resp = rng.dirichlet([1] * K, size=n)
    family = em.MultivariateNormal(covariance=covariance_type)
    phi = np.empty((family.n_rows(D), n))
    family.statistics(x.T, phi, {})
    params, _ = family.m_step(resp.T @ phi.T, {}, None)
    nk = resp.sum(0)
    mean = resp.T @ x / nk[:, None]
    scatter = np.stack([(resp[:, k, None] * (x - mean[k])).T @ (x - mean[k]) for k in range(K)])
    expected = {"full": scatter / nk[:, None, None],
                "tied": scatter.sum(0) / n,
                "diag": np.stack([np.diag(s) for s in scatter]) / nk[:, None],
                "spherical": np.stack([np.trace(s) for s in scatter]) / (nk * D)}[covariance_type]
    np.testing.assert_allclose(params["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(params["covariance"], expected, rtol=1e-10)


def test_eigenvalue_floor_keeps_covariance_positive_definite():
    family = em.MultivariateNormal(floor=1e-4)
    D = 2
    x = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])  # on a line: singular scatter
    phi = np.empty((family.n_rows(D), 3))
    family.statistics(x.T, phi, {})
    params, floored = family.m_step(phi.sum(1)[None, :], {}, None)
    values = np.linalg.eigvalsh(params["covariance"][0])
    assert values.min() == pytest.approx(1e-4, rel=1e-8)
    assert floored and floored[0][0] == 0


@pytest.mark.parametrize("covariance_type", TYPES)
def test_sampling_matches_moments(covariance_type):
    rng = np.random.default_rng(5)
    K, D = 2, 3
    params = random_params(covariance_type, K, D, rng)
    family = em.MultivariateNormal(covariance=covariance_type)
    draws = family.sample(params, np.ones(200_000, dtype=int), rng, {})
    cov = dense(covariance_type, params["covariance"], K, D)[1]
    np.testing.assert_allclose(draws.mean(0), params["mean"][1], atol=0.05 * np.sqrt(cov.diagonal().max()))
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.05 * cov.diagonal().max())


def test_fixed_covariance_shape_selects_type():
    assert em.MultivariateNormal(covariance=np.eye(2)).covariance_type == "tied"
    assert em.MultivariateNormal(covariance=np.ones((3, 2))).covariance_type == "diag"
    assert em.MultivariateNormal(covariance=np.ones(3)).covariance_type == "spherical"
    assert em.MultivariateNormal(covariance=np.stack([np.eye(2)] * 3)).covariance_type == "full"


@pytest.mark.parametrize("cov, match", [
    (np.array([[1.0, 2.0], [2.0, 1.0]]), "not positive definite"),
    (np.array([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    ("banana", "expected one of"),
])
def test_bad_covariance_is_rejected(cov, match):
    with pytest.raises(ModelError, match=match):
        em.MultivariateNormal(covariance=cov)
