"""The EM loop, written once: iterate, check the guarantee, record, report, stop."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from emdsl.compile import Plan, blocks, phi_rows
from emdsl.data import is_chunked
from emdsl.engine.estep import EStep
from emdsl.engine.events import IterationEvent, dispatch
from emdsl.engine.mstep import (
    Theta,
    expected_complete_loglik,
    log_prior,
    maximize,
    natural_matrix,
)
from emdsl.errors import DegenerateComponentWarning, ModelError, MonotonicityError

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
    #: per iteration: whether the point is an accelerated proposal rather than an EM step's output
    extrapolated: list[bool] = dataclasses.field(default_factory=list)
    #: per iteration: E-steps spent so far in this restart (the work, for comparing methods)
    e_steps: list[int] = dataclasses.field(default_factory=list)
    #: per iteration: the objective EM climbs, ℓ(θ) + log p(θ) with priors (= loglik without)
    logpost: list[float] = dataclasses.field(default_factory=list)

    #: the last entry is a full pass at θ̂ for its exact ℓ, not an iteration (online EM)
    final_pass: bool = False
    #: the accelerated scheme the restart ran ("qn", "squarem", "daarem"; "none": plain EM steps only,
    #: also when "auto" never left them)
    accelerated_with: str = "none"

    @property
    def n_iter(self) -> int:
        """Iterations run: the entries after the start, less a final pass."""
        return len(self.loglik) - 1 - int(self.final_pass)

    @property
    def final(self) -> float:
        return self.loglik[-1]

    @property
    def objectives(self) -> list[float]:
        """Per iteration, the objective EM climbs: the log-posterior with priors, else the log-likelihood."""
        return self.logpost if len(self.logpost) == len(self.loglik) else self.loglik

    @property
    def objective(self) -> float:
        """The final value of the objective (:attr:`objectives`)."""
        return self.objectives[-1]


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
    accelerate: str | None = None,
) -> RestartResult | None:
    """Run EM from θ⁽⁰⁾ for at most ``max_iter`` M-steps (None if interrupted before ℓ(θ⁽⁰⁾) was known).

    Every iteration checks the two halves of EM's guarantee (DESIGN.md §1): the
    M-step does not lower the ELBO below ℓ(θ⁽ᵗ⁻¹⁾), and the new log-likelihood is
    not below the ELBO (KL ≥ 0); together, ℓ never decreases. With ``accelerate``
    ("squarem" or "daarem", see ``accelerate.py``) an iteration is an accepted point
    instead, at most ``max_iter`` of them, with every EM step inside checked the same way
    and the accepted sequence checked on the same objective (the log-posterior with priors).

    With priors (MAP-EM) the M-step maximizes Q + log p(θ), and the quantity that never
    decreases is the log-posterior ℓ(θ) + log p(θ) (DESIGN.md §3, "Objective"): the checks
    and the convergence test use it, with the rounding slack of the prior's own terms
    added, and ``logpost`` records it next to ``loglik``.
    """
    start = time.perf_counter()
    try:
        previous_H = natural_matrix(plan, theta)
        summary = estep.summarize(previous_H, theta)
    except KeyboardInterrupt:
        stop.interrupt()  # nothing of this restart is evaluated yet: the caller keeps the earlier ones
        return None
    loglik = summary.loglik + plan.log_base_total
    elbo = loglik if elbo0 is None else elbo0
    result = RestartResult(theta, [loglik], [elbo], [loglik - elbo], [time.perf_counter() - start],
                           [rounding_slack(plan, previous_H, summary.magnitude)], counts=summary.stats[:, 0].copy(),
                           extrapolated=[False], e_steps=[1])
    prior, prior_size = log_prior(plan, theta)
    result.logpost.append(loglik + prior)
    _check_start(plan, previous_H, loglik, prior)
    collapsed: set[tuple[str, int]] = set()

    def report(delta: float | None) -> None:
        current = result.theta
        event = IterationEvent(restart, n_init, result.n_iter, max_iter, result.loglik[-1], result.elbo[-1],
                               result.kl[-1], delta, result.time[-1], result.converged,
                               lambda: label_params(current), stop.request, result.extrapolated[-1])
        dispatch(callbacks, "on_iteration", event)

    try:
        report(None)
        if accelerate is not None:
            # imported here: the accelerated loop builds on this module's checks
            from emdsl.engine import accelerate as accelerated

            first = accelerated.point(plan, theta, previous_H, summary)
            accelerated.run(accelerate, plan, estep, first, result=result, max_iter=max_iter, tol=tol, stop=stop,
                            report=report, clock_start=start,
                            warn_collapsed=lambda floored, i: _warn_collapsed(plan, floored, i, collapsed))
            return result
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
            new_prior, new_prior_size = log_prior(plan, theta)
            slack = max(rounding_slack(plan, H, new_summary.magnitude),
                        rounding_slack(plan, previous_H, summary.magnitude)) + prior_slack(plan, prior_size,
                                                                                           new_prior_size)
            # ℓ + log p never decreases (MAP-EM); without a prior both log p are 0 and this is ℓ's check.
            _check_guarantee(iteration, loglik + prior, elbo + new_prior, new_loglik + new_prior, slack,
                             objective="log-posterior" if prior_size or new_prior_size else "log-likelihood")
            result.slack.append(slack)
            before = loglik + prior  # the objective, whose change is the convergence test
            change = new_loglik - loglik  # the log-likelihood's, which events report next to it
            loglik, summary, previous_H, prior, prior_size = new_loglik, new_summary, H, new_prior, new_prior_size
            result.logpost.append(loglik + prior)
            result.theta = theta
            result.counts = summary.stats[:, 0].copy()
            result.loglik.append(loglik)
            result.elbo.append(elbo)
            result.kl.append(loglik - elbo)
            result.time.append(time.perf_counter() - start)
            result.extrapolated.append(False)
            result.e_steps.append(iteration + 1)
            result.converged = within_tol(before, loglik + prior, tol)
            report(change)
            if result.converged:
                break
    except KeyboardInterrupt:
        stop.interrupt()
        result.stopped = True
    return result


def within_tol(before: float, after: float, tol: float) -> bool:
    """EM's convergence test: the objective changed from ``before`` to ``after`` by at most
    tol·|after| (never with tol = 0, which runs to ``max_iter``).

    The one stopping rule of every loop: plain EM's, the online methods' over an epoch, and
    the accelerated one's on an EM step (and on a small accepted or predicted change, to
    decide when to take that step).
    """
    return bool(tol > 0 and after - before <= tol * abs(after))


def rounding_slack(plan: Plan, H: np.ndarray, magnitude: float) -> float:
    """How far the computed ℓ and ELBO may stray from their exact values through rounding alone.

    Both are sums of many terms: H Φ over the S statistics of every sample (bounded by
    Σ_s max_k |H_ks| Σ_n w_n |Φ_sn|, however they cancel), the log-sum-exp of each sample
    (``magnitude``) and log h. Each term carries a relative error of order ε, so the slack
    is ε times the magnitudes actually summed, not a fraction of |ℓ|, which can be small
    while the sums that produce it are large (a component collapsing onto a point).
    """
    eps = np.finfo(plan.dtype).eps  # float32's when the E-step runs in single precision (engine/precision.py)
    reached = magnitude + abs(plan.log_base_total)
    terms = _summed_magnitude(plan, H, reached) + reached
    # Sums inside a block run over up to 16k rows in BLAS (no pairwise summation): √(S·n)
    # is the typical growth of their error; blocks then add up in a short tree.
    depth = np.sqrt(plan.n_stats * min(plan.n_samples, 16384.0)) + np.log2(plan.n_samples + 2)
    return float(_ULPS * eps * depth * terms)


#: a state whose L lies this far below the sample's best has responsibility exactly 0: exp underflows
#: below −745, and the other terms of its log-weight (log π, log A) are each above log(tiny) ≈ −708
_NEGLIGIBLE = 1e4
#: the cheap bound is kept while it is within this factor of the sizes that reach ℓ (on ordinary
#: data it is 1–100 times them); beyond, it counts terms of states no sample can be in
_LOOSE = 1e6


def _summed_magnitude(plan: Plan, H: np.ndarray, reached: float) -> float:
    """A bound on Σ_n w_n Σ_s |H_ks Φ_sn| over the terms that reach ℓ and the ELBO.

    Cheap form: Σ_s max_k |H_ks| Σ_n w_n |Φ_sn|. It overflows, or dwarfs the sizes that
    do reach ℓ (``reached``: the samples' log-likelihoods and log h), when a value near the
    largest float meets a coefficient near or above 1 (Gamma's rate, an Exponential's): that
    product is about −1e308 or −∞ in L, the state's probability for that sample is exactly 0,
    and the term reaches neither ℓ nor the statistics. Then the bound is taken per sample over
    the states whose L is finite and within :data:`_NEGLIGIBLE` of the sample's best (a
    finite L of −1e308 has responsibility exactly 0 too, and two of them summed to ∞),
    max_k Σ_s |H_ks| |Φ_sn| (one more pass over the data, only in that case), which bounds
    both ℓ's and the ELBO's terms (each weighs the states by responsibilities that sum to 1).
    The cheap bound gave a slack of 5.7e294 on a fit with ℓ = −775.6 (an Exponential chain
    with one value at 1.7e308): a check that could never fail.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        cheap = float(np.abs(H).max(axis=0) @ plan.phi_magnitude)
    if np.isfinite(cheap) and cheap <= _LOOSE * max(reached, plan.n_samples):
        return cheap
    S = plan.n_stats
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.abs(H[:, S:]).max(axis=0, initial=0.0) @ plan.phi_magnitude[S:]) if H.shape[1] > S else 0.0
    if is_chunked(plan):  # the same pass, chunk by chunk (it returned the cheap ∞ before: a vacuous check)
        from emdsl.engine import chunked

        return total + chunked.reaching_magnitude(plan, H[:, :S])
    return total + reaching_magnitude(plan, H[:, :S])


def reaching_magnitude(plan: Plan, H: np.ndarray) -> float:
    """Σ_n w_n max_k Σ_s |H_ks Φ_sn| over the states whose L reaches ℓ (finite, within
    :data:`_NEGLIGIBLE` of the sample's best), for a plan in memory or one chunk's; H is K × S."""
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        absolute = np.abs(H)
        for a, b in blocks(plan.n_samples, phi_rows(plan.n_stats)):
            phi = np.empty((plan.n_stats, b - a))
            plan.read(a, b, phi, np.empty(plan.max_D * (b - a)))
            L = H @ phi
            finite = np.isfinite(L)
            best = np.where(finite, L, -np.inf).max(axis=0)
            reaching = finite & (L >= best - _NEGLIGIBLE)
            sizes = np.where(reaching, absolute @ np.abs(phi), 0.0).max(axis=0)
            total += float(sizes.sum() if plan.weights is None else sizes @ plan.weights[a:b])
    return total


def prior_slack(plan: Plan, *magnitudes: float) -> float:
    """The rounding bound of log p(θ) before and after a step: ε times the magnitude of its terms.

    Its terms are few (a handful per parameter), but a covariance's log-determinant and
    trace carry the error of a D × D factorisation, hence the factor D + 1.
    """
    return float(_ULPS * np.finfo(float).eps * (plan.max_D + 1) * sum(magnitudes))


def _check_guarantee(iteration: int, previous: float, elbo: float, loglik: float, slack: float,
                     objective: str = "log-likelihood") -> None:
    """ℓ never decreases, through ELBO ≥ previous and ℓ ≥ ELBO (with priors, each + log p(θ))."""
    elbo_name = "ELBO" if objective == "log-likelihood" else "ELBO + log-prior"
    # Comparisons with NaN are false and −∞ ≥ −∞ − ∞ holds: without this, a non-finite value
    # would pass every check below (a singular weak prior once made every log-posterior −∞).
    if not (np.isfinite(loglik) and np.isfinite(previous) and not np.isnan(elbo) and not np.isnan(slack)):
        raise MonotonicityError(f"iteration {iteration}: a value EM's check reads is not finite (the previous "
                                f"{objective} {previous!r}, the {elbo_name} {elbo!r}, the {objective} {loglik!r}, "
                                f"the rounding bound {slack!r}), so that the check that the {objective} never "
                                "decreases would hold vacuously; this is a bug")
    if loglik < previous - slack:
        raise MonotonicityError(f"iteration {iteration}: the {objective} decreased from {previous!r} to "
                                f"{loglik!r} (by {previous - loglik:.3g}, beyond the rounding bound "
                                f"{slack:.3g}); EM cannot do this, so this is a bug")
    if elbo < previous - slack:
        raise MonotonicityError(f"iteration {iteration}: the M-step lowered the {elbo_name} from {previous!r} to "
                                f"{elbo!r} (beyond the rounding bound {slack:.3g}); this is a bug in an M-step")
    if loglik < elbo - slack:
        raise MonotonicityError(f"iteration {iteration}: the {elbo_name} {elbo!r} exceeds the {objective} "
                                f"{loglik!r} (KL < 0 beyond the rounding bound {slack:.3g}); this is a bug "
                                "in the E-step")


def _check_start(plan: Plan, H: np.ndarray, loglik: float, prior: float) -> None:
    """ℓ(θ⁽⁰⁾) (and log p(θ⁽⁰⁾)) must be finite: EM's check compares every later value with them.

    Names the nodes whose natural parameters overflow there: any non-finite one of a
    continuous family, NaN or +∞ of a discrete one (−∞ is the log of a probability 0, which
    is allowed). A starting variance of 1e-320 passes "positive", but its reciprocal
    overflows (the fit used to run to max_iter with ℓ = NaN).
    """
    def overflows(node: Any) -> bool:
        block = H[:, node.offset:node.offset + node.n_rows]
        return bool(np.any(~np.isfinite(block) if node.family.continuous else np.isnan(block) | (block == np.inf)))

    for what, value in (("log-likelihood", loglik), ("log-prior", prior)):
        if np.isfinite(value):
            continue
        overflowing = [node.where() for node in plan.nodes if overflows(node)]
        where = (f": the natural parameters of {', '.join(overflowing)} are not finite there, e.g. from a "
                 "variance so small that its reciprocal exceeds the largest float") if overflowing else ""
        raise ModelError(f"fit: the {what} of the starting parameters is {value!r}, not a number EM can "
                         f"climb from{where}; check the starting values (init=...), or the data's extreme values")


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
        else:
            what = plan.component_label(node, k)
        warnings.warn(
            f"{node.where()}: {what} collapsed at iteration {iteration} (smallest variance "
            f"{max(smallest, 0.0):.3g} of the data's); it is held at the floor {node.family.floor:g}. "
            "Consider fewer components, or look for duplicated values.",
            DegenerateComponentWarning, stacklevel=5)


def restart_seeds(seed: int, n_init: int) -> list[np.random.Generator]:
    """Independent generators for the restarts, all determined by ``seed``."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n_init)]
