"""Shared fixtures: data sets and model configurations used across the suite."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, settings

import emdsl as em

settings.register_profile("emdsl", deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow])
# CI replays the same examples every run, so a red build is reproducible, not luck.
settings.register_profile("ci", parent=settings.get_profile("emdsl"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "emdsl"))


@pytest.fixture(scope="session")
def faithful() -> xr.Dataset:
    return em.datasets.load("faithful")


def blobs(n: int = 300, centers: tuple = ((0, 0), (4, 1), (-3, 5)), seed: int = 0,
          spread: float = 1.0) -> np.ndarray:
    """Gaussian clusters with random linear mixing of the features."""
    rng = np.random.default_rng(seed)
    centers = np.asarray(centers, dtype=float)
    parts = [rng.normal(c, spread, size=(n // len(centers), centers.shape[1])) for c in centers]
    mixing = np.eye(centers.shape[1]) + 0.3 * rng.normal(size=(centers.shape[1],) * 2)
    return np.vstack(parts) @ mixing


def as_dataset(X: np.ndarray, names: tuple[str, ...] | None = None) -> xr.Dataset:
    names = names or tuple(f"f{i}" for i in range(X.shape[1]))
    return xr.Dataset({"x": (("sample", "feature"), X)}, coords={"feature": list(names)})


@pytest.fixture
def blob_data() -> xr.Dataset:
    return as_dataset(blobs())
