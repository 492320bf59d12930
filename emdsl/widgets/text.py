"""A compact text progress line for fits outside a notebook frontend."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from emdsl.engine.events import Callback, FitInfo, IterationEvent

if TYPE_CHECKING:
    from emdsl.results import Fit


class TextMonitor(Callback):
    """Prints one updating line per restart: iteration, log-likelihood, change, KL gap, speed.

    The line is rewritten in place (``\\r``) at most every ``mininterval`` seconds,
    and always at a restart's first and last iteration; a summary line follows
    the fit: how it ended, its log-likelihood and, with restarts, how many ran
    and which one was kept. It costs nothing measurable in a fit.

    Parameters
    ----------
    file : text stream, optional
        Where to write (default: ``sys.stderr`` at the time of writing).
    mininterval : float, default 0.25
        Least number of seconds between two rewrites of the line.

    Examples
    --------
    >>> import io, emdsl as em
    >>> out = io.StringIO()
    >>> fit = em.Model().observe("waiting", em.Normal).fit(
    ...     em.datasets.load("faithful"), callbacks=[em.widgets.TextMonitor(file=out)])
    >>> print(out.getvalue().splitlines()[-1])
    converged after 1 iteration: log-likelihood -1095.2888 (restart 1 of 1)
    """

    def __init__(self, file: IO[str] | None = None, mininterval: float = 0.25) -> None:
        self.file = file
        self.mininterval = mininterval
        self._clock: Callable[[], float] = time.perf_counter
        self._last = -float("inf")
        self._line_open = False
        self._info: FitInfo | None = None

    def on_fit_start(self, info: FitInfo) -> None:
        self._info = info
        self._last = -float("inf")
        self._line_open = False

    def on_iteration(self, event: IterationEvent) -> None:
        now = self._clock()
        last_of_restart = event.converged or event.iteration == event.max_iter
        if not (last_of_restart or event.iteration == 0 or now - self._last >= self.mininterval):
            return
        self._last = now
        if event.iteration == 0 and self._line_open:  # a new restart begins on a new line
            self._write("\n")
        self._write("\r" + _line(event) + ("\n" if last_of_restart else ""))
        self._line_open = not last_of_restart

    def on_fit_end(self, fit: Fit) -> None:
        requested = self._info.n_init if self._info is not None else None
        which = (f"; {restarts(fit, requested)}" if max(fit.n_init, requested or 1) > 1
                 else f" (restart {fit.restart + 1} of {fit.n_init})")
        self._write(("\n" if self._line_open else "") + f"{status(fit)}: "
                    f"log-likelihood {fit.loglik:.8g}{which}\n")
        self._line_open = False

    def _write(self, text: str) -> None:
        out = self.file or sys.stderr
        out.write(text)
        out.flush()

    def __repr__(self) -> str:
        return "TextMonitor()"


def _line(event: IterationEvent) -> str:
    delta = "" if event.delta is None else f"  Δ {event.delta:+.3g}"
    speed = event.elapsed / event.iteration if event.iteration else 0.0
    bound = "extrapolated" if getattr(event, "extrapolated", False) else f"ELBO {event.elbo:.8g}  KL {event.kl:.2g}"
    return (f"restart {event.restart + 1}/{event.n_init}  iteration {event.iteration}/{event.max_iter}  "
            f"loglik {event.loglik:.8g}{delta}  {bound}  {speed * 1e3:.1f} ms/it")


def iterations(n: int) -> str:
    """``"1 iteration"``, ``"6 iterations"``."""
    return f"{n} iteration" if n == 1 else f"{n} iterations"


def restarts(fit: Fit, requested: int | None = None) -> str:
    """How many restarts ran and which one the fit kept.

    For example ``"2 restarts ran; kept restart 2 (best log-likelihood)"``;
    ``requested`` is the ``n_init`` asked for; when a stop ended the fit before
    all of them ran, the text says ``"2 of 5 restarts ran"``.
    """
    ran = fit.n_init
    count = f"{ran} of {requested}" if requested is not None and requested > ran else f"{ran}"
    noun = "restart" if ran == 1 and count == "1" else "restarts"
    return f"{count} {noun} ran; kept restart {fit.restart + 1} (best log-likelihood)"


def status(fit: Fit) -> str:
    """How the fit ended, e.g. ``"converged after 6 iterations"`` or ``"stopped after 3 iterations"``."""
    return f"{fit.status} after {iterations(fit.n_iter)}"
