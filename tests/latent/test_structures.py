"""The latent-structure seam: the mixture's inline E-step equals its reference, the chain's ELBO is exact."""

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.compile import compile_plan, start_values
from emdsl.engine.estep import engine
from emdsl.engine.mstep import expected_complete_loglik, natural_matrix
from emdsl.latent.mixture import posterior
from tests.conftest import blobs


def _plan_and_theta(model, ds, values):
    plan = compile_plan(model, ds)
    return plan, start_values(plan, values)


def test_inline_mixture_equals_the_reference_structure():
    X = blobs(n=150, seed=4)
    ds = xr.Dataset({"x": (("sample", "feature"), X)}, coords={"sample": np.arange(150)})
    ds["w"] = ("sample", np.random.default_rng(0).uniform(0.5, 2.0, 150))
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal(covariance="diag"))
    plan = compile_plan(model, ds, weights="w")
    theta = start_values(plan, {"z": {"probs": [0.2, 0.3, 0.5]},
                                "x": {"mean": X[[0, 60, 120]], "covariance": np.ones((3, 2))}})
    H = natural_matrix(plan, theta)
    phi = np.empty((plan.n_stats, plan.n_samples))
    plan.read(0, plan.n_samples, phi, np.empty(plan.max_D * plan.n_samples))
    resp, loglik, entropy = posterior(H @ phi, plan.weights)
    with engine(plan) as estep:
        summary = estep.summarize(H, theta)
        inline = np.empty((plan.n_samples, plan.K))
        estep.evaluate(H, theta, resp_out=inline)
    assert summary.loglik == pytest.approx(loglik, rel=1e-12)
    assert summary.entropy == pytest.approx(entropy, rel=1e-10)
    np.testing.assert_allclose(inline, resp.T, atol=1e-14)


def test_chain_elbo_equals_loglik_at_the_estep_parameters():
    """ℍ = ℓ − E_q[log p(x, z | θ)]: at the E-step's own θ the ELBO closes on ℓ, with the latent's columns in H."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 40, 2)) + rng.integers(0, 2, size=(3, 40, 1)) * 3.0
    x[1, 30:] = np.nan
    x[0, 5, 1] = np.nan  # a hole inside an event: the conditional Gaussian's entropy joins the chain's
    ds = xr.Dataset({"x": (("sequence", "time", "feature"), x)})
    model = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.MultivariateNormal())
    plan, theta = _plan_and_theta(model, ds, {
        "z": {"initial": [0.3, 0.7], "transition": [[0.8, 0.2], [0.4, 0.6]]},
        "x": {"mean": [[0.0, 0.0], [3.0, 3.0]], "covariance": np.stack([np.eye(2)] * 2)}})
    H = natural_matrix(plan, theta)
    assert H.shape == (2, plan.n_stats + 1 + 2)  # [emissions | log π | log A]
    with engine(plan) as estep:
        summary = estep.summarize(H, theta)
    elbo = expected_complete_loglik(H, summary.stats) + summary.entropy
    assert elbo == pytest.approx(summary.loglik, rel=1e-12)
    assert summary.entropy > 0
    # the latent's statistics: initial counts sum to the number of sequences, ξ to the transitions
    initial, xi = summary.stats[:, plan.n_stats], summary.stats[:, plan.n_stats + 1:]
    assert initial.sum() == pytest.approx(3.0, rel=1e-12)
    assert xi.sum() == pytest.approx(39 + 29 + 39, rel=1e-12)
    np.testing.assert_allclose(summary.stats[:, 0].sum(), 40 + 30 + 40, rtol=1e-12)
