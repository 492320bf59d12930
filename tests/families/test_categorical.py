"""Categorical latent: weights, fixed values, labels."""

import numpy as np
import pytest

import emdsl as em
from emdsl.errors import ModelError


def test_m_step_is_normalised_counts():
    family = em.Categorical(3)
    nk = np.array([2.0, 5.0, 3.0])
    np.testing.assert_allclose(family.weights_m_step(nk, {})["probs"], nk / 10)


def test_fixed_probs_are_held():
    family = em.Categorical(2, probs=[0.25, 0.75])
    np.testing.assert_array_equal(family.weights_m_step(np.array([9.0, 1.0]), {"probs": np.array([0.25, 0.75])})["probs"],
                                  [0.25, 0.75])
    assert family.n_free_params() == 0
    assert em.Categorical(4).n_free_params() == 3


def test_state_labels():
    family = em.Categorical(["low", "high"])
    assert family.k == 2 and family.states == ("low", "high")


def test_zero_weight_gives_finite_log_weight():
    assert np.isfinite(em.Categorical(2).log_weights({"probs": np.array([1.0, 0.0])})).all()


@pytest.mark.parametrize("args, match", [
    ((0,), "at least one state"),
    ((2.5,), "number of states"),
    ((["a", "a"],), "distinct"),
    ((2, [0.5, 0.6]), "sum to 1"),
    ((2, [1.2, -0.2]), "non-negative"),
    ((3, [0.5, 0.5]), "one weight per state"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ModelError, match=match):
        em.Categorical(*args)


def test_repr_shows_what_was_declared():
    assert repr(em.Categorical(3)) == "Categorical(3)"
    assert repr(em.Categorical(["calm", "storm"])) == "Categorical(['calm', 'storm'])"
    assert repr(em.Categorical(2, probs=[0.5, 0.5])) == "Categorical(2, probs=[0.5, 0.5])"
    assert repr(em.Normal(tied="variance")) == "Normal(tied='variance')"
    assert repr(em.MultivariateNormal(covariance="diag")) == "MultivariateNormal(covariance='diag')"
