"""The text fallback and how fit(monitor=True) picks between it and the widget."""

from __future__ import annotations

import io
import types

import IPython
import pytest

import emdsl as em
from emdsl.widgets import TextMonitor, auto_monitor, in_notebook_frontend


@pytest.fixture
def model() -> em.Model:
    return em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal,
                                                               name="x")


def test_monitor_true_outside_a_notebook_prints_a_text_line(model, faithful, capsys) -> None:
    fit = model.fit(faithful, seed=0, monitor=True)
    err = capsys.readouterr().err
    assert "restart 1/1  iteration 0/1000" in err
    assert f"iteration {fit.n_iter}/1000" in err
    assert err.endswith(f"converged after {fit.n_iter} iterations: log-likelihood {fit.loglik:.8g} "
                        "(restart 1 of 1)\n")


def test_auto_monitor_outside_a_kernel_is_text() -> None:
    assert not in_notebook_frontend()
    assert isinstance(auto_monitor(), TextMonitor)


def test_auto_monitor_in_a_kernel_displays_the_widget(monkeypatch) -> None:
    shell = types.SimpleNamespace(kernel=object(), config={"IPKernelApp": {}})
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objects, **_: shown.extend(objects))
    assert in_notebook_frontend()
    monitor = auto_monitor()
    assert isinstance(monitor, em.widgets.ConvergenceMonitor)
    assert shown == [monitor]


def test_terminal_ipython_is_not_a_notebook(monkeypatch) -> None:
    shell = types.SimpleNamespace(config={"TerminalIPythonApp": {}})  # no kernel
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert not in_notebook_frontend()
    assert isinstance(auto_monitor(), TextMonitor)


def test_each_restart_gets_its_own_line(model, faithful) -> None:
    out = io.StringIO()
    fit = model.fit(faithful, seed=0, n_init=3, init="random", callbacks=[TextMonitor(file=out)])
    lines = out.getvalue().split("\n")
    finished = [line.rsplit("\r", 1)[-1] for line in lines[:3]]
    for restart, line in enumerate(finished):
        assert line.startswith(f"restart {restart + 1}/3  iteration ")
    # how many ran and which one was kept, as the widget says it
    assert lines[3] == (f"converged after {fit.n_iter} iterations: log-likelihood {fit.loglik:.8g}; "
                        f"3 restarts ran; kept restart {fit.restart + 1} (best log-likelihood)")
    assert lines[4:] == [""]


def test_a_stop_during_restarts_says_how_many_ran(model, faithful) -> None:
    out = io.StringIO()
    fit = model.fit(faithful, seed=0, n_init=5, max_iter=50, tol=0, init="random",
                    callbacks=[lambda e: e.restart == 1 and e.iteration == 2 and e.request_stop(),
                               TextMonitor(file=out)])
    assert fit.stopped and fit.n_init == 2
    assert out.getvalue().endswith(f"; 2 of 5 restarts ran; kept restart {fit.restart + 1} (best log-likelihood)\n")


def test_stopped_fit_says_so(model, faithful) -> None:
    out = io.StringIO()
    fit = model.fit(faithful, seed=0, max_iter=100, tol=0,
                    callbacks=[lambda e: e.iteration == 4 and e.request_stop(), TextMonitor(file=out)])
    assert fit.stopped
    assert out.getvalue().endswith(f"\nstopped after 4 iterations: log-likelihood {fit.loglik:.8g} (restart 1 of 1)\n")


def test_text_line_is_throttled(model, faithful) -> None:
    out = io.StringIO()
    monitor = TextMonitor(file=out, mininterval=0.25)
    now = [0.0]
    monitor._clock = lambda: now[0]

    def tick(event: em.IterationEvent) -> None:
        now[0] += 0.125

    model.fit(faithful, seed=0, max_iter=10, tol=0, callbacks=[tick, monitor])
    written = [part.split("  ")[1] for part in out.getvalue().split("\r")[1:]]
    assert written == [f"iteration {i}/10" for i in range(0, 11, 2)]


def test_repr() -> None:
    assert repr(TextMonitor()) == "TextMonitor()"
