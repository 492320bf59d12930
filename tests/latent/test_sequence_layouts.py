"""A Markov fit's sequences in any layout: the sequence dims it was fitted over are found again in
predictions (in any order of the dims, after save and load), and ``impute`` fills the holes of
several sequences while leaving a shorter sequence's padding alone."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import emdsl as em


@pytest.fixture(scope="module")
def time_first() -> xr.Dataset:
    """Three sequences stored (time, seq): the sequence dim after the chain's."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    x[30:] += 3
    return xr.Dataset({"x": (("time", "seq"), x)}, coords={"seq": ["a", "b", "c"]})


def test_the_fitted_sequences_are_found_again_in_any_order_of_dims(time_first, tmp_path):
    model = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal)
    fit = model.fit(time_first, seed=0, sample_dim="seq")
    assert fit.sequence_dims == ("seq",)
    scores = fit.score_samples(time_first)
    assert scores.dims == ("seq",) and list(scores["seq"].values) == ["a", "b", "c"]
    assert float(scores.sum()) == pytest.approx(fit.loglik, rel=1e-12)
    # the same chain on the same data laid out (seq, time), sequences found from the dims' order
    same = model.fit(time_first.transpose("seq", "time"), seed=0)
    np.testing.assert_allclose(scores.values, same.score_samples(time_first.transpose("seq", "time")).values,
                               rtol=1e-12)
    assert fit.predict_proba(time_first).dims == ("seq", "time", "z")
    fit.save(tmp_path / "chain.nc")
    loaded = em.load(tmp_path / "chain.nc")
    assert loaded.sequence_dims == ("seq",)
    np.testing.assert_allclose(loaded.score_samples(time_first).values, scores.values, rtol=1e-12)
    # one sequence given alone: its only dim is the chain's
    alone = fit.score_samples(time_first.sel(seq="b"))
    assert alone.ndim == 0 and float(alone) == pytest.approx(float(scores.sel(seq="b")), rel=1e-12)


def test_impute_fills_the_holes_of_every_sequence_and_not_the_padding():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 50))
    x[:, 25:] += 3
    x[0, 5] = x[2, 40] = np.nan  # holes
    x[1, 42:] = np.nan  # the second sequence is shorter: padding
    ds = xr.Dataset({"x": (("seq", "time"), x)})
    fit = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal).fit(ds, seed=0)
    filled = fit.impute(ds)
    assert filled["x"].dims == ("seq", "time")
    posterior = fit.predict_proba(ds).values
    means = fit.params["x"]["mean"].values.ravel()
    for s, t in [(0, 5), (2, 40)]:  # Σ_k p(z_t = k | x) E[x | z = k]
        assert float(filled["x"][s, t]) == pytest.approx(float(posterior[s, t] @ means), rel=1e-12)
    assert np.isnan(filled["x"].values[1, 42:]).all()
    observed = ~np.isnan(x)
    np.testing.assert_array_equal(filled["x"].values[observed], x[observed])


def test_impute_of_an_event_and_labels_over_transposed_sequences():
    rng = np.random.default_rng(3)
    y = rng.normal(size=(2, 40, 2))
    y[0, 3, 1] = np.nan
    labels = np.array(rng.choice(["a", "b"], size=(2, 40)), dtype=object)
    labels[1, 7] = None
    ds = xr.Dataset({"y": (("seq", "time", "f"), y), "l": (("seq", "time"), labels)}).transpose("time", "f", "seq")
    model = (em.Model().latent("z", em.Categorical(2), markov="time")
             .observe("y", em.MultivariateNormal).observe("l", em.Categorical))
    fit = model.fit(ds, seed=0, sample_dim="seq")
    filled = fit.impute(ds)
    assert filled["y"].dims == ("time", "f", "seq") and filled["l"].dims == ("time", "seq")
    posterior = fit.predict_proba(ds).sel(seq=0, time=3).values
    cov, mean = fit.params["y"]["covariance"].values, fit.params["y"]["mean"].values
    given = y[0, 3, 0]
    conditional = mean[:, 1] + cov[:, 1, 0] / cov[:, 0, 0] * (given - mean[:, 0])  # E[y₁ | y₀, z = k]
    assert float(filled["y"].sel(seq=0, time=3, f=1)) == pytest.approx(float(posterior @ conditional), rel=1e-10)
    assert filled["l"].sel(seq=1, time=7).item() in ("a", "b")
    assert not filled["y"].isnull().any()


def test_impute_of_a_chain_on_dask_data_equals_in_memory():
    pytest.importorskip("dask")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 40))
    x[:, 20:] += 3
    x[0, 5] = x[3, 30] = np.nan
    x[1, 35:] = np.nan
    ds = xr.Dataset({"x": (("seq", "time"), x)})
    fit = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal).fit(ds, seed=0)
    in_memory = fit.impute(ds)
    from_dask = fit.impute(ds.chunk({"seq": 2}))  # it raised: rows of a chunk were not whole sequences
    np.testing.assert_array_equal(np.asarray(from_dask["x"].values), in_memory["x"].values)
    assert np.isnan(in_memory["x"].values).sum() == 5


def test_one_sequence_with_an_element_dim_scores_the_same_transposed():
    """Fitted on x(time, feature), the chain has no sequence dims: 'feature' is the node's element
    dim (its parameters carry it), not a sequence, whatever the order of the data's dims."""
    rng = np.random.default_rng(0)
    state = (np.arange(120) // 20) % 2
    x = np.where(state[:, None] == 0, [0.0, 0.0], [3.0, -3.0]) + rng.normal(0, 1, (120, 2))
    ds = xr.Dataset({"x": (("time", "feature"), x)}, coords={"feature": ["p", "q"]})
    for family in (em.MultivariateNormal(dim="feature"), em.Normal):
        fit = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", family).fit(ds, seed=0)
        assert fit.sequence_dims == ()
        flipped = ds.transpose("feature", "time")
        assert float(fit.score_samples(flipped)) == pytest.approx(fit.loglik, rel=1e-12)
        np.testing.assert_allclose(fit.predict_proba(flipped).values, fit.predict_proba(ds).values, rtol=1e-12)


def test_a_parametric_bootstrap_refits_over_the_fitted_sequences(time_first):
    model = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal)
    fit = model.fit(time_first, seed=0, sample_dim="seq")
    same = model.fit(time_first.transpose("seq", "time"), seed=0)
    boot = em.bootstrap(fit, n=2, seed=0, kind="parametric")  # the refits made 'seq' an element dim
    reference = em.bootstrap(same, n=2, seed=0, kind="parametric")
    assert boot["x.mean"].dims == ("replicate", "z")
    np.testing.assert_allclose(boot["loglik"].values, reference["loglik"].values, rtol=1e-10)
