"""explore(): candidates fitted once, the slider selects a fit, BIC values, and static-HTML behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

import emdsl as em  # noqa: E402
from emdsl.widgets._explore import criteria, explore  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EMBED_JS = ROOT / ".cache" / "npm" / "html-manager" / "dist" / "embed.js"
CHROMIUM = Path("/usr/bin/chromium")


def mixture(k: int) -> em.Model:
    return em.Model().latent("z", em.Categorical(k)).observe(["eruptions", "waiting"], em.MultivariateNormal,
                                                             name="x")


@pytest.fixture(scope="module")
def explorer(faithful: xr.Dataset):
    return explore(mixture, faithful, ks=range(1, 4), aic=True)


def test_starts_at_the_lowest_bic_and_reports_fit_bic(explorer) -> None:
    assert isinstance(explorer, ipywidgets.VBox)
    fits = explorer.fits
    assert list(fits) == [1, 2, 3]
    bic = {k: fit.bic() for k, fit in fits.items()}
    np.testing.assert_array_equal(explorer.criteria["bic"].values, [bic[1], bic[2], bic[3]])
    np.testing.assert_array_equal(explorer.criteria["aic"].values, [fits[k].aic() for k in (1, 2, 3)])
    assert explorer.best == min(bic, key=bic.get) == 2
    assert explorer.label == 2 and explorer.fit is fits[2]
    assert explorer.stack.selected_index == 1
    assert all(fit.seed == 0 for fit in fits.values())  # seeded: the same widget every run


def test_slider_changes_the_selected_fit(explorer) -> None:
    try:
        explorer.slider.value = 3
        assert explorer.label == 3 and explorer.fit is explorer.fits[3]
        assert explorer.fit.model.latent_var.family.k == 3
        assert explorer.stack.selected_index == 2  # the picture follows in the kernel too
        assert "K=3 selected" in repr(explorer) and f"BIC {explorer.fits[3].bic():.2f}" in repr(explorer)
        assert explorer.select(1) is explorer.fits[1] and explorer.slider.index == 0
        with pytest.raises(em.ModelError, match=r"no candidate 7; the candidates are \[1, 2, 3\]"):
            explorer.select(7)
    finally:
        explorer.select(explorer.best)


def test_pictures_are_linked_to_the_slider_in_the_browser(explorer) -> None:
    assert len(explorer.images) == len(explorer.stack.children) == 3
    pngs = [image.value for image in explorer.images]
    assert all(png[:4] == b"\x89PNG" for png in pngs) and len(set(pngs)) == 3
    from ipywidgets.widgets.widget_link import Link

    link = explorer._link
    assert isinstance(link, Link)  # a jslink: the browser moves the Stack itself
    assert link.source == (explorer.slider, "index") and link.target == (explorer.stack, "selected_index")
    assert explorer.stack.selected_index == explorer.slider.index


def test_repr_is_deterministic_and_used_for_text_plain(explorer, faithful: xr.Dataset) -> None:
    text = repr(explorer)
    assert text == "explore: K=2 selected among ['K=1', 'K=2', 'K=3'], BIC 2322.19; lowest BIC: K=2"
    assert explorer._repr_mimebundle_()["text/plain"] == text
    again = explore({k: mixture(k) for k in (1, 2, 3)}, faithful)
    assert repr(again) == text


def test_fits_are_computed_once(faithful: xr.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = em.Model.fit

    def counting(self, *args, **kwargs):
        calls.append(self.latent_var.family.k)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(em.Model, "fit", counting)
    widget = explore([mixture(1), mixture(2)], faithful)
    assert sorted(calls) == [1, 2]
    widget.slider.value = 1
    widget.slider.value = 2
    _ = widget.fit, widget.fits, repr(widget)
    assert sorted(calls) == [1, 2]


def test_fits_are_used_as_given(faithful: xr.Dataset) -> None:
    fits = [mixture(k).fit(faithful, seed=1) for k in (1, 2)]
    widget = explore(fits)
    assert widget.fits[1] is fits[0] and widget.fits[2] is fits[1]
    assert widget.criteria["bic"].values.tolist() == [fits[0].bic(), fits[1].bic()]


def test_named_candidates_and_fit_kwargs(faithful: xr.Dataset) -> None:
    models = {"full": mixture(2), "diag": em.Model().latent("z", em.Categorical(2)).observe(
        ["eruptions", "waiting"], em.MultivariateNormal(covariance="diag"), name="x")}
    widget = explore(models, faithful, criterion="aic", fit_kwargs={"seed": 3, "n_init": 2})
    assert widget.slider.description == "model"
    assert [label for label, _ in widget.slider.options] == ["full", "diag"]
    assert all(fit.seed == 3 and fit.n_init == 2 for fit in widget.fits.values())
    aic = {name: fit.aic() for name, fit in widget.fits.items()}
    assert widget.label == min(aic, key=aic.get)
    assert "lowest AIC" in repr(widget)


def test_tuple_labels(faithful: xr.Dataset) -> None:
    """{(covariance, K): Model}: the labels' coordinate was read as 2-D (a ValueError from xarray)."""
    models = {(covariance, k): em.Model().latent("z", em.Categorical(k)).observe(
        ["eruptions", "waiting"], em.MultivariateNormal(covariance=covariance), name="x")
        for covariance in ("full", "diag") for k in (2, 3)}
    widget = explore(models, faithful)
    assert [label for label, _ in widget.slider.options] == [str(label) for label in models]
    assert widget.label in models and set(widget.fits) == set(models)
    assert criteria(widget.fits)["model"].values.tolist() == list(models)


def test_criteria_dataset(faithful: xr.Dataset) -> None:
    fit = mixture(2).fit(faithful, seed=0)
    table = criteria({2: fit})
    assert table["model"].values.tolist() == [2]
    assert table["loglik"].item() == fit.loglik and table["n_params"].item() == 11
    assert bool(table["converged"].item()) is fit.converged


def test_loaded_fits_need_data(faithful: xr.Dataset, tmp_path: Path) -> None:
    mixture(2).fit(faithful, seed=0).save(tmp_path / "two.nc")
    loaded = em.load(tmp_path / "two.nc")
    with pytest.raises(em.ModelError, match=r"holds no training data.*explore\(fits, data\)"):
        explore([loaded])
    widget = explore([loaded], faithful)
    assert widget.fit is loaded


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((mixture,), {"ks": None}, r"needs ks=\.\.\."),
    (({1: None},), {"ks": range(2)}, "only for a function"),
    (([mixture(2), mixture(2)],), {}, r"same number of states \[2, 2\]; pass a mapping"),
    (([],), {}, "no candidates"),
    (({1: "model"},), {}, "the candidate 1 is a str"),
    ((42,), {}, "got int"),
    (([mixture(2)],), {}, r"pass the data to fit the models to"),
    (([mixture(2)],), {"criterion": "waic"}, "'bic' or 'aic'"),
])
def test_errors(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(em.ModelError, match=message):
        explore(*args, **kwargs)


# Run in a child process: Playwright's sync API refuses to start while another sync
# session (the session-wide browser of tests/browser) is open in this process.
_DRIVE_PAGE = """
import json, sys
from playwright.sync_api import sync_playwright
page_uri, chromium = sys.argv[1], sys.argv[2]
shown = "() => [...document.querySelectorAll('img')].filter(i => i.offsetParent !== null).map(i => i.src)"
size = ("() => [...document.querySelectorAll('img')].filter(i => i.offsetParent !== null)"
        ".map(i => [i.naturalWidth, i.naturalHeight])")
out = {}
with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_uri)
    page.wait_for_selector(".widget-readout", timeout=30000)
    page.wait_for_function("() => [...document.querySelectorAll('img')].some(i => i.naturalWidth > 0)")
    out["before"], out["readout_before"] = page.evaluate(shown), page.inner_text(".widget-readout")
    page.focus(".noUi-handle")
    page.keyboard.press("ArrowRight")
    try:
        page.wait_for_function("old => (" + shown + ")()[0] !== old", arg=out["before"][0], timeout=10000)
        # the new picture's size is 0 × 0 until it is decoded (seen on a loaded machine)
        page.wait_for_function("() => (" + size + ")().every(s => s[0] > 0)", timeout=10000)
    except Exception as error:
        out["timeout"] = str(error).splitlines()[0]
    out["after"], out["readout_after"] = page.evaluate(shown), page.inner_text(".widget-readout")
    out["size"], out["errors"] = page.evaluate(size), errors
    browser.close()
print(json.dumps(out))
"""


@pytest.mark.browser
def test_static_html_switches_pictures_without_a_kernel(explorer, tmp_path: Path) -> None:
    """Saved as a standalone page, moving the slider shows another picture (jslink, no kernel)."""
    if not (CHROMIUM.exists() and EMBED_JS.is_file()):
        pytest.fail(f"needs {CHROMIUM} and {EMBED_JS}; run `tools/install-test-deps.sh .venv/bin/python`",
                    pytrace=False)
    from ipywidgets.embed import embed_minimal_html

    page_path = tmp_path / "explore.html"
    embed_minimal_html(page_path, views=[explorer], requirejs=False, embed_url=EMBED_JS.as_uri(), cors=False)
    script = tmp_path / "drive.py"
    script.write_text(_DRIVE_PAGE)
    done = subprocess.run([sys.executable, str(script), page_path.as_uri(), str(CHROMIUM)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["readout_before"] == "K=2" and len(seen["before"]) == 1
    assert "timeout" not in seen, seen["timeout"]
    assert seen["readout_after"] == "K=3"
    assert len(seen["after"]) == 1 and seen["after"] != seen["before"]
    assert seen["size"] == [[800, 320]]
    assert seen["errors"] == []
