"""HTML cards of Model and Fit: the numbers they show, escaping, and well-formed self-contained HTML."""

from __future__ import annotations

import re
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl import _html

VOID = {"br", "img", "hr", "meta", "input", "col", "wbr", "source", "link"}
# SVG elements written self-closing (<circle .../>) by the sparkline
SELF_CLOSING = {"circle", "polyline"}


class TagChecker(HTMLParser):
    """Records tags and fails on any element closed out of order or left open."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def checked(markup: str) -> TagChecker:
    parser = TagChecker()
    parser.feed(markup)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    # self-contained: no stylesheet or script that a sanitiser would drop or a page would fetch
    assert not {"style", "script", "link", "iframe"} & set(parser.tags)
    assert "http://" not in markup.replace("http://www.w3.org/2000/svg", "") and "https://" not in markup
    return parser


@pytest.fixture(scope="module")
def fit(faithful: xr.Dataset) -> em.Fit:
    model = em.Model().latent("z", em.Categorical(2)).observe(
        ["eruptions", "waiting"], em.MultivariateNormal, name="x")
    return model.fit(faithful, seed=0, n_init=2)


# -- Model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [
    em.MultivariateNormal(), em.MultivariateNormal(covariance="diag"), em.MultivariateNormal(covariance="tied"),
    em.MultivariateNormal(covariance="spherical"), em.Normal(), em.Normal(tied="variance"),
])
def test_model_card_counts_the_parameters_the_fit_estimates(faithful: xr.Dataset, family) -> None:
    model = em.Model().latent("z", em.Categorical(3)).observe(["eruptions", "waiting"], family, name="x")
    card = model._repr_html_()
    text = " ".join(checked(card).text)
    fitted = model.fit(faithful, seed=0, max_iter=3, tol=0)
    assert f"{fitted.n_params} free parameters" in text
    assert repr(family) in text and "eruptions, waiting → feature" in text
    assert "(z: 3, feature: 2)" in text  # the mean's labelled shape


def test_model_card_before_the_data_are_known() -> None:
    model = em.Model().latent("z", em.Categorical(3)).observe("waiting", em.Normal(tied="variance"))
    text = " ".join(checked(model._repr_html_()).text)
    assert "4 × D" in text  # 3 means + 1 shared variance per element
    assert "dims of waiting" in text and "known once fitted" in text
    mvn = em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal)._repr_html_()
    assert "depends on D" in mvn


def test_model_card_marks_fixed_parameters() -> None:
    model = em.Model().latent("z", em.Categorical(2, probs=[0.5, 0.5])).observe(["a", "b"], em.Normal, name="v")
    card = model._repr_html_()
    assert "<i>fixed</i>" in card
    assert "8 free parameters" in card  # the weights are held: 2 × 2 means + 2 × 2 variances


def test_model_card_empty() -> None:
    assert "empty: declare" in checked(em.Model()._repr_html_()).text[-1]


# -- Fit ----------------------------------------------------------------------------------------
def test_fit_card_shows_the_numbers(fit: em.Fit) -> None:
    card = fit._repr_html_()
    text = " ".join(checked(card).text)
    for number in (f"{fit.loglik:.2f}", f"{fit.bic():.2f}", f"{fit.aic():.2f}"):
        assert number in text
    assert f"after {fit.n_iter} iterations, restart {fit.restart + 1} of 2 (best)" in text
    assert "converged" in text and re.search(rf"free parameters\s+{fit.n_params}\b", text)
    for name, node in fit.params.children.items():
        for key, da in node.to_dataset().data_vars.items():
            for value in np.ravel(da.values):
                assert f">{value:.4g}<" in card, (name, key, value)
    assert ">eruptions<" in card and ">waiting<" in card  # coordinate labels head the tables


def test_fit_card_sparkline_follows_the_trace(fit: em.Fit) -> None:
    card = fit._repr_html_()
    (points,) = re.findall(r"<polyline[^>]*points='([^']*)'", card)
    xy = np.array([[float(v) for v in p.split(",")] for p in points.split()])
    loglik = fit.trace["loglik"].values
    assert len(xy) == loglik.size
    assert np.all(np.diff(xy[:, 0]) > 0)
    # SVG y grows downwards, 36 px high with 3 px margins: the highest log-likelihood at the top
    expected = 33 - (loglik - loglik.min()) / np.ptp(loglik) * 30
    np.testing.assert_allclose(xy[:, 1], expected, atol=0.051)


def test_sparkline_edge_cases() -> None:
    assert _html.sparkline([1.0]) == ""
    assert _html.sparkline([np.nan, np.nan, 1.0]) == ""
    line = _html.sparkline([1.0, np.nan, 2.0, 3.0])
    assert line.count(",") == 3  # the NaN is left out
    flat = _html.sparkline([5.0, 5.0])
    assert "points=" in flat


def test_fit_card_not_converged_and_loaded(faithful: xr.Dataset, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.ConvergenceWarning)
        short = em.Model().latent("z", em.Categorical(3)).observe("waiting", em.Normal).fit(faithful, seed=0, max_iter=2)
    card = short._repr_html_()
    assert "not converged" in card and "#c75100" in card
    short.save(tmp_path / "fit.nc")
    loaded = em.load(tmp_path / "fit.nc")
    assert _strip_seed(loaded._repr_html_()) == _strip_seed(card)


def _strip_seed(card: str) -> str:
    return re.sub(r"seed</span> <b>\d+</b>", "", card)


def test_large_parameters_are_folded() -> None:
    rng = np.random.default_rng(0)
    ds = xr.Dataset({"img": (("sample", "px"), rng.normal(size=(300, 12)))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = em.Model().latent("z", em.Categorical(3)).observe("img", em.MultivariateNormal).fit(
            ds, seed=0, max_iter=3)
    card = big._repr_html_()
    checked(card)
    assert "<summary style='cursor:pointer;opacity:.7'>432 values</summary>" in card  # 3 × 12 × 12
    assert "…" in card  # tables stop after MAX_CELLS columns
    assert "36 values" not in card  # the means (3 × 12) are small enough to stay open


def test_names_and_labels_are_escaped() -> None:
    hostile = "<script>alert(1)<\\script>"
    ds = xr.Dataset({hostile: ("sample", np.r_[np.zeros(20), np.ones(20) * 5] + np.linspace(0, 1, 40))})
    model = em.Model().latent("<b>z&", em.Categorical(["<i>lo", "hi\"'"])).observe(hostile, em.Normal)
    for card in (model._repr_html_(), model.fit(ds, seed=0)._repr_html_()):
        parser = checked(card)
        assert "<script>" not in card and "<b>z&" not in card and "<i>lo" not in card
        assert "&lt;script&gt;" in card and "&lt;b&gt;z&amp;" in card
        text = " ".join(parser.text)
        assert hostile in text and "<i>lo" in text  # shown literally to the reader


@pytest.mark.parametrize("family", [em.Categorical, em.Poisson, em.Bernoulli, em.Binomial(trials=5), em.Gamma,
                                    em.Exponential, em.LogNormal, em.Beta, em.VonMises])
def test_model_card_of_every_family_lists_its_own_parameters(family) -> None:
    card = em.Model().latent("z", em.Categorical(2)).observe("v", family)._repr_html_()
    text = " ".join(checked(card).text)
    for name in em.Model().observe("v", family).observed[0].family.param_axes():
        assert name in text


def test_model_card_of_several_latents_shows_what_each_variable_depends_on() -> None:
    model = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
             .observe("x", em.Normal, given=("a",)).observe("y", em.Normal).observe("s", em.Normal, given=()))
    text = " ".join(checked(model._repr_html_()).text)
    assert "probs (a: 2)" in text and "probs (b: 3)" in text
    assert "mean (a: 2" in text and "mean (a, b: 6" in text
