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
