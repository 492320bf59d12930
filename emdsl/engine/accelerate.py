"""Accelerated EM that keeps the guarantee: quasi-Newton, SQUAREM and DAAREM over the plain EM map.

EM is a fixed-point iteration θ ↦ M(θ) (one E-step, one M-step) that converges
linearly, slowly when components overlap or data are missing. The schemes here
propose points and keep a proposal only when the objective does not fall:

* **Quasi-Newton** (``"qn"``, :mod:`emdsl.engine.quasi_newton`): L-BFGS on the objective
  from H₀ = γ·I_c⁻¹, the complete-data information that is EM's own metric, with the score
  by Fisher's identity, both differenced from the E-step's statistics (no extra pass).
  A proposal is kept when its objective is at least ELBO(q, M(θ)) (+ log p): what EM's
  step from θ is sure to gain. Otherwise its secant pair (its gradient is free once its
  E-step is done) corrects the model and the step is solved once more; if that fails too,
  the plain EM step is taken and the model restarts, after a pause of plain steps that
  doubles with each failure in a row (``_PAUSE_MAX``). One E-step per accepted proposal.
  Where the model predicts at most tol·|ℓ| left to gain, the E-step goes to EM's step
  instead, and EM's test decides (``_predicted_within_tol``).

* **SQUAREM** (Varadhan & Roland 2008, scheme S3, as R's SQUAREM runs it): from the
  accepted θ₀, the EM step θ₁ = M(θ₀) (recorded as an iteration of its own) and
  θ₂ = M(θ₁) (its M-step only); with r = θ₁ − θ₀ and v = θ₂ − 2θ₁ + θ₀, the step
  length a = ‖r‖/‖v‖ (α = −a in the paper's sign), the proposal θ' = θ₀ + 2a r + a² v
  (a = 1 gives θ₂), and if ℓ(θ') ≥ ℓ(θ₁) the stabilizing EM step M(θ'); else θ₂.
  Three E-steps a cycle, two recorded iterations.
* **DAAREM** (Henderson & Varadhan 2019): damped Anderson acceleration of the
  residual M(θ) − θ over the last few accepted points, restarted every ``order``
  steps, the damping relaxed while proposals keep being accepted. One E-step per
  accepted proposal, two per rejected one (then the EM step is taken).

**Why this is still (generalized) EM.** Every accepted point θ with its E-step
q = p(z | x, θ) satisfies ELBO(q, θ) = ℓ(θ) ≥ ℓ(θ_prev) = ELBO(q_prev, θ_prev): a move
of the pair (q, θ) that does not lower the ELBO, which is what DESIGN.md §1 asks of a
generalized-EM step (in Neal & Hinton's view of EM as coordinate ascent on the ELBO,
any move that does not lower it). It is not a partial M-step with q fixed, so the
proof is the acceptance test itself, checked at run time: a proposal that would
lower ℓ is discarded for the plain EM step. A SQUAREM point must beat the EM step θ₁
from the same point, and a quasi-Newton point the ELBO that EM's step from the same
point reaches (ℓ(M(θ)) ≥ ELBO(q, M(θ))), so either gains at least what EM is sure to,
and EM's convergence argument carries over. Every M-step inside is checked exactly as in the plain loop
(ELBO ≥ previous ℓ, ℓ ≥ ELBO), and the accepted sequence once more.

**Constraints.** Proposals live in the parameterization the families already
use (weights, probabilities, variances, covariance matrices, rates), as the
affine combination above, moved onto a family's structure where its M-step's outputs
share one that an affine combination does not keep (``mstep.on_model``: mclust's
constrained covariances). A proposal outside the valid set (``family.check_params``
fails, a covariance has no Cholesky factor, a value is not finite, a row of
probabilities is off 1 by more than rounding, a value beyond a cap of the M-step:
``within_m_step_bounds``) is shrunk towards the EM point (a halfway
towards 1) until it is valid; nothing is clipped. Rows that sum to 1 are divided by
their sums only to undo rounding (see ``_Layout``). Held (fixed) parameters are equal
in every EM point, so r = v = 0 there and they stay exactly (quasi-Newton has no direction
along them). Quasi-Newton halves its step until valid, and meets rows of probabilities
first: a row at a vertex of its simplex follows EM, another moves at most 90% of the way
to its boundary (``_qn_proposal``). A proposal is also refused
when the M-step from it has to floor a variance or cap a shape (``_unfloored_m_step``):
the floors bound the set EM maximizes over, and beyond them ℓ can exceed anything EM
reaches (a collapsing component), so that the next EM step would lose ground. The fit never *ends* on
a proposal: convergence is declared only on an EM step whose change of ℓ is at most
tol·|ℓ| (plain EM's test), a plain one or SQUAREM's stabilizing step θ' ↦ M(θ'), so the
final parameters are an M-step's output, inside its constraint set (floors included).

**The trace.** Every accepted point is one iteration: a plain EM step from the
previous one, with the ELBO of its M-step (the staircase), or a point that came
through a proposal, flagged ``extrapolated``: for SQUAREM the output of the
stabilizing M-step, whose ELBO is a genuine bound but from the proposal's posterior,
not q⁽ᵗ⁻¹⁾; for DAAREM and quasi-Newton the proposal itself, which no M-step produced, so it records
elbo = loglik and kl = 0. Plots leave extrapolated points out of the staircase. No
NaN reaches the results. ``e_steps`` counts the E-steps (passes over the data) spent.

**The objective.** Acceptance reads the objective from :func:`evaluate` only: ℓ(θ),
or with priors (MAP-EM) the log-posterior ℓ(θ) + log p(θ), the quantity the plain loop
monitors (DESIGN.md §3, "Objective"), with the rounding slack of the prior's terms
added. A proposal is compared with the EM step on that same objective, every EM step
inside is checked as the plain loop checks it (ELBO + log p(M(θ)) ≥ the previous
objective, and the new objective ≥ ELBO + log p), and the convergence test is plain
EM's on it. The argument above holds with ELBO + log p(θ) for the ELBO: the MAP M-step
maximizes it over θ with q fixed, and at q = p(z | x, θ) it equals ℓ(θ) + log p(θ).
Markov latents and dask sources go through ``estep.summarize`` like the plain loop.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from emdsl.compile import Plan
from emdsl.engine import quasi_newton
from emdsl.engine.estep import EStep, Summary
from emdsl.engine.loop import _check_guarantee, prior_slack, rounding_slack, within_tol
from emdsl.engine.mstep import (
    Theta,
    expected_complete_loglik,
    has_prior,
    log_prior,
    maximize,
    natural_matrix,
    on_model,
)
from emdsl.errors import ImpossibleDataError, ModelError, MonotonicityError

Method = Literal["squarem", "daarem", "qn"]
#: the values ``fit(accelerate=...)`` takes besides None (plain EM) and "auto"
METHODS: tuple[str, ...] = ("squarem", "daarem", "qn")
#: what ``accelerate="auto"`` runs once EM is slow (see :data:`AUTO_RATE`): quasi-Newton where its
#: differences cost less than an E-step (:data:`QN_EVALUATION_COST`), else SQUAREM. Measured with
#: benchmarks/bench_accelerate.py (docs/design.md, "Accelerated EM", has the tables): quasi-Newton needs
#: 2–7× fewer E-steps than SQUAREM on the Hasselblad mixture, the overlapping Gaussians and the
#: mixtures with holes, and fewer on both HMMs; DAAREM ranges from 2.8× fewer E-steps than plain EM
#: (overlapping Gaussians) to 56× (Hasselblad), and is 29% slower on Old Faithful.
DEFAULT: Method = "qn"
#: "auto" runs quasi-Newton only where one iteration's differences cost less than an E-step, both
#: counted, not timed (so that a fit takes the same path on every machine): an evaluation of H
#: (``natural_matrix``: 30–200 µs, Python's overhead mostly) counts as this many entries of an
#: E-step's N × K × S table (0.7–20 ns each here: 0.7 for a mixture of Gaussians without holes, 3 in
#: an HMM's forward–backward pass, 20 with missing values). Measured: a 3-state HMM with Normal
#: emissions on 1e5 steps spends about 6 evaluations per iteration (quasi-Newton), six 3-D Gaussians
#: on 6e5 rows about 50 (quasi-Newton), three 4-D ones with holes on 2e4 rows about 110 (SQUAREM:
#: its time was within 10% of quasi-Newton's there, fewer E-steps but each dearer), and small data
#: SQUAREM. It also needs at most :data:`QN_DIRECTIONS` free directions (its model is dense in them).
QN_EVALUATION_COST = 50_000
QN_DIRECTIONS = 300
#: "auto" takes plain EM steps while EM converges fast: until the objective's gain over one step
#: exceeds this fraction of the previous step's (EM's linear rate, the largest fraction of missing
#: information). At rate r plain EM divides the error by 1/r per E-step, and a SQUAREM cycle costs
#: three E-steps; measured (benchmarks/bench_accelerate.py, plain EM's first ratios): Old Faithful
#: stays below 0.06 and converges in 6 E-steps; SQUAREM takes 6 too, but 5–10% more time (the
#: proposals' own work: extrapolating, checking, shrinking, on a fit of 10 ms); the slow
#: cases pass 0.3 within three steps (Hasselblad 0.50, overlapping Gaussians 0.33, 20% missing 0.32,
#: HMM 0.39) and then climb towards 0.8–1.
AUTO_RATE = 0.25
#: DAAREM's ridge λ is searched up to here: beyond, 10·λ would overflow
_RIDGE_MAX = 1e300


def check_method(accelerate: Any) -> Method | Literal["auto"] | None:
    """``accelerate`` validated: "auto", None (plain EM) or one of :data:`METHODS`; else ``ModelError``."""
    if accelerate is None or (isinstance(accelerate, str) and accelerate in (*METHODS, "auto")):
        return accelerate
    choices = ", ".join([*map(repr, (*METHODS, "auto")), "None"])
    raise ModelError(f"fit(accelerate=...): expected one of {choices} (None is plain EM), got {accelerate!r}")


def resolve(accelerate: Method | Literal["auto"] | None, *, online: bool,
            max_iter: int = 1) -> Method | Literal["auto"] | None:
    """"auto" stays "auto" for full-batch EM (:func:`run`: plain EM steps while EM converges fast,
    then :data:`DEFAULT`); plain EM, quietly, where acceleration does not apply: online methods
    (minibatch steps, nothing to extrapolate; an explicit choice is refused there) and
    ``max_iter=0`` (no step at all). Priors are accelerated too (the objective is then the
    log-posterior, see :func:`evaluate`)."""
    if accelerate != "auto":
        return accelerate
    return None if online or max_iter == 0 else "auto"


@dataclasses.dataclass
class Point:
    """A parameter point with its E-step: all that acceptance and the next M-step need."""

    theta: Theta
    H: np.ndarray
    summary: Summary
    #: the objective EM climbs: ℓ(θ) + log p(θ) with priors, else ℓ(θ)
    objective: float
    #: rounding bound of this E-step's sums (see loop.rounding_slack), plus the prior's (loop.prior_slack)
    slack: float
    #: ℓ(θ) = log p(x | θ) including log h (what the trace records as loglik)
    loglik: float
    #: log p(θ) (0 without priors)
    log_prior: float


def evaluate(plan: Plan, estep: EStep, theta: Theta) -> Point:
    """The objective at θ, from one E-step; the single place acceptance reads it.

    With priors it is the log-posterior ℓ(θ) + log p(θ), as in the plain loop, and the
    slack adds the rounding bound of log p's terms.
    """
    H = natural_matrix(plan, theta)
    summary = estep.summarize(H, theta)
    return point(plan, theta, H, summary)


def point(plan: Plan, theta: Theta, H: np.ndarray, summary: Summary) -> Point:
    """The :class:`Point` of θ from its E-step (``summary``, computed with ``H``)."""
    loglik = summary.loglik + plan.log_base_total
    prior, size = log_prior(plan, theta)
    slack = rounding_slack(plan, H, summary.magnitude) + (prior_slack(plan, size) if size else 0.0)
    return Point(theta, H, summary, loglik + prior, slack, loglik, prior)


@dataclasses.dataclass
class Accepted:
    """One accepted iteration: the point, what the trace records, and whether it ends the fit."""

    point: Point
    elbo: float
    slack: float
    extrapolated: bool
    floored: list[tuple[str, int, float]]
    converged: bool = False


# -- flattening and validity --------------------------------------------------------------
class _Layout:
    """θ (node → param → array) ↔ one flat vector, in a fixed order and shape.

    ``unit_rows`` marks the parameters whose rows (last axis) sum to 1 in every EM point
    given: weights and probabilities. An affine combination keeps those sums exactly in
    exact arithmetic, but with step lengths a in the hundreds its rounding (≈ a²·ε) moves
    them by 1e-11, which inflates ℓ by that much times the number of samples (the
    families take log π and A = 0 as normalized) and once let an EM step from an
    accepted proposal "decrease" ℓ. :meth:`theta` divides such rows by their sums when
    they are off by rounding only; a real violation (> 1e-9) makes the point invalid.
    """

    def __init__(self, theta: Theta, *others: Theta) -> None:
        self.keys = [(name, key) for name in theta for key in sorted(theta[name])]
        self.shapes = [np.shape(theta[name][key]) for name, key in self.keys]
        stops = np.cumsum([int(np.prod(shape, dtype=int)) for shape in self.shapes], dtype=int)
        #: per parameter: its (start, stop) in the flat vector
        self.bounds = [(int(start), int(stop)) for start, stop in zip([0, *stops[:-1]], stops, strict=True)]
        self.size = int(stops[-1]) if len(stops) else 0
        self.unit_rows = [bool(shape) and all(_unit_rows(point[name][key]) for point in (theta, *others))
                          for (name, key), shape in zip(self.keys, self.shapes, strict=True)]

    def flat(self, theta: Theta) -> np.ndarray:
        # broadcast: a starting value may have been given in a broadcastable shape
        return np.concatenate([np.broadcast_to(np.asarray(theta[name][key], dtype=float), shape).ravel()
                               for (name, key), shape in zip(self.keys, self.shapes, strict=True)])

    def theta(self, x: np.ndarray) -> Theta | None:
        """The parameters of a flat vector (None if a row that must sum to 1 does not)."""
        out: Theta = {}
        for (name, key), shape, (start, stop), unit in zip(self.keys, self.shapes, self.bounds, self.unit_rows,
                                                           strict=True):
            value = x[start:stop].reshape(shape)
            if unit:
                sums = value.sum(axis=-1, keepdims=True)
                if not np.all(np.abs(sums - 1.0) <= 1e-9):
                    return None
                value = value / sums
            out.setdefault(name, {})[key] = value
        return out


def _unit_rows(value: np.ndarray) -> bool:
    """Whether every row (last axis) of ``value`` sums to 1 up to the rounding of an M-step's division."""
    value = np.asarray(value, dtype=float)
    return bool(np.all(np.abs(value.sum(axis=-1) - 1.0) <= 64 * np.finfo(float).eps * value.shape[-1]))


def admissible(plan: Plan, theta: Theta | None) -> bool:
    """Whether every parameter of θ is finite, valid for its family (covariances: Cholesky) and inside
    the bounds its M-step maximizes within (``within_m_step_bounds``)."""
    if theta is None:
        return False
    families = [(node.name, node.family) for node in plan.nodes]
    if plan.latent is not None:
        families.append((plan.latent.name, plan.latent.family))
    for name, family in families:
        params = theta[name]
        if not all(np.all(np.isfinite(value)) for value in params.values()):
            return False
        try:
            family.check_params(params, name)
            for key, axes in family.param_axes().items():
                if axes[-2:] == ("event", "event_") and key in params:
                    np.linalg.cholesky(params[key])
        except (ValueError, np.linalg.LinAlgError):  # ModelError is a ValueError
            return False
    # the latent's weights and transitions fill their simplex; observed families may cap within theirs
    return all(node.family.within_m_step_bounds(theta[node.name]) for node in plan.nodes)


# -- the driver ------------------------------------------------------------------------------
class Accelerator:
    """Runs accelerated iterations from an accepted point: :meth:`iterations` yields them one at a time."""

    #: SQUAREM: largest step length at first (1: the first cycle is two EM steps); multiplied by
    #: ``_STEP_FACTOR`` each time it is reached and kept, divided when a proposal at it is
    #: rejected. R's SQUAREM multiplies by 4; measured over six data sets each of the overlapping
    #: and the missing-values mixtures (benchmarks/bench_accelerate.py's generators, smaller N),
    #: E-steps in total for 4 / 3 / 2: 2075 / 1625 / 1661 and 933 / 705 / 663, and on the
    #: Hasselblad mixture 73 / 103 / 148 (plain EM: 1724).
    _STEP_MAX0 = 1.0
    _STEP_FACTOR = 3.0
    #: quasi-Newton: I_c's second differences are taken again after this many iterations (and when
    #: the model restarts); in between, each E-step's statistics are contracted with the last ones.
    #: Measured (E-steps, HMM / closer HMM / six mixtures with holes): every 5 iterations 29 / 46 / 192,
    #: every 10 31 / 52 / 193, every 20 37 / 62 / 204.
    _CURVATURE_EVERY = 5
    #: below this step length a proposal is too close to θ₂ to be worth an E-step
    _STEP_MIN = 1.01
    #: quasi-Newton: after the n-th failed iteration in a row (both proposals short of EM's bound),
    #: 2ⁿ⁻¹ − 1 plain EM steps (at most this many) come before the next try, so that where ℓ has no
    #: useful quadratic model (a ridge towards a boundary of the simplex) the proposals cost a vanishing
    #: share of E-steps instead of two more per EM step. Measured on eight 3-state HMMs with random
    #: emission means (plain EM: 206–11,170 E-steps): 1,677 E-steps in total without the pause, 1,235
    #: with it (one draw 818 → 446, plain EM 1,922); the benchmark's cases are unchanged or within 3.
    _PAUSE_MAX = 63

    def __init__(self, method: Method, plan: Plan, estep: EStep, start: Point, *, tol: float,
                 warn_collapsed: Callable[[list[tuple[str, int, float]], int], None],
                 order: int = 5, kappa: float = 25.0, alpha: float = 1.2, memory: int = 10) -> None:
        self.method, self.plan, self.estep, self.tol = method, plan, estep, tol
        #: what the checks' messages call the objective
        self.objective = "log-posterior" if has_prior(plan) else "log-likelihood"
        self.current = start
        self.e_steps = 1
        self.warn_collapsed = warn_collapsed
        self.step_max = self._STEP_MAX0
        # DAAREM state
        self.order, self.kappa, self.alpha = order, kappa, alpha
        self.history: list[tuple[np.ndarray, np.ndarray]] = []  # (Δx, Δf) pairs since the last restart
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # (x, f) at the last accepted point
        self.shrink = 0
        self.lam = 1e5
        self.cycle_start: float | None = None
        self.confirm = False  # DAAREM: take a plain EM step next, to test convergence
        #: DAAREM: (accepted proposal, M-step from it, its floored variances), computed on acceptance
        self.next_m_step: tuple[Point, Theta, list[tuple[str, int, float]]] | None = None
        #: the number of the iteration being computed (for messages)
        self.iteration = 1
        # quasi-Newton state: the free directions and their differences, the secant pairs, the
        # last point observed with its (x, ∇ℓ), iterations since the curvature was differenced
        self.coords: quasi_newton.Coordinates | None = None
        self.differences: quasi_newton.Differences | None = None
        self.memory = quasi_newton.Memory(memory)
        self.observed: tuple[Point, np.ndarray, np.ndarray] | None = None
        self.since_curvature = 0
        #: quasi-Newton: failed iterations in a row, and plain EM steps left before the next try
        self.failures = 0
        self.pause = 0
        #: past "auto"'s plain steps (from the start for an explicit method)
        self.accelerating = False

    # one EM step, with the plain loop's checks ------------------------------------------------
    def em_step(self, p: Point, iteration: int, theta: Theta | None = None,
                floored: list[tuple[str, int, float]] | None = None
                ) -> tuple[Point, float, list[tuple[str, int, float]], float]:
        """θ ↦ M(θ) with its E-step (``theta``: M(θ) when already computed); checks EM's guarantee
        like the plain loop (with priors: ELBO + log p(M(θ)) ≥ the previous log-posterior, and the
        new log-posterior ≥ ELBO + log p). Returns the new point, its ELBO (without log p, as the
        trace records it), the floored variances and the slack."""
        if theta is None:
            theta, floored = maximize(self.plan, p.summary.stats, p.theta)
            self.warn_collapsed(floored, iteration)
        q = evaluate(self.plan, self.estep, theta)
        self.e_steps += 1
        elbo = expected_complete_loglik(q.H, p.summary.stats) + self.plan.log_base_total + p.summary.entropy
        slack = max(q.slack, p.slack)
        _check_guarantee(iteration, p.objective, elbo + q.log_prior, q.objective, slack, objective=self.objective)
        return q, elbo, floored or [], slack

    def _plain(self, p: Point, iteration: int, theta: Theta | None = None,
               floored: list[tuple[str, int, float]] | None = None) -> Accepted:
        """A plain EM step as an accepted iteration, with plain EM's convergence test."""
        q, elbo, floored, slack = self.em_step(p, iteration, theta, floored)
        return Accepted(q, elbo, slack, False, floored, self._em_test(p, q))

    def _em_test(self, p: Point, q: Point) -> bool:
        """Plain EM's convergence test on the EM step p ↦ q = M(p): a change of the objective of at most tol·|q|."""
        return within_tol(p.objective, q.objective, self.tol)

    def iterations(self, rate: float | None = None) -> Iterator[Accepted]:
        """Accepted iterations from the current point, one at a time (endless: the caller stops).

        With ``rate``, plain EM steps first, while each step's gain in the objective is at most
        ``rate`` times the previous one's (see :data:`AUTO_RATE`).
        """
        if rate is not None:
            yield from self._plain_while_fast(rate)
        self.accelerating = True
        cycles = {"squarem": self._squarem, "daarem": self._daarem, "qn": self._quasi_newton}
        while True:  # (read each time: quasi-Newton may hand over to SQUAREM, see _quasi_newton_step)
            yield from cycles[self.method]()

    def _plain_while_fast(self, rate: float) -> Iterator[Accepted]:
        """Plain EM steps until EM's observed linear rate exceeds ``rate`` (or the fit converges)."""
        previous_gain = None
        recent = [self.current]  # quasi-Newton learns its first secant pairs from these steps
        while True:
            before = self.current.objective
            accepted = self._accept(self._plain(self.current, self.iteration))
            yield accepted
            if accepted.converged:
                return
            recent = [*recent[-self.memory.size:], accepted.point]
            gain = accepted.point.objective - before
            if previous_gain is not None and previous_gain > 0 and gain > rate * previous_gain:
                if self.method == "qn":
                    self._choose_quasi_newton(recent)
                return
            previous_gain = gain

    def _choose_quasi_newton(self, recent: list[Point]) -> None:
        """At the end of "auto"'s plain steps: quasi-Newton with their secant pairs, or SQUAREM where
        quasi-Newton's differences would cost too much (:meth:`_quasi_newton_affordable`)."""
        # each point is the M-step's output from the one before: the last step's moves are its own
        if not (self._start_quasi_newton(recent[:-1], recent[-1].theta) and self._quasi_newton_affordable()):
            self.method = "squarem"
            self.coords = self.differences = None
            return
        self._observe_all(recent)

    def _accept(self, accepted: Accepted) -> Accepted:
        """Check the accepted sequence at run time, like the plain loop, and move to the new point."""
        before = self.current
        if accepted.point.objective < before.objective - accepted.slack:
            raise MonotonicityError(
                f"iteration {self.iteration} ({self.method}): the accepted {self.objective} decreased from "
                f"{before.objective!r} to {accepted.point.objective!r} (beyond the rounding bound "
                f"{accepted.slack:.3g}); acceleration must never do this, so this is a bug")
        self.current = accepted.point
        self.iteration += 1
        return accepted

    # SQUAREM ------------------------------------------------------------------------------------
    def _squarem(self) -> Iterator[Accepted]:
        """One SQUAREM cycle: the EM step θ₁ (an iteration of its own), then the stabilized
        proposal if it is kept, else the EM step θ₂."""
        p0, iteration = self.current, self.iteration
        first = self._plain(p0, iteration)
        yield self._accept(first)
        if first.converged:  # plain EM's test held at θ₀: the fit ends on this EM step, as plain EM's does
            return
        p1, iteration = first.point, self.iteration
        theta2, floored2 = maximize(self.plan, p1.summary.stats, p1.theta)  # θ₂ = M(θ₁): its E-step waits
        self.warn_collapsed(floored2, iteration)
        layout = _Layout(p1.theta, theta2)
        proposal = self._squarem_proposal(layout, p0, p1, theta2)
        stabilizing = None if proposal is None else self._unfloored_m_step(proposal)
        if proposal is None or stabilizing is None:
            # θ₂ after all, evaluated only now (as R's SQUAREM does): a plain EM step from θ₁
            yield self._accept(self._plain(p1, iteration, theta2, floored2))
            return
        # The stabilizing EM step of scheme S3 (as in R's SQUAREM): it costs one E-step and
        # measured, it pays (fits with holes needed 2–3× fewer E-steps with it), and it makes
        # every accepted point an M-step's output, with a genuine ELBO (of the proposal's posterior).
        q, elbo, floored, more = self.em_step(proposal, iteration, *stabilizing)
        # θ' ↦ M(θ') is an EM step like any other: plain EM's test applies to its change of the
        # objective. Read only at θ₁ of the next cycle, a fit that is already there would spend
        # one more cycle (3 E-steps) to prove it.
        yield self._accept(Accepted(q, elbo, max(proposal.slack, p1.slack) + more, True, floored,
                                    self._em_test(proposal, q)))

    def _evaluate_proposal(self, theta: Theta) -> Point | None:
        """A proposal's point from its E-step, or None (refused) where the data have probability 0
        under it: a chain's forward pass that no state survives at some step (far out, one state's
        emissions underflow where the chain must be in it). Such a point is not a fit's starting
        value, where the error would be the user's to see, but an extrapolation to be refused."""
        self.e_steps += 1
        try:
            return evaluate(self.plan, self.estep, theta)
        except ImpossibleDataError:
            return None

    def _unfloored_m_step(self, proposal: Point) -> tuple[Theta, list[tuple[str, int, float]]] | None:
        """M(θ') from a proposal that passed the objective's test, or None (the proposal is refused)
        when that M-step had to floor a variance or cap a shape.

        The floors bound the set the M-steps maximize over; a proposal may lie outside it (a
        covariance's eigenvalue extrapolated below the floor), where ℓ can exceed anything EM
        reaches from there, since a collapsing component's likelihood grows without bound. The
        floored M-step would then lower the ELBO below the proposal's ℓ: such a proposal was
        never a point of the constrained problem, and EM's step is taken instead. (Plain EM never
        meets this: its points are M-steps' outputs, inside the floors.)
        """
        theta, floored = maximize(self.plan, proposal.summary.stats, proposal.theta)
        return None if floored else (theta, floored)

    def _squarem_proposal(self, layout: _Layout, p0: Point, p1: Point, theta2: Theta) -> Point | None:
        """θ' = θ₀ + 2a r + a² v, shrunk until valid, evaluated; None unless its objective (ℓ, or
        ℓ + log p with priors) is at least θ₁'s."""
        try:
            x0 = layout.flat(p0.theta)
        except ValueError:  # a starting value that does not broadcast: no proposal this cycle
            return None
        x1, x2 = layout.flat(p1.theta), layout.flat(theta2)
        r = x1 - x0
        v = (x2 - x1) - r
        norm_r, norm_v = float(np.linalg.norm(r)), float(np.linalg.norm(v))
        if not (norm_v > 0 and np.isfinite(norm_r) and np.isfinite(norm_v)):
            return None
        a = min(norm_r / norm_v, self.step_max)
        at_max = a == self.step_max
        if a < self._STEP_MIN:
            if at_max:
                self.step_max *= self._STEP_FACTOR
            return None
        while True:
            theta = on_model(self.plan, layout.theta(x0 + 2.0 * a * r + a * a * v))
            if admissible(self.plan, theta):
                break
            a, at_max = 0.5 * (a + 1.0), False  # halfway towards a = 1, which is θ₂
            if a < self._STEP_MIN:
                return None
        proposal = self._evaluate_proposal(theta)
        # Kept only if at least as good as the EM step θ₁ from the same point: then every accepted
        # point gains at least what EM would, and EM's convergence argument carries over.
        if proposal is None or not (np.isfinite(proposal.objective) and proposal.objective >= p1.objective):
            if at_max:
                self.step_max = max(self._STEP_MAX0, self.step_max / self._STEP_FACTOR)
            return None
        if at_max:
            self.step_max *= self._STEP_FACTOR
        return proposal

    # quasi-Newton -------------------------------------------------------------------------------
    def _quasi_newton(self) -> Iterator[Accepted]:
        """One quasi-Newton iteration: an accepted proposal (the second try after a first that fell
        short), or the plain EM step."""
        yield self._accept(self._quasi_newton_step(self.iteration))

    def _quasi_newton_step(self, iteration: int) -> Accepted:
        p = self.current
        theta_f, floored = self._m_step_of_current(iteration)
        # ELBO(q, M(θ)) (+ log p): what EM's step from here gains at least
        em_bound = self._check_m_step(p, theta_f, iteration)
        if self.coords is None:
            if not self._start_quasi_newton([p], theta_f):
                return self._plain(p, iteration, theta_f, floored)
            if not self._quasi_newton_feasible():
                pairs = "" if self.differences is None else f" and {len(self.differences.pairs)} coupled pairs of them"
                warnings.warn(
                    f"accelerate='qn': {self.coords.size} free parameters{pairs} make quasi-Newton's "
                    f"differences too dear (at most {QN_DIRECTIONS} parameters and {quasi_newton.MAX_PAIRS} "
                    "pairs); running SQUAREM instead", UserWarning, stacklevel=2)
                self.method, self.coords, self.differences = "squarem", None, None
                return self._plain(p, iteration, theta_f, floored)
        coords, differences = self.coords, self.differences
        assert coords is not None and differences is not None
        x, gradient = self._observe(p)
        if self.confirm or self.pause or not self.memory.pairs or not coords.size:
            # the first step, a pause after failures, and one after a small accepted change: a plain EM
            # step (its secant pair comes with the next point; EM's test decides)
            self.confirm = False
            self.pause = max(self.pause - 1, 0)
            return self._plain(p, iteration, theta_f, floored)
        if self.since_curvature >= self._CURVATURE_EVERY or len(self.memory.pairs) <= 1:
            differences.curvature(x)
            self.since_curvature = 0
        self.since_curvature += 1
        solve = quasi_newton.solver(differences.information(p.summary.stats))
        x_em = coords.layout.flat(theta_f)
        for attempt in range(2):
            d = self.memory.direction(gradient, solve)
            if not (np.isfinite(d).all() and float(gradient @ d) > 0):
                break
            if not attempt and self._predicted_within_tol(p, gradient, d, em_bound):
                return self._plain(p, iteration, theta_f, floored)
            proposal = self._qn_proposal(coords, x, d, x_em)
            if proposal is None:
                break
            # Kept only if it gains at least what EM's step is sure to gain (ℓ(M(θ)) ≥ ELBO(q, M(θ))):
            # then EM's convergence argument carries over, as for SQUAREM's proposals.
            if np.isfinite(proposal.objective) and proposal.objective >= max(em_bound, p.objective):
                following = self._unfloored_m_step(proposal)
                if following is None:
                    break
                self.next_m_step = (proposal, *following)
                self.failures = 0
                # a small accepted change is not EM's convergence test: confirm it with a plain step
                self.confirm = within_tol(p.objective, proposal.objective, self.tol)
                # no M-step produced the proposal: its recorded ELBO is ℓ itself (KL = 0)
                return Accepted(proposal, proposal.loglik, max(proposal.slack, p.slack), True, floored)
            if attempt or self.coords is not coords or not np.isfinite(proposal.objective):
                break
            # The proposal's gradient is free (its E-step is done): its secant pair teaches the model
            # the curvature it overshot, and the step is solved again (measured: fewer E-steps than a
            # backtrack along the same direction on every benchmark case but one data set with holes).
            x_trial = coords.layout.flat(proposal.theta)
            trial = differences.score(x_trial, proposal.summary.stats)
            if not self.memory.add(coords.coordinates(x_trial - x), gradient - trial):
                break
        # the model failed here: it starts afresh from EM's metric, after a pause if it keeps failing
        self.memory.clear()
        self.failures += 1
        self.pause = min(2 ** (self.failures - 1), self._PAUSE_MAX + 1) - 1
        return self._plain(p, iteration, theta_f, floored)

    def _predicted_within_tol(self, p: Point, gradient: np.ndarray, d: np.ndarray, em_bound: float) -> bool:
        """Whether what is left to gain from p is predicted to be at most tol·|ℓ|: then the next E-step
        goes to EM's step, whose test decides, instead of to a proposal that could only gain less.

        The prediction is the quasi-Newton model's gain ½ ∇ℓᵀd to its maximum (λ²/2 with λ the
        Newton decrement, the stopping rule of Newton's method: Boyd & Vandenberghe 2004, §9.5.1), raised
        to what EM's step from p is sure to gain (ELBO(q, M(θ)) − ℓ(θ), a lower bound of ℓ* − ℓ(θ)),
        so that a model that underestimates cannot hold the fit to plain EM steps while EM still gains
        more. Measured: one E-step fewer on nearly every benchmark case (the first HMM 25 → 24, the
        closer one 48 → 46), each run ending within tol·|ℓ| of where it ended before.
        """
        left = max(0.5 * float(gradient @ d), em_bound - p.objective)
        return within_tol(p.objective, p.objective + left, self.tol)

    def _start_quasi_newton(self, points: list[Point], theta_f: Theta) -> bool:
        """The free directions from the EM step from ``points[-1]`` to ``theta_f``, and their
        differences. False if a starting value does not flatten (one given in a broadcastable shape)."""
        try:
            layout = _Layout(points[-1].theta, theta_f)
            moved = layout.flat(points[-1].theta) != layout.flat(theta_f)
        except ValueError:
            return False
        self.coords = quasi_newton.Coordinates(self.plan, layout, moved)
        if self.coords.size > QN_DIRECTIONS:  # not feasible: no differences to set up
            return True
        self.differences = quasi_newton.Differences(self.plan, self.coords, points[-1].theta)
        return True

    def _observe_all(self, points: list[Point]) -> None:
        """The secant pairs of the plain EM steps through ``points`` (their statistics are kept: no E-step;
        ``_plain_while_fast`` keeps as many as the memory holds)."""
        for point in points:
            try:
                self._observe(point)
            except ValueError:  # θ⁽⁰⁾ given in a broadcastable shape: the pairs begin after it
                self.observed = None

    def _quasi_newton_affordable(self) -> bool:
        """Whether quasi-Newton's differences per iteration cost less than an E-step (counted, see
        :data:`QN_EVALUATION_COST`) and its directions are at most :data:`QN_DIRECTIONS`."""
        if not self._quasi_newton_feasible():
            return False
        assert self.differences is not None
        score, curvature = self.differences.evaluations()
        n = self.differences.coords.size
        if self.differences.prior:  # log p is differenced one direction at a time
            score, curvature = score + 2 * n, curvature + 2 * n + 2 * n * (n - 1)
        per_iteration = score + curvature / self._CURVATURE_EVERY
        e_step = self.plan.n_samples * self.plan.K * self.plan.n_stats
        return per_iteration * QN_EVALUATION_COST <= e_step

    def _quasi_newton_feasible(self) -> bool:
        """At most :data:`QN_DIRECTIONS` directions and ``quasi_newton.MAX_PAIRS`` coupled pairs."""
        assert self.coords is not None
        return (self.coords.size <= QN_DIRECTIONS and self.differences is not None
                and not self.differences.too_many)

    def _observe(self, p: Point) -> tuple[np.ndarray, np.ndarray]:
        """(x, ∇ℓ) at the accepted point p, and the secant pair from the point observed before."""
        assert self.coords is not None and self.differences is not None
        if self.observed is not None and self.observed[0] is p:
            return self.observed[1], self.observed[2]
        x = self.coords.layout.flat(p.theta)
        gradient = self.differences.score(x, p.summary.stats)
        if self.observed is not None:
            _, x_before, gradient_before = self.observed
            self.memory.add(self.coords.coordinates(x - x_before), gradient_before - gradient)
        self.observed = (p, x, gradient)
        return x, gradient

    def _qn_proposal(self, coords: quasi_newton.Coordinates, x: np.ndarray, d: np.ndarray,
                     x_em: np.ndarray) -> Point | None:
        """The point x + t·B d from t = 1, halved until valid (None below t = 1e-3), evaluated.

        Rows of probabilities: a row at a vertex of its simplex (an entry below
        ``quasi_newton.VERTEX`` in the EM point: with one sequence, a chain's initial
        distribution converges to a vertex) follows EM from now on, and the model drops its
        directions; another row that the step would take out of its simplex moves only part of
        the way to its boundary (``Coordinates.to_boundary``). Nothing is clipped: every
        proposal is a combination of valid points' moves, and valid.
        """
        step = coords.B @ d
        outside = coords.rows_below(np.where(coords.pinned, x_em, x + step), 0.0)
        at_vertex = outside & coords.rows_below(x_em, quasi_newton.VERTEX)
        if at_vertex.any() and self.coords is coords:
            assert self.observed is not None
            self.coords, keep = coords.without(at_vertex)
            self.memory.restrict(keep)
            self.differences = quasi_newton.Differences(self.plan, self.coords, self.current.theta)
            self.since_curvature = self._CURVATURE_EVERY
            self.observed = (*self.observed[:2], self.observed[2][keep])
        step = coords.to_boundary(x, step, outside & ~at_vertex)
        pinned = coords.pinned | at_vertex
        theta = self._halved_until_admissible(coords.layout, lambda t: np.where(pinned, x_em, x + t * step))
        return None if theta is None else self._evaluate_proposal(theta)

    def _halved_until_admissible(self, layout: _Layout, point_at: Callable[[float], np.ndarray]) -> Theta | None:
        """The parameters of ``point_at(t)`` (on the model's structure, ``on_model``) for the first of
        t = 1, ½, ¼, … that is admissible; None once t falls below 1e-3."""
        t = 1.0
        while True:
            theta = on_model(self.plan, layout.theta(point_at(t)))
            if admissible(self.plan, theta):
                return theta
            t *= 0.5
            if t < 1e-3:
                return None

    # DAAREM -------------------------------------------------------------------------------------
    def _daarem(self) -> Iterator[Accepted]:
        """One DAAREM iteration: the accepted proposal, or the plain EM step."""
        yield self._accept(self._daarem_step(self.iteration))

    def _daarem_step(self, iteration: int) -> Accepted:
        p = self.current
        theta_f, floored = self._m_step_of_current(iteration)  # F(x)
        self._check_m_step(p, theta_f, iteration)
        layout = _Layout(theta_f, p.theta)
        try:
            x = layout.flat(p.theta)
        except ValueError:  # a starting value that does not broadcast: start the history here
            self.previous = None
            return self._plain(p, iteration, theta_f, floored)
        f = layout.flat(theta_f) - x
        if self.previous is not None:
            self.history.append((x - self.previous[0], f - self.previous[1]))
        self.previous = (x, f)
        restart = len(self.history) >= self.order
        if self.confirm or not self.history:
            # the first step, and a plain step after a small accepted change: EM's own test decides
            self.confirm = False
            return self._daarem_fallback(p, iteration, theta_f, floored, restart)
        dX = np.column_stack([h[0] for h in self.history])
        dF = np.column_stack([h[1] for h in self.history])
        em_x = x + f
        proposal_x = em_x - (dX + dF) @ self._damped_coefficients(dF, f)
        # shrunk towards the EM point until valid
        theta = self._halved_until_admissible(
            layout, lambda t: proposal_x if t == 1.0 else em_x + t * (proposal_x - em_x))
        if theta is None:
            return self._daarem_fallback(p, iteration, theta_f, floored, restart)
        proposal = self._evaluate_proposal(theta)
        if proposal is None or not (np.isfinite(proposal.objective) and proposal.objective >= p.objective):
            return self._daarem_fallback(p, iteration, theta_f, floored, restart)
        following = self._unfloored_m_step(proposal)  # the next iteration's F(x), needed now: see there
        if following is None:
            return self._daarem_fallback(p, iteration, theta_f, floored, restart)
        self.next_m_step = (proposal, *following)
        self.shrink += 1
        self._end_cycle(restart, proposal.objective)
        # a small accepted change is not EM's convergence test: confirm it with a plain step
        self.confirm = within_tol(p.objective, proposal.objective, self.tol)
        # no M-step produced the proposal: its recorded ELBO is ℓ itself (KL = 0)
        return Accepted(proposal, proposal.loglik, max(proposal.slack, p.slack), True, floored)

    def _m_step_of_current(self, iteration: int) -> tuple[Theta, list[tuple[str, int, float]]]:
        """M(θ) of the current point and its floored variances: free, its E-step is done (and
        computed already when the point, a proposal, was accepted: ``next_m_step``)."""
        computed, self.next_m_step = self.next_m_step, None
        if computed is not None and computed[0] is self.current:
            return computed[1], computed[2]
        theta_f, floored = maximize(self.plan, self.current.summary.stats, self.current.theta)
        self.warn_collapsed(floored, iteration)
        return theta_f, floored

    def _check_m_step(self, p: Point, theta_f: Theta, iteration: int) -> float:
        """The M-step half of EM's guarantee at an accepted point: ELBO(q, M(θ)) ≥ ℓ(θ)
        (with priors: ELBO(q, M(θ)) + log p(M(θ)) ≥ ℓ(θ) + log p(θ)); returns that ELBO (+ log p).

        A run of accepted proposals compares proposals only with each other; this check,
        which costs no E-step, is what would catch an overstated objective of the current point.
        """
        H = natural_matrix(self.plan, theta_f)
        prior, size = log_prior(self.plan, theta_f)
        elbo = (expected_complete_loglik(H, p.summary.stats) + self.plan.log_base_total + p.summary.entropy
                + prior)
        slack = max(p.slack, rounding_slack(self.plan, H, p.summary.magnitude)
                    + (prior_slack(self.plan, size) if size else 0.0))
        if elbo < p.objective - slack:
            name = "ELBO + log-prior" if self.objective == "log-posterior" else "ELBO"
            raise MonotonicityError(f"iteration {iteration} ({self.method}): the M-step lowered the {name} from "
                                    f"{p.objective!r} to {elbo!r} (beyond the rounding bound {slack:.3g}); "
                                    "this is a bug in an M-step or in the objective of an accepted point")
        return elbo

    def _daarem_fallback(self, p: Point, iteration: int, theta_f: Theta,
                         floored: list[tuple[str, int, float]], restart: bool) -> Accepted:
        accepted = self._plain(p, iteration, theta_f, floored)
        self._end_cycle(restart, accepted.point.objective)
        return accepted

    def _end_cycle(self, restart: bool, objective: float) -> None:
        if not restart:
            return
        self.history.clear()
        if self.cycle_start is not None and objective < self.cycle_start:
            self.shrink = max(self.shrink - self.order, int(-2 * self.kappa))
        self.cycle_start = objective

    def _damped_coefficients(self, dF: np.ndarray, f: np.ndarray) -> np.ndarray:
        """Ridge-damped least squares min ‖f − dF γ‖² + λ‖γ‖², λ set so that ‖γ‖ ≈ √δ ‖γ_LS‖.

        δ = 1 / (1 + α^(κ − s)) grows towards 1 as proposals keep being accepted (s counts
        them) and falls back after a cycle that lost ground (Henderson & Varadhan 2019, §3).
        """
        # values near the largest float overflow the products below; that is detected and handled
        with np.errstate(over="ignore", invalid="ignore"):
            u, d, vt = np.linalg.svd(dF, full_matrices=False)
            keep = d > d[0] * 1e-12 if d.size and d[0] > 0 else np.zeros(d.shape, bool)
            if not keep.any():
                return np.zeros(dF.shape[1])
            u, d, vt = u[:, keep], d[keep], vt[keep]
            uf = u.T @ f
            full = float(np.linalg.norm(uf / d))
            if not np.isfinite(full):  # the undamped coefficients overflow: no extrapolation this step
                return np.zeros(dF.shape[1])
            target = full / np.sqrt(1.0 + self.alpha ** (self.kappa - self.shrink))

            def norm(lam: float) -> float:
                return float(np.linalg.norm(d * uf / (d * d + lam)))

            if target >= full or full == 0:
                lam = 0.0
            else:
                # ‖γ(λ)‖ falls monotonically in λ: bisect in log λ between bounds that bracket the target
                high = max(self.lam, 1e-12)
                while norm(high) > target and high < _RIDGE_MAX:
                    high *= 10.0
                low = high / 10.0
                while norm(low) < target and low > 1e-300:
                    low /= 10.0
                if not norm(high) <= target < norm(low):
                    # residuals near the largest float (d² overflows, or no ridge a float holds
                    # outweighs it) or the smallest (d² below any ridge): the least-squares
                    # coefficients shrunk to the target norm damp them as much
                    return vt.T @ (uf / d * (target / full))
                for _ in range(60):
                    mid = _geometric_mean(low, high)
                    if norm(mid) > target:
                        low = mid
                    else:
                        high = mid
                    if high / low < 1.01:
                        break
                lam = float(_geometric_mean(low, high))
            self.lam = max(lam, 1e-12)
            return vt.T @ (d * uf / (d * d + lam))


def _geometric_mean(low: float, high: float) -> float:
    """√(low·high), also where the product overflows or underflows (the bracket's ends reach 1e±300)."""
    product = low * high
    normal = np.finfo(float).tiny <= product < np.inf
    return float(np.sqrt(product) if normal else np.sqrt(low) * np.sqrt(high))


def run(method: Method | Literal["auto"], plan: Plan, estep: EStep, start: Point, *, result: Any, max_iter: int, tol: float,
        stop: Any, report: Callable[[float | None], None], warn_collapsed: Callable[..., None],
        clock_start: float, **options: Any) -> None:
    """Accelerated iterations appended to ``result`` (a loop.RestartResult) until converged, stopped or max_iter."""
    auto = method == "auto"  # plain EM while it converges fast, then DEFAULT (see AUTO_RATE)
    accelerator = Accelerator(DEFAULT if auto else method, plan, estep, start, tol=tol,
                              warn_collapsed=warn_collapsed, **options)
    iterations = accelerator.iterations(AUTO_RATE if auto else None)
    for _ in range(max_iter):
        if stop.requested:
            result.stopped = True
            break
        before = accelerator.current.loglik
        accepted = next(iterations)
        point = accepted.point
        result.theta = point.theta
        result.floored = accepted.floored
        result.counts = point.summary.stats[:, 0].copy()
        result.loglik.append(point.loglik)
        result.logpost.append(point.objective)
        result.elbo.append(accepted.elbo)
        result.kl.append(point.loglik - accepted.elbo)
        result.time.append(time.perf_counter() - clock_start)
        result.slack.append(accepted.slack)
        result.extrapolated.append(accepted.extrapolated)
        result.e_steps.append(accelerator.e_steps)
        result.converged = accepted.converged
        result.accelerated_with = accelerator.method if accelerator.accelerating else "none"
        report(point.loglik - before)  # the log-likelihood's change, as the plain loop reports it
        if result.converged:
            break
