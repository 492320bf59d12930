"""``prior="weak"`` on scikit-learn's wine data (issue 8): 13 features, 3 cultivars, full covariances.

Without a prior, most starts end with a component collapsed onto a few wines
(tests/test_degenerate.py). The weak prior has to make the cultivars the best sound fit
(the MAP among non-degenerate fits), so that restarts find them: these are properties
over many seeds, not one seed's outcome. What the prior cannot do is make every
k-means++ start reach the cultivars' basin (about a third do): with the default
``n_init=1`` the outcome still depends on the start (last test, an expected failure).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em

sklearn_datasets = pytest.importorskip("sklearn.datasets")
adjusted_rand_score = pytest.importorskip("sklearn.metrics").adjusted_rand_score


@pytest.fixture(scope="module")
def wine():
    frame = sklearn_datasets.load_wine(as_frame=True).frame
    features = [c for c in frame.columns if c != "target"]
    model = em.Model().latent("z", em.Categorical(3)).observe(features, em.MultivariateNormal, name="x")
    return model, frame[features], frame["target"].to_numpy()


def fit_quietly(model: em.Model, data, **kwargs) -> em.Fit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.DegenerateComponentWarning)
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        return model.fit(data, prior="weak", **kwargs)


def test_the_cultivars_are_the_best_sound_fit_under_the_weak_prior(wine):
    model, data, cultivars = wine
    start = xr.DataArray(np.eye(3)[cultivars], dims=("sample", "z"))
    truth = fit_quietly(model, data, init=start)
    assert adjusted_rand_score(cultivars, truth.predict(data)) > 0.95 and not truth.degenerate
    best = float(truth.trace.logpost[-1])
    reached = 0
    for seed in range(24):
        fit = fit_quietly(model, data, seed=seed)
        score = adjusted_rand_score(cultivars, fit.predict(data))
        if fit.degenerate:
            continue
        reached += score > 0.85
        if score < 0.85:
            # every sound fit that misses the cultivars has a clearly lower log-posterior
            # (measured: at least 17 nats lower over these seeds; mclust's own scale lets
            # a sound fit with ARI 0.5 beat them, see docs/design.md)
            assert float(fit.trace.logpost[-1]) < best - 5.0, (seed, score)
    assert reached >= 4  # measured 7 of 24: the cultivars' basin is found from a fair share of starts


def test_restarts_with_the_weak_prior_recover_the_cultivars(wine):
    """Over seeds, n_init=12 keeps the cultivars (measured over 20 seeds: median ARI 0.93, 17 above 0.85, min 0.76).

    Other sound local optima lie between the cultivars' fits in log-posterior, so a margin
    over seeds is asserted, not every seed.
    """
    model, data, cultivars = wine
    scores = []
    for seed in range(6):
        fit = fit_quietly(model, data, seed=seed, n_init=12)
        assert fit.status == "converged" and not fit.degenerate
        scores.append(adjusted_rand_score(cultivars, fit.predict(data)))
        # the kept restart is the best non-degenerate one by log-posterior
        finals = fit.traces["logpost"].groupby("restart").map(lambda s: s.isel(step=-1)).values
        sound = ~fit.restarts["degenerate"].values
        assert fit.restart == int(np.flatnonzero(sound)[np.argmax(finals[sound])])
    scores = np.array(scores)
    assert np.median(scores) > 0.9 and (scores > 0.85).sum() >= 5 and scores.min() > 0.7, scores


@pytest.mark.xfail(strict=True, reason="k-means++ seeding with one assignment step (engine/init.py) starts "
                                       "outside the cultivars' basin about two times in three; with starts "
                                       "from a converged k-means the weak prior reaches ARI >= 0.93 at n_init=3")
def test_the_default_single_start_recovers_the_cultivars_for_every_seed(wine):
    model, data, cultivars = wine
    scores = [adjusted_rand_score(cultivars, fit_quietly(model, data, seed=seed).predict(data)) for seed in range(8)]
    assert min(scores) > 0.85, scores
