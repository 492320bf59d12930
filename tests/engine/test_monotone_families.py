"""EM's guarantee for every observed family, with holes and with weights.

Each family alone in a small mixture, and all of them together in one mixed model,
each with and without 15% missing values (NaN) and with and without integer weights:
ℓ never decreases (beyond the engine's recorded rounding bound), ℓ = ELBO + KL with
KL ≥ 0, every parameter is finite, and ``fit.loglik`` is the weighted sum of
``fit.score_samples`` — the per-sample densities evaluated independently of the loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from tests.engine.test_monotone import check_trace

N = 300


def _labels(rng: np.random.Generator, K: int) -> np.ndarray:
    """Component of each sample, in unequal proportions (so the components are identifiable)."""
    weights = np.arange(1, K + 1, dtype=float)
    return rng.choice(K, size=N, p=weights / weights.sum())


# Each simulator draws one node from its family given the component labels z and
# returns (data variables, declaration). Several have two elements (a "feature" dim)
# so that per-element holes and per-element parameters are exercised.
def _normal(rng, z):
    mean = np.array([[-2.0, 0.0], [1.5, 3.0], [4.0, -2.0]])[z]
    return {"normal": (("sample", "feature"), rng.normal(mean, [0.7, 1.3]))}, ("normal", em.Normal())


def _mvn(covariance: str):
    def simulate(rng, z):
        centers = np.array([[0.0, 0.0, 0.0], [3.0, 1.0, -2.0], [-2.0, 4.0, 1.0]])
        mixing = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.4, 0.9]])
        x = centers[z] + rng.normal(size=(N, 3)) @ mixing.T
        return ({"mvn": (("sample", "dim3"), x)},
                ("mvn", em.MultivariateNormal(covariance=covariance)))
    return simulate


def _categorical(rng, z):
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.5, 0.2, 0.05]])[z]
    codes = (rng.random((N, 1)) > probs.cumsum(axis=1)).sum(axis=1).astype(float)
    return {"level": ("sample", codes)}, ("level", em.Categorical())


def _poisson(rng, z):
    rate = np.array([[1.0, 6.0], [7.0, 0.5], [15.0, 3.0]])[z]
    return {"count": (("sample", "feature"), rng.poisson(rate).astype(float))}, ("count", em.Poisson())


def _bernoulli(rng, z):
    probs = np.array([[0.1, 0.8, 0.5], [0.9, 0.2, 0.5], [0.5, 0.5, 0.05]])[z]
    return ({"flag": (("sample", "item"), (rng.random(probs.shape) < probs).astype(float))},
            ("flag", em.Bernoulli()))


def _binomial(rng, z):
    probs = np.array([0.15, 0.6, 0.9])[z]
    return {"successes": ("sample", rng.binomial(10, probs).astype(float))}, ("successes", em.Binomial(trials=10))


def _exponential(rng, z):
    scale = np.array([0.3, 3.0, 12.0])[z]
    return {"wait": ("sample", rng.exponential(scale))}, ("wait", em.Exponential())


def _gamma(rng, z):
    shape, rate = np.array([2.0, 9.0, 30.0])[z], np.array([4.0, 1.0, 3.0])[z]
    return {"size": ("sample", rng.gamma(shape, 1.0 / rate))}, ("size", em.Gamma())


def _lognormal(rng, z):
    mean, sd = np.array([0.0, 2.0, -1.5])[z], np.array([0.3, 0.5, 0.2])[z]
    return {"income": ("sample", np.exp(rng.normal(mean, sd)))}, ("income", em.LogNormal())


def _beta(rng, z):
    alpha, beta = np.array([2.0, 8.0, 1.5])[z], np.array([8.0, 2.0, 1.5])[z]
    return {"share": ("sample", rng.beta(alpha, beta))}, ("share", em.Beta())


def _von_mises(rng, z):
    mean, kappa = np.array([0.5, 2.8, -1.8])[z], np.array([6.0, 3.0, 10.0])[z]
    return {"angle": ("sample", rng.vonmises(mean, kappa))}, ("angle", em.VonMises())


def _multinomial(rng, z):
    probs = np.array([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    totals = rng.integers(5, 30, size=N)
    counts = np.stack([rng.multinomial(n, probs[k]) for n, k in zip(totals, z, strict=True)]).astype(float)
    return {"words": (("sample", "word"), counts)}, ("words", em.Multinomial(dim="word"))


Simulator = Callable[[np.random.Generator, np.ndarray], tuple[dict, tuple[str, Any]]]
FAMILIES: dict[str, tuple[Simulator, int]] = {  # simulator, number of components
    "normal": (_normal, 2),
    "mvn-full": (_mvn("full"), 3),
    "mvn-diag": (_mvn("diag"), 3),
    "mvn-spherical": (_mvn("spherical"), 2),
    "mvn-tied": (_mvn("tied"), 3),
    "categorical": (_categorical, 3),
    "poisson": (_poisson, 3),
    "bernoulli": (_bernoulli, 2),
    "binomial": (_binomial, 3),
    "exponential": (_exponential, 2),
    "gamma": (_gamma, 3),
    "lognormal": (_lognormal, 2),
    "beta": (_beta, 3),
    "von-mises": (_von_mises, 3),
    "multinomial": (_multinomial, 3),
}
#: every family in one model (the MVN as "full"; the other covariance types are tested alone)
MIXED = [name for name in FAMILIES if not name.startswith("mvn-") or name == "mvn-full"]


def _punch_holes(rng: np.random.Generator, ds: xr.Dataset, fraction: float) -> xr.Dataset:
    """Missing completely at random: ``fraction`` of the elements of every variable become NaN.

    A Multinomial event is observed entirely or not at all (a partial event has no known
    total), so its holes are whole events.
    """
    out = ds.copy()
    for name, da in ds.data_vars.items():
        if name == "words":
            hole = np.broadcast_to((rng.random(da.sizes["sample"]) < fraction)[:, None], da.shape)
        else:
            hole = rng.random(da.shape) < fraction
        out[name] = da.where(~hole)
    return out


def _case(names: list[str], K: int, holes: bool, weighted: bool, seed: int):
    rng = np.random.default_rng(seed)
    z = _labels(rng, K)
    variables, model = {}, em.Model().latent("z", em.Categorical(K))
    for name in names:
        data, (node, family) = FAMILIES[name][0](rng, z)
        variables.update(data)
        model = model.observe(node, family)
    ds = xr.Dataset(variables)
    if holes:
        ds = _punch_holes(rng, ds, 0.15)
    weights = None
    if weighted:
        ds["w"] = ("sample", rng.integers(0, 4, size=N).astype(float))  # zeros included: a row that counts 0 times
        weights = "w"
    return model, ds, weights


CASES = [([name], K) for name, (_, K) in FAMILIES.items()] + [(MIXED, 3)]
IDS = list(FAMILIES) + ["mixed"]


@pytest.mark.parametrize("holes, weighted", list(itertools.product([False, True], repeat=2)),
                         ids=[f"{h}-{w}" for h, w in itertools.product(["complete", "holes"],
                                                                       ["unweighted", "weighted"])])
@pytest.mark.parametrize("names, K", CASES, ids=IDS)
def test_every_family_keeps_the_guarantee(names, K, holes, weighted):
    seed = 1000 + IDS.index("mixed" if len(names) > 1 else names[0]) * 4 + 2 * holes + weighted
    model, ds, weights = _case(names, K, holes, weighted, seed)
    fit = model.fit(ds, max_iter=40, tol=0, seed=seed, weights=weights)
    assert fit.n_iter == 40
    check_trace(fit)
    for name, node in fit.params.children.items():
        for key, da in node.to_dataset().data_vars.items():
            assert np.isfinite(da.values).all(), f"{name}.{key} is not finite: {da.values}"
    # ℓ recomputed sample by sample, independently of the loop's sums, with the weights applied
    scores = fit.score_samples(ds).values
    w = np.ones(N) if weights is None else ds[weights].values
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(fit.loglik, scores @ w, rtol=1e-9)
    np.testing.assert_allclose(fit.loglik, fit.trace["loglik"].values[-1], rtol=0)
