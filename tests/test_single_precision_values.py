"""Parameter values rounded to single precision elsewhere (torch, pomegranate, float32 arrays) are
accepted as starting or fixed values, and used exactly normalized; a real mistake is still refused,
naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.errors import ModelError


def _float32(values) -> np.ndarray:
    """Values as another library hands them over: rounded to float32, then widened."""
    return np.asarray(values, dtype=np.float32).astype(float)


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(-2, 1, (100, 2)), rng.normal(2, 1, (100, 2))])
    return xr.Dataset({"y": (("sample", "feature"), y),
                       "c": ("sample", rng.integers(0, 3, 200).astype(float))})


def test_float32_weights_are_a_starting_value_and_a_fixed_one(data):
    weights = _float32([0.3804565668106079, 0.6195433735847473])
    assert 1e-8 < abs(weights.sum() - 1) < 1e-6  # refused before: off by more than 1e-8
    model = em.Model().latent("z", em.Categorical(2)).observe("y", em.MultivariateNormal)
    start = model.fit(data, init={"z": {"probs": weights}, "y": {"mean": [[-2, -2], [2, 2]]}}, max_iter=0)
    np.testing.assert_allclose(start.params["z"]["probs"].values, weights / weights.sum(), rtol=0, atol=1e-15)

    fixed = em.Model().latent("z", em.Categorical(2, probs=weights)).observe("y", em.MultivariateNormal)
    fit = fixed.fit(data, seed=0)
    probs = fit.params["z"]["probs"].values
    assert probs.sum() == pytest.approx(1.0, abs=1e-15)
    # the fixed weights are the ones used: the density of each sample integrates their mixture
    by_hand = np.logaddexp.reduce([np.log(probs[k]) + _mvn_logpdf(data, fit, k) for k in range(2)], axis=0)
    np.testing.assert_allclose(fit.score_samples(data).values, by_hand, rtol=1e-12)


def _mvn_logpdf(data: xr.Dataset, fit: em.Fit, k: int) -> np.ndarray:
    from scipy import stats

    mean = fit.params["y"]["mean"].values[k]
    cov = fit.params["y"]["covariance"].values[k]
    return stats.multivariate_normal(mean, cov).logpdf(data["y"].values)


def test_float32_level_probabilities_and_transitions_are_normalized(data):
    levels = _float32([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    model = em.Model().latent("z", em.Categorical(2)).observe("c", em.Categorical(3, probs=levels))
    fit = model.fit(data, seed=0)
    np.testing.assert_allclose(fit.params["c"]["probs"].values.sum(axis=-1), 1.0, rtol=0, atol=1e-15)

    transition = _float32([[0.9, 0.1], [0.3, 0.7]])
    chain = (em.Model().latent("z", em.Categorical(2, transition=transition, initial=_float32([0.6, 0.4])),
                               markov="sample")
             .observe("y", em.MultivariateNormal))
    params = chain.fit(data, seed=0).params["z"]
    np.testing.assert_allclose(params["transition"].values.sum(axis=-1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(params["transition"].values, transition / transition.sum(-1, keepdims=True),
                               rtol=1e-15)
    assert params["initial"].values.sum() == pytest.approx(1.0, abs=1e-15)


def test_several_latents_take_float32_weights(data):
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("y", em.MultivariateNormal, given=["a"]).observe("c", em.Categorical, given=["b"]))
    weights = _float32([0.1, 0.2, 0.7])
    start = model.fit(data, init={"b": {"probs": weights}}, seed=0, max_iter=0)
    np.testing.assert_allclose(start.params["b"]["probs"].values, weights / weights.sum(), rtol=1e-15)


def test_a_nearly_symmetric_covariance_is_symmetrized(data):
    cov = np.stack([np.cov(data["y"].values.T)] * 2)
    cov[:, 0, 1] *= 1 + 1e-7  # float32's rounding of a matrix computed elsewhere
    model = em.Model().latent("z", em.Categorical(2)).observe("y", em.MultivariateNormal)
    start = model.fit(data, init={"z": {"probs": [0.5, 0.5]}, "y": {"mean": [[-2, -2], [2, 2]], "covariance": cov}},
                      max_iter=0)
    got = start.params["y"]["covariance"].values
    np.testing.assert_array_equal(got, np.swapaxes(got, 1, 2))
    np.testing.assert_allclose(got, cov, rtol=1e-7)


@pytest.mark.parametrize("make, match", [
    (lambda: em.Categorical(2, probs=[0.5, 0.499]), "a row sums to 0.999"),
    (lambda: em.Categorical(2, transition=[[0.9, 0.1], [0.3, 0.69999]]), "row 1 sums to 0.99999"),
    (lambda: em.MultivariateNormal(covariance=[[1.0, 0.5], [0.4999, 1.0]]),
     r"symmetric; entry \[0, 1\] is 0.5 but \[1, 0\] is 0.4999"),
    (lambda: em.MultivariateNormal(covariance=np.ones((2, 2, 3))), r"D × D matrices, got shape \(2, 2, 3\)"),
])
def test_a_real_mistake_is_still_refused_with_what_is_wrong(make, match):
    with pytest.raises(ModelError, match=match):
        make()


def test_an_asymmetric_starting_covariance_names_the_state_and_entry(data):
    cov = np.stack([np.eye(2)] * 2)
    cov[1, 1, 0] = 0.01
    model = em.Model().latent("z", em.Categorical(2)).observe("y", em.MultivariateNormal)
    with pytest.raises(ModelError, match=r"init\['y'\]: covariance must be symmetric; entry \[0, 1\] of state 1"):
        model.fit(data, init={"y": {"mean": [[-2, -2], [2, 2]], "covariance": cov}}, max_iter=0)
