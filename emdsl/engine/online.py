r"""Online EM over minibatches: stepwise EM and incremental EM (``fit(..., method=...)``).

Both are generalized EM (DESIGN.md §1) on minibatches of rows; neither needs more than
one minibatch's data at a time, so they suit streams (:meth:`Fit.partial_fit`) and data
too large for many full passes.

**Stepwise EM** (Cappé & Moulines 2009; Liang & Klein 2009). The running statistics
``s`` (per unit of weight, K × S) follow a stochastic approximation of the E-step,

.. math::

    s_t = (1 - \gamma_t)\, s_{t-1} + \gamma_t\, \hat s(B_t; \theta_{t-1}), \qquad
    \gamma_t = (t + 1)^{-\alpha}, \qquad \theta_t = \bar\theta(W s_t),

where :math:`\hat s(B; \theta)` are the responsibility-weighted statistics of minibatch
B divided by its weight, :math:`\bar\theta` is the ordinary M-step (moment matching) on
statistics scaled to the data's total weight W, and α = ``step_decay`` ∈ (½, 1] (so that
Σγ = ∞ and Σγ² < ∞; Cappé & Moulines' conditions for convergence to a stationary point
of ℓ). s₀ is the full-data statistics at θ⁽⁰⁾ (one pass, which also gives ℓ(θ⁽⁰⁾)).

*What is checked*: ℓ itself is not monotone along stochastic steps, so EM's check is
replaced by the one property each step must have exactly: the M-step maximizes the
running surrogate :math:`\bar Q_t(\theta) = \langle H(\theta), W s_t\rangle + \log p(\theta)`,
so :math:`\bar Q_t(\theta_t) \ge \bar Q_t(\theta_{t-1})` up to rounding. A failure is a
bug in an M-step (``MonotonicityError``). The trace records, per epoch (one pass over
the minibatches), the *running objective* :math:`\sum_b \ell_b(\theta_{\text{used for } b})
+ \log h`: the log-likelihood of each minibatch at the parameters it was visited with
(no extra pass); a final full pass gives the last entry, the exact ℓ(θ̂). The fit stops
after an epoch that raised the running objective by at most ``tol``·|ℓ| (with steps
shrinking, the parameters have stopped moving beyond the steps' own noise).

**Incremental EM** (Neal & Hinton 1998). Each minibatch keeps its own posterior's
statistics S_b and entropy; a step replaces one minibatch's by a fresh E-step at θ_t,
then runs the M-step on Σ_b S_b. The ELBO F = ⟨H(θ), Σ_b S_b⟩ + Σ_b ℍ_b + log h never
decreases — the E-step on b maximizes F over q_b, the M-step over θ — and both halves are
checked at every step, with the same rounding slack as batch EM. The trace records F at
the end of each epoch (elbo; loglik = elbo there, as ℓ ≥ F is not computed), then the
exact ℓ(θ̂) from a final pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from emdsl.compile import Plan, blocks
from emdsl.data import is_chunked
from emdsl.engine.estep import Summary, engine
from emdsl.engine.events import IterationEvent, dispatch
from emdsl.engine.loop import RestartResult, StopFlag, _check_start, prior_slack, rounding_slack, within_tol
from emdsl.engine.mstep import Theta, expected_complete_loglik, log_prior, maximize, natural_matrix
from emdsl.errors import ModelError, MonotonicityError

Method = Literal["em", "stepwise", "incremental"]
METHODS = ("em", "stepwise", "incremental")
#: the default step decay α: Cappé & Moulines' and Liang & Klein's experiments favour 0.5 < α ≤ 0.7
STEP_DECAY = 0.6
#: minibatches per epoch when no batch_size is given (in-memory data; dask data: one per chunk)
DEFAULT_BATCHES = 32


def check_method(method: Any, batch_size: Any, step_decay: Any, accelerate: Any) -> str:
    """Validate the online settings of :meth:`Model.fit`; returns the method."""
    if method not in METHODS:
        raise ModelError(f"fit(method=...): expected one of {list(METHODS)}, got {method!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer)
                                   or batch_size < 1):
        raise ModelError(f"fit(batch_size=...): must be a positive integer or None, got {batch_size!r}")
    if isinstance(step_decay, bool) or not isinstance(step_decay, int | float | np.floating) or not (
            0.5 < float(step_decay) <= 1.0):
        raise ModelError(f"fit(step_decay=...): must be in (0.5, 1] (Σγ = ∞ and Σγ² < ∞), got {step_decay!r}")
    if method != "em" and accelerate is not None:
        raise ModelError(f"fit(method={method!r}, accelerate={accelerate!r}): acceleration extrapolates full EM "
                         "steps; online methods take minibatch steps. Use one or the other")
    return str(method)


def check_dtype(dtype: Any) -> np.dtype:
    """``dtype=None | "float64" | "float32"`` as a numpy dtype, or ``ModelError``."""
    if dtype is None:
        return np.dtype(np.float64)
    try:
        chosen = np.dtype(dtype)
    except TypeError:
        chosen = None
    if chosen not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ModelError(f"fit(dtype=...): expected 'float64' or 'float32', got {dtype!r}")
    return chosen


@dataclasses.dataclass
class OnlineState:
    """What a stepwise fit carries on to :meth:`Fit.partial_fit`: the running statistics and the step count."""

    stats: np.ndarray | None
    steps: int
    step_decay: float
    batch_size: int | None

    def step(self) -> float:
        """γ_t for the next update (t counts updates since s₀)."""
        self.steps += 1
        return float((self.steps + 1) ** -self.step_decay)


def rows_plan(plan: Plan, start: int, stop: int) -> Plan:
    """The plan restricted to rows [start, stop): views of in-memory data, slices of dask data."""
    nodes = []
    for node in plan.nodes:
        a, b = np.searchsorted(node.partial_rows, [start, stop])
        local = dataclasses.replace(node, sources=[s[start:stop] for s in node.sources],
                                    aux={k: v[start:stop] for k, v in node.aux.items()})
        local.partial_rows = node.partial_rows[a:b] - start
        local.partial_pattern = node.partial_pattern[a:b]
        nodes.append(local)
    return dataclasses.replace(plan, n_samples=stop - start, sample_coords={}, nodes=nodes,
                               weights=None if plan.weights is None else plan.weights[start:stop],
                               clamp=None if plan.clamp is None else plan.clamp[start:stop],
                               sequences=None if plan.sequences is None else plan.sequences.within(start, stop))


def batches(plan: Plan, batch_size: int | None) -> list[tuple[int, int]]:
    """Minibatch row ranges: ``batch_size`` rows, or (by default) each dask chunk, or N / 32 rows.

    A Markov latent's minibatches are runs of whole sequences (its independent units) of about
    that many rows (steps), a longer sequence a minibatch of its own; a dask chunk is one already.
    """
    if plan.sequences is not None and plan.sequences.n_sequences < 2:
        raise ModelError("fit(method=...): online EM over a Markov latent takes minibatches of whole sequences, "
                         "and the data are one sequence (its steps are not independent); fit it with method='em'")
    if batch_size is None and is_chunked(plan):
        bounds = np.cumsum((0,) + tuple(plan.nodes[0].sources[0].chunks[0]))
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    size = batch_size or max(1, -(-plan.n_samples // DEFAULT_BATCHES))
    if plan.sequences is not None:
        return plan.sequences.blocks(int(size))
    return list(blocks(plan.n_samples, int(size)))


def _summarize(plan: Plan, ranges: tuple[int, int], H: np.ndarray, theta: Theta) -> Summary:
    with engine(rows_plan(plan, *ranges)) as estep:
        return estep.summarize(H, theta)


def _surrogate(plan: Plan, theta: Theta, stats: np.ndarray) -> tuple[float, float, np.ndarray]:
    """⟨H(θ), stats⟩ + log p(θ), the prior's magnitude, and H."""
    H = natural_matrix(plan, theta)
    prior, size = log_prior(plan, theta)
    return expected_complete_loglik(H, stats) + prior, size, H


def run_online(
    plan: Plan,
    estep: Any,
    theta: Theta,
    *,
    method: str,
    batch_size: int | None,
    step_decay: float,
    rng: np.random.Generator,
    restart: int,
    n_init: int,
    max_iter: int,
    tol: float,
    callbacks: Sequence[Any],
    stop: StopFlag,
    label_params: Callable[[Theta], Any],
) -> RestartResult | None:
    """Stepwise or incremental EM from θ⁽⁰⁾ for at most ``max_iter`` epochs; see the module docstring."""
    start = time.perf_counter()
    ranges = batches(plan, batch_size)
    H = natural_matrix(plan, theta)
    try:
        if method == "incremental":
            parts = [_summarize(plan, r, H, theta) for r in ranges]
            summary = sum(parts[1:], parts[0])
        else:
            summary = estep.summarize(H, theta)
    except KeyboardInterrupt:
        stop.interrupt()
        return None
    loglik = summary.loglik + plan.log_base_total
    prior = log_prior(plan, theta)[0]
    _check_start(plan, H, loglik, prior)
    result = RestartResult(theta, [loglik], [loglik], [0.0], [time.perf_counter() - start],
                           [rounding_slack(plan, H, summary.magnitude)], counts=summary.stats[:, 0].copy(),
                           extrapolated=[False], e_steps=[1], logpost=[loglik + prior])
    total = float(summary.stats[:, 0].sum())  # W: the data's total weight
    state = OnlineState(summary.stats / total, 0, float(step_decay), batch_size)
    e_steps = 1

    def report(delta: float | None) -> None:
        current = result.theta
        event = IterationEvent(restart, n_init, result.n_iter, max_iter, result.loglik[-1], result.elbo[-1],
                               result.kl[-1], delta, result.time[-1], result.converged,
                               lambda: label_params(current), stop.request, False)
        dispatch(callbacks, "on_iteration", event)

    try:
        report(None)
        previous = None
        for epoch in range(1, max_iter + 1):
            if stop.requested:
                result.stopped = True
                break
            running = 0.0
            for b in rng.permutation(len(ranges)):
                if method == "incremental":
                    theta, gained = _incremental_step(plan, parts, int(b), ranges, theta, epoch)
                else:
                    theta, gained = stepwise_step(plan, state, ranges[b], theta, total, epoch)
                running += gained
                e_steps += 1
            if method == "incremental":
                summary = sum(parts[1:], parts[0])
                objective = (expected_complete_loglik(natural_matrix(plan, theta), summary.stats)
                             + summary.entropy + plan.log_base_total)
            else:
                objective = running + plan.log_base_total
            if not np.isfinite(objective):  # the trace would carry it, and the stopping test never hold
                raise MonotonicityError(f"{method} EM, epoch {epoch}: the epoch's objective is {objective!r}, "
                                        "not finite; this is a bug")
            result.theta = theta
            result.loglik.append(objective)
            result.elbo.append(objective)
            result.kl.append(0.0)
            result.logpost.append(objective + log_prior(plan, theta)[0])
            result.slack.append(result.slack[-1])
            result.time.append(time.perf_counter() - start)
            result.extrapolated.append(False)
            result.e_steps.append(e_steps)
            delta = None if previous is None else objective - previous
            result.converged = previous is not None and within_tol(previous, objective, tol)
            previous = objective
            report(delta)
            if result.converged:
                break
        _final_pass(plan, estep, result, start, e_steps)
        report(None)
    except KeyboardInterrupt:
        stop.interrupt()
        result.stopped = True
    if method == "incremental":  # what partial_fit continues from: every minibatch's latest statistics
        state = OnlineState(sum(parts[1:], parts[0]).stats / total, e_steps - 1, float(step_decay), batch_size)
    result.online = state  # type: ignore[attr-defined]
    return result


def _final_pass(plan: Plan, estep: Any, result: RestartResult, start: float, e_steps: int) -> None:
    """One full E-step at θ̂: the exact ℓ as the trace's last entry, and the final counts."""
    H = natural_matrix(plan, result.theta)
    summary = estep.summarize(H, result.theta)
    loglik = summary.loglik + plan.log_base_total
    result.loglik.append(loglik)
    result.elbo.append(loglik)
    result.kl.append(0.0)
    result.logpost.append(loglik + log_prior(plan, result.theta)[0])
    result.slack.append(rounding_slack(plan, H, summary.magnitude))
    result.time.append(time.perf_counter() - start)
    result.extrapolated.append(False)
    result.e_steps.append(e_steps + 1)
    result.counts = summary.stats[:, 0].copy()
    result.final_pass = True
    # whether an M-step at the final statistics holds a variance at its floor (a collapsed component)
    result.floored = maximize(plan, summary.stats, result.theta)[1]


def stepwise_step(plan: Plan, state: OnlineState, rows: tuple[int, int], theta: Theta, total: float,
                  step: int) -> tuple[Theta, float]:
    """One stepwise-EM update from the minibatch ``rows``: (θ_t, ℓ_b(θ_{t−1}) without log h)."""
    H = natural_matrix(plan, theta)
    part = _summarize(plan, rows, H, theta)
    weight = float(part.stats[:, 0].sum())
    if weight <= 0:
        return theta, part.loglik
    gamma = state.step()
    fresh = part.stats / weight
    state.stats = fresh if state.stats is None else (1.0 - gamma) * state.stats + gamma * fresh
    stats = state.stats * total
    new_theta = _checked_m_step(plan, theta, H, stats, f"stepwise EM, step {state.steps}",
                                "the running surrogate ⟨H(θ), W s_t⟩ + log p(θ)")
    return new_theta, part.loglik


def _incremental_step(plan: Plan, parts: list[Summary], b: int, ranges: list[tuple[int, int]], theta: Theta,
                      epoch: int) -> tuple[Theta, float]:
    """Neal & Hinton's step: a fresh E-step on minibatch b, then the M-step on every minibatch's statistics."""
    H = natural_matrix(plan, theta)
    old = parts[b]
    new = _summarize(plan, ranges[b], H, theta)
    slack = rounding_slack(plan, H, new.magnitude + old.magnitude)
    before = expected_complete_loglik(H, old.stats) + old.entropy
    if new.loglik < before - slack:
        raise MonotonicityError(f"incremental EM, epoch {epoch}, minibatch {b}: the E-step lowered the "
                                f"minibatch's ELBO from {before!r} to {new.loglik!r} (beyond {slack:.3g}); "
                                "the posterior maximizes it, so this is a bug in the E-step")
    parts[b] = new
    stats = sum((p.stats for p in parts[1:]), parts[0].stats.copy())
    new_theta = _checked_m_step(plan, theta, H, stats, f"incremental EM, epoch {epoch}", "the ELBO")
    return new_theta, new.loglik


def _checked_m_step(plan: Plan, theta: Theta, H: np.ndarray, stats: np.ndarray, where: str, what: str) -> Theta:
    """The M-step on ``stats``, checked: it must not lower ⟨H(θ), stats⟩ + log p(θ) (``what``) beyond rounding."""
    new_theta, _ = maximize(plan, stats, theta)
    before, size_before, _ = _surrogate(plan, theta, stats)
    after, size_after, H_new = _surrogate(plan, new_theta, stats)
    slack = rounding_slack(plan, np.maximum(np.abs(H), np.abs(H_new)), 0.0) + prior_slack(plan, size_before,
                                                                                         size_after)
    if after < before - slack:
        raise MonotonicityError(f"{where}: the M-step lowered {what} from {before!r} to {after!r} (beyond the "
                                f"rounding bound {slack:.3g}); the M-step must maximize it, so this is a bug")
    return new_theta


def partial_fit(plan: Plan, theta: Theta, state: OnlineState | None, batch_size: int | None,
                step_decay: float, total: float) -> tuple[Theta, OnlineState, float, float]:
    """Stepwise-EM updates from the rows of ``plan`` (a new chunk of a stream), in order.

    Returns θ, the state, the chunk's running objective (Σ_b ℓ_b + log h) and its weight.
    ``total`` is the weight the statistics are scaled to (the weight seen so far).
    """
    state = state or OnlineState(None, 0, float(step_decay), batch_size)
    running = 0.0
    for rows in batches(plan, state.batch_size if batch_size is None else batch_size):
        theta, gained = stepwise_step(plan, state, rows, theta, total, state.steps)
        running += gained
    return theta, state, running + plan.log_base_total, plan.total_weight


@dataclasses.dataclass
class StreamState:
    """A fit's online state (``Fit._online``): running statistics, step count, minibatch size, step decay."""

    state: OnlineState | None
    batch_size: int | None
    step_decay: float


def _stream_from_batch_fit(fit: Any) -> StreamState:
    """The running statistics a fit without any (``method="em"``) continues from: those of its own
    E-step over its training data at θ̂ (which the M-step maps back to θ̂), with the step count of
    one epoch of default minibatches over them, as if a stepwise fit had just passed over the data.

    Without them the stream restarted from the new chunk's first minibatch alone, which threw the
    fit away (a converged two-component fit, given 40 of its own rows, collapsed to a variance of
    1e-3). A fit loaded from a file holds neither its data nor running statistics.
    """
    if fit.data is None:
        raise ModelError("partial_fit: this fit was loaded from a file and keeps no running statistics of the "
                         "data it was fitted to, so a new chunk cannot be weighed against them; refit on the "
                         "data seen so far (fit(..., method='stepwise')) and continue that fit")
    plan, theta, H = fit._compiled(fit.data, weights=fit.weights, priors=True)
    summary = _summarize(plan, (0, plan.n_samples), H, theta)
    epoch = batches(plan, None)
    state = OnlineState(summary.stats / plan.total_weight, len(epoch), STEP_DECAY, len(range(*epoch[0])))
    return StreamState(state, state.batch_size, STEP_DECAY)


def continue_fit(fit: Any, data: Any, weights: Any = None) -> Any:
    """:meth:`Fit.partial_fit`'s body: stepwise-EM updates from a new chunk, in the fit's units and levels."""
    import xarray as xr

    from emdsl.engine.orchestrate import labeller

    stream = getattr(fit, "_online", None) or _stream_from_batch_fit(fit)
    # the fit's priors shape its M-steps here too (a weak one scaled from the new chunk)
    plan, theta, _ = fit._compiled(data, weights=weights, priors=True)
    weight = plan.total_weight
    start = time.perf_counter()
    theta, state, running, weight = partial_fit(plan, theta, stream.state, stream.batch_size, stream.step_decay,
                                                fit.weight_total + weight)
    fit._online = StreamState(state, stream.batch_size, stream.step_decay)
    fit.params = labeller(plan)(theta)
    # The prequential log-likelihood: each chunk scored at the parameters it arrived to.
    fit.loglik = float(fit.loglik + running)
    fit.n_samples += plan.n_samples
    fit.weight_total += weight
    traces = fit.traces
    mine = np.flatnonzero(traces["restart"].values == fit.restart)
    last = traces.isel(step=[int(mine[-1])])
    new = last.assign({"loglik": ("step", [running]), "elbo": ("step", [running]), "kl": ("step", [0.0]),
                       "time": ("step", [float(last["time"].values[0]) + time.perf_counter() - start])})
    new = new.assign_coords(iteration=("step", last["iteration"].values + 1))
    if "logpost" in new.variables:  # the running objective; log p(θ) of a stream is not tracked
        new = new.assign_coords(logpost=("step", [running]))
    order = [int(i) for i in range(traces.sizes["step"]) if i <= mine[-1]]
    rest = [int(i) for i in range(traces.sizes["step"]) if i > mine[-1]]
    fit.traces = xr.concat([traces.isel(step=order), new, traces.isel(step=rest)], dim="step",
                           combine_attrs="override")
    fit.traces.attrs["method"] = "stepwise"
    for cached in ("trace", "posterior"):
        fit.__dict__.pop(cached, None)
    return fit
