"""The monitor after a real fit, as a person sees it in a static HTML page (ipywidgets.embed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ipywidgets.embed import embed_minimal_html

import emdsl as em


@pytest.fixture(scope="module")
def fitted_monitor() -> tuple[em.widgets.ConvergenceMonitor, em.Fit]:
    monitor = em.widgets.ConvergenceMonitor()
    model = em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal,
                                                                name="x")
    fit = model.fit(em.datasets.load("faithful"), seed=0, callbacks=[monitor])
    return monitor, fit


def test_static_page_shows_the_finished_fit(fitted_monitor, embed_js: Path, page, tmp_path: Path) -> None:
    monitor, fit = fitted_monitor
    html_path = tmp_path / "monitor.html"
    embed_minimal_html(html_path, views=[monitor], requirejs=False, embed_url=embed_js.as_uri(), cors=False,
                       title="emdsl monitor")
    page.goto(html_path.as_uri())

    image = page.locator("img.widget-image")
    image.wait_for(state="visible")
    page.wait_for_function("() => { const i = document.querySelector('img.widget-image');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    page.screenshot(path=str(tmp_path / "monitor.png"), full_page=True)

    # the bar is full: its filled part spans the whole track
    track = page.locator(".widget-hprogress .progress").bounding_box()
    bar = page.locator(".widget-hprogress .progress-bar").bounding_box()
    assert track and bar and track["width"] > 100
    assert bar["width"] == pytest.approx(track["width"], rel=0.01)
    assert page.locator(".widget-hprogress .widget-label").inner_text() == "restart 1/1"

    text = page.locator(".widget-html-content").inner_text()
    assert f"log-likelihood {fit.loglik:.4f}" in text
    assert f"converged after {fit.n_iter} iterations" in text

    natural = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert natural == [int(monitor.figsize[0] * monitor.dpi), int(monitor.figsize[1] * monitor.dpi)]
    shown = image.bounding_box()
    assert shown and shown["width"] > 300 and shown["height"] > 100

    stop = page.locator("button.widget-button")
    assert stop.is_disabled()  # the fit is over
    assert not page.errors, page.errors
