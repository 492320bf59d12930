"""FitPlotter: what is drawn (artists, counts, geometry), where (ax=), and the errors."""

from __future__ import annotations

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

import emdsl as em  # noqa: E402
from emdsl import plot  # noqa: E402
from emdsl.plot import Marginal  # noqa: E402


@pytest.fixture(scope="module")
def fit2d(faithful: xr.Dataset) -> em.Fit:
    model = em.Model().latent("z", em.Categorical(2)).observe(
        ["eruptions", "waiting"], em.MultivariateNormal, name="x")
    # plain EM (accelerate=None): its convergence plot is the full ELBO staircase, one line per
    # restart and no marks of extrapolated points (those: tests/engine/test_accelerate.py)
    return model.fit(faithful, seed=0, n_init=3, accelerate=None)


@pytest.fixture(scope="module")
def fit1d(faithful: xr.Dataset) -> em.Fit:
    return em.Model().latent("z", em.Categorical(3)).observe("waiting", em.Normal).fit(faithful, seed=0, n_init=2)


@pytest.fixture(scope="module")
def blobs() -> xr.Dataset:
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0, 0.0], [5.0, 1.0, -2.0], [-3.0, 4.0, 2.0]])
    mixing = np.array([[1.0, 0.6, 0.0], [0.0, 1.0, -0.4], [0.3, 0.0, 1.0]])
    X = np.vstack([rng.normal(c, 1.0, size=(120, 3)) for c in centers]) @ mixing
    return xr.Dataset({"x": (("sample", "feature"), X)}, coords={"feature": ["a", "b", "c"]})


def lines(ax, prefix: str) -> list:
    return [line for line in ax.get_lines() if (line.get_gid() or "").startswith(prefix)]


def ellipses(ax) -> list[Ellipse]:
    return [p for p in ax.patches if isinstance(p, Ellipse)]


def mahalanobis_on_boundary(ellipse: Ellipse, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of points on the drawn ellipse's boundary (data coordinates)."""
    theta = np.linspace(0, 2 * np.pi, 50)
    unit = np.column_stack([np.cos(theta), np.sin(theta)])
    points = ellipse.get_patch_transform().transform(unit)
    diff = points - mean
    return np.sqrt(np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff))


# -- import cost and display ---------------------------------------------------------------
def test_import_emdsl_loads_neither_matplotlib_nor_ipywidgets() -> None:
    code = ("import sys, emdsl, emdsl.plot, emdsl._html, emdsl.widgets._explore; "
            "print('matplotlib' in sys.modules, 'ipywidgets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_new_figures_display_as_png_and_stay_out_of_pyplot(fit2d: em.Fit) -> None:
    import matplotlib.pyplot as plt
    from IPython.core.interactiveshell import InteractiveShell

    before = plt.get_fignums()
    fig = fit2d.plot.components()
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == before  # not registered: the inline backend cannot show it twice
    data, _ = InteractiveShell.instance().display_formatter.format(fig)
    assert data["image/png"][:4] == b"\x89PNG"
    assert data["text/plain"] == "<Figure size 600x480 with 1 Axes>"


def test_figure_png_tight_and_not(fit2d: em.Fit) -> None:
    fig = plot.new_figure((4, 3))
    fig.add_subplot().plot([0, 1])
    loose = plot.figure_png(fig, dpi=50, tight=False)
    assert loose[:4] == b"\x89PNG"
    # a PNG's IHDR holds width and height: 4 x 3 inches at 50 dpi
    assert int.from_bytes(loose[16:20], "big") == 200 and int.from_bytes(loose[20:24], "big") == 150


# -- convergence ----------------------------------------------------------------------------
def test_convergence_draws_every_restart_and_the_elbo_staircase(fit2d: em.Fit) -> None:
    fig = fit2d.plot.convergence()
    main, kl_ax = fig.axes
    loglik_lines = lines(main, "loglik-restart-")
    assert len(loglik_lines) == fit2d.n_init == 3
    for line in loglik_lines:
        r = int(line.get_gid().rsplit("-", 1)[1])
        expected = fit2d.traces["loglik"].values[fit2d.traces["restart"].values == r]
        np.testing.assert_array_equal(line.get_ydata(), expected)
    chosen = next(line for line in loglik_lines if line.get_gid() == f"loglik-restart-{fit2d.restart}")
    assert chosen.get_linewidth() > max(line.get_linewidth() for line in loglik_lines if line is not chosen)

    (elbo,) = lines(main, "elbo")
    x, y = elbo.get_xdata(), elbo.get_ydata()
    trace = fit2d.trace
    np.testing.assert_array_equal(x, np.repeat(trace["iteration"].values, 2))
    np.testing.assert_array_equal(y[0::2], trace["elbo"].values)
    np.testing.assert_array_equal(y[1::2], trace["loglik"].values)
    # EM: after the first point the staircase never goes down (M-steps raise the ELBO
    # from the last log-likelihood, E-steps close the gap up to the next one)
    assert np.all(np.diff(y[1:]) >= -1e-9 * np.abs(y[1:-1]))

    assert kl_ax.get_yscale() == "log"
    (kl,) = lines(kl_ax, "kl")
    gap = trace["kl"].values
    np.testing.assert_array_equal(kl.get_ydata()[gap > 0], gap[gap > 0])
    assert np.isnan(kl.get_ydata()[gap <= 0]).all()
    assert kl_ax.get_xlabel() == "iteration"
    labels = [t.get_text() for t in main.get_legend().get_texts()]
    assert labels[0].endswith("(best)") and "other restarts" in labels


def test_convergence_zooms_past_the_first_elbo(fit1d: em.Fit) -> None:
    main = fit1d.plot.convergence(kl=False).axes[0]
    low, high = main.get_ylim()
    assert low <= fit1d.traces["loglik"].min() and high >= fit1d.traces["loglik"].max()
    assert low > fit1d.trace["elbo"].values[0]  # the starting ELBO is far below and cut off


def test_convergence_honours_ax(fit2d: em.Fit) -> None:
    fig = Figure()
    ax = fig.add_subplot()
    assert fit2d.plot.convergence(ax=ax) is ax
    assert len(fig.axes) == 1 and len(ax.get_lines()) == fit2d.n_init + 1
    other = Figure().add_subplot()
    fit2d.plot.convergence(ax=other, kl=True)
    assert len(other.figure.axes) == 2 and other.figure.axes[1].get_yscale() == "log"
    assert len(fit2d.plot.convergence(kl=False).axes) == 1


def test_convergence_without_latent_has_no_gap(faithful: xr.Dataset) -> None:
    fit = em.Model().observe("waiting", em.Normal).fit(faithful)
    kl_ax = fit.plot.convergence().axes[1]
    assert any("KL gap is 0" in t.get_text() for t in kl_ax.texts)


# -- components, two elements ------------------------------------------------------------------
def test_components_2d_scatter_means_and_ellipses(fit2d: em.Fit, faithful: xr.Dataset) -> None:
    fig = fit2d.plot.components()
    (ax,) = fig.axes
    (scatter,) = [c for c in ax.collections if c.get_gid() == "data"]
    np.testing.assert_array_equal(scatter.get_offsets(), np.column_stack([faithful.eruptions, faithful.waiting]))
    # colours blend the states' colours by responsibility
    resp = fit2d.posterior.values
    colours = plot.state_colors(2)
    sure = np.flatnonzero(resp.max(axis=1) > 0.999)
    np.testing.assert_allclose(scatter.get_facecolors()[sure, :3], colours[resp[sure].argmax(axis=1)], atol=2e-3)
    assert len(lines(ax, "mean-")) == 2
    assert len(ellipses(ax)) == 4  # 1σ and 2σ per component
    assert ax.get_xlabel() == "eruptions [minutes]" and ax.get_ylabel() == "waiting [minutes]"

    mean = fit2d.params["x"]["mean"].values
    cov = fit2d.params["x"]["covariance"].values
    for patch in ellipses(ax):
        k = int(np.argmin(np.linalg.norm(mean - np.asarray(patch.center), axis=1)))
        n_sigma = 1 if "1sigma" in patch.get_gid() else 2
        np.testing.assert_allclose(mahalanobis_on_boundary(patch, mean[k], cov[k]), n_sigma, rtol=1e-9)


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical", "tied"])
def test_ellipses_are_the_marginal_covariance(blobs: xr.Dataset, covariance: str) -> None:
    fit = em.Model().latent("z", em.Categorical(3)).observe("x", em.MultivariateNormal(covariance=covariance)) \
        .fit(blobs, seed=0)
    ax = fit.plot.components("c", "x[a]").axes[0]
    assert ax.get_xlabel() == "x[c]" and ax.get_ylabel() == "x[a]"
    mean = fit.params["x"]["mean"].sel(feature=["c", "a"]).transpose("z", "feature").values
    cov_da = fit.params["x"]["covariance"]
    full = {
        "full": lambda: cov_da.values,
        "tied": lambda: np.broadcast_to(cov_da.values, (3, 3, 3)),
        "diag": lambda: np.stack([np.diag(v) for v in cov_da.values]),
        "spherical": lambda: np.stack([v * np.eye(3) for v in cov_da.values]),
    }[covariance]()
    pick = np.ix_(range(3), [2, 0], [2, 0])  # features c, a
    sub = full[pick]
    assert len(ellipses(ax)) == 6
    for patch in ellipses(ax):
        k = int(np.argmin(np.linalg.norm(mean - np.asarray(patch.center), axis=1)))
        n_sigma = 1 if "1sigma" in patch.get_gid() else 2
        np.testing.assert_allclose(mahalanobis_on_boundary(patch, mean[k], sub[k]), n_sigma, rtol=1e-8)


def test_elements_of_separate_nodes_are_independent_given_z(faithful: xr.Dataset) -> None:
    fit = em.Model().latent("z", em.Categorical(2)).observe("eruptions", em.Normal) \
        .observe("waiting", em.Normal).fit(faithful, seed=0)
    ax = fit.plot.components().axes[0]
    for patch in ellipses(ax):
        assert patch.angle % 90 == pytest.approx(0, abs=1e-9)  # axis-aligned: no covariance across nodes


def test_components_choose_elements_by_name(fit2d: em.Fit) -> None:
    ax = fit2d.plot.components("waiting", "eruptions").axes[0]
    assert ax.get_xlabel().startswith("waiting")
    hist = fit2d.plot.components("waiting").axes[0]  # x alone: a histogram
    assert len(hist.containers) == 2


def test_components_errors(fit2d: em.Fit, blobs: xr.Dataset) -> None:
    with pytest.raises(em.ModelError, match="no plottable element 'nope'.*'eruptions', 'waiting'"):
        fit2d.plot.components("nope")
    with pytest.raises(em.ModelError, match="same element"):
        fit2d.plot.components("waiting", "waiting")
    with pytest.raises(em.ModelError, match="give x when giving y"):
        fit2d.plot.components(y="waiting")


def test_loaded_fit_needs_data(fit2d: em.Fit, faithful: xr.Dataset, tmp_path) -> None:
    fit2d.save(tmp_path / "fit.nc")
    loaded = em.load(tmp_path / "fit.nc")
    with pytest.raises(em.ModelError, match=r"holds no training data.*components\(data=ds\)"):
        loaded.plot.components()
    with pytest.raises(em.ModelError, match=r"posterior\(data=ds\)"):
        loaded.plot.posterior()
    ax = loaded.plot.components(data=faithful).axes[0]
    assert len(ellipses(ax)) == 4
    assert len(loaded.plot.convergence().axes[0].get_lines()) == fit2d.n_init + 1  # traces are saved


def test_components_on_new_data(fit2d: em.Fit, faithful: xr.Dataset) -> None:
    part = faithful.isel(sample=slice(0, 100))
    ax = fit2d.plot.components(data=part).axes[0]
    (scatter,) = [c for c in ax.collections if c.get_gid() == "data"]
    assert scatter.get_offsets().shape == (100, 2)


def test_components_honour_ax(fit2d: em.Fit) -> None:
    fig = Figure()
    ax = fig.add_subplot()
    assert fit2d.plot.components(ax=ax) is ax
    assert len(ellipses(ax)) == 4


# -- components, one element ---------------------------------------------------------------------
def test_components_1d_histogram_and_weighted_densities(fit1d: em.Fit) -> None:
    ax = fit1d.plot.components().axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3
    top = bars[-1]  # stacked: the last layer's tops are the totals; a density integrates to 1
    area = sum((p.get_y() + p.get_height()) * p.get_width() for p in top.patches)
    assert area == pytest.approx(1.0)
    parts = lines(ax, "density-")
    (mixture,) = lines(ax, "mixture")
    assert len(parts) == 3
    np.testing.assert_allclose(mixture.get_ydata(), np.sum([p.get_ydata() for p in parts], axis=0))
    probs = fit1d.params["z"]["probs"].values
    for k, part in enumerate(parts):
        # each weighted density integrates to its weight π_k (the grid covers the data ± 5 %)
        assert np.trapezoid(part.get_ydata(), part.get_xdata()) == pytest.approx(probs[k], abs=0.02)


def test_model_without_latent(faithful: xr.Dataset) -> None:
    fit = em.Model().observe(["eruptions", "waiting"], em.MultivariateNormal, name="x").fit(faithful)
    ax = fit.plot.components().axes[0]
    assert len(ellipses(ax)) == 2 and len(lines(ax, "mean-")) == 1
    one = em.Model().observe("waiting", em.Normal).fit(faithful).plot.components().axes[0]
    assert len(lines(one, "density-")) == 1 and not lines(one, "mixture")
    with pytest.raises(em.ModelError, match="no latent variable"):
        fit.plot.posterior()


def test_a_discrete_family_is_drawn_with_bars() -> None:
    rng = np.random.default_rng(0)
    counts = rng.poisson(np.where(rng.random(300) < 0.4, 2.0, 9.0)).astype(float)
    fit = em.Model().latent("z", em.Categorical(2)).observe("n", em.Poisson).fit(
        xr.Dataset({"n": ("sample", counts)}), seed=0)
    ax = fit.plot.components().axes[0]
    edges = [p.get_x() for p in ax.containers[0].patches]
    np.testing.assert_allclose(np.asarray(edges) % 1, 0.5)  # one bar per integer value
    parts = lines(ax, "density-")
    assert all(p.get_marker() == "o" for p in parts)
    assert np.all(np.asarray(parts[0].get_xdata()) % 1 == 0)
    assert ax.get_ylabel() == "probability"


def test_a_categorical_variable_is_drawn_at_its_levels() -> None:
    rng = np.random.default_rng(1)
    labels = np.array(["red", "green", "blue"], dtype=object)[rng.integers(0, 3, 200)]
    ds = xr.Dataset({"colour": ("sample", labels), "x": ("sample", rng.normal(size=200))})
    fit = em.Model().latent("z", em.Categorical(2)).observe("colour", em.Categorical).observe("x", em.Normal).fit(
        ds, seed=0)
    ax = fit.plot.components(x="colour").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["blue", "green", "red"]
    heights = np.asarray(lines(ax, "mixture")[0].get_ydata())
    np.testing.assert_allclose(heights.sum(), 1.0, rtol=1e-12)  # the mixture's level probabilities


# -- posterior --------------------------------------------------------------------------------
def test_posterior_stacked_and_certainty(fit1d: em.Fit) -> None:
    fig = fit1d.plot.posterior()
    stacked, certainty = fig.axes
    assert len(stacked.collections) == 3  # one area per state
    resp = fit1d.posterior.values
    best = resp.argmax(axis=1)
    legend = [t.get_text() for t in stacked.get_legend().get_texts()]
    assert legend == [f"z={k}: {n} samples" for k, n in enumerate(np.bincount(best, minlength=3))]
    uncertain = int(np.sum(resp.max(axis=1) < 0.9))
    assert stacked.get_title() == f"responsibilities: {uncertain} of {resp.shape[0]} samples below 0.9"
    bars = [c for c in certainty.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3
    assert sum(p.get_y() + p.get_height() for p in bars[-1].patches) == resp.shape[0]  # every sample once


def test_posterior_honours_ax_and_kind(fit1d: em.Fit) -> None:
    fig = Figure()
    ax = fig.add_subplot()
    assert fit1d.plot.posterior(ax=ax) is ax
    assert len(fig.axes) == 1 and len(ax.collections) == 3
    single = fit1d.plot.posterior(kind="certainty")
    assert len(single.axes) == 1 and single.axes[0].get_xlabel() == "max p(z | x)"
    with pytest.raises(em.ModelError, match="'stacked' or 'certainty'"):
        fit1d.plot.posterior(kind="pie")


def test_posterior_subsamples_many_samples() -> None:
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"v": ("sample", np.concatenate([rng.normal(0, 1, 6000), rng.normal(5, 1, 6000)]))})
    fit = em.Model().latent("z", em.Categorical(2)).observe("v", em.Normal).fit(ds, seed=0)
    ax = fit.plot.posterior(kind="stacked").axes[0]
    vertices = max(len(path.vertices) for c in ax.collections for path in c.get_paths())
    assert vertices < 4 * plot._MAX_STACKED_POINTS + 10
    assert ax.get_xlim() == (0, 11999)


def test_bad_choices_of_sequence_or_a_categorical_axis_are_named():
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"x": (("seq", "time"), np.where((np.arange(60) // 15) % 2, 3.0, 0.0)
                           + rng.normal(0, 1, (4, 60)))})
    chain = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal).fit(ds, seed=0)
    assert isinstance(chain.plot.states(sequence=3), Figure)
    for bad in (4, -1, 1.5):
        with pytest.raises(em.ModelError, match=r"sequence=.*0 to 3"):
            chain.plot.states(sequence=bad)
    with pytest.raises(em.ModelError, match="no such sequence"):
        chain.plot.states(sequence={"seq": 7})
    z = rng.integers(0, 2, 200)
    mixed = xr.Dataset({"x": ("sample", rng.normal(3.0 * z, 1.0)),
                        "color": ("sample", np.where(z == 0, "red", rng.choice(["red", "blue"], 200)).astype(object))})
    fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal).observe("color", em.Categorical).fit(
        mixed, seed=0)
    assert isinstance(fit.plot.components(x="color"), Figure)
    for x, y in (("x", "color"), ("color", "x")):
        with pytest.raises(em.ModelError, match=r"\['color'\] is categorical"):
            fit.plot.components(x=x, y=y)
