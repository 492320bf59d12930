"""The k-means++ start (engine/init.py): k-means++ seeds, then Lloyd's iterations to convergence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.cluster.vq import vq

from emdsl.engine import init


def _blobs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(c, 1.0, (80, 3)) for c in ([0, 0, 0], [2.5, 0, 0], [0, 2.5, 1])])


def _inertia(z: np.ndarray, labels: np.ndarray, k: int) -> float:
    return sum(float(((z[labels == j] - z[labels == j].mean(axis=0)) ** 2).sum()) for j in range(k) if (labels == j).any())


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_stops_at_a_fixed_point_of_lloyds_iterations(seed: int) -> None:
    z = _blobs(seed)
    labels, centres, too_few = init.kmeans(z, 3, np.random.default_rng(seed))
    assert not too_few and labels.dtype == np.intp
    np.testing.assert_array_equal(vq(z, centres)[0], labels)  # each point at its nearest centre
    for j in range(3):  # each centre the mean of its points
        np.testing.assert_allclose(centres[j], z[labels == j].mean(axis=0), rtol=1e-12)


def test_kmeans_converges_from_the_same_seeds_and_lowers_the_k_means_objective(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    z = _blobs(1)
    for seed in range(5):
        converged = init.kmeans(z, 3, np.random.default_rng(seed))[0]
        monkeypatch.setattr(init, "KMEANS_MAX_ITER", 0)  # the seeds' assignment alone
        seeds_only = init.kmeans(z, 3, np.random.default_rng(seed))[0]
        monkeypatch.undo()
        assert _inertia(z, converged, 3) <= _inertia(z, seeds_only, 3) + 1e-9
        np.testing.assert_array_equal(init.kmeans(z, 3, np.random.default_rng(seed))[0], converged)


def test_kmeans_with_fewer_distinct_points_than_states_says_so_and_leaks_no_warning() -> None:
    z = np.repeat([[0.0, 1.0], [3.0, 4.0]], 5, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels, centres, too_few = init.kmeans(z, 3, np.random.default_rng(0))
    assert too_few and set(np.unique(labels)) <= {0, 1, 2} and np.all(np.isfinite(centres))
    assert len(np.unique(labels)) == 2  # a state starts empty; the M-step handles it


@pytest.mark.parametrize("seed", range(5))
def test_weighted_kmeans_is_lloyds_fixed_point_on_the_expanded_table(seed: int) -> None:
    """Integer weights count each row that many times: the centres are the means of the expanded rows they win."""
    z = _blobs(seed)
    weights = np.random.default_rng(seed).integers(0, 4, len(z)).astype(float)
    labels, centres, too_few = init.kmeans(z, 3, np.random.default_rng(seed), weights)
    assert not too_few
    expanded = np.repeat(z, weights.astype(int), axis=0)
    nearest = vq(expanded, centres)[0]
    np.testing.assert_array_equal(labels, vq(z, centres)[0])
    for j in range(3):
        np.testing.assert_allclose(centres[j], expanded[nearest == j].mean(axis=0), rtol=1e-12, atol=1e-12)


def test_a_row_of_weight_zero_is_never_a_seed() -> None:
    """Far-off rows of weight 0: plain k-means++ seeds one there often, the weighted draw never."""
    z = np.concatenate([_blobs(0), np.full((30, 3), 40.0) + np.random.default_rng(1).normal(size=(30, 3))])
    weights = np.r_[np.ones(240), np.zeros(30)]
    far = lambda seeds: bool((np.abs(seeds) > 20).any())  # noqa: E731
    unweighted = [far(init.kmeans_plusplus_seeds(z, 3, np.random.default_rng(s))[0]) for s in range(20)]
    weighted = [far(init.kmeans_plusplus_seeds(z, 3, np.random.default_rng(s), weights)[0]) for s in range(20)]
    assert sum(unweighted) >= 10 and not any(weighted)


def test_a_weighted_fit_starts_from_the_weighted_clusters() -> None:
    """Rows of weight 0 (a far-off cluster) take no part in the start: both states begin on the weighted data."""
    import xarray as xr

    import emdsl as em
    rng = np.random.default_rng(3)
    x = np.r_[rng.normal(-2, 0.5, 200), rng.normal(2, 0.5, 200), rng.normal(60, 0.5, 40)]
    ds = xr.Dataset({"x": ("sample", x), "w": ("sample", np.r_[np.ones(400), np.zeros(40)])})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    for seed in range(5):
        start = model.fit(ds, weights="w", seed=seed, max_iter=0)
        np.testing.assert_allclose(np.sort(start.params["x"]["mean"].values), [-2, 2], atol=0.2)


def test_weighted_seeding_features_are_the_expanded_tables() -> None:
    """Families fitted in the data's units (Gamma) are centred and scaled for seeding with the fit's
    weights, as on the table with rows repeated (standardized families get that from their units);
    on dask (every row gathered below SEED_SAMPLE) the weighted k-means start is the in-memory one."""
    import xarray as xr

    import emdsl as em
    from emdsl.compile import compile_plan

    rng = np.random.default_rng(5)
    n = 200
    group = rng.random(n) < 0.3
    x = rng.gamma(np.where(group, 2.0, 9.0), 1.5)
    x[rng.random(n) < 0.1] = np.nan
    weights = rng.integers(0, 5, n)
    # y's spread comes mostly from rows of weight 0: unweighted, it would count for less than x
    y = np.where(weights == 0, rng.gamma(1.0, 200.0, n), rng.gamma(np.where(group, 9.0, 2.0), 1.5))
    ds = xr.Dataset({"x": ("sample", x), "y": ("sample", y), "w": ("sample", weights.astype(float))})
    model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Gamma).observe("y", em.Gamma)
    expanded = compile_plan(model, ds.drop_vars("w").isel(sample=np.repeat(np.arange(n), weights)))
    got = init._continuous(compile_plan(model, ds, weights="w"))
    np.testing.assert_allclose(np.repeat(got, weights, axis=0), init._continuous(expanded), rtol=1e-12, atol=1e-12)
    assert np.abs(init._continuous(compile_plan(model, ds)) - got).max() > 1e-3  # the weights mattered
    in_memory = model.fit(ds, weights="w", seed=2, max_iter=0)
    chunked = model.fit(ds.chunk({"sample": 64}), weights="w", seed=2, max_iter=0)
    for name in ("x", "y"):
        for key in ("shape", "rate"):
            np.testing.assert_allclose(chunked.params[name][key].values, in_memory.params[name][key].values,
                                       rtol=1e-12, err_msg=f"{name}.{key}")


def test_kmeans_stops_as_scikit_learns_once_the_centres_stop_moving() -> None:
    """Six overlapping clusters: labels keep swapping long after the centres settle. k-means stops,
    as scikit-learn's KMeans does, once a step moves the centres by at most KMEANS_TOL of the
    data's mean variance: the same centres as scikit-learn's from the same seeds."""
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(2)
    centres_true = rng.normal(0, 1.3, (6, 3))
    z = centres_true[rng.integers(6, size=20_000)] + rng.normal(size=(20_000, 3))
    seeds, _ = init.kmeans_plusplus_seeds(z, 6, np.random.default_rng(0))
    labels, centres, _ = init.kmeans(z, 6, np.random.default_rng(0))
    reference = cluster.KMeans(6, init=seeds, n_init=1, tol=init.KMEANS_TOL, algorithm="lloyd").fit(z)
    assert reference.n_iter_ < init.KMEANS_MAX_ITER
    assert not np.array_equal(vq(z, centres)[0], labels)  # stopped before a fixed point, as scikit-learn did
    np.testing.assert_allclose(centres, reference.cluster_centers_, rtol=1e-9, atol=1e-12)
    for j in range(6):  # each centre is the mean of the points it labels
        np.testing.assert_allclose(centres[j], z[labels == j].mean(axis=0), rtol=1e-12)
