"""The EM loop, written once: iterate, check the guarantee, record, report, stop."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from emdsl.compile import Plan
from emdsl.engine.estep import EStep
from emdsl.engine.events import IterationEvent, dispatch
from emdsl.engine.mstep import Theta, expected_complete_loglik, maximize, natural_matrix
from emdsl.errors import DegenerateComponentWarning, MonotonicityError

#: ulps of rounding allowed per unit of magnitude summed, times the depth of the sums
_ULPS = 16.0


@dataclasses.dataclass
class StopFlag:
    """Set by a callback (``event.request_stop()``) or an interrupt; read between iterations."""

    requested: bool = False
    #: the stop came from Ctrl-C (KeyboardInterrupt), not from a callback
    interrupted: bool = False

    def request(self) -> None:
        self.requested = True

    def interrupt(self) -> None:
        self.requested = self.interrupted = True


@dataclasses.dataclass
class RestartResult:
    """One restart's parameters (internal units) and trace."""

    theta: Theta
    loglik: list[float]
    elbo: list[float]
    kl: list[float]
    time: list[float]
    #: the rounding bound of each iteration's check (DESIGN.md §3, "Objective")
    slack: list[float]
    converged: bool = False
    stopped: bool = False
    #: the last M-step's floored variances: (node, component, smallest variance)
    floored: list[tuple[str, int, float]] = dataclasses.field(default_factory=list)
    #: responsibility each component holds at the last E-step (N_k, weighted)
    counts: np.ndarray | None = None

    @property
    def n_iter(self) -> int:
        return len(self.loglik) - 1

    @property
    def final(self) -> float:
        return self.loglik[-1]


def run_em(
    plan: Plan,
    estep: EStep,
    theta: Theta,
    elbo0: float | None,
    *,
    restart: int,
    n_init: int,
    max_iter: int,
    tol: float,
    callbacks: Sequence[Any],
    stop: StopFlag,
    label_params: Callable[[Theta], Any],
) -> RestartResult | None:
    """Run EM from θ⁽⁰⁾ for at most ``max_iter`` M-steps (None if interrupted before ℓ(θ⁽⁰⁾) was known).

    Every iteration checks the two halves of EM's guarantee (DESIGN.md §1): the
    M-step does not lower the ELBO below ℓ(θ⁽ᵗ⁻¹⁾), and the new log-likelihood is
    not below the ELBO (KL ≥ 0); together, ℓ never decreases.
    """
    start = time.perf_counter()
    previous_H = natural_matrix(plan, theta)
    try:
        summary = estep.summarize(previous_H, theta)
    except KeyboardInterrupt:
        stop.interrupt()  # nothing of this restart is evaluated yet: the caller keeps the earlier ones
        return None
    loglik = summary.loglik + plan.log_base_total
    elbo = loglik if elbo0 is None else elbo0
    result = RestartResult(theta, [loglik], [elbo], [loglik - elbo], [time.perf_counter() - start],
                           [rounding_slack(plan, previous_H, summary.magnitude)], counts=summary.stats[:, 0].copy())
    collapsed: set[tuple[str, int]] = set()

    def report(delta: float | None) -> None:
        current = result.theta
        event = IterationEvent(restart, n_init, result.n_iter, max_iter, result.loglik[-1], result.elbo[-1],
                               result.kl[-1], delta, result.time[-1], result.converged,
                               lambda: label_params(current), stop.request)
        dispatch(callbacks, "on_iteration", event)

    try:
        report(None)
        for iteration in range(1, max_iter + 1):
            if stop.requested:
                result.stopped = True
                break
            theta, floored = maximize(plan, summary.stats, result.theta)
            _warn_collapsed(plan, floored, iteration, collapsed)
            result.floored = floored
            H = natural_matrix(plan, theta)
            elbo = expected_complete_loglik(H, summary.stats) + plan.log_base_total + summary.entropy
            new_summary = estep.summarize(H, theta)
            new_loglik = new_summary.loglik + plan.log_base_total
            slack = max(rounding_slack(plan, H, new_summary.magnitude),
                        rounding_slack(plan, previous_H, summary.magnitude))
            _check_guarantee(iteration, loglik, elbo, new_loglik, slack)
            result.slack.append(slack)
            delta, loglik, summary, previous_H = new_loglik - loglik, new_loglik, new_summary, H
            result.theta = theta
            result.counts = summary.stats[:, 0].copy()
            result.loglik.append(loglik)
            result.elbo.append(elbo)
            result.kl.append(loglik - elbo)
            result.time.append(time.perf_counter() - start)
            result.converged = tol > 0 and delta <= tol * abs(loglik)
            report(delta)
            if result.converged:
                break
    except KeyboardInterrupt:
        stop.interrupt()
        result.stopped = True
    return result


def rounding_slack(plan: Plan, H: np.ndarray, magnitude: float) -> float:
    """How far the computed ℓ and ELBO may stray from their exact values through rounding alone.

    Both are sums of many terms: H Φ over the S statistics of every sample (bounded by
    Σ_s max_k |H_ks| Σ_n w_n |Φ_sn|, however they cancel), the log-sum-exp of each sample
    (``magnitude``) and log h. Each term carries a relative error of order ε, so the slack
    is ε times the magnitudes actually summed, not a fraction of |ℓ|, which can be small
    while the sums that produce it are large (a component collapsing onto a point).
    """
    eps = np.finfo(float).eps
    terms = float(np.abs(H).max(axis=0) @ plan.phi_magnitude) + magnitude + abs(plan.log_base_total)
    # Sums inside a block run over up to 16k rows in BLAS (no pairwise summation): √(S·n)
    # is the typical growth of their error; blocks then add up in a short tree.
    depth = np.sqrt(plan.n_stats * min(plan.n_samples, 16384.0)) + np.log2(plan.n_samples + 2)
    return float(_ULPS * eps * depth * terms)


def _check_guarantee(iteration: int, previous: float, elbo: float, loglik: float, slack: float) -> None:
    if loglik < previous - slack:
        raise MonotonicityError(f"iteration {iteration}: the log-likelihood decreased from {previous!r} to "
                                f"{loglik!r} (by {previous - loglik:.3g}, beyond the rounding bound "
                                f"{slack:.3g}); EM cannot do this, so this is a bug")
    if elbo < previous - slack:
        raise MonotonicityError(f"iteration {iteration}: the M-step lowered the ELBO from {previous!r} to "
                                f"{elbo!r} (beyond the rounding bound {slack:.3g}); this is a bug in an M-step")
    if loglik < elbo - slack:
        raise MonotonicityError(f"iteration {iteration}: the ELBO {elbo!r} exceeds the log-likelihood "
                                f"{loglik!r} (KL < 0 beyond the rounding bound {slack:.3g}); this is a bug "
                                "in the E-step")


def _warn_collapsed(plan: Plan, floored: list[tuple[str, int, float]], iteration: int,
                    seen: set[tuple[str, int]]) -> None:
    nodes = {node.name: node for node in plan.nodes}
    for name, k, smallest in floored:
        if (name, k) in seen:
            continue
        seen.add((name, k))
        node = nodes[name]
        if k < 0:
            what = "the shared (tied) covariance"
        elif plan.latent is not None:
            what = f"component {plan.latent.name}={plan.latent.family.states[k]!r}"
        else:
            what = "the single component"
        warnings.warn(
            f"{node.where()}: {what} collapsed at iteration {iteration} (smallest variance "
            f"{max(smallest, 0.0):.3g} of the data's); it is held at the floor {node.family.floor:g}. "
            "Consider fewer components, or look for duplicated values.",
            DegenerateComponentWarning, stacklevel=5)


def restart_seeds(seed: int, n_init: int) -> list[np.random.Generator]:
    """Independent generators for the restarts, all determined by ``seed``."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n_init)]
