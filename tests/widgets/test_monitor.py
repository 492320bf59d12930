"""ConvergenceMonitor with real fits of Old Faithful: what it shows, Stop, throttling, repr."""

from __future__ import annotations

import io
import struct

from matplotlib.colors import to_rgb

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.plot import state_colors
from emdsl.widgets.monitor import MAX_PARAMETER_LINES, ConvergenceMonitor, restart_style

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
    clock = FakeClock()
    monitor = ConvergenceMonitor()
    monitor._clock = clock  # iterations of a (fake) second: the numbers change at every one
    seen: list[str] = []
    model.fit(faithful, seed=0, max_iter=4, tol=0,
              callbacks=[ticking(clock, 1.0), monitor, lambda e: seen.append(monitor.label.value)])
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
    # plain EM (accelerate=None): every iteration an M-step from q⁽ᵗ⁻¹⁾, a full staircase
    # (accelerated fits: tests/engine/test_accelerate.py)
    fit = model.fit(faithful, seed=1, n_init=3, init="random", callbacks=[monitor], accelerate=None)
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


# -- restarts ------------------------------------------------------------------------------------
def test_restart_colours_are_not_state_colours(faithful) -> None:
    monitor = ConvergenceMonitor()
    model = em.Model().latent("z", em.Categorical(4)).observe(["eruptions", "waiting"], em.MultivariateNormal,
                                                                name="x")
    fit = model.fit(faithful, seed=0, n_init=4, max_iter=30, tol=0, init="random", callbacks=[monitor])
    likelihood, parameters = monitor._plots.figure.axes
    restart_colours = {to_rgb(line.get_color()) for line in likelihood.get_lines()}
    state_colours = {to_rgb(line.get_color()) for line in parameters.get_lines()}
    assert len(restart_colours) == min(fit.n_init, 3) and len(state_colours) == 4
    assert not restart_colours & state_colours
    # the weights panel uses the states' colours of every emdsl plot
    assert [to_rgb(line.get_color()) for line in parameters.get_lines()] == [tuple(c) for c in state_colors(4)]
    # restarts beyond the greys differ by line style
    styles = {(to_rgb(line.get_color()), str(line.get_linestyle())) for line in likelihood.get_lines()[1::2]}
    assert len(styles) == fit.n_init


@pytest.mark.parametrize("k", [1, 2, 6, 8, 10, 12, 20, 25])
def test_no_restart_shares_a_colour_with_a_state(k) -> None:
    shown = {tuple(np.round(c, 6)) for c in state_colors(k)[:MAX_PARAMETER_LINES]}
    restarts = {tuple(np.round(restart_style(r)[0], 6)) for r in range(30)}
    assert not shown & restarts
    # and none is close: at least 0.08 apart in some channel
    for state in state_colors(k)[:MAX_PARAMETER_LINES]:
        for restart in restarts:
            assert np.abs(np.subtract(state, restart)).max() >= 0.08, (state, restart)


def test_restart_legend_names_the_kept_restart(model, faithful) -> None:
    clock = FakeClock()
    monitor = ConvergenceMonitor()
    monitor._clock = clock  # iterations of 10 (fake) seconds, drawings of none: a drawing every iteration
    during: list[list[str]] = []

    def legend(event: em.IterationEvent) -> None:
        if event.iteration == 1:
            during.append([t.get_text() for t in monitor._plots.likelihood.get_legend().get_texts()])

    fit = model.fit(faithful, seed=1, n_init=3, max_iter=3, tol=0, init="random",
                    callbacks=[ticking(clock, 10.0), monitor, legend])
    assert during == [["restart 1"], ["restart 1", "restart 2"], ["restart 1", "restart 2", "restart 3"]]
    texts = [t.get_text() for t in monitor._plots.likelihood.get_legend().get_texts()]
    expected = [f"restart {r + 1}" + (" (kept)" if r == fit.restart else "") for r in range(3)]
    assert texts == expected


def test_final_status_names_the_kept_restart_and_how_many_ran(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    descriptions: list[str] = []
    fit = model.fit(faithful, seed=0, n_init=2, init="random",
                    callbacks=[monitor, lambda e: descriptions.append(monitor.progress.description)])
    assert fit.n_init == 2
    assert descriptions[0] == "restart 1/2" and descriptions[-1] == "restart 2/2"
    # not "restart 1/2" once both ran: how many ran, and which one the fit kept
    assert monitor.progress.description == "restarts 2/2"
    label = monitor.label.value
    assert f"2 restarts ran; kept restart {fit.restart + 1} (best log-likelihood)" in label
    assert f"converged after {fit.n_iter} iterations" in label
    # the parameter panel shows the kept restart
    assert monitor._plots.parameters.get_title().endswith(f"restart {fit.restart + 1}")


def test_status_text_for_a_kept_second_restart() -> None:
    from types import SimpleNamespace

    from emdsl.widgets.text import restarts

    assert restarts(SimpleNamespace(n_init=2, restart=1)) == "2 restarts ran; kept restart 2 (best log-likelihood)"
    assert restarts(SimpleNamespace(n_init=2, restart=0), requested=5) == (
        "2 of 5 restarts ran; kept restart 1 (best log-likelihood)")


def test_single_restart_keeps_the_short_status(model, faithful) -> None:
    monitor = ConvergenceMonitor()
    model.fit(faithful, seed=0, callbacks=[monitor])
    assert monitor.progress.description == "restart 1/1"
    assert "restarts ran" not in monitor.label.value and "kept" not in monitor.label.value
    assert monitor._plots.likelihood.get_legend() is None  # one restart: nothing to tell apart


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
    assert monitor.progress.description == "restarts 2/5"
    assert f"2 of 5 restarts ran; kept restart {fit.restart + 1} (best log-likelihood)" in monitor.label.value


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
            return super()._render(chosen) if chosen is not None else b"\x89PNG"  # timing, not pictures

    monitor = SlowDrawing(mininterval=0.25, max_overhead=0.1)
    monitor._clock = clock
    iterations = 400
    model.fit(faithful, seed=0, max_iter=iterations, tol=0, callbacks=[ticking(clock, 0.125), monitor])
    fit_seconds = iterations * 0.125 + draw_seconds * monitor.n_redraws
    # drawings during the fit, and the final one, take at most a tenth of the time
    assert monitor.n_redraws >= 3
    assert monitor.n_redraws * draw_seconds <= 0.1 * fit_seconds
    # far fewer than the 200 updates of the numbers (one per 0.25 s)
    assert monitor.n_redraws < 200 / 10


def test_without_cost_the_plot_follows_plot_interval(model, faithful) -> None:
    clock = FakeClock()

    class FreeDrawing(ConvergenceMonitor):
        def _render(self, chosen):
            return super()._render(chosen) if chosen is not None else b"\x89PNG"

    monitor = FreeDrawing(mininterval=0.25, plot_interval=0.25)
    monitor._clock = clock
    monitor._plot_cost = 0.0  # known to be free, rather than guessed
    counts: list[int] = []
    model.fit(faithful, seed=0, max_iter=20, tol=0,
              callbacks=[ticking(clock, 0.125), monitor, lambda e: counts.append(monitor.n_redraws)])
    # 0.125 s per iteration: a drawing every 0.25 s from the start (iterations 1, 3, …, 19), and the final one
    drawn = [i for i in range(21) if counts[i] > (counts[i - 1] if i else 0)]
    assert drawn == list(range(1, 21, 2))
    assert monitor.n_redraws == 10 + 1


def test_plot_is_redrawn_while_a_long_fit_runs(model, faithful) -> None:
    """A fit of 30 (fake) seconds with drawings of 60 ms: the curves change during the fit, not just at its end."""
    clock = FakeClock()
    draw_seconds, step_seconds, iterations = 0.06, 0.1, 300
    images: list[bytes] = []

    class TimedDrawing(ConvergenceMonitor):
        def _render(self, chosen):
            clock.now += draw_seconds
            png = super()._render(chosen)
            images.append(png)
            return png

    monitor = TimedDrawing()  # the default throttle
    monitor._clock = clock
    during: list[int] = []
    model.fit(faithful, seed=0, max_iter=iterations, tol=0,
              callbacks=[ticking(clock, step_seconds), monitor, lambda e: during.append(monitor.n_redraws)])
    before_end = during[-1]
    assert before_end > 1  # redrawn while the fit ran
    assert monitor.n_redraws == before_end + 1  # and once at the end
    assert len(set(images)) == len(images)  # each drawing shows new iterations
    # each drawing waits max(plot_interval, t / its share) = 2 s after the last: ~15 in 30 s
    assert monitor._plot.share == pytest.approx(0.75 * monitor.max_overhead)
    assert before_end >= 0.8 * clock.now / (draw_seconds / monitor._plot.share + draw_seconds)
    assert monitor._spent <= monitor.max_overhead * clock.now  # all of the monitor's time, the final drawing too


def test_plot_waits_for_plot_interval_when_drawing_is_cheap(model, faithful) -> None:
    clock = FakeClock()
    monitor = ConvergenceMonitor(plot_interval=1.0)
    monitor._clock = clock  # drawings take no (fake) time: only plot_interval throttles
    monitor._plot_cost = 0.0  # known to be free, rather than guessed
    during: list[int] = []
    model.fit(faithful, seed=0, max_iter=100, tol=0,
              callbacks=[ticking(clock, 0.125), monitor, lambda e: during.append(monitor.n_redraws)])
    # 12.6 s of fit: a drawing every second, at 1 s, 2 s, …, 12 s
    assert during[-1] == 12
    assert monitor.n_redraws == during[-1] + 1


def test_a_slow_drawing_spaces_out_the_next_ones(model, faithful) -> None:
    clock = FakeClock()
    costs = iter([0.01, 0.01, 0.2] + [0.01] * 1000)  # the third drawing is slow, the others cheap
    drawings: list[tuple[float, float]] = []  # (start, end)

    class Drawing(ConvergenceMonitor):
        def _render(self, chosen):
            start = clock.now
            clock.now += next(costs)
            drawings.append((start, clock.now))
            return super()._render(chosen) if chosen is not None else b"\x89PNG"  # timing, not pictures

    monitor = Drawing(plot_interval=1.0, max_overhead=0.05)
    monitor._clock = clock
    model.fit(faithful, seed=0, max_iter=400, tol=0, callbacks=[ticking(clock, 0.1), monitor])
    starts, ends = np.array(drawings).T
    waits = starts[1:] - ends[:-1]  # from the end of a drawing to the start of the next
    assert 1.0 <= waits[0] < 1.2 and 1.0 <= waits[1] < 1.2  # every plot_interval while drawings are cheap
    assert waits[2] >= 0.2 / monitor._plot.share  # at least 27 times its cost after the slow drawing
    assert len(waits) > 10 and np.all(waits[3:-1] < 1.2)  # then every plot_interval again (until the final)


def test_a_fit_of_a_few_seconds_stays_within_the_budget(model, faithful) -> None:
    """The first drawing, the final one and the numbers all count: a 6 s fit with 80 ms drawings gets one."""
    clock = FakeClock()

    class Drawing(ConvergenceMonitor):
        def _render(self, chosen):
            clock.now += 0.08
            return super()._render(chosen)

        def _update_numbers(self, event):
            clock.now += 0.002  # the numbers and parameters: 2 ms four times a second
            super()._update_numbers(event)

    monitor = Drawing()
    monitor._clock = clock
    model.fit(faithful, seed=0, max_iter=120, tol=0, callbacks=[ticking(clock, 0.05), monitor])
    assert monitor.n_redraws == 2  # one while it ran (at 4.3 s), the final one
    assert monitor._spent <= monitor.max_overhead * clock.now


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


def test_parameter_panel_of_covariate_weights_and_of_several_latents() -> None:
    """Weights that depend on covariates (no probs: their coefficients are followed) and several
    latents (each has its own weights: the first one's are followed); both raised KeyError."""
    rng = np.random.default_rng(0)
    u = rng.uniform(-2, 2, 200)
    ds = xr.Dataset({"u": ("sample", u), "a": ("sample", rng.normal(size=200) + 3 * (u > 0)),
                     "b": ("sample", rng.normal(size=200))})
    concomitant = em.Model().latent("z", em.Categorical(2), covariates=["u"]).observe("a", em.Normal)
    monitor = ConvergenceMonitor()
    fit = concomitant.fit(ds, seed=0, callbacks=[monitor])
    _, parameters = monitor._plots.figure.axes
    np.testing.assert_allclose([line.get_ydata()[-1] for line in parameters.get_lines()],
                               fit.params["z"]["coef"].values.ravel())
    two = (em.Model().latent("p", em.Categorical(2)).latent("q", em.Categorical(3))
           .observe("a", em.Normal, given=["p"]).observe("b", em.Normal, given=["q"]))
    monitor = ConvergenceMonitor()
    fit = two.fit(ds, seed=0, callbacks=[monitor])
    _, parameters = monitor._plots.figure.axes
    assert [line.get_label() for line in parameters.get_lines()] == ["p=0", "p=1"]
    np.testing.assert_allclose([line.get_ydata()[-1] for line in parameters.get_lines()],
                               fit.params["p"]["probs"].values)
