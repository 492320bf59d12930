"""em.bootstrap_lrt: McLachlan's parametric bootstrap of the likelihood ratio between nested fits.

By hand against mclust 6.0.0's ``mclustBootstrapLRT(faithful$waiting, "V")`` with emControl(tol = 1e-10):
the statistic for 1 against 2 components is 122.574101248 there and 122.574101335 here; over 999
replicates its quantiles (50, 90, 95, 99%) are 3.24, 8.42, 10.26, 14.66 there, 2.80, 8.01, 10.27, 14.70
here without the 25 replicates whose refit collapsed (mclust redraws the ones whose fit fails).
"""

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em


def _normal_fits(ds, ks=(1, 2), **kwargs):
    return [em.Model().latent("z", em.Categorical(k)).observe("x", em.Normal).fit(ds, seed=0, **kwargs) for k in ks]


def _sample(seed, n=150, means=(0.0,)):
    rng = np.random.default_rng(seed)
    return xr.Dataset({"x": ("sample", rng.normal(np.asarray(means)[rng.integers(0, len(means), n)], 1.0))})


def test_the_statistic_and_the_p_value_are_what_the_replicates_say():
    faithful = em.datasets.load("faithful").rename(waiting="x")
    one, two = _normal_fits(faithful)
    test = em.bootstrap_lrt(one, two, n=19, seed=3, n_jobs=1)
    assert float(test["statistic"]) == pytest.approx(2 * (two.loglik - one.loglik), rel=1e-14)
    assert float(test["statistic"]) == pytest.approx(122.574101248, abs=1e-6)  # mclust's, with tol = 1e-10
    np.testing.assert_array_equal(test["lrts"], 2 * (test["loglik_alternative"] - test["loglik_null"]))
    assert float(test["p_value"]) == (1 + int((test["lrts"] >= test["statistic"]).sum())) / 20 == 0.05
    assert test.sizes["replicate"] == 19 and test.attrs["n_params_null"] == 2 and test.attrs["n_params_alternative"] == 5
    # a one-component null refits to the closed-form maximum of its replicate: ℓ of N(x̄, s²) at most the
    # alternative's from a start inside it would be, and every replicate converged
    assert bool(test["converged"].all())
    assert np.all(np.isfinite(test["lrts"]))


def test_the_same_seed_gives_the_same_replicates_in_one_process_or_two():
    one, two = _normal_fits(_sample(0, means=(0.0, 2.5)))
    here = em.bootstrap_lrt(one, two, n=6, seed=11, n_jobs=1)
    workers = em.bootstrap_lrt(one, two, n=6, seed=11, n_jobs=2)
    xr.testing.assert_identical(here, workers)
    assert not np.array_equal(em.bootstrap_lrt(one, two, n=6, seed=12, n_jobs=1)["lrts"], here["lrts"])


def test_the_test_holds_its_level_under_the_null_and_rejects_two_clear_components():
    """20 data sets from one Normal: P(p ≤ 0.1) is 0.1 for a test of level 0.1 (19 replicates each), so
    7 or more of 20 would happen with probability 0.002; the p-values are not stuck at 1 either. Two
    components 4 standard deviations apart give the smallest p-value the replicates allow."""
    p = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.DegenerateComponentWarning)
        for seed in range(20):
            one, two = _normal_fits(_sample(seed))
            p.append(float(em.bootstrap_lrt(one, two, n=19, seed=seed, n_jobs=1)["p_value"]))
        p = np.array(p)
        assert np.sum(p <= 0.1) <= 6
        assert 0.25 < p.mean() < 0.8
        one, two = _normal_fits(_sample(99, means=(0.0, 4.0)))
        assert float(em.bootstrap_lrt(one, two, n=19, seed=0, n_jobs=1)["p_value"]) == 0.05


def test_a_hidden_markov_model_draws_paths_along_its_sequences():
    """1 against 2 states on two sequences of a sticky chain: each replicate is a path per sequence."""
    rng = np.random.default_rng(4)
    z = np.zeros((2, 300), dtype=int)
    for t in range(1, 300):
        z[:, t] = np.where(rng.random(2) < 0.05, 1 - z[:, t - 1], z[:, t - 1])
    ds = xr.Dataset({"x": (("seq", "time"), np.array([0.0, 3.0])[z] + rng.normal(size=z.shape))})
    one, two = (em.Model().latent("z", em.Categorical(k), markov="time").observe("x", em.Normal).fit(ds, seed=0)
                for k in (1, 2))
    test = em.bootstrap_lrt(one, two, n=4, seed=0, n_jobs=1)
    assert float(test["p_value"]) == 0.2
    assert bool(test["converged"].all())
    assert np.all(test["lrts"] < float(test["statistic"]) / 10)


def test_a_weighted_fit_is_tested_on_draws_of_its_total_weight():
    ds = _sample(5, n=60, means=(0.0, 3.0)).assign(w=("sample", np.full(60, 2.0)))
    one, two = _normal_fits(ds, weights="w")
    test = em.bootstrap_lrt(one, two, n=3, seed=0, n_jobs=1)
    assert np.all(np.isfinite(test["lrts"])) and float(test["p_value"]) == 0.25


def test_bad_input_names_what_is_wrong(tmp_path):
    one, two = _normal_fits(_sample(1, means=(0.0, 3.0)))
    with pytest.raises(em.ModelError, match="the alternative must be the larger model.*swap them"):
        em.bootstrap_lrt(two, one, n=3)
    other = _normal_fits(_sample(2, n=80), ks=(2,))[0]
    with pytest.raises(em.ModelError, match="fitted to different data.*150 samples.*80"):
        em.bootstrap_lrt(one, other, n=3)
    with pytest.raises(em.ModelError, match=r"n=\.\.\.\): the number of replicates must be a positive integer"):
        em.bootstrap_lrt(one, two, n=0)
    with pytest.raises(em.ModelError, match=r"n_jobs=\.\.\.\)"):
        em.bootstrap_lrt(one, two, n=2, n_jobs=0)
    with pytest.raises(em.ModelError, match=r"null=\.\.\.\): expected a Fit, got Model"):
        em.bootstrap_lrt(one.model, two, n=2)
    one.save(tmp_path / "one.nc")
    loaded = em.load(tmp_path / "one.nc")
    with pytest.raises(em.ModelError, match="loaded from a file and holds no training data; pass the data"):
        em.bootstrap_lrt(loaded, two, n=2)
    assert float(em.bootstrap_lrt(loaded, two, two.data, n=2, seed=0, n_jobs=1)["p_value"]) == pytest.approx(1 / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        warnings.simplefilter("ignore", em.DegenerateComponentWarning)
        worse = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal).fit(
            two.data, init={"x": {"mean": [10.0, 11.0], "variance": [1.0, 1.0]}}, max_iter=0)
    assert worse.loglik < one.loglik - 100
    with pytest.warns(em.ConvergenceWarning, match="alternative's log-likelihood is below the null's"):
        em.bootstrap_lrt(one, worse, n=2, seed=0, n_jobs=1)
