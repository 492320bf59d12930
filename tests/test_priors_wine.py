"""``prior="weak"`` on scikit-learn's wine data (issue 8): 13 features, 3 cultivars, full covariances.

Without a prior, most starts end with a component collapsed onto a few wines
(tests/test_degenerate.py). The weak prior has to make the cultivars the best sound fit
(the MAP among non-degenerate fits), so that restarts find them: these are properties
over many seeds, not one seed's outcome. What the prior cannot do is choose the start:
k-means++ seeds with a single assignment step reached the cultivars' basin from about a
third of the starts; the default start runs k-means to convergence from the seeds
(engine/init.py, docs/design.md), and every start measured reaches it (last test).
"""

from __future__ import annotations

import itertools
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
    reached = missed = 0
    for seed, init in itertools.product(range(24), ["kmeans++", "random"]):
        fit = fit_quietly(model, data, seed=seed, init=init)
        score = adjusted_rand_score(cultivars, fit.predict(data))
        if fit.degenerate:
            continue
        reached += init == "kmeans++" and score > 0.85
        if score < 0.85:
            # every sound fit that misses the cultivars has a clearly lower log-posterior
            # (measured: at least 20 nats lower; every sound miss here is a random start,
            # 24 of 24 of them; mclust's own scale lets a sound fit with ARI 0.5 beat
            # them, see docs/design.md)
            missed += 1
            assert float(fit.trace.logpost[-1]) < best - 5.0, (seed, init, score)
    assert missed >= 12  # the margin was checked on many sound optima besides the cultivars
    assert reached >= 20  # measured 24 of 24 k-means++ starts (7 of 24 with one assignment step)


def test_restarts_with_the_weak_prior_recover_the_cultivars(wine):
    """Over seeds, n_init=12 keeps the cultivars (measured over 20 seeds: ARI 0.96 for every seed;
    from k-means++ seeds with one assignment step: median 0.93, 17 above 0.85, min 0.76)."""
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
    assert np.median(scores) > 0.9 and scores.min() > 0.85, scores


def test_the_default_start_recovers_the_cultivars_for_every_seed(wine):
    """From k-means run to convergence, the default start reaches the cultivars across seeds (issue 8).

    Measured over 20 seeds: ARI above 0.85 for every seed, with a single start (median 0.93,
    min 0.91; from k-means++ seeds with one assignment step: median 0.56, 6 of 20) and with
    ``n_init=3`` (median 0.96, min 0.91; one assignment step: median 0.82, min 0.39, 10 of 20).
    """
    model, data, cultivars = wine
    restarts = [adjusted_rand_score(cultivars, fit_quietly(model, data, seed=seed, n_init=3).predict(data))
                for seed in range(8)]
    assert min(restarts) > 0.85, restarts
    single = [adjusted_rand_score(cultivars, fit_quietly(model, data, seed=seed).predict(data)) for seed in range(8)]
    assert min(single) > 0.85, single
