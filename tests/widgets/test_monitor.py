"""ConvergenceMonitor with real fits of Old Faithful: what it shows, Stop, throttling, repr."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.widgets.monitor import ConvergenceMonitor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model() -> em.Model:
    return em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal,
                                                               name="x")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])  # the IHDR chunk comes first


class FakeClock:
    """Time that moves only when told: throttling tests without wall-clock assumptions."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ticking(clock: FakeClock, step: float):
    """A callback placed before the monitor: each iteration 'takes' ``step`` seconds."""
    def tick(event: em.IterationEvent) -> None:
        clock.now += step
    return tick


def click_stop(monitor: ConvergenceMonitor) -> None:
    """What the frontend sends when the button is clicked (a custom comm message)."""
    monitor.stop_button._handle_button_msg(None, {"event": "click"}, [])


# -- what it shows ----------------------------------------------------------------------------
def test_converged_fit_fills_the_bar(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = model.fit(faithful, seed=0, max_iter=300, callbacks=[monitor])
    assert fit.converged
    assert monitor.progress.max == 300
    assert monitor.progress.value == 300
    assert monitor.progress.bar_style == "success"
    assert monitor.progress.description == "restart 1/1"
    assert monitor.stop_button.disabled


def test_fit_that_runs_out_of_iterations_shows_a_warning(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = model.fit(faithful, seed=0, max_iter=3, tol=0, callbacks=[monitor])
    assert (monitor.progress.value, monitor.progress.max) == (3, 3)
    assert monitor.progress.bar_style == "warning"
    assert f"not converged after {fit.n_iter} iterations" in monitor.label.value


def test_label_shows_the_final_numbers(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = model.fit(faithful, seed=0, callbacks=[monitor])
    label = monitor.label.value
    assert f"log-likelihood {fit.loglik:.4f}" in label
    assert f"converged after {fit.n_iter} iterations" in label
    assert f"ELBO {fit.trace['elbo'].values[-1]:.4f}" in label
    assert "KL gap" in label and "s/iteration" in label


def test_label_during_the_fit_shows_iteration_loglik_change_elbo_kl(model, faithful) -> None:
    monitor = ConvergenceMonitor(mininterval=0)
    seen: list[str] = []
    model.fit(faithful, seed=0, max_iter=4, tol=0, callbacks=[monitor, lambda e: seen.append(monitor.label.value)])
    assert "iteration 2/4" in seen[2]
    for word in ("log-likelihood", "Δ +", "ELBO", "KL gap", "s/iteration"):
        assert word in seen[2], (word, seen[2])


def test_image_is_a_png_of_the_figure_size(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    model.fit(faithful, seed=0, callbacks=[monitor])
    png = monitor.image.value
    assert png_size(png) == (round(monitor.figsize[0] * monitor.dpi), round(monitor.figsize[1] * monitor.dpi))
    assert len(png) > 10_000
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png))
    assert pixels.std() > 0.05  # lines and text, not a blank canvas
    assert monitor.image.layout.display is None  # shown once drawn


def test_plot_draws_every_restart_and_the_staircase(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = model.fit(faithful, seed=1, n_init=3, init="random", callbacks=[monitor])
    likelihood, parameters = monitor._plots.figure.axes
    # per restart: the staircase (2 points per iteration) and the log-likelihood
    lines = likelihood.get_lines()
    assert len(lines) == 2 * fit.n_init
    for restart in range(fit.n_init):
        trace = fit.traces.where(fit.traces["restart"] == restart, drop=True)
        steps, loglik = lines[2 * restart], lines[2 * restart + 1]
        np.testing.assert_allclose(loglik.get_ydata(), trace["loglik"].values)
        t, y = steps.get_data()
        np.testing.assert_array_equal(t, np.repeat(np.arange(trace.sizes["step"]), 2))
        np.testing.assert_allclose(y[0::2], trace["elbo"].values)  # after the M-step …
        np.testing.assert_allclose(y[1::2], trace["loglik"].values)  # … the E-step closes the gap
    assert np.all(y[0::2] <= y[1::2] + 1e-9)
    assert monitor.progress.description == f"restart {fit.restart + 1}/3"
    # the parameter panel follows the kept restart's mixture weights, ending at the fit's
    assert [line.get_label() for line in parameters.get_lines()] == ["z=0", "z=1"]
    final = [line.get_ydata()[-1] for line in parameters.get_lines()]
    np.testing.assert_allclose(final, fit.params["z"]["probs"].values)


def test_parameter_panel_without_a_latent_follows_the_mean(faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = em.Model().observe(["eruptions", "waiting"], em.MultivariateNormal, name="x").fit(
        faithful, callbacks=[monitor])
    _, parameters = monitor._plots.figure.axes
    labels = [line.get_label() for line in parameters.get_lines()]
    assert labels == ["mean[eruptions]", "mean[waiting]"]
    np.testing.assert_allclose([line.get_ydata()[-1] for line in parameters.get_lines()],
                               fit.params["x"]["mean"].values.ravel())


# -- Stop ---------------------------------------------------------------------------------------
def test_click_on_stop_ends_the_fit_after_the_current_iteration(model, faithful) -> None:
    monitor = ConvergenceMonitor()

    def click_at_third_iteration(event: em.IterationEvent) -> None:
        if event.iteration == 3:
            click_stop(monitor)

    fit = model.fit(faithful, seed=0, max_iter=200, tol=0, callbacks=[click_at_third_iteration, monitor])
    assert fit.stopped and not fit.converged
    assert fit.n_iter == 3
    assert "stopped after 3 iterations" in monitor.label.value
    assert monitor.stop_button.disabled and monitor.stop_button.description == "Stopped"
    assert monitor.progress.value == 3 and monitor.progress.bar_style == "warning"
    assert repr(monitor).startswith("ConvergenceMonitor(stopped after 3 iterations")


def test_stop_keeps_the_best_parameters_so_far(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = model.fit(faithful, seed=0, max_iter=200, tol=0,
                    callbacks=[lambda e: e.iteration == 2 and click_stop(monitor), monitor])
    reference = model.fit(faithful, seed=0, max_iter=2, tol=0)
    assert fit.loglik == pytest.approx(reference.loglik, rel=1e-12)
    xr.testing.assert_allclose(fit.params["x"].to_dataset(), reference.params["x"].to_dataset())


def test_stop_during_restarts_ends_them_all(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = model.fit(faithful, seed=0, n_init=5, max_iter=50, tol=0, init="random",
                    callbacks=[lambda e: e.restart == 1 and e.iteration == 2 and click_stop(monitor), monitor])
    assert fit.stopped and not fit.converged
    assert fit.n_init == 2


def test_stop_after_a_converged_restart_is_a_stop(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    fit = model.fit(faithful, seed=0, n_init=3,
                    callbacks=[lambda e: e.restart == 1 and e.iteration == 2 and click_stop(monitor), monitor])
    assert fit.stopped and not fit.converged and fit.restart == 0
    assert f"stopped after {fit.n_iter} iterations" in monitor.label.value
    assert monitor.progress.bar_style == "warning"


def test_clicks_outside_a_fit_do_not_stop_the_next_one(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    click_stop(monitor)  # before any fit
    model.fit(faithful, seed=0, max_iter=200, tol=0, callbacks=[lambda e: e.iteration == 1 and click_stop(monitor),
                                                                 monitor])
    click_stop(monitor)  # after the fit
    fit = model.fit(faithful, seed=0, callbacks=[monitor])
    assert fit.converged and not fit.stopped
    assert monitor.stop_button.description == "Stop"


# -- throttling ----------------------------------------------------------------------------------
def test_numbers_update_at_most_every_mininterval(model, faithful) -> None:
    clock = FakeClock()
    monitor = ConvergenceMonitor(mininterval=0.25)
    monitor._clock = clock
    labels: list[str] = []
    model.fit(faithful, seed=0, max_iter=20, tol=0,
              callbacks=[ticking(clock, 0.125), monitor, lambda e: labels.append(monitor.label.value)])
    # 0.125 s per iteration, 0.25 s apart: iterations 0, 2, 4, …, 20 are shown, the others are not
    shown = [i for i in range(21) if i == 0 or labels[i] != labels[i - 1]]
    assert shown == list(range(0, 21, 2))


def test_plot_redraws_keep_to_the_overhead_budget(model, faithful) -> None:
    clock = FakeClock()
    draw_seconds = 0.5

    class SlowDrawing(ConvergenceMonitor):
        def _render(self, chosen):
            clock.now += draw_seconds  # each drawing 'takes' half a second
            return super()._render(chosen)

    monitor = SlowDrawing(mininterval=0.25, max_overhead=0.1)
    monitor._clock = clock
    iterations = 400
    model.fit(faithful, seed=0, max_iter=iterations, tol=0, callbacks=[ticking(clock, 0.125), monitor])
    fit_seconds = iterations * 0.125 + draw_seconds * monitor.n_redraws
    # drawings during the fit, and the final one, take at most a tenth of the time
    assert monitor.n_redraws >= 2
    assert monitor.n_redraws * draw_seconds <= 0.1 * fit_seconds
    # far fewer than the 200 updates of the numbers (one per 0.25 s)
    assert monitor.n_redraws < 200 / 10


def test_without_cost_the_plot_follows_the_numbers(model, faithful) -> None:
    clock = FakeClock()

    class FreeDrawing(ConvergenceMonitor):
        def _render(self, chosen):
            return super()._render(chosen) if chosen is not None else b"\x89PNG"

    monitor = FreeDrawing(mininterval=0.25, max_overhead=1.0)
    monitor._clock = clock
    model.fit(faithful, seed=0, max_iter=20, tol=0, callbacks=[ticking(clock, 0.125), monitor])
    # a drawing with every update of the numbers (iterations 0, 2, …, 20), and the final one
    assert monitor.n_redraws == 11 + 1


def test_parameters_are_read_only_when_the_display_updates(model, faithful, monkeypatch) -> None:
    clock = FakeClock()
    reads = []
    monitor = ConvergenceMonitor(mininterval=0.25)
    monitor._clock = clock

    def counting(event: em.IterationEvent) -> None:
        original = event._params
        object.__setattr__(event, "_params", lambda: reads.append(event.iteration) or original())

    model.fit(faithful, seed=0, max_iter=20, tol=0, callbacks=[ticking(clock, 0.125), counting, monitor])
    assert reads == list(range(0, 21, 2))


# -- repr -------------------------------------------------------------------------------------------
def test_repr_is_deterministic(model, faithful) -> None:
    reprs = []
    for _ in range(2):
        monitor = ConvergenceMonitor()
        assert repr(monitor) == "ConvergenceMonitor(not started)"
        fit = model.fit(faithful, seed=0, callbacks=[monitor])
        reprs.append(repr(monitor))
    assert reprs[0] == reprs[1] == (f"ConvergenceMonitor(converged after {fit.n_iter} iterations, "
                                    f"log-likelihood {fit.loglik:.6g})")


def test_repr_during_the_fit_has_no_timings(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    seen: list[str] = []
    model.fit(faithful, seed=0, max_iter=5, tol=0, callbacks=[monitor, lambda e: seen.append(repr(monitor))])
    assert seen[2].startswith("ConvergenceMonitor(restart 1/1, iteration 2/5, log-likelihood -11")
    assert "s/it" not in "".join(seen)


def test_text_plain_of_the_display_is_the_repr(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    bundle = monitor._repr_mimebundle_()
    assert bundle["text/plain"] == "ConvergenceMonitor(not started)"
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_monitor_is_a_callback(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    assert isinstance(monitor, em.Callback)
    assert isinstance(monitor, __import__("ipywidgets").VBox)


def test_public_name(model) -> None:
    assert em.widgets.ConvergenceMonitor is ConvergenceMonitor
    assert "ConvergenceMonitor" in em.widgets.__all__ and "ConvergenceMonitor" in dir(em.widgets)
