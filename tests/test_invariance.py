"""Standardizing internally makes fits invariant to shifting and scaling the data (to 1e-9)."""

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from tests.conftest import blobs

TYPES = ["full", "diag", "spherical", "tied"]


def fit_of(X, covariance, **kwargs):
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal(covariance=covariance))
    return model.fit(ds, seed=0, max_iter=100, tol=0, **kwargs)


@pytest.mark.parametrize("covariance", TYPES)
@pytest.mark.parametrize("shift, scale", [(1e6, 1.0), (0.0, 1e-3), (0.0, 1e3), (-1e6, 1e3)])
def test_fit_is_invariant_to_shift_and_scale(covariance, shift, scale):
    X = blobs(n=300, seed=2)
    base = fit_of(X, covariance)
    moved = fit_of(X * scale + shift, covariance)
    np.testing.assert_allclose(moved.params["z"]["probs"], base.params["z"]["probs"], rtol=1e-9)
    np.testing.assert_allclose((moved.params["x"]["mean"] - shift) / scale, base.params["x"]["mean"],
                               rtol=1e-9, atol=1e-9 * np.abs(X).max())
    np.testing.assert_allclose(moved.params["x"]["covariance"] / scale**2, base.params["x"]["covariance"],
                               rtol=1e-9, atol=1e-9 * np.abs(base.params["x"]["covariance"].values).max())
    # log p changes by the Jacobian, N·D·log(scale)
    expected = base.loglik - X.size * np.log(scale)
    assert moved.loglik == pytest.approx(expected, rel=1e-9)


def test_diag_far_from_origin_is_accurate():
    """Data at 1e6 ± 1: the expanded Gaussian form would lose every digit without standardizing."""
    X = blobs(n=300, seed=5)
    far = fit_of(X + 1e6, "diag")
    near = fit_of(X, "diag")
    np.testing.assert_allclose(far.params["x"]["covariance"], near.params["x"]["covariance"], rtol=1e-8)
    assert np.isfinite(far.loglik)
