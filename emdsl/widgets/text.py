"""A compact text progress line for fits outside a notebook frontend."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from emdsl.engine.events import Callback, FitInfo, IterationEvent


class TextMonitor(Callback):
    """Prints one updating line per restart: iteration, log-likelihood, change, KL gap, speed.

    Redraws at most every ``mininterval`` seconds (and always at a restart's last
    iteration), so it costs nothing measurable in a fit.

    Examples
    --------
    >>> import io, emdsl as em
    >>> out = io.StringIO()
    >>> fit = em.Model().observe("waiting", em.Normal).fit(
    ...     em.datasets.load("faithful"), callbacks=[em.widgets.TextMonitor(file=out)])
    >>> "loglik" in out.getvalue()
    True
    """

    def __init__(self, file: IO[str] | None = None, mininterval: float = 0.25) -> None:
        self.file = file
        self.mininterval = mininterval
        self._last = 0.0
        self._info: FitInfo | None = None

    def on_fit_start(self, info: FitInfo) -> None:
        self._info = info

    def on_iteration(self, event: IterationEvent) -> None:
        now = time.perf_counter()
        last_of_restart = event.converged or event.iteration == event.max_iter
        if not last_of_restart and event.iteration and now - self._last < self.mininterval:
            return
        self._last = now
        out = self.file or sys.stderr
        delta = "" if event.delta is None else f"  Δ {event.delta:+.3g}"
        speed = event.elapsed / event.iteration if event.iteration else 0.0
        line = (f"restart {event.restart + 1}/{event.n_init}  iteration {event.iteration}/{event.max_iter}  "
                f"loglik {event.loglik:.8g}{delta}  KL {event.kl:.2g}  {speed * 1e3:.1f} ms/it")
        end = "\n" if last_of_restart else ""
        out.write("\r" + line + end)
        out.flush()

    def on_fit_end(self, fit: Any) -> None:
        out = self.file or sys.stderr
        out.write(("\n" if not fit.converged else "") + f"{'converged' if fit.converged else 'stopped'}: "
                  f"loglik {fit.loglik:.8g} after {fit.n_iter} iterations\n")
        out.flush()

    def __repr__(self) -> str:
        return "TextMonitor()"
