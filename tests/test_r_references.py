"""Mixtures against R's mclust 6.0.0 and mixtools 2.0.0: Old Faithful's Gaussian mixtures, Gamma and
multinomial mixtures.

R is not a dependency, so these results are recorded from runs by hand (Debian's r-cran-mclust
and r-cran-mixtools, 2026-12-04). mclust, the reference for model-based clustering, with its EM
run to a tight tolerance::

    library(mclust)
    X <- read.csv("emdsl/datasets/faithful.csv")[, c("eruptions", "waiting")]
    f <- Mclust(X, G = G, modelNames = m, verbose = FALSE,  # m: any of the 14 below
                control = emControl(tol = c(1e-13, sqrt(.Machine$double.eps)), itmax = c(1e5, 1e5)))
    c(f$loglik, f$df, icl(f))

mclust starts from one model-based hierarchical clustering, so it may stop at a local
optimum; emdsl with ten restarts must never end below it, must reach exactly its value
where mclust found the global optimum, and must count the same free parameters (BIC).
The models' names map as VVV = "full", EEE = "tied", VII = "spherical", VVI = "diag"; EII, EEI, VEI,
EVI, VEE, EVE, VVE, EEV, VEV and EVV are ``em.MultivariateNormal(covariance=...)`` under mclust's own
names, and EEI
(a diagonal covariance shared by the components) is also ``em.Normal(tied="variance")`` on the two
variables: all 14 of mclust's models.

mixtools' ``normalmixEM`` (the best of 10 random starts, ``epsilon = 1e-12``) on the waiting
times, with a variance per component and with one shared (``arbvar = FALSE``)::

    best <- normalmixEM(faithful$waiting, k = 2, epsilon = 1e-12, maxit = 100000)
    c(best$loglik, best$lambda, best$mu, best$sigma)

and mixtools' ``gammamixEM`` (the best of 10 random starts, ``epsilon = 1e-12``) on
``tests/data/gamma_mixture.csv`` (400 draws: 150 from Gamma(2, scale 1.5), 250 from
Gamma(9, scale 1)); its M-step for the shapes is a numerical optimization, so it stops
1e-6 below the optimum that emdsl's Newton M-step reaches. And ``multmixEM`` on
``tests/data/multinomial_mixture.csv`` (200 rows of counts over 4 categories, 5–29 trials).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import emdsl as em

DATA = Path(__file__).parent / "data"
COVARIANCE = {"VVV": "full", "EEE": "tied", "VII": "spherical", "VVI": "diag", "EII": "EII", "VEI": "VEI",
              "EVI": "EVI", "EEV": "EEV", "VEV": "VEV", "EVV": "EVV", "VEE": "VEE", "EVE": "EVE", "VVE": "VVE"}
#: (model, G): (log-likelihood, df), from mclust 6.0.0
MCLUST = {
    ("VVV", 2): (-1130.26396018, 11), ("VVV", 3): (-1127.07166740, 17), ("VVV", 4): (-1111.24796917, 23),
    ("EEE", 2): (-1140.18675944, 8), ("EEE", 3): (-1126.31592782, 11), ("EEE", 4): (-1120.82812661, 14),
    ("VII", 2): (-1709.52928218, 7), ("VII", 3): (-1637.43441800, 11), ("VII", 4): (-1579.34664804, 15),
    ("VVI", 2): (-1147.80635254, 9), ("VVI", 3): (-1131.81853484, 14), ("VVI", 4): (-1112.88083293, 19),
    ("EEI", 2): (-1157.68001234, 7), ("EEI", 3): (-1133.45539992, 10), ("EEI", 4): (-1125.36058741, 13),
    ("EII", 2): (-1709.68137295, 6), ("EII", 3): (-1663.53959975, 9), ("EII", 4): (-1581.47337875, 12),
    ("VEI", 2): (-1152.88019637, 8), ("VEI", 3): (-1132.66684339, 12), ("VEI", 4): (-1120.74254183, 16),
    ("EVI", 2): (-1153.88556822, 8), ("EVI", 3): (-1132.42243932, 12), ("EVI", 4): (-1122.39822289, 16),
    ("EEV", 2): (-1139.33159866, 9), ("EEV", 3): (-1126.16326646, 13), ("EEV", 4): (-1128.00027472, 17),
    ("VEV", 2): (-1134.67920352, 10), ("VEV", 3): (-1122.54939033, 15), ("VEV", 4): (-1120.89964714, 20),
    ("EVV", 2): (-1135.76990394, 10), ("EVV", 3): (-1125.66088640, 15), ("EVV", 4): (-1116.25321504, 20),
    ("VEE", 2): (-1136.25985414, 9), ("VEE", 3): (-1124.52818221, 13), ("VEE", 4): (-1121.73394206, 17),
    ("EVE", 2): (-1136.91026067, 9), ("EVE", 3): (-1124.83185156, 13), ("EVE", 4): (-1133.15758709, 17),
    ("VVE", 2): (-1132.18744640, 10), ("VVE", 3): (-1122.79684535, 15), ("VVE", 4): (-1125.19962219, 20),
}
#: mclust's ICL (its sign: higher is better) where it reached the optimum
MCLUST_ICL = {("VVV", 2): -2322.7046803281, ("EEE", 2): -2326.7093903264, ("EEE", 3): -2358.3892421635,
              ("EEE", 4): -2372.4651514013}
#: where mclust stops below what emdsl's restarts find, and by at least how much: its single start's
#: local optima (1.5–12.7), and VVE, whose fixed points in mclust are not maxima (see the VVE test)
MCLUST_LOCAL = {("VVV", 3): 1.0, ("VVV", 4): 1.0, ("VVI", 3): 1.0, ("EEV", 4): 1.0, ("VEV", 4): 1.0,
                ("EVV", 3): 1.0, ("VEE", 4): 1.0, ("EVE", 4): 1.0, ("VVE", 2): 0.07, ("VVE", 3): 0.5,
                ("VVE", 4): 10.0}
#: mclust's own EM (``me(X, modelName, z = emdsl's posterior)``, tol 1e-13) from emdsl's optimum stays there
MCLUST_FROM_EMDSL = {("EEV", 4): -1120.6861535063, ("VEV", 4): -1114.7104085277, ("EVV", 3): -1124.1272403322,
                     ("VEE", 4): -1118.1450017417, ("EVE", 4): -1120.4195167164}


@pytest.mark.parametrize(("name", "G"), list(MCLUST))
def test_faithful_mixtures_reach_mclusts_optimum(name, G):
    loglik, df = MCLUST[name, G]
    ds = em.datasets.load("faithful")
    # EEI, one diagonal covariance shared by the components: independent Normal elements, variances tied
    family = (em.Normal(tied="variance") if name == "EEI"
              else em.MultivariateNormal(covariance=COVARIANCE[name]))
    model = em.Model().latent("z", em.Categorical(G)).observe(["eruptions", "waiting"], family)
    selection = em.select({(name, G): model}, ds, n_init=10, seed=0, tol=1e-12, max_iter=10_000)
    fit = selection.fits[name, G]
    assert fit.n_params == df
    if name == "EEI":  # mclust's name on a MultivariateNormal: the same model and optimum
        same = em.Model().latent("z", em.Categorical(G)).observe(["eruptions", "waiting"],
                                                                 em.MultivariateNormal(covariance="EEI"))
        other = same.fit(ds, n_init=10, seed=0, tol=1e-12, max_iter=10_000)
        assert other.n_params == df and other.loglik == pytest.approx(fit.loglik, rel=1e-10)
    # mclust's BIC is 2ℓ − df·log n; emdsl's, scikit-learn's sign: −2ℓ + df·log n
    assert fit.bic() == pytest.approx(-2 * fit.loglik + df * np.log(272), rel=1e-12)
    if (name, G) in MCLUST_ICL:
        # The MAP labels' cost moves along ℓ's flat directions: at EEE, G = 3, mclust's ℓ is 4e-10 below
        # emdsl's and its ICL 2.7e-4 off; emdsl's own fits to tol 1e-12 and to 20,000 iterations differ
        # by 2.7e-5. The entropy form of ICL would be 41 off there.
        assert float(selection.table["icl"][0]) == pytest.approx(-MCLUST_ICL[name, G], rel=1e-6)
    if (name, G) in MCLUST_LOCAL:
        assert fit.loglik > loglik + MCLUST_LOCAL[name, G]
        if (name, G) in MCLUST_FROM_EMDSL:  # a better optimum of the same model, by mclust's own EM
            assert fit.loglik == pytest.approx(MCLUST_FROM_EMDSL[name, G], rel=1e-11)
    else:
        assert fit.loglik == pytest.approx(loglik, rel=1e-10, abs=0)


def test_mclusts_vve_fixed_point_is_not_a_maximum():
    """mclust's VVE (one orientation, each component its own eigenvalues) stops below its maximum: from
    mclust's own parameters (G = 2, printed to 15 digits), one EM step of emdsl's raises ℓ by 0.075,
    and the end point still shares its eigenvectors, with ℓ equal to scipy's. mclust's ``me`` from
    emdsl's posterior falls back to about its own value, so its VVE M-step is where the two differ."""
    from scipy import stats
    from scipy.special import logsumexp

    ds = em.datasets.load("faithful")
    x = np.column_stack([ds["eruptions"].values, ds["waiting"].values])
    probs = [0.643184120853128, 0.356815879146872]
    mean = [[4.29162041937638, 79.9901320369551], [2.03881336083678, 54.5061955171826]]
    sigma = [[[0.160026224847141, 0.727283092880778], [0.727283092880778, 35.759827573598]],
             [[0.0806830064785185, 0.691239249965547], [0.691239249965547, 33.9161732359578]]]
    model = em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"],
                                                              em.MultivariateNormal(covariance="VVE"))
    fit = model.fit(ds, init={"z": {"probs": probs}, "eruptions+waiting": {"mean": mean, "covariance": sigma}},
                    tol=1e-13, accelerate=None)
    mclust_loglik = MCLUST["VVE", 2][0]
    assert fit.trace["loglik"].values[0] == pytest.approx(mclust_loglik, rel=1e-9)  # mclust's point
    assert fit.trace["loglik"].values[1] > mclust_loglik + 0.07
    cov = fit.params["eruptions+waiting"]["covariance"].values
    axes = np.linalg.eigh(cov[0])[1]
    rotated = axes.T @ cov[1] @ axes
    assert abs(rotated[0, 1]) < 1e-9 * np.abs(rotated).max()
    w, mu = fit.params["z"]["probs"].values, fit.params["eruptions+waiting"]["mean"].values
    scipy_loglik = logsumexp([np.log(w[k]) + stats.multivariate_normal(mu[k], cov[k]).logpdf(x) for k in range(2)],
                             axis=0).sum()
    assert fit.loglik == pytest.approx(scipy_loglik, rel=1e-12)


#: mixtools: ℓ, λ, μ, σ (λ, μ ordered by μ)
MIXTOOLS = {
    "variance": (-1034.00174983, [0.360886081218, 0.639113918782], [54.6148564444, 80.0910695952],
                 [5.87121962416, 5.86773426745]),
    "tied": (-1034.00176036, [0.360849441373, 0.639150558627], [54.6136262957, 80.090303595],
             [5.86909140585, 5.86909140585]),
}


@pytest.mark.parametrize("variance", list(MIXTOOLS))
def test_faithful_waiting_matches_mixtools(variance):
    loglik, probs, mean, sigma = MIXTOOLS[variance]
    family = em.Normal(tied="variance") if variance == "tied" else em.Normal()
    fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", family).fit(
        em.datasets.load("faithful"), n_init=10, seed=0, tol=1e-13)
    assert fit.loglik == pytest.approx(loglik, rel=1e-11)
    order = np.argsort(fit.params["waiting"]["mean"].values.ravel())
    np.testing.assert_allclose(fit.params["z"]["probs"].values[order], probs, rtol=1e-5)
    np.testing.assert_allclose(fit.params["waiting"]["mean"].values.ravel()[order], mean, rtol=1e-6)
    sd = np.broadcast_to(np.sqrt(fit.params["waiting"]["variance"].values.ravel()), (2,))
    np.testing.assert_allclose(sd[order], sigma, rtol=1e-5)


#: mixtools gammamixEM: ℓ; λ, shape α and scale β per component (ordered by α)
GAMMAMIX = (-1095.8899241934, [0.3449907, 0.6550093], [1.859335, 7.522783], [1.459908, 1.187019])


def test_gamma_mixture_reaches_mixtools_optimum():
    loglik, probs, shape, scale = GAMMAMIX
    x = pd.read_csv(DATA / "gamma_mixture.csv")["x"].values
    fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Gamma).fit(
        xr.Dataset({"x": ("sample", x)}), n_init=10, seed=0, tol=1e-13, max_iter=100_000)
    assert loglik <= fit.loglik <= loglik + 1e-5
    order = np.argsort(fit.params["x"]["shape"].values.ravel())
    np.testing.assert_allclose(fit.params["z"]["probs"].values[order], probs, rtol=1e-3)
    np.testing.assert_allclose(fit.params["x"]["shape"].values.ravel()[order], shape, rtol=1e-3)
    np.testing.assert_allclose(1 / fit.params["x"]["rate"].values.ravel()[order], scale, rtol=1e-3)


#: mixtools multmixEM: ℓ (with the multinomial coefficients); λ and θ per component (θ's first ascending)
MULTMIX = (-1122.4016181347, [0.3812683, 0.6187317],
           [[0.09910197, 0.1997515, 0.30469307, 0.3964535], [0.50011501, 0.3092816, 0.08733155, 0.1032718]])


def test_multinomial_mixture_matches_mixtools():
    loglik, probs, theta = MULTMIX
    counts = pd.read_csv(DATA / "multinomial_mixture.csv").values
    fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Multinomial).fit(
        xr.Dataset({"x": (("sample", "category"), counts)}), n_init=10, seed=0, tol=1e-13, max_iter=100_000)
    assert fit.loglik == pytest.approx(loglik, rel=1e-11)
    order = np.argsort(fit.params["x"]["probs"].values[:, 0])
    np.testing.assert_allclose(fit.params["z"]["probs"].values[order], probs, rtol=1e-6)
    np.testing.assert_allclose(fit.params["x"]["probs"].values[order], theta, rtol=1e-6)
