"""A Markov-switching regression against statsmodels' ``MarkovRegression``: the same likelihood, the same optimum,
the same standard errors.

statsmodels fits y_t = β_{s_t}ᵀ x_t + ε_t, ε_t ~ N(0, σ²_{s_t}) with a 2-state chain s by
maximum likelihood (EM, then BFGS); the same model in emdsl is a Markov latent with a Normal
regression emission. Its ``initialize_known(p)`` fixes the chain's distribution two steps
before the first observation (its filter predicts the first step's state through the
transition matrix twice; measured: the first predicted probabilities are p·A², and with
one step instead the likelihoods differ by 0.035), so the emdsl model gets two missing
steps in front of the data with ``initial=p`` fixed: a missing response adds nothing but
the chain's transitions.
"""

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em

sm = pytest.importorskip("statsmodels.api")


@pytest.fixture(scope="module")
def rates() -> xr.Dataset:
    return em.datasets.load("us_rates")[["tbilrate", "infl"]]


def _in_statsmodels_order(tree) -> np.ndarray:
    """A tree like ``fit.params`` (the parameters or their standard errors) in statsmodels' order: p[0->0],
    p[1->0], const[0], const[1], x1[0], x1[1], then sigma2[0], sigma2[1] (or one sigma2 when the
    variance does not switch)."""
    A = tree["z"]["transition"].values
    coef = tree["tbilrate"]["coef"].sel(term=["intercept", "infl"]).values
    return np.array([A[0, 0], A[1, 0], *coef[:, 0], *coef[:, 1], *np.ravel(tree["tbilrate"]["variance"].values)])


@pytest.mark.parametrize(("initial", "switching"), [((0.5, 0.5), True), ((0.8, 0.2), True), ((0.5, 0.5), False)])
def test_markov_switching_regression_matches_statsmodels(rates, initial, switching):
    """``switching_variance=False`` is a variance tied across the states (``em.Normal(tied="variance")``)."""
    y, x = rates["tbilrate"].values, rates["infl"].values
    reference = sm.tsa.MarkovRegression(y, k_regimes=2, exog=x, switching_variance=switching)
    reference.initialize_known(np.array(initial))
    ahead = xr.Dataset({"tbilrate": ("sample", [np.nan, np.nan]), "infl": ("sample", [0.0, 0.0])},
                       coords={"sample": [-2, -1]})
    padded = xr.concat([ahead, rates], dim="sample")
    model = (em.Model().latent("z", em.Categorical(2, initial=list(initial)), markov="sample")
             .observe("tbilrate", em.Normal() if switching else em.Normal(tied="variance"), covariates=["infl"]))
    fit = model.fit(padded, n_init=10, seed=0, tol=1e-13, max_iter=20_000)
    assert fit.converged
    theta = _in_statsmodels_order(fit.params)
    # the same likelihood at the same parameters
    assert reference.loglike(theta) == pytest.approx(fit.loglik, rel=1e-11)
    # the same optimum: statsmodels' optimizer started there finds nothing better, and its gradient vanishes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter
        again = reference.fit(start_params=theta, em_iter=0, maxiter=1000)
    assert again.llf <= fit.loglik + 1e-9 * abs(fit.loglik)
    np.testing.assert_allclose(again.params, theta, rtol=1e-4, atol=1e-6)
    assert np.abs(reference.score(theta)).max() < 1e-3
    # the same standard errors: statsmodels inverts a numerical Hessian of its log-likelihood
    # (cov_type="approx"); emdsl's observed information, by the delta method to these parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothed = reference.smooth(theta, cov_type="approx")
    np.testing.assert_allclose(_in_statsmodels_order(fit.standard_errors()), smoothed.bse, rtol=1e-6)
