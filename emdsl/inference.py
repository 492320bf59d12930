r"""Standard errors of a fit's parameters, from the observed or the empirical information.

Both estimates come from the same exact identity (Fisher 1925; Louis 1982): the score of
the observed data is the expected complete-data score under the posterior,

.. math::

    \nabla_\psi \ell(\psi) = \nabla_\psi Q(\psi \mid \psi')\big|_{\psi'=\psi}
        = \sum_{k,s} T_{ks}(\psi)\, \frac{\partial H_{ks}}{\partial \psi},
    \qquad T = (R\,w)\,\Phi^\top ,

so the score needs nothing but the E-step's summed statistics T (K × S) and the
derivative J = ∂H/∂ψ of the natural-parameter matrix, a small closed-form map.

* ``method="observed"``: the observed information −∇²ℓ(ψ̂) as the Jacobian of that
  score, which splits into Louis' two terms:

  .. math::

      -\nabla^2 \ell = \underbrace{-\nabla^2_\psi Q(\psi \mid \psi')}_{\text{complete information}}
                       - \underbrace{J^\top\, \partial T / \partial \psi}_{\text{missing information}} .

  The complete information is the second derivative of the cheap map ψ ↦ vdot(H(ψ), T)
  with T held; the missing information differentiates the E-step's sums T(ψ) by
  central differences. Why not Louis' formula in closed form: its missing-information
  term is the posterior covariance of the complete-data score, which needs per-family
  second moments of Φ per sample, the conditional Gaussian of partly missing events and
  (for a Markov latent) the cross-time covariances of forward–backward; differentiating
  the E-step gets all of them from code that already exists, with only K × S sums per
  evaluation. Every difference is a central difference refined by one Richardson step
  (error O(h⁴)), with steps scaled to each coordinate's curvature, so the information is
  accurate to about 1e-9 relative.
* ``method="empirical"``: the outer product of the per-sample scores
  s_n = Σ_k r_nk J_k Φ_n (a mixture's samples are independent, so this estimates the
  information too, and it is robust to a misspecified family: it is the "meat" of a
  sandwich estimator). It needs a pass over the data per block of samples. For a Markov
  latent the independent units are the sequences: s_s = J · (the sequence's own E-step
  sums), forward–backward run one sequence at a time (``EStep.sequence_statistics``), and
  one sequence is refused.

The coordinates ψ are unconstrained where a constraint exists (log of variances and
rates, logit of probabilities, log-ratios of the free K − 1 weights of a simplex against
its largest entry), in the internal (standardized) units; the covariance of ψ̂ is
carried to the parameters the user sees, in the data's units, by the delta method,
Cov(θ̂) = G Cov(ψ̂) Gᵀ with G = ∂θ/∂ψ. A simplex's errors thus respect the sum-to-one
constraint (they come from a rank-(K − 1) covariance whose rows sum to zero).

With priors (declared on families, or ``fit(prior="weak")``, which the fit records as
:attr:`Fit.prior`) the fit maximizes ℓ + log p(θ), and both informations add −∇² log p
(second differences over ψ, no E-step; a prior is a sum over nodes): the errors of the
Laplace approximation, and the stationarity check reads the log-posterior's score.

Fixed parameters (given to the family in the declaration) have no standard error: they
are left out of the result, whose node attrs list them under ``fixed``. An entry on the
boundary of its range (a probability within 1e-6 of 0 or 1, a rate of 0) has no finite
information: it is held, gets a standard error of 0, and is named in a warning and in
the node's ``at_boundary`` attr.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.compile import Plan
from emdsl.data import is_chunked
from emdsl.engine.estep import engine
from emdsl.engine.mstep import Theta, has_prior, log_prior, natural_matrix
from emdsl.errors import ModelError

if TYPE_CHECKING:
    from emdsl.engine.estep import EStep
    from emdsl.results import Fit

Method = Literal["observed", "empirical"]
Constraint = Literal["real", "reference", "positive", "unit", "simplex", "symmetric", "structured"]

#: the relative size of the first difference step, in units of a coordinate's per-sample curvature
_STEP = 2e-3
#: an entry closer than this to the edge of its range is on the boundary (no finite information)
_EDGE = 1e-10
#: a probability closer than this to 0 or 1 is on the boundary. EM reaches such an edge only in the
#: limit (a one-sequence chain's initial distribution, a transition never taken, each entry shrinking
#: by a factor per iteration), so where it stops, 1e-12 or 1e-8, depended on tol; the information
#: there belongs to no maximum, and the outcome was a standard error of 0, a finite one or an error
_PROBABILITY_EDGE = 1e-6
#: rows per block of the per-sample scores (P × K × rows floats are held at once)
_ROWS = 1024

_POSITIVE = ("variance", "rate", "shape", "kappa", "alpha", "beta", "scale", "concentration")
_REAL = ("mean", "coef", "location")


def constraint(family: Any, param: str) -> Constraint:
    """The range of a parameter, which fixes its unconstrained coordinates.

    A family may state its own in a ``constraints`` mapping (param → one of
    ``"real"``, ``"positive"``, ``"unit"``, ``"simplex"`` (over the last axis),
    ``"symmetric"`` (matrices over the last two axes), ``"structured"`` (the family maps
    its own coordinates: ``structure_coordinates``, ``structure_array``,
    ``structure_indices``)); otherwise the parameter's name and axes decide.
    """
    own = getattr(family, "constraints", None)
    if isinstance(own, dict) and param in own:
        return own[param]
    if family.role == "latent":
        return "simplex"  # weights, a chain's initial distribution, each row of its transition matrix
    axes = family.param_axes()[param]
    if "level" in axes:
        return "simplex"
    if param == "probs":
        return "simplex" if family.kind == "Multinomial" else "unit"
    if param == "covariance":
        return "symmetric" if "event_" in axes else "positive"
    if param in _POSITIVE:
        return "positive"
    if param in _REAL:
        return "real"
    raise ModelError(f"standard_errors: no parameterization is known for {family.kind}'s {param!r}; "
                     "standard errors are not available for this family")


@dataclasses.dataclass
class _Block:
    """One learned parameter's share of ψ."""

    name: str
    param: str
    constraint: Constraint
    value: np.ndarray  # the internal array at the fit
    #: flat indices into ``value`` (or the simplex rows' entries) that ψ moves
    free: np.ndarray
    #: simplex: the flat index of each free entry's reference (its row's largest entry)
    reference: np.ndarray | None = None
    #: entries on the boundary of their range, held (flat indices)
    boundary: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    #: "structured": the family that maps its coordinates (mclust's constrained covariances)
    family: Any = None

    @property
    def size(self) -> int:
        return len(self.free)

    def coordinates(self) -> np.ndarray:
        flat = self.value.ravel()
        if self.constraint == "structured":
            return self.family.structure_coordinates(self.value)
        if self.constraint == "positive":
            return np.log(flat[self.free])
        if self.constraint == "unit":
            p = flat[self.free]
            return np.log(p) - np.log1p(-p)
        if self.constraint == "simplex":
            assert self.reference is not None
            return np.log(flat[self.free]) - np.log(flat[self.reference])
        return flat[self.free].copy()

    def array(self, psi: np.ndarray) -> np.ndarray:
        """The internal array with ψ's coordinates put in."""
        if self.constraint == "structured":
            return self.family.structure_array(psi, self.value)
        out = self.value.astype(float).copy()
        flat = out.reshape(-1)
        if self.constraint == "real":
            flat[self.free] = psi
        elif self.constraint == "positive":
            flat[self.free] = np.exp(psi)
        elif self.constraint == "unit":
            flat[self.free] = 1.0 / (1.0 + np.exp(-psi))
        elif self.constraint == "symmetric":
            D = out.shape[-1]
            flat[self.free] = psi
            lead, rest = np.divmod(self.free, D * D)
            i, j = np.divmod(rest, D)
            flat[lead * D * D + j * D + i] = psi  # the mirror entry
        else:
            # A simplex row: its held (boundary) entries keep their values, and the others share
            # what is left in proportion to (1 at the reference, exp ψ at the free entries).
            assert self.reference is not None
            L = out.shape[-1]
            logits = np.full(out.size, -np.inf)
            logits[self.reference] = 0.0
            logits[self.free] = psi
            logits = logits.reshape(-1, L)
            rows = out.reshape(-1, L)
            active = np.isfinite(logits).any(axis=1)
            moved = np.isfinite(logits[active])
            held_mass = np.where(moved, 0.0, rows[active]).sum(axis=1, keepdims=True)
            e = np.exp(logits[active] - logits[active].max(axis=1, keepdims=True))
            rows[active] = np.where(moved, (1.0 - held_mass) * e / e.sum(axis=1, keepdims=True), rows[active])
        return out


def _block(name: str, param: str, kind: Constraint, value: np.ndarray, family: Any = None) -> _Block:
    value = np.asarray(value, dtype=float)
    flat = value.ravel()
    if kind == "structured":
        return _Block(name, param, kind, value, family.structure_indices(value.shape), family=family)
    if kind == "real":
        return _Block(name, param, kind, value, np.arange(flat.size))
    if kind == "reference":  # real, with the first row held at 0 (a multinomial logit's reference state)
        return _Block(name, param, "real", value, np.arange(value[0].size, flat.size))
    if kind == "positive":
        inside = flat > _EDGE * max(float(np.abs(flat).max()), 1e-300)
        return _Block(name, param, kind, value, np.flatnonzero(inside), boundary=np.flatnonzero(~inside))
    if kind == "unit":
        inside = (flat > _PROBABILITY_EDGE) & (flat < 1 - _PROBABILITY_EDGE)
        return _Block(name, param, kind, value, np.flatnonzero(inside), boundary=np.flatnonzero(~inside))
    if kind == "symmetric":
        D = value.shape[-1]
        i, j = np.tril_indices(D)
        lead = np.arange(flat.size // (D * D))[:, None] * D * D
        return _Block(name, param, kind, value, (lead + i * D + j).ravel())
    L = value.shape[-1]
    rows = value.reshape(-1, L)
    reference = rows.argmax(axis=1)
    free, refs, boundary = [], [], []
    for r, row in enumerate(rows):
        for entry in range(L):
            index = r * L + entry
            if entry == reference[r]:
                continue
            if row[entry] > _PROBABILITY_EDGE:
                free.append(index)
                refs.append(r * L + reference[r])
            else:
                boundary.append(index)
    return _Block(name, param, kind, value, np.asarray(free, dtype=np.intp),
                  np.asarray(refs, dtype=np.intp), np.asarray(boundary, dtype=np.intp))


class Parameterization:
    """ψ: the unconstrained coordinates of a plan's learned parameters, around θ̂ (internal units)."""

    def __init__(self, plan: Plan, theta: Theta) -> None:
        self.plan, self.theta = plan, theta
        self.blocks: list[_Block] = []
        owners: list[tuple[str, Any, dict[str, Any]]] = []
        if plan.latent is not None:
            owners.append((plan.latent.name, plan.latent.family, plan.latent.held))
        # a latent's covariates live in a hidden node named like it: its parameters are the latent's
        owners += [(node.name, node.family, node.held) for node in plan.nodes
                   if plan.latent is None or node.name != plan.latent.name]
        for name, family, held in owners:
            for param in theta[name]:
                if param in held or param in family.fixed:
                    continue
                self.blocks.append(_block(name, param, constraint(family, param), theta[name][param], family))
        self.offsets = np.cumsum([0] + [b.size for b in self.blocks])
        self.psi = np.concatenate([b.coordinates() for b in self.blocks]) if self.blocks else np.zeros(0)

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def at(self, psi: np.ndarray) -> Theta:
        """θ (internal units) at ψ."""
        theta = {name: dict(values) for name, values in self.theta.items()}
        for b, block in enumerate(self.blocks):
            theta[block.name][block.param] = block.array(psi[self.offsets[b]:self.offsets[b + 1]])
        return theta

    def user(self, theta: Theta) -> np.ndarray:
        """Every learned parameter at θ in the data's units, flattened and concatenated."""
        nodes = {node.name: node for node in self.plan.nodes}
        out = []
        converted: dict[str, Any] = {}
        for block in self.blocks:
            if block.name not in converted:
                node = nodes.get(block.name)
                converted[block.name] = (theta[block.name] if node is None else
                                         node.family.to_original(theta[block.name], node.center, node.scale))
            out.append(np.asarray(converted[block.name][block.param], dtype=float).ravel())
        return np.concatenate(out) if out else np.zeros(0)

    def label(self, p: int) -> str:
        """``x.mean[3]``: the coordinate p as the user may recognize it."""
        b = int(np.searchsorted(self.offsets, p, side="right") - 1)
        block = self.blocks[b]
        index = np.unravel_index(int(block.free[p - self.offsets[b]]), block.value.shape)
        return f"{block.name}.{block.param}[{', '.join(map(str, index))}]"


def _richardson(diff: Callable[[float], Any]) -> Any:
    """A central difference refined once: (4 D(h/2) − D(h)) / 3, error O(h⁴)."""
    coarse, fine = diff(1.0), diff(0.5)
    return (4.0 * fine - coarse) / 3.0


class _Problem:
    """ℓ's derivatives at θ̂ for one plan: steps, J = ∂H/∂ψ, the information matrices."""

    def __init__(self, plan: Plan, theta: Theta, estep: EStep) -> None:
        self.plan, self.estep = plan, estep
        self.space = Parameterization(plan, theta)
        self.psi = self.space.psi
        self.P = self.space.size
        self.H0 = natural_matrix(plan, theta)
        summary = estep.summarize(self.H0, theta)
        self.stats = summary.stats
        self.steps = self._steps()
        self.J = np.stack([self._dH(p) for p in range(self.P)]) if self.P else np.zeros((0, *self.H0.shape))

    def H(self, psi: np.ndarray) -> np.ndarray:
        return natural_matrix(self.plan, self.space.at(psi))

    def Q(self, psi: np.ndarray) -> float:
        """E_q[log p(x, z | ψ)] − log h, with q the posterior at θ̂."""
        return float(np.vdot(self.H(psi), self.stats))

    def shifted(self, moves: dict[int, float]) -> np.ndarray:
        psi = self.psi.copy()
        for p, h in moves.items():
            psi[p] += h
        return psi

    def _steps(self) -> np.ndarray:
        """h_p = 2e-3 · √(W / c_p), c_p the complete-data curvature: a step of the same size for every
        coordinate measured in its own per-sample units (σ for a mean, 1 for a log-variance)."""
        weight = self.plan.total_weight
        steps = np.empty(self.P)
        q0 = self.Q(self.psi)
        for p in range(self.P):
            delta = 1e-4 * max(1.0, abs(self.psi[p]))
            curvature = -(self.Q(self.shifted({p: delta})) - 2 * q0 + self.Q(self.shifted({p: -delta}))) / delta**2
            if not (np.isfinite(curvature) and curvature > 0):
                raise ModelError(f"standard_errors: the data carry no information about {self.space.label(p)} "
                                 "(its expected complete-data log-likelihood is flat or curving up there): "
                                 "a component without responsibility, or a parameter the data cannot "
                                 "identify; fix it in the declaration or fit fewer components")
            steps[p] = _STEP * np.sqrt(weight / curvature)
        return steps

    def _dH(self, p: int) -> np.ndarray:
        h = self.steps[p]
        return _richardson(lambda f: (self.H(self.shifted({p: f * h})) - self.H(self.shifted({p: -f * h})))
                           / (2 * f * h))

    def complete_hessian(self) -> np.ndarray:
        """∇²_ψ Q(ψ | θ̂) (P × P): second differences of vdot(H(ψ), T), only where H entries are shared."""
        support = [np.abs(self.J[p]) > 0 for p in range(self.P)]
        # ψ_p and ψ_q that move disjoint entries of H meet in no term of Q: their cross term is 0
        return self._hessian(self.Q, lambda p, q: bool((support[p] & support[q]).any()))

    def _hessian(self, f: Callable[[np.ndarray], float], meet: Callable[[int, int], bool]) -> np.ndarray:
        """∇²_ψ f at ψ̂ (P × P) by Richardson-refined second differences with the coordinates' steps;
        a cross term only where ``meet(p, q)`` (else f is a sum of terms that each see one of them)."""
        P, f0 = self.P, f(self.psi)
        out = np.zeros((P, P))
        for p in range(P):
            hp = self.steps[p]
            out[p, p] = _richardson(lambda e, p=p, hp=hp: (f(self.shifted({p: e * hp})) - 2 * f0
                                                            + f(self.shifted({p: -e * hp}))) / (e * hp) ** 2)
            for q in range(p):
                if not meet(p, q):
                    continue
                hq = self.steps[q]

                def cross(e: float, p: int = p, q: int = q, hp: float = hp, hq: float = hq) -> float:
                    a, b = e * hp, e * hq
                    return (f(self.shifted({p: a, q: b})) - f(self.shifted({p: a, q: -b}))
                            - f(self.shifted({p: -a, q: b})) + f(self.shifted({p: -a, q: -b}))) / (4 * a * b)

                out[p, q] = out[q, p] = _richardson(cross)
        return out

    def missing_hessian(self) -> np.ndarray:
        """J · ∂T/∂ψ (P × P): how the E-step's sums move with ψ (Louis' missing information, negated)."""
        columns = []
        for q in range(self.P):
            h = self.steps[q]

            def stats(f: float, q: int = q, h: float = h) -> np.ndarray:
                plus, minus = self.space.at(self.shifted({q: f * h})), self.space.at(self.shifted({q: -f * h}))
                return (self.estep.summarize(natural_matrix(self.plan, plus), plus).stats
                        - self.estep.summarize(natural_matrix(self.plan, minus), minus).stats) / (2 * f * h)

            columns.append(_richardson(stats).ravel())
        dstats = np.stack(columns, axis=1) if columns else np.zeros((self.H0.size, 0))
        return self.J.reshape(self.P, self.H0.size) @ dstats

    def score(self) -> np.ndarray:
        """∇ℓ(ψ̂) = J · T (P,), plus ∇ log p(ψ̂) with priors: zero at an exact maximum of what EM climbed."""
        score = self.J.reshape(self.P, self.H0.size) @ self.stats.ravel()
        if has_prior(self.plan):
            score = score + np.array([_richardson(lambda f, p=p: (self._log_prior(self.shifted({p: f * self.steps[p]}))
                                                                  - self._log_prior(self.shifted({p: -f * self.steps[p]})))
                                                  / (2 * f * self.steps[p])) for p in range(self.P)])
        return score

    def _log_prior(self, psi: np.ndarray) -> float:
        return log_prior(self.plan, self.space.at(psi))[0]

    def prior_hessian(self) -> np.ndarray:
        """∇²_ψ log p(θ(ψ)) (P × P) by second differences; a prior is a sum over nodes, so coordinates of
        different nodes do not meet. Zero without priors."""
        if not has_prior(self.plan):
            return np.zeros((self.P, self.P))
        owner = [self.space.blocks[int(np.searchsorted(self.space.offsets, p, side="right") - 1)].name
                 for p in range(self.P)]
        return self._hessian(self._log_prior, lambda p, q: owner[p] == owner[q])

    def sample_scores(self, theta: Theta) -> np.ndarray:
        """s_n = Σ_k r_nk J_k Φ_n for every sample (N × P), unweighted; for a Markov latent, every
        sequence's (its units: n_sequences × P), J contracted with the sequence's own E-step sums."""
        plan, P, K = self.plan, self.P, self.plan.K
        if plan.sequences is not None:
            return np.einsum("pkw,skw->sp", self.J, self.estep.sequence_statistics(self.H0, theta))
        resp = np.empty((plan.n_samples, K))
        self.estep.evaluate(self.H0, theta, resp_out=resp)
        J = self.J.reshape(P * K, self.plan.n_stats)
        out = np.empty((plan.n_samples, P))
        patterns = {node.name: [node.family.patterns(theta[node.name], o) for o in node.patterns]
                    for node in plan.nodes if len(node.partial_rows)}
        for start in range(0, plan.n_samples, _ROWS):
            stop = min(start + _ROWS, plan.n_samples)
            phi = np.empty((plan.n_stats, stop - start))
            plan.read(start, stop, phi, np.empty(plan.max_D * (stop - start)))
            g = (J @ phi).reshape(P, K, stop - start)
            out[start:stop] = np.einsum("pkn,nk->np", g, resp[start:stop])
        for node in plan.nodes:
            if not len(node.partial_rows):
                continue
            # Partly observed events: their block of Φ is 0; the expected statistics given
            # the observed part stand in for it (Fisher's identity, the holes being latent).
            block = slice(node.offset, node.offset + node.n_rows)
            x = node.read_rows(node.partial_rows)
            for i, (row, g) in enumerate(zip(node.partial_rows, node.partial_pattern, strict=True)):
                terms = patterns[node.name][g]
                extra, _ = terms.expected_statistics(x[terms.o][:, i:i + 1], resp[row][:, None])
                out[row] += np.einsum("pks,ks->p", self.J[:, :, block], extra)
        return out


def information(plan: Plan, theta: Theta, method: Method = "observed") -> tuple[np.ndarray, _Problem]:
    """The information matrix of ψ at θ̂ (P × P) and the problem it came from."""
    with engine(plan) as estep:
        problem = _Problem(plan, theta, estep)
        if method == "observed":
            hessian = problem.complete_hessian() + problem.missing_hessian() + problem.prior_hessian()
            info = -0.5 * (hessian + hessian.T)
        else:
            scores = problem.sample_scores(theta)
            units = (plan.weights if plan.sequences is None or plan.weights is None
                     else plan.sequences.weights_of(0, plan.sequences.n_sequences))  # a sequence's weight
            weighted = scores if units is None else scores * units[:, None]
            counted = len(scores) if units is None else int(np.count_nonzero(units))
            if counted <= problem.P:  # Σ w g gᵀ has rank at most the number of units that count
                what = "sequences" if plan.sequences is not None else "samples"
                raise ModelError(f"standard_errors(method='empirical'): {counted} {what} (of nonzero weight) for "
                                 f"{problem.P} free parameters; a sum of that many outer products of scores is a "
                                 "singular information matrix; use 'observed'")
            # with priors the prior's curvature adds its information (a penalized likelihood's)
            info = weighted.T @ scores - problem.prior_hessian()
    return info, problem


def covariance(info: np.ndarray, problem: _Problem) -> np.ndarray:
    """Cov(ψ̂) = I⁻¹, or a ModelError naming the direction in which the information is not positive."""
    if info.size == 0:
        return info
    scale = np.sqrt(np.abs(np.diag(info)))
    scale = np.where(scale > 0, scale, 1.0)
    unit = info / np.outer(scale, scale)  # a correlation-like matrix: its conditioning is what matters
    values, vectors = np.linalg.eigh(unit)
    if not values[0] > 1e-10 * values[-1]:
        worst = np.argsort(-np.abs(vectors[:, 0]))[:3]
        named = ", ".join(problem.space.label(int(p)) for p in worst)
        raise ModelError("standard_errors: the information matrix is not positive definite (smallest "
                         f"relative eigenvalue {values[0] / values[-1]:.3g}, mostly along {named}): the fit is "
                         "not at a local maximum of the likelihood (did it converge?), or these parameters "
                         "are not identified by the data (e.g. a component with almost no samples)")
    inverse = (vectors / values) @ vectors.T
    return inverse / np.outer(scale, scale)


def user_covariance_diagonal(problem: _Problem, cov: np.ndarray) -> np.ndarray:
    """diag(G Cov Gᵀ) with G = ∂θ/∂ψ (θ the learned parameters in the data's units), by the delta method."""
    space = problem.space
    columns = []
    for p in range(problem.P):
        h = problem.steps[p]
        columns.append(_richardson(lambda f, p=p, h=h: (space.user(space.at(problem.shifted({p: f * h})))
                                                      - space.user(space.at(problem.shifted({p: -f * h}))))
                                   / (2 * f * h)))
    G = np.stack(columns, axis=1) if columns else np.zeros((space.user(space.theta).size, 0))
    return np.maximum(np.einsum("up,pq,uq->u", G, cov, G), 0.0)


def standard_errors(fit: Fit, method: Method = "observed", data: Any = None) -> xr.DataTree:
    """Standard errors of ``fit``'s learned parameters, labelled like ``fit.params``.

    See :meth:`emdsl.Fit.standard_errors` (the public entry point) and this module's notes.
    """
    if method not in ("observed", "empirical"):
        raise ModelError(f"standard_errors(method=...): expected 'observed' or 'empirical', got {method!r}")
    if data is None:
        data = fit.data
        if data is None:
            raise ModelError("standard_errors: this fit was loaded from a file and holds no training data; "
                             "pass the data it was fitted to: fit.standard_errors(data=ds)")
    weights = fit.weights if fit.weights is not None else None
    plan, theta, _ = fit._compiled(data, weights=weights, priors=True)
    if method == "empirical" and is_chunked(plan):
        # the per-sample scores are an N × P array in memory: so may the data they come from be
        plan, theta, _ = fit._compiled(labels.as_dataset(data, like=fit.model).compute(),
                                       weights=None if weights is None else weights.compute(), priors=True)
    if method == "empirical" and plan.sequences is not None and plan.sequences.n_sequences < 2:
        raise ModelError("standard_errors(method='empirical'): the data are one sequence of a Markov latent; "
                         "the steps of a chain are not independent, and the sum of outer products of scores "
                         "needs independent sequences; use 'observed'")
    if not fit.converged:
        warnings.warn("standard_errors: the fit did not converge; standard errors assume the parameters "
                      "maximize the likelihood", RuntimeWarning, stacklevel=3)
    try:
        info, problem = information(plan, theta, method)
    except np.linalg.LinAlgError as error:  # a covariance not positive definite at a nearby point
        why = ("the fit is degenerate (a component collapsed or a covariance sits at its floor, "
               "where the likelihood has no maximum); refit with prior='weak' or fewer components"
               if fit.degenerate else "a covariance is singular at or next to the fitted parameters")
        raise ModelError(f"standard_errors: the information matrix cannot be computed: {why} "
                         f"(numpy: {error})") from None
    cov = covariance(info, problem)
    _check_stationary(problem, cov)
    variance = user_covariance_diagonal(problem, cov)
    return _tree(fit, problem, np.sqrt(variance), method)


def _check_stationary(problem: _Problem, cov: np.ndarray) -> None:
    """Warn when θ̂ is visibly not a maximum: the Newton step sᵀ I⁻¹ s is more than a small fraction of one SE."""
    if problem.P == 0:
        return
    score = problem.score()
    decrement = float(score @ cov @ score)
    if decrement > 1e-4:
        what = "log-posterior" if has_prior(problem.plan) else "likelihood"
        warnings.warn(f"standard_errors: the fit is not at a maximum of the {what} (a Newton step would "
                      f"move it by {np.sqrt(decrement):.2g} standard errors); fit with a smaller tol "
                      "before trusting the standard errors", RuntimeWarning, stacklevel=4)


def _tree(fit: Fit, problem: _Problem, se: np.ndarray, method: str) -> xr.DataTree:
    """The standard errors as a DataTree shaped like ``fit.params`` (learned parameters only)."""
    space = problem.space
    by_param: dict[tuple[str, str], np.ndarray] = {}
    start = 0
    boundary: dict[str, list[str]] = {}
    joint = fit.model.latent_var if len(fit.model.latents) > 1 else None
    for block in space.blocks:
        size = block.value.size
        # several latents: the joint's blocks are each latent's weights, shown under its own name
        key = (block.param, "probs") if joint is not None and block.name == joint.name else (block.name, block.param)
        by_param[key] = se[start:start + size]
        start += size
        for index in block.boundary:
            where = np.unravel_index(int(index), block.value.shape)
            boundary.setdefault(block.name, []).append(f"{block.param}[{', '.join(map(str, where))}]")
    children: dict[str, xr.Dataset] = {}
    for name, child in fit.params.children.items():
        ds = child.to_dataset()
        kept = {}
        for key, da in ds.data_vars.items():
            if (name, key) in by_param:
                kept[key] = da.copy(data=np.reshape(by_param[name, key], da.shape))
                kept[key].attrs = {"long_name": f"standard error of {name}.{key}", "method": method}
        out = xr.Dataset(kept, attrs={**ds.attrs, "method": method})
        if name in boundary:
            out.attrs["at_boundary"] = ",".join(boundary[name])
        children[name] = out
    if boundary:
        listed = "; ".join(f"{name}: {', '.join(items)}" for name, items in boundary.items())
        warnings.warn(f"standard_errors: entries on the boundary of their range have no finite information and "
                      f"are reported with a standard error of 0 ({listed})", RuntimeWarning, stacklevel=4)
    tree = xr.DataTree.from_dict(children)
    tree.attrs = {"method": method, "description": "standard errors in the data's units; fixed parameters "
                  "are left out (listed in each node's 'fixed' attr)"}
    return tree
