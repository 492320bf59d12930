"""Several latents (``latent("a", ...).latent("b", ...)``) and ``observe(..., given=...)``.

The references are independent of the engine: brute-force enumeration of the joint
states with scipy.stats densities, and closed-form estimates.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import xarray as xr
from scipy import stats

import emdsl as em
from emdsl.errors import ModelError


def _tiny(n: int = 7, seed: int = 3) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    return xr.Dataset({"x": ("sample", rng.normal(size=n) * 2.0),
                       "y": ("sample", rng.poisson(3.0, n).astype(float)),
                       "w": ("sample", rng.integers(0, 2, n).astype(float)),
                       "c": ("sample", rng.normal(size=n) + 5.0)})


def _tiny_model() -> em.Model:
    return (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
            .observe("x", em.Normal, given=("a",))
            .observe("y", em.Poisson, given=("b",))
            .observe("w", em.Bernoulli)             # default: every latent
            .observe("c", em.Normal, given=()))     # shared by all samples


def _brute_force(ds: xr.Dataset, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """log p(x_n) and p(a, b | x_n) by enumerating the 2 × 3 joint states with scipy.stats."""
    x, y, w, c = (ds[v].values for v in ("x", "y", "w", "c"))
    joint = np.empty((len(x), 2, 3))
    for i, j in itertools.product(range(2), range(3)):
        joint[:, i, j] = (np.log(p["a"][i]) + np.log(p["b"][j])
                          + stats.norm.logpdf(x, p["x_mean"][i], np.sqrt(p["x_var"][i]))
                          + stats.poisson.logpmf(y, p["y_rate"][j])
                          + stats.bernoulli.logpmf(w, p["w_prob"][i, j])
                          + stats.norm.logpdf(c, p["c_mean"], np.sqrt(p["c_var"])))
    total = np.logaddexp.reduce(joint.reshape(len(x), -1), axis=1)
    return total, np.exp(joint - total[:, None, None])


def _values(fit: em.Fit) -> dict:
    P = fit.params
    return {"a": P["a"]["probs"].values, "b": P["b"]["probs"].values,
            "x_mean": P["x"]["mean"].values, "x_var": P["x"]["variance"].values,
            "y_rate": P["y"]["rate"].values, "w_prob": P["w"]["probs"].transpose("a", "b").values,
            "c_mean": float(P["c"]["mean"]), "c_var": float(P["c"]["variance"])}


def test_loglik_and_posterior_equal_brute_force_enumeration_at_given_parameters():
    ds = _tiny()
    init = {"a": {"probs": [0.3, 0.7]}, "b": {"probs": [0.2, 0.5, 0.3]},
            "x": {"mean": [-1.0, 2.0], "variance": [1.5, 0.7]},
            "y": {"rate": [1.0, 3.0, 6.0]},
            "w": {"probs": [[0.2, 0.5, 0.9], [0.6, 0.3, 0.1]]},
            "c": {"mean": 4.5, "variance": 2.0}}
    fit = _tiny_model().fit(ds, init=init, max_iter=0)
    expected, posterior = _brute_force(ds, {"a": [0.3, 0.7], "b": [0.2, 0.5, 0.3], "x_mean": [-1.0, 2.0],
                                            "x_var": [1.5, 0.7], "y_rate": [1.0, 3.0, 6.0],
                                            "w_prob": np.array([[0.2, 0.5, 0.9], [0.6, 0.3, 0.1]]),
                                            "c_mean": 4.5, "c_var": 2.0})
    assert fit.loglik == pytest.approx(expected.sum(), rel=1e-12)
    np.testing.assert_allclose(fit.score_samples(ds).values, expected, rtol=1e-12)
    assert fit.posterior.dims == ("sample", "a", "b")
    np.testing.assert_allclose(fit.posterior.values, posterior, rtol=1e-10, atol=1e-14)


def test_fitted_parameters_are_labelled_by_exactly_their_latents_and_match_enumeration():
    ds = _tiny(n=40, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = _tiny_model().fit(ds, seed=0, accelerate=None, tol=1e-13, max_iter=20000)
    P = fit.params
    assert P["a"]["probs"].dims == ("a",) and P["b"]["probs"].dims == ("b",)
    assert P["x"]["mean"].dims == ("a",)
    assert P["y"]["rate"].dims == ("b",)
    assert set(P["w"]["probs"].dims) == {"a", "b"}
    assert P["c"]["mean"].dims == ()
    expected, _ = _brute_force(ds, _values(fit))
    np.testing.assert_allclose(fit.score_samples(ds).values, expected, rtol=1e-10)
    # EM's guarantee, checked at run time and here
    loglik = fit.trace["loglik"].values
    assert np.all(np.diff(loglik) >= -1e-9 * np.abs(loglik[1:]))
    # a shared node's M-step pools every sample: its mean is the data's mean
    assert float(P["c"]["mean"]) == pytest.approx(float(ds["c"].mean()), rel=1e-10)
    # each latent's weights are its marginal posterior mass
    np.testing.assert_allclose(P["a"]["probs"].values, fit.posterior.sum("b").mean("sample").values, atol=1e-5)
    np.testing.assert_allclose(P["b"]["probs"].values, fit.posterior.sum("a").mean("sample").values, atol=1e-5)


def _crossed(n: int = 900, seed: int = 0) -> tuple[xr.Dataset, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.choice(2, n, p=[0.4, 0.6])
    b = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    ds = xr.Dataset({"x": ("sample", np.array([-3.0, 3.0])[a] + rng.normal(size=n)),
                     "y": ("sample", np.array([-5.0, 0.0, 5.0])[b] + rng.normal(size=n))})
    return ds, a, b


def test_two_latents_recover_their_own_variables():
    ds, a, b = _crossed()
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)))
    fit = model.fit(ds, seed=0, n_init=5)
    assert fit.status == "converged"
    # label switching: compare sorted means and the matching weights
    x_order = np.argsort(fit.params["x"]["mean"].values)
    y_order = np.argsort(fit.params["y"]["mean"].values)
    np.testing.assert_allclose(fit.params["x"]["mean"].values[x_order], [-3.0, 3.0], atol=0.15)
    np.testing.assert_allclose(fit.params["y"]["mean"].values[y_order], [-5.0, 0.0, 5.0], atol=0.15)
    np.testing.assert_allclose(fit.params["a"]["probs"].values[x_order], np.bincount(a) / len(a), atol=0.01)
    np.testing.assert_allclose(fit.params["b"]["probs"].values[y_order], np.bincount(b) / len(b), atol=0.01)
    # predict: each latent's state in the most probable joint state
    predicted = fit.predict(ds)
    assert set(predicted.data_vars) == {"a", "b"}
    accuracy_a = np.mean(np.argsort(x_order)[predicted["a"].values] == a)
    assert accuracy_a > 0.99
    assert fit.n_params == 1 + 2 + 2 * 2 + 2 * 3


def test_save_load_sample_and_select_with_several_latents(tmp_path):
    ds, _, _ = _crossed(n=300, seed=1)
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)))
    fit = model.fit(ds, seed=0, n_init=3)
    fit.save(tmp_path / "two.nc")
    loaded = em.load(tmp_path / "two.nc")
    assert loaded.model == model
    assert loaded.score(ds) == pytest.approx(fit.score(ds), rel=1e-12)
    draws = fit.sample(50, seed=2)
    assert set(draws.coords) >= {"a", "b"} and set(draws.data_vars) == {"x", "y"}
    assert em.Model.from_json(model.to_json()) == model
    table = em.select({"crossed": model,
                       "flat": em.Model().latent("z", em.Categorical(6)).observe("x", em.Normal)
                       .observe("y", em.Normal)}, ds, seed=0).table
    assert int(table["n_params"].sel(model="crossed")) == 1 + 2 + 4 + 6
    assert "given: a" in fit._repr_html_() or "a" in fit._repr_html_()


def test_a_shared_node_with_one_latent_and_monotone_map_with_weak_priors():
    ds, _, _ = _crossed(n=200, seed=2)
    ds["s"] = ("sample", np.random.default_rng(0).normal(size=200))
    model = (em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
             .observe("s", em.Normal, given=()))
    fit = model.fit(ds, seed=0)
    assert fit.params["s"]["mean"].dims == ()
    assert float(fit.params["s"]["variance"]) == pytest.approx(float(ds["s"].var()), rel=1e-10)
    two = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
           .observe("x", em.Normal, given=("a",)).observe("y", em.Normal))
    fit = two.fit(ds, seed=0, prior="weak", accelerate=None)
    logpost = fit.trace["logpost"].values
    assert np.all(np.isfinite(logpost))
    assert np.all(np.diff(logpost) >= -1e-9 * np.abs(logpost[1:]))


def test_holes_in_a_multivariate_node_that_depends_on_one_of_two_latents():
    rng = np.random.default_rng(4)
    ds, _, _ = _crossed(n=300, seed=4)
    v = rng.normal(size=(300, 2)) + np.where(ds["x"].values[:, None] > 0, 2.0, -2.0)
    v[rng.random((300, 2)) < 0.1] = np.nan
    ds["v"] = (("sample", "feature"), v)
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(2))
             .observe("v", em.MultivariateNormal, given=("a",)).observe("y", em.Normal, given=("b",)))
    fit = model.fit(ds, seed=0, accelerate=None, n_init=2)
    loglik = fit.trace["loglik"].values
    assert np.all(np.diff(loglik) >= -1e-9 * np.abs(loglik[1:]))
    assert fit.params["v"]["covariance"].dims[0] == "a"
    assert np.isfinite(fit.loglik)
    assert fit.loglik == pytest.approx(float(fit.score_samples(ds).sum()), rel=1e-10)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: em.Model().latent("a", em.Categorical(2)).observe("x", em.Normal, given=("b",)), "not a latent"),
    (lambda: em.Model().latent("a", em.Categorical(2)).observe("x", em.Normal, given=(1,)), "strings"),
    (lambda: em.Model().latent("a", em.Categorical(2)).observe("x", em.Normal, given=("a", "a")), "twice"),
    (lambda: em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(2), markov="time"), "only latent"),
    (lambda: em.Model().latent("a", em.Categorical(2), markov="t").latent("b", em.Categorical(2)), "only latent"),
])
def test_bad_declarations_name_the_problem(build, message):
    with pytest.raises(ModelError, match=message):
        build()


def test_plots_draw_the_joint_states():
    """Component and posterior plots of several latents draw their joint states, weighted π_a π_b."""
    import matplotlib

    matplotlib.use("Agg")
    ds, _, _ = _crossed(n=200, seed=3)
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)))
    fit = model.fit(ds, seed=0, n_init=3)
    ax = fit.plot.components("y").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:6] == [f"π·p(x | a={i}, b={j})" for i in range(2) for j in range(3)]
    # the six weighted curves sum to the mixture's density (the dashed line)
    lines = ax.get_lines()
    np.testing.assert_allclose(sum(line.get_ydata() for line in lines[:6]), lines[6].get_ydata(), rtol=1e-10)
    grid = lines[6].get_xdata()
    pi = np.multiply.outer(fit.params["a"]["probs"].values, fit.params["b"]["probs"].values)
    mean, sd = fit.params["y"]["mean"].values, np.sqrt(fit.params["y"]["variance"].values)
    expected = sum(pi[i, j] * stats.norm.pdf(grid, mean[j], sd[j]) for i in range(2) for j in range(3))
    np.testing.assert_allclose(lines[6].get_ydata(), expected, rtol=1e-8)
    assert len(fit.plot.components("x", "y").axes) == 1
    assert len(fit.plot.posterior().axes) >= 1
    assert fit.plot.convergence() is not None


def test_independent_blocks_separate_exactly_into_two_single_latent_fits():
    """x | a and y | b with a ⊥ b: ℓ(x, y) = ℓ(x) + ℓ(y), so the joint fit is the two fits side by side.

    An exact reference for the whole pipeline (E-step over joint states, reduced M-steps,
    each latent's weights, and the observed-information standard errors).
    """
    ds, _, _ = _crossed(n=400, seed=6)
    two = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
           .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)))
    joint = two.fit(ds, seed=0, n_init=4, tol=1e-14, max_iter=5000)
    only_x = em.Model().latent("a", em.Categorical(2)).observe("x", em.Normal)
    only_y = em.Model().latent("b", em.Categorical(3)).observe("y", em.Normal)
    fx = only_x.fit(ds, init={"a": {"probs": joint.params["a"]["probs"]}, "x": dict(joint.params["x"].to_dataset().data_vars)},
                    tol=1e-14, max_iter=5000)
    fy = only_y.fit(ds, init={"b": {"probs": joint.params["b"]["probs"]}, "y": dict(joint.params["y"].to_dataset().data_vars)},
                    tol=1e-14, max_iter=5000)
    assert joint.loglik == pytest.approx(fx.loglik + fy.loglik, rel=1e-10)
    np.testing.assert_allclose(joint.params["x"]["mean"].values, fx.params["x"]["mean"].values, rtol=1e-6)
    np.testing.assert_allclose(joint.params["b"]["probs"].values, fy.params["b"]["probs"].values, rtol=1e-6)
    se, se_x = joint.standard_errors(), fx.standard_errors()
    np.testing.assert_allclose(se["x"]["mean"].values, se_x["x"]["mean"].values, rtol=1e-3)
    np.testing.assert_allclose(se["a"]["probs"].values, se_x["a"]["probs"].values, rtol=1e-3)


def test_impute_and_dask_with_several_latents():
    ds, _, _ = _crossed(n=300, seed=7)
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)))
    fit = model.fit(ds, seed=0, n_init=3)
    holes = ds.copy(deep=True)
    holes["x"][:4] = np.nan
    filled = fit.impute(holes)["x"].values[:4]
    # E[x | y] = Σ_a p(a | y) μ_a, and y says nothing of a: p(a | y) = π_a
    expected = float(fit.params["a"]["probs"] @ fit.params["x"]["mean"])
    np.testing.assert_allclose(filled, expected, rtol=1e-10)
    lazy = model.fit(ds.chunk(sample=70), init=fit, max_iter=3, accelerate=None)
    eager = model.fit(ds, init=fit, max_iter=3, accelerate=None)
    assert lazy.loglik == pytest.approx(eager.loglik, rel=1e-10)
    np.testing.assert_allclose(lazy.posterior.values, eager.posterior.values, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_each_latent_is_seeded_on_its_own_variables(seed):
    """k-means per latent on the nodes that depend on it alone (measured over 20 data sets with one
    start: 18 found the product optimum, against 7 when the 6 joint states were seeded as one clustering);
    three restarts find it on each of these."""
    ds, a, b = _crossed(n=600, seed=10 + seed)
    ds["w"] = ("sample", np.array([-2.0, 2.0])[a] + np.array([0.0, 5.0, 10.0])[b]
               + np.random.default_rng(seed).normal(size=600))
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)).observe("w", em.Normal))
    fit = model.fit(ds, seed=seed, n_init=3)
    assert fit.status == "converged"
    np.testing.assert_allclose(np.sort(fit.params["x"]["mean"].values), [-3.0, 3.0], atol=0.2)
    np.testing.assert_allclose(np.sort(fit.params["y"]["mean"].values), [-5.0, 0.0, 5.0], atol=0.2)


def test_bootstrap_aligns_each_latent_and_agrees_with_standard_errors():
    from emdsl import labels
    from emdsl.bootstrap import _aligned

    ds, _, _ = _crossed(n=400, seed=1)
    ds["w"] = ("sample", ds["x"].values + ds["y"].values + np.random.default_rng(1).normal(size=400))
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)).observe("w", em.Normal))
    fit = model.fit(ds, seed=0, n_init=3)
    original = labels.tree_values(fit.params)
    # a replicate whose states came out relabelled, a ↦ [1, 0] and b ↦ [2, 0, 1], slightly moved
    swap = {"a": np.array([1, 0]), "b": np.array([2, 0, 1])}
    replicate = {name: {key: (da.isel({d: p for d, p in swap.items() if d in da.dims}) * 1.01)
                        for key, da in values.items()} for name, values in original.items()}
    perm = _aligned(original, replicate, ["a", "b"], {})
    np.testing.assert_array_equal(swap["a"][perm["a"]], [0, 1])
    np.testing.assert_array_equal(swap["b"][perm["b"]], [0, 1, 2])
    boot = em.bootstrap(fit, ds, n=30, seed=0, kind="parametric")
    se = fit.standard_errors()
    # 30 replicates: the spread of a standard deviation's estimate is about 1/sqrt(2 · 29) ≈ 13%
    ratio = boot["x.mean"].std("replicate").values / se["x"]["mean"].values
    assert np.all((ratio > 0.6) & (ratio < 1.6))
    ratio = boot["w.mean"].std("replicate").values / se["w"]["mean"].values
    assert np.all((ratio > 0.6) & (ratio < 1.6))


def test_known_states_of_one_of_several_latents_clamp_the_joint_posterior():
    """Labels of ``a`` in the data (NaN = unknown): labelled samples keep the joint states with that a;
    loglik is then log p(x, labels), checked against enumeration."""
    ds, a, _ = _crossed(n=300, seed=8)
    labels_a = a.astype(float)
    labels_a[np.random.default_rng(0).random(300) < 0.8] = np.nan
    data = ds.assign(a=("sample", labels_a))
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",)))
    fit = model.fit(data, seed=0, n_init=2)
    known = ~np.isnan(labels_a)
    post_a = fit.posterior.sum("b").values
    np.testing.assert_array_equal(post_a[known].argmax(axis=1), a[known])
    np.testing.assert_allclose(post_a[known].max(axis=1), 1.0, rtol=1e-12)
    # the labels fix the meaning of a's states: no label switching on a
    assert fit.params["x"]["mean"].values[0] < 0 < fit.params["x"]["mean"].values[1]
    # log p(x, y, labels) by enumeration at the fitted parameters
    P = fit.params
    x, y = ds["x"].values, ds["y"].values
    joint = np.empty((300, 2, 3))
    for i, j in itertools.product(range(2), range(3)):
        joint[:, i, j] = (np.log(P["a"]["probs"].values[i]) + np.log(P["b"]["probs"].values[j])
                          + stats.norm.logpdf(x, P["x"]["mean"].values[i], np.sqrt(P["x"]["variance"].values[i]))
                          + stats.norm.logpdf(y, P["y"]["mean"].values[j], np.sqrt(P["y"]["variance"].values[j])))
    joint[known & (a == 0), 1, :] = -np.inf
    joint[known & (a == 1), 0, :] = -np.inf
    expected = np.logaddexp.reduce(joint.reshape(300, -1), axis=1).sum()
    assert fit.loglik == pytest.approx(expected, rel=1e-9)
    lazy = model.fit(data.chunk(sample=80), init=fit, max_iter=2, accelerate=None)
    eager = model.fit(data, init=fit, max_iter=2, accelerate=None)
    assert lazy.loglik == pytest.approx(eager.loglik, rel=1e-10)
    with pytest.raises(ModelError, match="not states of 'b'"):
        model.fit(ds.assign(b=("sample", np.full(300, 7.0))))


def _crossed_weighted(n: int) -> tuple[xr.Dataset, em.Model]:
    """Two crossed latents on their own Normals, a Gamma over both (fitted in its own units), weights."""
    ds, _, _ = _crossed(n=n, seed=4)
    rng = np.random.default_rng(1)
    ds["s"] = ("sample", rng.gamma(3.0, 2.0, n))
    ds["w"] = ("sample", rng.integers(0, 4, n).astype(float))
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal, given=("b",))
             .observe("s", em.Gamma))
    return ds, model


def test_several_latents_on_dask_start_and_end_as_in_memory():
    """Below chunked.SEED_SAMPLE rows, dask seeds each latent on its own nodes (and the shared one,
    within the others' clusters) exactly as in memory, with weights: the same θ⁽⁰⁾ and the same fit."""
    ds, model = _crossed_weighted(600)
    for max_iter in (0, 50):
        in_memory = model.fit(ds, weights="w", seed=2, max_iter=max_iter)
        chunked = model.fit(ds.chunk({"sample": 128}), weights="w", seed=2, max_iter=max_iter)
        assert chunked.n_iter == in_memory.n_iter
        assert chunked.loglik == pytest.approx(in_memory.loglik, rel=1e-10)
        for name, node in in_memory.params.children.items():
            for key, value in node.to_dataset().data_vars.items():
                np.testing.assert_allclose(chunked.params[name][key].values, value.values, rtol=1e-9, atol=1e-12,
                                           err_msg=f"{name}.{key}, max_iter={max_iter}")


@pytest.mark.parametrize("seed", [0, 3])
def test_several_latents_on_dask_beyond_the_seeding_sample_start_near_the_in_memory_start(monkeypatch, seed):
    """Beyond chunked.SEED_SAMPLE rows each latent is seeded on a sample and every row takes each
    latent's nearest centre: θ⁽⁰⁾ lands next to the in-memory one (one k-means over the 6 joint
    states started 4,000–5,000 lower in ℓ here, and needed 31–205 iterations against 6)."""
    from emdsl.engine import chunked

    ds, model = _crossed_weighted(4000)
    in_memory = model.fit(ds, weights="w", seed=seed)
    monkeypatch.setattr(chunked, "SEED_SAMPLE", 500)
    start = model.fit(ds.chunk({"sample": 700}), weights="w", seed=seed, max_iter=0)
    assert abs(start.loglik - in_memory.trace["loglik"].values[0]) < 1e-4 * abs(in_memory.loglik)
    fit = model.fit(ds.chunk({"sample": 700}), weights="w", seed=seed)
    assert fit.n_iter <= 2 * in_memory.n_iter
    assert fit.loglik == pytest.approx(in_memory.loglik, rel=1e-8)
