"""The live convergence widget: progress, numbers, and the ELBO staircase under ℓ(θ).

Imported on first use of ``emdsl.widgets.ConvergenceMonitor`` (it needs ipywidgets
and matplotlib, which ``import emdsl`` must not load).

Why this shape (see /work/shared/ECOSYSTEM.md): a ``VBox`` of ``IntProgress``,
``HTML`` and an ``Image`` holding a PNG drawn with ``matplotlib.figure.Figure``
(no pyplot state, no inline auto-display) is what works under strict nbval and in
static HTML; every update is a comm message, which nbval ignores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from emdsl.engine.events import Callback, FitInfo, IterationEvent
from emdsl.plot import state_colors
from emdsl.widgets._poll import CommPoller
from emdsl.widgets.text import restarts, status

if TYPE_CHECKING:
    import xarray as xr

    from emdsl.results import Fit

#: most lines drawn in the parameter panel
MAX_PARAMETER_LINES = 8

#: seconds a drawing is guessed to take until one is timed (the first, which also builds the figure,
#: takes 80–150 ms; later ones 40–100 ms)
FIRST_PLOT_COST = 0.08

#: how ``max_overhead`` is shared: each part keeps to its own share, so none can starve another
PLOT_SHARE, PARAMS_SHARE, NUMBERS_SHARE = 0.75, 0.2, 0.05

#: restarts are drawn in black and greys (the only greys among state colours are 0.5 and lighter, so the
#: weights panel beside them never shares a colour with a restart), then in dashed and dotted lines
RESTART_GREYS = (0.0, 0.25, 0.4)
RESTART_LINESTYLES = ("-", (0, (4, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)))


def restart_style(restart: int) -> tuple[tuple[float, float, float], Any]:
    """The colour (RGB) and line style of a restart (0-based) in the log-likelihood panel."""
    grey = RESTART_GREYS[restart % len(RESTART_GREYS)]
    return (grey, grey, grey), RESTART_LINESTYLES[(restart // len(RESTART_GREYS)) % len(RESTART_LINESTYLES)]


@dataclasses.dataclass
class _Throttle:
    """Keeps one task of the monitor to at most once every ``interval`` seconds and ``share`` of the fit's time.

    After a run that took ``cost`` seconds the next waits at least ``cost / share``, so the task never
    takes more than ``share`` of the time however slow it gets; and a run happens only while the time
    spent on the task so far, with ``reserve`` more runs, stays within ``share`` of the time elapsed.
    """

    interval: float
    share: float
    cost: float = 0.0  # what the last run took (a guess before the first)
    reserve: int = 1
    last: float = -float("inf")  # when the last run ended
    spent: float = 0.0

    def due(self, now: float, elapsed: float) -> bool:
        return (now - self.last >= max(self.interval, self.cost / self.share)
                and self.spent + self.reserve * self.cost <= self.share * elapsed)

    @contextlib.contextmanager
    def timing(self, clock: Callable[[], float]) -> Iterator[None]:
        start = clock()
        try:
            yield
        finally:
            self.last = clock()
            self.cost = self.last - start
            self.spent += self.cost


@dataclasses.dataclass
class _Run:
    """What one restart reported: ℓ and ELBO every iteration, parameters when sampled."""

    restart: int
    loglik: list[float] = dataclasses.field(default_factory=list)
    elbo: list[float] = dataclasses.field(default_factory=list)
    param_iteration: list[int] = dataclasses.field(default_factory=list)
    param_values: list[np.ndarray] = dataclasses.field(default_factory=list)
    last: IterationEvent | None = None

    def record(self, event: IterationEvent) -> None:
        self.loglik.append(event.loglik)
        # an accelerated proposal had no M-step from the last posterior: its step is left out (NaN
        # breaks the drawn line; it stays inside the plot)
        self.elbo.append(float("nan") if getattr(event, "extrapolated", False) else event.elbo)
        self.last = event

    def staircase(self) -> tuple[np.ndarray, np.ndarray]:
        """(t, ELBO_t) → (t, ℓ_t) → (t+1, ELBO_{t+1}) → …: M-steps slant up, E-steps close the gap."""
        t = np.arange(len(self.loglik))
        return np.repeat(t, 2), np.column_stack([self.elbo, self.loglik]).ravel()


@dataclasses.dataclass(frozen=True)
class _Tracked:
    """Which parameter the second panel follows, how to read it off a params tree, and its lines' colours."""

    title: str
    node: str
    key: str
    labels: tuple[str, ...]
    colours: tuple[tuple[float, float, float], ...]

    def read(self, tree: xr.DataTree) -> np.ndarray:
        return np.ravel(tree[self.node][self.key].values)[:MAX_PARAMETER_LINES]


def _tracked_parameter(info: FitInfo, tree: xr.DataTree) -> _Tracked | None:
    """The mixture weights π when there is a latent; else the first observed node's first parameter."""
    latent = info.model.latent_var
    if latent is not None and latent.markov is not None:  # a chain: p(next | state), in the state's colour
        states = tree[latent.name]["transition"][latent.name].values
        labels = tuple(f"{latent.name}: {a}→{b}" for a in states for b in states)[:MAX_PARAMETER_LINES]
        colours = np.repeat(state_colors(len(states)), len(states), axis=0)[:MAX_PARAMETER_LINES]
        return _Tracked(f"transition probabilities p({latent.name}_next | {latent.name})", latent.name, "transition",
                        labels, tuple(map(tuple, colours)))
    if latent is not None and len(info.model.latents) > 1:  # several latents: the first one's own weights
        latent = info.model.latents[0]
    if latent is not None and "probs" in tree[latent.name].to_dataset().data_vars:
        # one line per state, in the state's colour in every emdsl plot
        states = tree[latent.name]["probs"][latent.name].values[:MAX_PARAMETER_LINES]
        colours = state_colors(tree[latent.name]["probs"].size)[:MAX_PARAMETER_LINES]
        return _Tracked(f"mixture weights π({latent.name})", latent.name, "probs",
                        tuple(f"{latent.name}={s}" for s in states), tuple(map(tuple, colours)))
    if latent is not None:  # weights that depend on covariates: their coefficients
        return _every_entry(tree, latent.name, "coef")
    if not info.model.observed:
        return None
    node = info.model.observed[0].name
    node_ds = tree[node].to_dataset()
    return _every_entry(tree, node, "mean" if "mean" in node_ds.data_vars else str(next(iter(node_ds.data_vars))))


def _every_entry(tree: xr.DataTree, node: str, key: str) -> _Tracked:
    """One line per entry of a node's parameter (the first MAX_PARAMETER_LINES), labelled by its coordinates."""
    da = tree[node].to_dataset()[key]
    labels = []
    for index in np.ndindex(da.shape):
        parts = [str(da[d].values[i]) if d in da.coords else str(i) for d, i in zip(da.dims, index, strict=True)]
        labels.append(f"{key}[{', '.join(parts)}]" if parts else key)
    labels = labels[:MAX_PARAMETER_LINES]
    return _Tracked(f"{node}.{key}", node, key, tuple(labels), tuple(map(tuple, state_colors(len(labels)))))


class ConvergenceMonitor(widgets.VBox, Callback):
    """A live view of an EM fit: progress, ℓ(θ) and its change, ELBO, KL gap, speed, plots.

    Pass it as a callback (``model.fit(ds, callbacks=[monitor])``), or let
    ``model.fit(ds, monitor=True)`` create and display one. It shows a progress
    bar (iteration of ``max_iter``, restart r of n), the current log-likelihood,
    its change, the ELBO and the KL gap, seconds per iteration, and two plots:
    the log-likelihood per iteration of every restart with the ELBO as a
    staircase under it (each E-step closes the KL gap, each M-step raises the
    ELBO), and the mixture weights (or the first parameter) over iterations.
    In an accelerated fit (the default, ``accelerate="auto"``) an iteration that
    came through an extrapolation had no M-step from the last posterior: the
    staircase skips it, and the numbers say "extrapolated" instead of an ELBO.
    Restarts are drawn in black and greys, with a legend, so that they never
    share a colour with the states in the weights panel (whose colours are those
    of every emdsl plot). At the end the kept restart is emphasised, and the
    status says how many restarts ran and which one was kept.

    The Stop button ends the fit after the current iteration; the fit then
    returns the best parameters so far, marked ``stopped`` and not converged.

    Updates are throttled so that the monitor takes at most ``max_overhead``
    of the fit's time: three quarters of it for the plots, a fifth for reading
    the parameters (``event.params`` labels them in a few milliseconds), the
    rest for the numbers. Each of the three runs at most every ``mininterval``
    (the plots: ``plot_interval``) seconds; when a run took ``t`` seconds, the
    next waits at least ``t`` divided by its share (33 ``t`` for a drawing of
    the plots by default), and it runs only while its time so far (for the
    plots: with this drawing and the final one) stays within its share of the
    time elapsed. A long fit gets its plots redrawn every two or three seconds
    (less often where drawing is slower); one of 5–10 s once or twice; a
    shorter one (a drawing is guessed to take 80 ms until one is timed) only at
    the end, where the plots are always drawn. A fit of a fraction of a second
    shows its parameters at the first and last iteration only.

    Parameters
    ----------
    mininterval : float, default 0.25
        Least number of seconds between two updates of the numbers.
    plot_interval : float, default 1.0
        Least number of seconds between two drawings of the plots.
    max_overhead : float, default 0.04
        Largest share of the fit's wall time the monitor may take (a fit too
        short to afford even the final drawing still gets it).
    poll_interval : float, default 0.1
        Seconds between two looks for a click on Stop while the fit runs.
    figsize : (float, float), default (8.5, 3)
        Size of the plot in inches, drawn at ``dpi`` pixels per inch.
    dpi : int, default 96

    Attributes
    ----------
    progress : ipywidgets.IntProgress
    stop_button : ipywidgets.Button
    label : ipywidgets.HTML
    image : ipywidgets.Image
        PNG of the plots.
    n_redraws : int
        Number of times the plot was drawn.

    Examples
    --------
    >>> import emdsl as em
    >>> monitor = em.widgets.ConvergenceMonitor()
    >>> model = em.Model().latent("z", em.Categorical(2)).observe(
    ...     ["eruptions", "waiting"], em.MultivariateNormal, name="x")
    >>> fit = model.fit(em.datasets.load("faithful"), seed=0, callbacks=[monitor])
    >>> monitor
    ConvergenceMonitor(converged after 5 iterations, log-likelihood -1130.26)
    >>> monitor.progress.value == monitor.progress.max
    True
    """

    def __init__(
        self,
        *,
        mininterval: float = 0.25,
        plot_interval: float = 1.0,
        max_overhead: float = 0.04,
        poll_interval: float = 0.1,
        figsize: tuple[float, float] = (8.5, 3.0),
        dpi: int = 96,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mininterval = mininterval
        self.plot_interval = plot_interval
        self.max_overhead = max_overhead
        self.figsize = figsize
        self.dpi = dpi
        self.n_redraws = 0
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="EM",
                                            style={"description_width": "initial"},
                                            layout=widgets.Layout(flex="1 1 auto"))
        self.stop_button = widgets.Button(
            description="Stop", disabled=True, layout=widgets.Layout(width="auto"),
            tooltip="End the fit after the current iteration; it keeps the best parameters so far")
        self.stop_button.on_click(self._on_stop_click)
        self.label = widgets.HTML(value=_html_line("waiting for the fit to start"))
        # natural size, shrinking with a narrow page (a flex column would otherwise stretch it, blurred)
        self.image = widgets.Image(format="png", layout=widgets.Layout(
            display="none", width=f"{round(figsize[0] * dpi)}px", max_width="100%", height="auto"))
        self.children = [widgets.HBox([self.progress, self.stop_button]), self.label, self.image]
        self._clock: Callable[[], float] = time.perf_counter
        self._poller = CommPoller(poll_interval)
        self._plots: _Plots | None = None
        self._plot_cost = FIRST_PLOT_COST  # seconds a drawing takes, kept from fit to fit
        self._reset(None)

    # -- the callback protocol ---------------------------------------------------------------
    def on_fit_start(self, info: FitInfo) -> None:
        """Clear the display for a new fit and start listening for Stop."""
        self._reset(info)
        if self._plots is not None:
            self._plots.clear()
        self.progress.max = max(info.max_iter, 1)
        self.progress.value = 0
        self.progress.bar_style = ""
        self.stop_button.disabled = False
        self.stop_button.description = "Stop"
        self._poller.start()
        self._spent += self._clock() - self._start

    def on_iteration(self, event: IterationEvent) -> None:
        """Record the iteration; redraw if the throttle allows; honour a click on Stop."""
        now = self._clock()
        self._poller.poll()
        if self._stop_clicked and not self._stop_sent:
            event.request_stop()
            self._stop_sent = True
        run = self._run_for(event)
        run.record(event)
        elapsed = now - self._start
        # each restart's first iteration always shows: it is where its staircase and weights begin
        if event.iteration == 0 or self._numbers.due(now, elapsed):
            with self._numbers.timing(self._clock):
                self._update_numbers(event)
        if event.iteration == 0 or self._params.due(now, elapsed):
            self._sample_params(run, event)
        if self._plot.due(now, elapsed):
            self._draw_plot(chosen=None)
        self._spent += self._clock() - now

    def on_fit_end(self, fit: Fit) -> None:
        """Show the result: final numbers and one last plot."""
        start = self._clock()
        self._poller.stop()
        self._fit = fit
        for run in self._runs:
            if run.last is not None:
                self._sample_params(run, run.last)
        self._show_result(fit)
        self._draw_plot(chosen=fit.restart)
        self._spent += self._clock() - start

    # -- state -----------------------------------------------------------------------------
    def _reset(self, info: FitInfo | None) -> None:
        self._info = info
        self._runs: list[_Run] = []
        self._tracked: _Tracked | None = None
        self._fit: Fit | None = None
        self._stop_clicked = False
        self._stop_sent = False
        self._start = self._clock()
        self._spent = 0.0  # all the monitor's time in this fit
        share = self.max_overhead
        self._numbers = _Throttle(self.mininterval, NUMBERS_SHARE * share)
        self._params = _Throttle(self.mininterval, PARAMS_SHARE * share)
        # the first drawing waits plot_interval too; each commits to the final one
        self._plot = _Throttle(self.plot_interval, PLOT_SHARE * share, cost=self._plot_cost, reserve=2,
                               last=self._start)

    def _run_for(self, event: IterationEvent) -> _Run:
        if not self._runs or self._runs[-1].restart != event.restart:
            if self._runs and self._runs[-1].last is not None:
                self._sample_params(self._runs[-1], self._runs[-1].last)
            self._runs.append(_Run(event.restart))
        return self._runs[-1]

    def _on_stop_click(self, _: widgets.Button) -> None:
        if self._info is None or self._fit is not None:
            return
        self._stop_clicked = True
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping…"

    # -- drawing ---------------------------------------------------------------------------
    def _update_numbers(self, event: IterationEvent) -> None:
        self.progress.value = min(event.iteration, self.progress.max)
        self.progress.description = f"restart {event.restart + 1}/{event.n_init}"
        self.label.value = _html_line(_iteration_text(event))

    def _sample_params(self, run: _Run, event: IterationEvent) -> None:
        """Keep the followed parameters at this iteration (``event.params`` builds a tree: not every iteration)."""
        if run.param_iteration and run.param_iteration[-1] == event.iteration:
            return
        with self._params.timing(self._clock):
            tree = event.params
            if self._tracked is None and self._info is not None:
                self._tracked = _tracked_parameter(self._info, tree)
            if self._tracked is not None:
                run.param_iteration.append(event.iteration)
                run.param_values.append(self._tracked.read(tree))

    def _draw_plot(self, chosen: int | None) -> None:
        with self._plot.timing(self._clock):
            self.image.value = self._render(chosen)
            self.image.layout.display = None
        self.n_redraws += 1
        if self.n_redraws == 1:
            # a monitor's first drawing also lays out the new figure (and, once a session, loads fonts):
            # it counts in the time spent, but does not predict the next drawings' cost
            self._plot.cost = min(self._plot.cost, FIRST_PLOT_COST)
        self._plot_cost = self._plot.cost

    def _render(self, chosen: int | None) -> bytes:
        """The plots as PNG; ``chosen`` (the restart the fit kept) is drawn emphasised."""
        if self._plots is None:
            self._plots = _Plots(self.figsize, self.dpi)
        return self._plots.render(self._runs, self._tracked, chosen)

    def _show_result(self, fit: Fit) -> None:
        if fit.converged:
            self.progress.value = self.progress.max
            self.progress.bar_style = "success"
        else:
            self.progress.value = min(fit.n_iter, self.progress.max)
            self.progress.bar_style = "warning"
        requested = self._info.n_init if self._info is not None else fit.n_init
        if max(requested, fit.n_init) > 1:  # not "restart 1/2" once both ran: the label names the kept one
            self.progress.description = f"restarts {fit.n_init}/{requested}"
        else:
            self.progress.description = "restart 1/1"
        self.stop_button.disabled = True
        self.stop_button.description = "Stopped" if fit.stopped else "Stop"
        self.label.value = _html_line(_result_text(fit, requested))

    def __repr__(self) -> str:
        # Only counts and a rounded ℓ: the same fit gives the same text (nbval compares it).
        if self._fit is not None:
            return f"ConvergenceMonitor({status(self._fit)}, log-likelihood {self._fit.loglik:.6g})"
        if self._runs and self._runs[-1].last is not None:
            event = self._runs[-1].last
            return (f"ConvergenceMonitor(restart {event.restart + 1}/{event.n_init}, iteration "
                    f"{event.iteration}/{event.max_iter}, log-likelihood {event.loglik:.6g})")
        return "ConvergenceMonitor(not started)"


# -- text ------------------------------------------------------------------------------------
def _html_line(text: str) -> str:
    return f"<span style='font-family: monospace; white-space: pre-wrap'>{html.escape(text)}</span>"


def _speed(elapsed: float, iterations: int) -> str:
    return f"{elapsed / iterations:.3g} s/iteration" if iterations else "– s/iteration"


def _iteration_text(event: IterationEvent) -> str:
    delta = "–" if event.delta is None else f"{event.delta:+.3g}"
    bound = ("extrapolated (no ELBO step)" if getattr(event, "extrapolated", False)
             else f"ELBO {event.elbo:.4f} · KL gap {event.kl:.3g}")
    return (f"iteration {event.iteration}/{event.max_iter} · log-likelihood {event.loglik:.4f} "
            f"(Δ {delta}) · {bound} · {_speed(event.elapsed, event.iteration)}")


def _result_text(fit: Fit, requested: int) -> str:
    trace = fit.trace
    elbo, kl, elapsed = (float(trace[key].values[-1]) for key in ("elbo", "kl", "time"))
    delta = float(trace["loglik"].values[-1] - trace["loglik"].values[-2]) if fit.n_iter else None
    change = "–" if delta is None else f"{delta:+.3g}"
    restart = f" · {restarts(fit, requested)}" if max(requested, fit.n_init) > 1 else ""
    return (f"{status(fit)}{restart} · log-likelihood {fit.loglik:.4f} (Δ {change}) · "
            f"ELBO {elbo:.4f} · KL gap {kl:.3g} · {_speed(elapsed, fit.n_iter)}")


# -- plots -----------------------------------------------------------------------------------
class _Plots:
    """The two panels, kept between drawings: lines get new data rather than being redrawn from scratch.

    Drawing cost is mostly matplotlib's per-artist Python work, so the figure
    holds few artists: fixed title, label and legend positions (no layout
    search per drawing), and the restart legend is rebuilt only when a restart
    begins or the kept one is known.
    """

    def __init__(self, figsize: tuple[float, float], dpi: int) -> None:
        self.figure = Figure(figsize=figsize, dpi=dpi)
        # an Agg canvas of its own: its renderer, and the text layouts cached for it, last between drawings
        self.canvas = FigureCanvasAgg(self.figure)
        self.likelihood, self.parameters = self.figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        # the right margin holds the parameter legend, which would hide lines inside the axes
        self.figure.subplots_adjust(left=0.09, right=0.86, bottom=0.17, top=0.88, wspace=0.25)
        self.clear()

    def clear(self) -> None:
        self._restarts: dict[int, tuple[Any, Any]] = {}  # restart -> (staircase, ℓ) lines
        self._legend_key: tuple[int, int | None] | None = None  # (restarts, kept) the legend shows
        self._parameter_lines: list[Any] = []
        for ax in (self.likelihood, self.parameters):
            ax.cla()
            # tick labels are most of a drawing's cost: a few suffice
            ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(4))
            ax.tick_params(labelsize=8)
            ax.set_xlabel("iteration", fontsize=9)
            ax.xaxis.set_label_coords(0.5, -0.12)
        # right-aligned: the y offset text (e.g. "1e6" for large ℓ) sits top-left
        self.likelihood.set_title("log-likelihood ℓ(θ) (thick), ELBO staircase under it", fontsize=9, y=1.0,
                                  pad=4, loc="right")
        self.parameters.set_title("parameters", fontsize=9, y=1.0, pad=4)

    def render(self, runs: list[_Run], tracked: _Tracked | None, chosen: int | None) -> bytes:
        self._draw_likelihood(runs, chosen)
        shown = next((run for run in runs if run.restart == chosen), runs[-1] if runs else None)
        self._draw_parameters(tracked, shown)
        buffer = io.BytesIO()
        # compress_level 1: faster than the default and hardly bigger for line plots
        self.canvas.print_png(buffer, pil_kwargs={"compress_level": 1})
        return buffer.getvalue()

    def _draw_likelihood(self, runs: list[_Run], chosen: int | None) -> None:
        ax = self.likelihood
        for run in runs:
            if run.restart not in self._restarts:
                color, linestyle = restart_style(run.restart)
                steps, = ax.plot([], [], color=color, lw=0.8)
                loglik, = ax.plot([], [], color=color, ls=linestyle, marker=".", ms=3)
                self._restarts[run.restart] = (steps, loglik)
            steps, loglik = self._restarts[run.restart]
            steps.set_data(*run.staircase())
            loglik.set_data(np.arange(len(run.loglik)), run.loglik)
            emphasis = chosen is None or run.restart == chosen
            steps.set_alpha(0.7 if emphasis else 0.25)
            loglik.set_alpha(1.0 if emphasis else 0.35)
            loglik.set_linewidth(1.8 if emphasis else 1.0)
            loglik.set_marker("." if len(run.loglik) <= 60 else "")
        self._restart_legend(chosen, n_init=max((run.last.n_init for run in runs if run.last), default=1))
        ax.relim()
        ax.autoscale_view()

    def _restart_legend(self, chosen: int | None, n_init: int) -> None:
        """With restarts, one entry per restart (its ℓ line), the kept one marked; bottom right, under the
        converged curves."""
        key = (len(self._restarts), chosen)
        if n_init < 2 or key == self._legend_key:
            return
        self._legend_key = key
        lines = [loglik for _, loglik in self._restarts.values()]
        labels = [f"restart {restart + 1}" + (" (kept)" if restart == chosen else "") for restart in self._restarts]
        self.likelihood.legend(lines, labels, fontsize=7, loc="lower right", ncols=1 if len(labels) <= 4 else 2,
                               frameon=False, handlelength=2.5)

    def _draw_parameters(self, tracked: _Tracked | None, run: _Run | None) -> None:
        ax = self.parameters
        if tracked is None or run is None or not run.param_iteration:
            return
        if not self._parameter_lines:
            self._parameter_lines = [ax.plot([], [], marker=".", ms=4, lw=1.2, label=label, color=colour)[0]
                                     for label, colour in zip(tracked.labels, tracked.colours, strict=True)]
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
        values = np.asarray(run.param_values)
        for column, line in enumerate(self._parameter_lines):
            line.set_data(run.param_iteration, values[:, column])
        ax.set_title(f"{tracked.title}, restart {run.restart + 1}", fontsize=9, y=1.0, pad=4)
        ax.relim()
        ax.autoscale_view()
