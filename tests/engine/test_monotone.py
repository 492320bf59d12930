"""EM's guarantee over many model configurations: ℓ never decreases and ℓ = ELBO + KL, KL ≥ 0."""

import itertools

import numpy as np
import pytest
import xarray as xr
from hypothesis import example, given
from hypothesis import strategies as hs

import emdsl as em
from tests.conftest import blobs

FAMILIES = {
    "mvn-full": lambda: em.MultivariateNormal(),
    "mvn-diag": lambda: em.MultivariateNormal(covariance="diag"),
    "mvn-spherical": lambda: em.MultivariateNormal(covariance="spherical"),
    "mvn-tied": lambda: em.MultivariateNormal(covariance="tied"),
    "normal": lambda: em.Normal(),
    "normal-tied": lambda: em.Normal(tied="variance"),
}


def check_trace(fit, *, tight=False):
    """EM's guarantee, with the rounding bound the engine's own run-time check derived (recorded in the trace)."""
    loglik, elbo, kl = (fit.traces[v].values for v in ("loglik", "elbo", "kl"))
    slack = fit.traces["slack"].values
    assert np.all(np.isfinite(slack) & (slack > 0))
    if tight:  # on well-behaved data the bound is far below the old rule of 1e-9·|ℓ|
        assert np.all(slack <= 1e-9 * np.abs(loglik)), (slack / np.abs(loglik)).max()
    restart, iteration = fit.traces["restart"].values, fit.traces["iteration"].values
    for r in np.unique(restart):
        mine = restart == r
        assert np.all(np.diff(loglik[mine]) >= -slack[mine][1:]), np.diff(loglik[mine]).min()
    np.testing.assert_allclose(loglik, elbo + kl, rtol=1e-12)
    assert np.all(kl >= -slack), kl.min()
    # the M-step raises the ELBO above the previous log-likelihood (the staircase)
    after_m_step = iteration[1:] > 0
    assert np.all(elbo[1:][after_m_step] >= loglik[:-1][after_m_step] - slack[:-1][after_m_step])
    assert all(np.isfinite(fit.traces[v].values).all() for v in fit.traces.data_vars)


@pytest.mark.parametrize("family, K, init", list(itertools.product(FAMILIES, [1, 2, 4], ["kmeans++", "random"])))
def test_loglik_never_decreases(family, K, init):
    X = blobs(n=240, seed=K)
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(K)).observe("x", FAMILIES[family]())
    fit = model.fit(ds, init=init, n_init=2, max_iter=60, tol=0, seed=K)
    check_trace(fit, tight=True)
    assert fit.n_iter == 60


def test_two_observed_nodes_and_no_latent():
    X = blobs(n=200, seed=3)
    ds = xr.Dataset({"a": ("sample", X[:, 0]), "b": ("sample", X[:, 1]), "c": ("sample", X[:, 2] if X.shape[1] > 2 else X[:, 0] ** 2)})
    for model in (
        em.Model().latent("z", em.Categorical(3)).observe(["a", "b"], em.MultivariateNormal).observe("c", em.Normal),
        em.Model().observe(["a", "b"], em.MultivariateNormal, name="ab"),
    ):
        check_trace(model.fit(ds, max_iter=40, tol=0, seed=0))


@given(
    n=hs.integers(8, 80),
    D=hs.integers(1, 3),
    K=hs.integers(1, 4),
    covariance=hs.sampled_from(["full", "diag", "spherical", "tied"]),
    seed=hs.integers(0, 2**32 - 1),
    scale=hs.floats(1e-3, 1e3),
)
@example(n=8, D=2, K=4, covariance="full", seed=6066, scale=2.0)  # |ℓ| ≈ 0.1: slack must not shrink with ℓ
def test_monotone_on_random_data(n, D, K, covariance, seed, scale):
    rng = np.random.default_rng(seed)
    X = rng.standard_t(3, size=(n, D)) * scale + rng.normal(0, 10 * scale, D)
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(min(K, n))).observe("x", em.MultivariateNormal(covariance=covariance))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.DegenerateComponentWarning)
        fit = model.fit(ds, max_iter=30, tol=0, seed=seed)
    check_trace(fit)
    assert np.isfinite(fit.params["x"]["covariance"].values).all()


def test_brute_force_enumeration_equals_loglik():
    """p(x) = Π_n Σ_k π_k Π_v p(x_nv | k), enumerated with scipy for a tiny model."""
    import scipy.stats as st

    rng = np.random.default_rng(7)
    shift = np.repeat([0.0, 3.0], 4)
    ds = xr.Dataset({"a": ("sample", rng.normal(size=8) + shift), "b": ("sample", rng.normal(size=8) * 3 + 1),
                     "c": ("sample", rng.normal(size=8) - shift)})
    model = (em.Model().latent("z", em.Categorical(2)).observe(["a", "b"], em.MultivariateNormal, name="ab")
             .observe("c", em.Normal))
    fit = model.fit(ds, init="random", max_iter=5, tol=0, seed=1)
    p = fit.params
    total = 0.0
    for n in range(8):
        terms = []
        for k in range(2):
            x_ab = [ds["a"].values[n], ds["b"].values[n]]
            terms.append(np.log(p["z"]["probs"].values[k])
                         + st.multivariate_normal(p["ab"]["mean"].values[k], p["ab"]["covariance"].values[k]).logpdf(x_ab)
                         + st.norm(p["c"]["mean"].values[k, ], np.sqrt(p["c"]["variance"].values[k])).logpdf(ds["c"].values[n]))
        total += np.logaddexp(*terms)
    assert fit.loglik == pytest.approx(total, rel=1e-11)


# -- a value the check reads that is not finite ------------------------------------------------------------
def test_the_check_refuses_values_that_would_pass_it_vacuously():
    """NaN compares false with everything and −∞ ≥ −∞ − ∞: each would let a decrease through."""
    from emdsl.engine.loop import _check_guarantee

    _check_guarantee(3, -10.0, -9.5, -9.0, 1e-9)  # an ordinary step passes
    for previous, elbo, loglik, slack in [(-10.0, np.nan, -9.0, 1e-9), (-10.0, -9.5, np.nan, 1e-9),
                                          (np.nan, -9.5, -9.0, 1e-9), (-np.inf, -np.inf, -np.inf, 0.0),
                                          (-10.0, -9.5, np.inf, 1e-9), (-10.0, -9.5, -9.0, np.nan)]:
        with pytest.raises(em.MonotonicityError, match="iteration 3: .*not finite"):
            _check_guarantee(3, previous, elbo, loglik, slack)


@pytest.mark.parametrize("accelerate", [None, "squarem", "daarem", "qn"])
def test_a_log_likelihood_that_becomes_nan_stops_the_fit(monkeypatch, accelerate):
    """A bug that made ℓ NaN mid-fit ran on to max_iter with NaN in the trace; now the fit stops with it."""
    from emdsl.engine.estep import EStep

    original, calls = EStep.summarize, []

    def failing(self, H, theta=None):
        summary = original(self, H, theta)
        calls.append(None)
        if len(calls) >= 4:
            summary.loglik = float("nan")
        return summary

    monkeypatch.setattr(EStep, "summarize", failing)
    X = blobs(300)
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal)
    with pytest.raises(em.MonotonicityError, match="not finite"):
        model.fit(xr.Dataset({"x": (("sample", "feature"), X)}), seed=0, tol=0, max_iter=30, accelerate=accelerate)
