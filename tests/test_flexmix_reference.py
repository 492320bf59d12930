"""Mixtures of regressions against R's flexmix 2.3.18, the reference for them, and mixtools 2.0.0.

The data (``tests/data/regression_mixture.csv``, 200 rows) follow flexmix's own ``NPreg``
design: x uniform on [0, 10]; a Gaussian response on one of two curves, 5x or
15 + 10x − x², σ = 3; a Poisson response with log-means 2 − 0.2x or 1 + 0.1x. R is not a
dependency, so flexmix's results are recorded from a run by hand (Debian's r-cran-flexmix,
2026-12-04)::

    d <- read.csv("tests/data/regression_mixture.csv"); set.seed(1)
    ctrl <- list(tolerance = 1e-13, iter.max = 100000)
    g <- stepFlexmix(yn ~ x + I(x^2), data = d, k = 2, nrep = 20, control = ctrl)
    p <- stepFlexmix(yp ~ x, data = d, k = 2, nrep = 20, control = ctrl,
                     model = FLXMRglm(family = "poisson"))
    c(logLik(.), parameters(.), prior(.))

A second file (``tests/data/concomitant_binomial.csv``, 300 rows) has binomial counts k of 10
trials on one of two logistic lines in x, the line's weight a logistic curve in a second
covariate w (a concomitant model)::

    d <- read.csv("tests/data/concomitant_binomial.csv"); set.seed(1)
    b <- stepFlexmix(cbind(k, trials - k) ~ x, data = d, k = 2, nrep = 20, control = ctrl,
                     model = FLXMRglm(family = "binomial"), concomitant = FLXPmultinom(~ w))
    c(logLik(b), parameters(b), parameters(b, which = "concomitant"))

and the same without the concomitant (``prior(b0)`` for the weights). Standard errors from
``summary(refit(.))``: flexmix's Hessian of the observed likelihood by finite differences
(``optim``), against emdsl's observed information, so they agree to about 1e-5.

flexmix's Gaussian M-step is not maximum likelihood: its σ² is Σ w r² / mean(w) / (n − rank)
over all n rows (``FLXMRglm``), so its fit ends a little below the maximum (0.0126 here);
emdsl's likelihood at flexmix's parameters must equal flexmix's, and emdsl's fit must beat it.
The Poisson and binomial M-steps are the weighted GLM in both, and the concomitant one is
nnet's weighted multinomial logit, so those optima must be the same. mixtools' ``regmixEM``
(the best of 20 random starts, ``epsilon = 1e-12``) is maximum likelihood for the Gaussian one::

    f <- regmixEM(d$yn, cbind(d$x, d$x^2), k = 2, epsilon = 1e-12, maxit = 100000)
    c(f$loglik, f$beta, f$sigma, f$lambda)
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import emdsl as em

DATA = Path(__file__).parent / "data" / "regression_mixture.csv"
#: flexmix: ℓ; per component (intercept, x, x², σ); the prior probabilities
GAUSSIAN = (-618.584950833241,
            np.array([[0.0407217113714781, 4.71780426424094, 0.0345320601290796],
                      [13.8331720648402, 10.4559899706745, -1.03077919287873]]),
            np.array([3.15531667200113, 2.73379855531926]), np.array([0.461494165204372, 0.538505834795628]))
#: mixtools regmixEM: ℓ; per component (intercept, x, x², σ); the mixing proportions
REGMIX = (-618.5723543598,
          np.array([[0.0428005190628, 4.7158049254339, 0.0347245999516],
                    [13.83274461931, 10.45659124444, -1.03085464505]]),
          np.array([3.12856528782, 2.71133451339]), np.array([0.461490327044, 0.538509672956]))
#: flexmix: ℓ; per component (intercept, x) of the binomial logits; the concomitant (intercept, w) of
#: component 2 against component 1 (or, without one, the prior probabilities)
CONCOMITANT = (-607.048034246689,
               np.array([[1.26038712579249, -0.353642027936508], [-1.76008446128749, 0.461498185714425]]),
               np.array([-2.35827668824019, 0.623657805444815]))
BINOMIAL = (-641.990294585637,
            np.array([[-1.83157370893822, 0.476211771188903], [1.20090032634929, -0.34590170701896]]),
            np.array([0.493024632325951, 0.506975367674049]))
#: flexmix's standard errors (refit): per component of CONCOMITANT (intercept, x), and of its concomitant
CONCOMITANT_SE = (np.array([[0.1279463667, 0.02382576597], [0.1478282419, 0.0277711454]]),
                  np.array([0.3793789695, 0.09261975315]))
#: flexmix: ℓ; per component (intercept, x); the prior probabilities
POISSON = (-459.731792964171,
           np.array([[2.27489331941251, -0.257398222851632], [0.969831553127999, 0.101403287851385]]),
           np.array([0.380083705200434, 0.619916294799566]))
#: flexmix's standard errors (refit) per component of POISSON (intercept, x)
POISSON_SE = np.array([[0.124299163, 0.03620989144], [0.1228281484, 0.01911653573]])


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    ds = xr.Dataset.from_dataframe(pd.read_csv(DATA))
    ds["x2"] = ds["x"] ** 2
    return ds


def test_gaussian_regression_mixture_beats_flexmix_whose_likelihood_it_reproduces(data):
    loglik, coef, sigma, probs = GAUSSIAN
    model = em.Model().latent("z", em.Categorical(2)).observe("yn", em.Normal, covariates=["x", "x2"])
    at_theirs = model.fit(data, init={"yn": {"coef": coef, "variance": sigma ** 2}, "z": {"probs": probs}},
                          max_iter=0)
    assert at_theirs.loglik == pytest.approx(loglik, rel=1e-11)
    fit = model.fit(data, seed=0, n_init=10, tol=1e-13, max_iter=100_000)
    assert loglik < fit.loglik < loglik + 0.05  # flexmix's σ² divides by n − 3, not n: 0.0126 short
    order = np.argsort(fit.params["yn"]["coef"].values[:, 0])  # flexmix's order: the lower intercept first
    np.testing.assert_allclose(fit.params["yn"]["coef"].values[order], coef, atol=0.01, rtol=0.01)
    np.testing.assert_allclose(fit.params["z"]["probs"].values[order], probs, atol=1e-3)
    # the maximum itself is mixtools' (its σ is maximum likelihood)
    loglik, coef, sigma, probs = REGMIX
    assert fit.loglik == pytest.approx(loglik, rel=1e-11)
    np.testing.assert_allclose(fit.params["yn"]["coef"].values[order], coef, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(fit.params["yn"]["variance"].values[order]), sigma, rtol=1e-6)
    np.testing.assert_allclose(fit.params["z"]["probs"].values[order], probs, rtol=1e-6)


def test_regression_mixture_restarts_start_apart(data):
    """Seeding on k-means of the response put every restart on one wrong split (y's levels are shared by
    two crossing curves: ℓ = −697.4 each time); regressions no longer seed k-means, so restarts differ."""
    model = em.Model().latent("z", em.Categorical(2)).observe("yn", em.Normal, covariates=["x", "x2"])
    single = [model.fit(data, seed=seed, tol=1e-13, max_iter=100_000).loglik for seed in range(10)]
    best = max(single)
    assert best > GAUSSIAN[0]
    assert sum(np.isclose(single, best, rtol=1e-9)) >= 7


def test_poisson_regression_mixture_reaches_flexmixs_optimum(data):
    loglik, coef, probs = POISSON
    model = em.Model().latent("z", em.Categorical(2)).observe("yp", em.Poisson, covariates=["x"])
    fit = model.fit(data, seed=0, n_init=10, tol=1e-13, max_iter=100_000)
    assert fit.loglik == pytest.approx(loglik, rel=1e-10)
    order = np.argsort(fit.params["yp"]["coef"].values[:, 1])  # flexmix's order: the falling line first
    np.testing.assert_allclose(fit.params["yp"]["coef"].values[order], coef, rtol=1e-5)
    np.testing.assert_allclose(fit.params["z"]["probs"].values[order], probs, rtol=1e-5)
    np.testing.assert_allclose(fit.standard_errors()["yp"]["coef"].values[order], POISSON_SE, rtol=1e-4)


@pytest.fixture(scope="module")
def counts() -> xr.Dataset:
    return xr.Dataset.from_dataframe(pd.read_csv(DATA.parent / "concomitant_binomial.csv"))


def test_binomial_regression_mixture_with_concomitant_weights_reaches_flexmixs_optimum(counts):
    loglik, coef, gamma = CONCOMITANT
    model = (em.Model().latent("z", em.Categorical(2), covariates=["w"])
             .observe("k", em.Binomial(trials="trials"), covariates=["x"]))
    fit = model.fit(counts, seed=0, n_init=10, tol=1e-13, max_iter=100_000)
    assert fit.loglik == pytest.approx(loglik, rel=1e-11)
    # flexmix's component 1 is the falling line
    first = int(np.argmin(fit.params["k"]["coef"].sel(term="x").values))
    second = 1 - first
    np.testing.assert_allclose(fit.params["k"]["coef"].values[[first, second]], coef, rtol=1e-5)
    ours = fit.params["z"]["coef"].sel(term=["intercept", "w"]).values
    np.testing.assert_allclose(ours[second] - ours[first], gamma, rtol=1e-5)
    se = fit.standard_errors()
    np.testing.assert_allclose(se["k"]["coef"].values[[first, second]], CONCOMITANT_SE[0], rtol=1e-4)
    # one of the two states is the reference (γ = 0): the other's errors are those of the difference
    np.testing.assert_allclose(se["z"]["coef"].sel(term=["intercept", "w"]).values[max(first, second)],
                               CONCOMITANT_SE[1], rtol=1e-4)


def test_binomial_regression_mixture_reaches_flexmixs_optimum(counts):
    loglik, coef, probs = BINOMIAL
    model = em.Model().latent("z", em.Categorical(2)).observe("k", em.Binomial(trials="trials"), covariates=["x"])
    fit = model.fit(counts, seed=0, n_init=10, tol=1e-13, max_iter=100_000)
    assert fit.loglik == pytest.approx(loglik, rel=1e-11)
    order = np.argsort(fit.params["k"]["coef"].sel(term="x").values)[::-1]  # flexmix's order: the rising line first
    np.testing.assert_allclose(fit.params["k"]["coef"].values[order], coef, rtol=1e-5)
    np.testing.assert_allclose(fit.params["z"]["probs"].values[order], probs, rtol=1e-5)
