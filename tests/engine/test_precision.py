"""``fit(dtype="float32")``: single-precision E-step, float64 sums; agrees with float64, never a negative variance."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import emdsl as em


def far_off_data(n: int = 20000, seed: int = 0) -> xr.Dataset:
    """scikit-learn#30382's trap: a large offset and small, unequal spreads, stored in float32."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 0.01, (n // 2, 3)), rng.normal(0.05, 0.002, (n // 2, 3))]) + 1000.0
    return xr.Dataset({"x": (("sample", "feature"), x.astype(np.float32)),
                       "c": ("sample", rng.poisson(np.r_[np.full(n // 2, 2.0), np.full(n // 2, 9.0)]).astype(float))})


MODEL = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal).observe("c", em.Poisson)


@pytest.mark.parametrize("chunks", [None, 3001])
def test_float32_agrees_with_float64(chunks: int | None) -> None:
    data = far_off_data()
    double = MODEL.fit(data, seed=1, tol=1e-10)
    single = MODEL.fit(data if chunks is None else data.chunk({"sample": chunks}), seed=1, dtype="float32",
                       tol=1e-6)
    # float32 rounding of Φ (≈6e-8 relative) moves the optimum by about that much of the data's spread
    for key in ("mean", "covariance"):
        want, got = double.params["x"][key].values, single.params["x"][key].values
        scale = np.abs(double.params["x"]["covariance"].values).max() if key == "covariance" else 0.01
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(single.params["c"]["rate"].values, double.params["c"]["rate"].values, rtol=1e-5)
    # ℓ's per-block sums are float32 (ε ≈ 1.2e-7 relative, times a few for the log-sum-exp)
    assert single.loglik == pytest.approx(double.loglik, rel=2e-6)
    for k in range(2):
        assert np.linalg.eigvalsh(single.params["x"]["covariance"].values[k]).min() > 0


def test_float32_check_uses_float32_rounding() -> None:
    """The trace's rounding bound is float32's: float64's would call float32 rounding a bug."""
    data = far_off_data(4000)
    single = MODEL.fit(data, seed=1, dtype="float32", tol=1e-6)
    double = MODEL.fit(data, seed=1, tol=1e-6)
    ratio = single.trace["slack"].values[-1] / double.trace["slack"].values[-1]
    assert ratio == pytest.approx(np.finfo(np.float32).eps / np.finfo(np.float64).eps, rel=0.05)


def test_float32_refuses_labelled_samples() -> None:
    data = far_off_data(1000)
    labelled = data.assign(z=("sample", np.where(np.arange(1000) < 10, 0.0, np.nan)))
    with pytest.raises(em.ModelError, match=r"dtype='float32'\): a semi-supervised fit"):
        MODEL.fit(labelled, seed=1, dtype="float32")
