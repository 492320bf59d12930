"""Ctrl-C at any point of a fit returns the best restart found so far, marked stopped.

KeyboardInterrupt is raised at the n-th call of each phase of the fit (a restart's
initialisation, the E-step, the M-step, the natural parameters, a callback between
iterations and restarts), for every n the uninterrupted fit reaches. The reference is
that uninterrupted fit: restarts draw their seeds from ``SeedSequence(seed).spawn``,
so an interrupted fit must have run exactly a prefix of the same restarts and
iterations, and must keep the best of what it ran.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.engine import accelerate, estep, init, loop, mstep, orchestrate

N_INIT, MAX_ITER, SEED = 3, 4, 3


@pytest.fixture(scope="module")
def data() -> xr.Dataset:
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (30, 2)), rng.normal(4, 1, (30, 2))])
    return xr.Dataset({"x": (("sample", "feature"), x)})


@pytest.fixture(scope="module")
def model() -> em.Model:
    return em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal(covariance="diag"))


def _fit(model: em.Model, data: xr.Dataset, callbacks=(), accelerate=None) -> em.Fit:
    # init="random": every restart starts elsewhere, so which restart is kept matters. Plain EM
    # (accelerate=None) by default: PHASES are the plain loop's (loop.maximize, loop.natural_matrix).
    return model.fit(data, init="random", n_init=N_INIT, max_iter=MAX_ITER, tol=0, seed=SEED, callbacks=callbacks,
                     accelerate=accelerate)


@pytest.fixture(scope="module")
def reference(model, data) -> em.Fit:
    return _fit(model, data)


def _restart_traces(fit: em.Fit) -> list[np.ndarray]:
    restarts = fit.traces["restart"].values
    return [fit.traces["loglik"].values[restarts == r] for r in np.unique(restarts)]


class _Raiser:
    """Wraps a function: counts its calls and raises KeyboardInterrupt at call ``at`` (1-based)."""

    def __init__(self, function: Callable, at: int | None) -> None:
        self.function, self.at, self.calls = function, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.function(*args, **kwargs)


# (module or class, attribute): where each phase is looked up when the fit runs
PHASES = {
    "initialisation": (orchestrate, "initial_theta"),
    "E-step": (estep.EStep, "summarize"),
    "M-step": (loop, "maximize"),
    "M-step of the initialisation": (init, "maximize"),
    "natural parameters": (loop, "natural_matrix"),
}


def _count_calls(monkeypatch, model, data, phase: str) -> int:
    owner, name = PHASES[phase]
    counter = _Raiser(getattr(owner, name), None)
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, counter if not isinstance(owner, type) else _method(counter))
        _fit(model, data)
    return counter.calls


def _method(raiser: _Raiser) -> Callable:
    def method(self, *args, **kwargs):
        return raiser(self, *args, **kwargs)
    return method


def _check_interrupted(fit: em.Fit, reference: em.Fit, data: xr.Dataset) -> None:
    """What any interrupted fit must be: a prefix of the reference's restarts, the best kept, stopped."""
    assert fit.stopped and not fit.converged and fit.status == "stopped"
    ran, full = _restart_traces(fit), _restart_traces(reference)
    assert 1 <= len(ran) <= len(full)
    for r, trace in enumerate(ran):
        # every restart before the last ran to the end; the last one may have been cut short
        expected = full[r] if r < len(ran) - 1 else full[r][:len(trace)]
        np.testing.assert_array_equal(trace, expected)
    finals = [trace[-1] for trace in ran]
    assert fit.loglik == max(finals)
    assert fit.restart == int(np.argmax(finals))
    # the parameters returned are the ones that have that log-likelihood
    assert float(fit.score_samples(data).sum()) == pytest.approx(fit.loglik, rel=1e-9)


def _interrupted_fit(monkeypatch, model, data, phase: str, at: int) -> em.Fit | None:
    owner, name = PHASES[phase]
    raiser = _Raiser(getattr(owner, name), at)
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, raiser if not isinstance(owner, type) else _method(raiser))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return _fit(model, data)
            except KeyboardInterrupt:
                return None


# Calls of each phase made before the first restart has ℓ(θ⁽⁰⁾): an interrupt there has
# nothing to return, and KeyboardInterrupt goes on to the caller.
BEFORE_FIRST_LOGLIK = {"initialisation": 1, "E-step": 1, "M-step": 0, "M-step of the initialisation": 1,
                       "natural parameters": 1}

@pytest.mark.parametrize("phase", PHASES)
def test_an_interrupt_in_any_call_of_a_phase_keeps_the_best_restart_so_far(monkeypatch, model, data, reference,
                                                                           phase):
    calls = _count_calls(monkeypatch, model, data, phase)
    assert calls >= N_INIT  # the phase runs in every restart
    for at in range(1, calls + 1):
        fit = _interrupted_fit(monkeypatch, model, data, phase, at)
        if at <= BEFORE_FIRST_LOGLIK[phase]:
            assert fit is None, f"{phase}: call {at} returned a fit before any log-likelihood was known"
            continue
        assert fit is not None, f"{phase}: call {at} raised instead of returning the restarts so far"
        _check_interrupted(fit, reference, data)


# the phases of an accelerated fit: the E-steps (shared with the plain loop) and its own M-steps
ACCELERATED_PHASES = {"E-step": (estep.EStep, "summarize"), "M-step": (accelerate, "maximize")}


@pytest.mark.parametrize("phase", ACCELERATED_PHASES)
def test_an_interrupt_in_an_accelerated_fit_keeps_the_best_restart_so_far(monkeypatch, model, data, phase):
    reference = _fit(model, data, accelerate="squarem")
    owner, name = ACCELERATED_PHASES[phase]

    def patched(raiser: _Raiser) -> Callable:
        return _method(raiser) if isinstance(owner, type) else raiser

    counter = _Raiser(getattr(owner, name), None)
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, patched(counter))
        _fit(model, data, accelerate="squarem")
    assert counter.calls >= N_INIT
    for at in range(1, counter.calls + 1):
        with monkeypatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch.setattr(owner, name, patched(_Raiser(getattr(owner, name), at)))
            try:
                fit = _fit(model, data, accelerate="squarem")
            except KeyboardInterrupt:
                fit = None
        if at <= BEFORE_FIRST_LOGLIK[phase]:
            assert fit is None, f"{phase}: call {at} returned a fit before any log-likelihood was known"
            continue
        assert fit is not None, f"{phase}: call {at} raised instead of returning the restarts so far"
        _check_interrupted(fit, reference, data)


def test_an_interrupt_in_a_callback_between_iterations_and_restarts(model, data, reference):
    events: list[tuple[int, int]] = []

    def record(event):
        events.append((event.restart, event.iteration))

    _fit(model, data, callbacks=[record])
    assert len(events) == N_INIT * (MAX_ITER + 1)
    for at, (restart, iteration) in enumerate(events, start=1):
        calls = 0

        def interrupt(event):
            nonlocal calls
            calls += 1
            if calls == at:
                raise KeyboardInterrupt

        with pytest.warns(UserWarning, match="interrupted"):
            fit = _fit(model, data, callbacks=[interrupt])
        _check_interrupted(fit, reference, data)
        # the interrupt came after iteration `iteration` of `restart` was recorded: nothing after it ran
        ran = _restart_traces(fit)
        assert len(ran) == restart + 1 and len(ran[-1]) == iteration + 1


def test_an_interrupt_in_the_first_e_step_keeps_the_finished_restarts(monkeypatch, model, data, reference):
    # summarize's calls: MAX_ITER + 1 per restart; the first call of restart 2 is its first E-step
    at = (MAX_ITER + 1) * 2 + 1
    fit = _interrupted_fit(monkeypatch, model, data, "E-step", at)
    assert fit is not None
    _check_interrupted(fit, reference, data)
    assert fit.n_init == 2


def test_an_interrupt_in_the_initialisation_of_a_later_restart_is_not_converged(monkeypatch, model, data,
                                                                                  reference):
    fit = _interrupted_fit(monkeypatch, model, data, "initialisation", 2)
    assert fit is not None
    _check_interrupted(fit, reference, data)
    assert fit.n_init == 1 and fit.status == "stopped"


def test_an_interrupt_before_any_log_likelihood_propagates(monkeypatch, model, data):
    for phase, before in BEFORE_FIRST_LOGLIK.items():
        if before:
            with pytest.raises(KeyboardInterrupt):
                owner, name = PHASES[phase]
                with monkeypatch.context() as patch:
                    patch.setattr(owner, name, _method(_Raiser(getattr(owner, name), 1)) if isinstance(owner, type)
                                  else _Raiser(getattr(owner, name), 1))
                    _fit(model, data)


def test_mstep_module_is_what_the_loop_calls():
    # The M-step patched above is the one the loop uses (imported by name into loop).
    assert loop.maximize is mstep.maximize and init.maximize is mstep.maximize
    assert accelerate.maximize is mstep.maximize
