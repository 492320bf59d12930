"""Quasi-Newton EM: L-BFGS on the objective, preconditioned by the complete-data information.

EM's step is, to first order, θ + I_c(θ)⁻¹ ∇ℓ(θ): a Newton step with the complete-data
information I_c in place of the observed one, I_c − I_m. Where the fraction of missing
information I_c⁻¹ I_m is large, EM crawls. L-BFGS learns the missing curvature from the
gradients it meets: it starts from H₀ = γ·I_c⁻¹ (EM's own metric, scaled) and corrects it
with the last few secant pairs (Jamshidian & Jennrich 1997 start quasi-Newton EM from the
same metric; Nocedal & Wright 2006, §7.2, for the two-loop recursion and the scaling γ).
``accelerate.Accelerator`` runs it and keeps EM's guarantee; this module is its arithmetic.

Everything here comes from one E-step's statistics S, without another pass over the data:

* **The score** by Fisher's identity: ∇ℓ(θ) = ∇_θ' Q(θ' | θ) at θ' = θ, with
  Q(θ' | θ) = ⟨H(θ'), S⟩ + log p(θ') (``mstep.expected_complete_loglik``), by central
  differences through ``natural_matrix``: H is cheap, S stays fixed.
* **The complete-data information** I_c = −∇²_θ' Q(θ' | θ) = −Σ_e S_e ∇²H_e(θ) − ∇² log p(θ),
  by second differences of H. Q splits over components and nodes, so only directions that
  move a common entry of H are differenced together, and directions that move disjoint
  entries share one evaluation (:class:`Differences`).

Both are taken along :class:`Coordinates`: the free directions of the flat parameter vector
(a row that sums to 1 moves along its simplex, a covariance symmetrically, held values not
at all), so that the quasi-Newton model lives in the set the families are defined on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse

from emdsl.compile import Plan
from emdsl.engine.mstep import Theta, has_prior, log_prior, natural_matrix

#: relative steps of the central differences: ≈ ε^(1/3) for the gradient, ε^(1/4) for the second
#: differences (the rounding of Q, ≈ ε·|Q|, against each formula's truncation error)
GRADIENT_STEP = 6e-6
HESSIAN_STEP = 1e-4
#: quasi-Newton differences at most this many coupled pairs of directions (the curvature's cost)
MAX_PAIRS = 3000
#: an entry of a row of probabilities below this in the EM point is at its bound (see ``rows_below``)
VERTEX = 1e-8
#: a row of probabilities that a step would take out of its simplex moves at most this share of the
#: way to 0 (the "fraction to the boundary" of interior-point methods)
TO_BOUNDARY = 0.9


class Coordinates:
    """The directions a parameter point can move in: x = x₀ + B z, B sparse (one or two entries a column).

    ``layout`` flattens θ (``accelerate._Layout``); ``moved`` marks the entries an EM step
    changed (a held parameter never changes). A row that sums to 1 moves along its simplex:
    its last moved entry takes up the others' changes. A symmetric matrix (a covariance)
    moves symmetrically: one direction per entry on or above the diagonal. Each direction
    has a *lead* entry that no other direction moves, so that z = Δx[lead] for any move
    between two valid points.
    """

    def __init__(self, plan: Plan, layout: Any, moved: np.ndarray) -> None:
        families = {node.name: node.family for node in plan.nodes}
        if plan.latent is not None:
            families[plan.latent.name] = plan.latent.family
        columns: list[tuple[list[int], list[float]]] = []
        #: per direction: its parameter array (index into layout.keys), and the entries whose size is
        #: its own scale (one component's slice; a covariance entry's two variances, geometric mean)
        self.block: list[int] = []
        self.local: list[tuple[np.ndarray, bool]] = []
        for index, ((name, key), shape, (start, stop), unit) in enumerate(
                zip(layout.keys, layout.shapes, layout.bounds, layout.unit_rows, strict=True)):
            entries = np.arange(start, stop).reshape(shape)
            axes = tuple(families[name].param_axes().get(key, ()))
            if unit:
                for row in entries.reshape(-1, shape[-1]):
                    free = [int(i) for i in row if moved[i]]
                    for i in free[:-1]:
                        columns.append(([i, free[-1]], [1.0, -1.0]))
                        self.block.append(index)
                        self.local.append((np.array([i, free[-1]]), False))
            elif len(shape) >= 2 and axes[-2:] == ("event", "event_"):
                D = shape[-1]
                for matrix in entries.reshape(-1, D, D):
                    for i in range(D):
                        for j in range(i, D):
                            if moved[matrix[i, j]] or moved[matrix[j, i]]:
                                pair = [int(matrix[i, j])] if i == j else [int(matrix[i, j]), int(matrix[j, i])]
                                columns.append((pair, [1.0] * len(pair)))
                                self.block.append(index)
                                self.local.append((np.array([matrix[i, i], matrix[j, j]]), True))
            else:
                for position, i in enumerate(entries.ravel()):
                    if moved[i]:
                        columns.append(([int(i)], [1.0]))
                        self.block.append(index)
                        first = np.unravel_index(position, shape)[0] if shape else ()
                        self.local.append((entries[first].ravel() if shape else np.array([i]), False))
        self.layout = layout
        self.columns = columns
        self.simplex = _simplex_directions(columns)
        self.B = _sparse(columns, layout.size)
        self.lead = np.array([entries[0] for entries, _ in columns], dtype=int)
        #: entries that follow the EM step instead (rows of probabilities at a vertex, see ``without``)
        self.pinned = np.zeros(layout.size, bool)

    @property
    def size(self) -> int:
        return len(self.columns)

    def coordinates(self, dx: np.ndarray) -> np.ndarray:
        """z with B z = dx, for dx a move between two valid points."""
        return dx[self.lead]

    def steps(self, x: np.ndarray, relative: float, local: bool = False) -> np.ndarray:
        """Each direction's difference step: ``relative`` times the largest value of its parameter
        (``local``: of its own component's slice, or √(σ_ii σ_jj) for a covariance entry, but at
        least a hundredth of the parameter's largest value; second differences of a collapsing
        component, whose variances are far below the others', need steps on its own scale)."""
        scales = np.array([max(float(np.max(np.abs(x[a:b]))), 1e-8) for a, b in self.layout.bounds])
        out = scales[self.block] if self.block else np.zeros(0)
        if local:
            for j, (entries, symmetric) in enumerate(self.local):
                own = float(np.sqrt(np.abs(np.prod(x[entries])))) if symmetric else float(np.max(np.abs(x[entries])))
                out[j] = max(min(own, out[j]), 1e-2 * out[j])
        out = relative * out
        # a step along a simplex never reaches its boundary: a probability near 0 (a chain's initial
        # distribution converging to a vertex) is differenced within its own size
        for j in self.simplex:
            out[j] = min(out[j], 0.5 * float(np.min(x[self.local[j][0]])))
        return out

    def _unit_rows(self, x: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """(start, stop, rows view) of every parameter whose rows sum to 1."""
        return [(a, b, x[a:b].reshape(-1, shape[-1]))
                for (a, b), unit, shape in zip(self.layout.bounds, self.layout.unit_rows, self.layout.shapes,
                                               strict=True) if unit]

    def rows_below(self, x: np.ndarray, level: float) -> np.ndarray:
        """The flat entries of every row of ``x`` that must sum to 1 and has an entry below ``level``
        (0: the step left the simplex; :data:`VERTEX`: the row is at a vertex)."""
        out = np.zeros(x.shape, bool)
        for a, b, rows in self._unit_rows(x):
            out[a:b] = np.repeat(np.any(rows < level, axis=1), rows.shape[1])
        return out

    def to_boundary(self, x: np.ndarray, step: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``step`` with each row ``rows`` marks scaled so that no entry of x + step falls by more than
        :data:`TO_BOUNDARY` of its value (the row's step still sums to 0: it stays on the simplex)."""
        step = step.copy()
        for a, b, x_rows in self._unit_rows(x):
            step_rows, marked = step[a:b].reshape(x_rows.shape), rows[a:b].reshape(x_rows.shape)
            for i in np.flatnonzero(marked.any(axis=1)):
                falling = step_rows[i] < 0
                factor = np.min(TO_BOUNDARY * x_rows[i][falling] / -step_rows[i][falling]) if falling.any() else 1.0
                step_rows[i] *= min(1.0, float(factor))
        return step

    def without(self, entries: np.ndarray) -> tuple[Coordinates, np.ndarray]:
        """These coordinates less every direction that moves one of ``entries`` (which are pinned
        from now on); and the mask of the directions kept."""
        keep = np.array([not entries[rows].any() for rows, _ in self.columns], dtype=bool)
        out = object.__new__(Coordinates)
        out.__dict__.update(self.__dict__)
        out.columns = [column for column, kept in zip(self.columns, keep, strict=True) if kept]
        out.B = _sparse(out.columns, self.B.shape[0])
        out.lead = self.lead[keep]
        out.block = [block for block, kept in zip(self.block, keep, strict=True) if kept]
        out.local = [local for local, kept in zip(self.local, keep, strict=True) if kept]
        out.simplex = _simplex_directions(out.columns)
        out.pinned = self.pinned | entries
        return out, keep


def _simplex_directions(columns: list[tuple[list[int], list[float]]]) -> list[int]:
    """The directions along a simplex: two entries, +1 and −1."""
    return [j for j, (_, values) in enumerate(columns) if len(values) == 2 and values[1] < 0]


def _sparse(columns: list[tuple[list[int], list[float]]], size: int) -> scipy.sparse.csc_array:
    rows = [i for entries, _ in columns for i in entries]
    cols = [j for j, (entries, _) in enumerate(columns) for _ in entries]
    values = [v for _, vals in columns for v in vals]
    return scipy.sparse.csc_array((values, (rows, cols)), shape=(size, len(columns)))


class Differences:
    """∇_z Q(· | θ) and −∇²_z Q(· | θ) by central differences, many directions at once.

    Q(θ' | θ) = Σ_e H_e(θ') S_e + log p(θ') is a sum over the entries e of H. A direction
    moves a few of them only (one component's row, one node's block), so directions that move
    disjoint entries are differenced together in one evaluation of H and each reads its own
    entries' change (a colouring of the directions, as in sparse finite-difference Jacobians:
    Curtis, Powell & Reid 1974): with K components, K times fewer evaluations. The
    log-prior is a scalar of all of θ, differenced one direction at a time.
    """

    def __init__(self, plan: Plan, coords: Coordinates, theta: Theta) -> None:
        self.plan, self.coords = plan, coords
        self.prior = has_prior(plan)
        x = coords.layout.flat(theta)
        H0 = self._natural(x)  # through the layout, as every difference goes (it normalizes rows)
        if H0 is None:
            H0 = natural_matrix(plan, theta)
        self.size_H = H0.size
        h = coords.steps(x, 1e-3)
        touched = []
        for j in range(coords.size):
            H = self._natural(x + self._along([j], h))
            touched.append(np.ones(H0.size, bool) if H is None else (H != H0).ravel())
        #: per direction: the flat entries of H it moves
        self.touched = [np.flatnonzero(t) for t in touched]
        touches = np.array(touched, dtype=bool).reshape(coords.size, H0.size)
        T = scipy.sparse.csr_array(touches.astype(float))
        coupled = np.triu((T @ T.T).toarray() > 0, 1)
        self.pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(coupled), strict=True)]
        #: more coupled pairs than :data:`MAX_PAIRS`: too dear to difference (no groups are formed)
        self.too_many = len(self.pairs) > MAX_PAIRS
        self.gradient_groups = _colour([self.touched[j] for j in range(coords.size)], self.size_H)
        #: per coupled pair: the flat entries of H that either direction moves
        self.pair_entries = [] if self.too_many else [np.union1d(self.touched[i], self.touched[j])
                                                      for i, j in self.pairs]
        self.pair_groups = _colour(self.pair_entries, self.size_H)
        self.second: tuple[list[tuple[int, int, np.ndarray, np.ndarray]], np.ndarray] = (
            [], np.zeros((coords.size, coords.size)))

    def evaluations(self) -> tuple[int, int]:
        """Evaluations of H for one score and for one :meth:`curvature` (without the prior's)."""
        return 2 * len(self.gradient_groups), 1 + 2 * len(self.gradient_groups) + 4 * len(self.pair_groups)

    def _along(self, directions: list[int], h: np.ndarray) -> np.ndarray:
        """Σ_j h_j b_j over ``directions`` as a flat vector."""
        B = self.coords.B
        return B[:, directions] @ h[directions]

    def _natural(self, x: np.ndarray) -> np.ndarray | None:
        theta = self.coords.layout.theta(x)
        if theta is None:
            return None
        with np.errstate(all="ignore"):
            try:
                return natural_matrix(self.plan, theta)
            except (ValueError, np.linalg.LinAlgError, FloatingPointError):
                return None

    def _flat_natural(self, x: np.ndarray) -> np.ndarray:
        H = self._natural(x)
        return np.full(self.size_H, np.nan) if H is None else H.ravel()

    def _log_prior(self, x: np.ndarray) -> float:
        theta = self.coords.layout.theta(x)
        return -np.inf if theta is None else log_prior(self.plan, theta)[0]

    def score(self, x: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """∇_z ℓ at x (Fisher's identity: the gradient of Q(· | θ) at θ, S = ``stats`` from θ's E-step)."""
        coords = self.coords
        h = coords.steps(x, GRADIENT_STEP)
        flat = stats.ravel()
        out = np.zeros(coords.size)
        # a direction along a simplex whose smaller entry is 0 has step 0 (it sits on the boundary):
        # its derivative is not taken (0), and neither is one that met an invalid point (not finite)
        with np.errstate(all="ignore"):
            for group in self.gradient_groups:
                step = self._along(group, h)
                plus, minus = self._flat_natural(x + step), self._flat_natural(x - step)
                for j in group:
                    e = self.touched[j]
                    out[j] = float(np.dot(plus[e] - minus[e], flat[e])) / (2.0 * h[j])
            if self.prior:
                for j in range(coords.size):
                    b = self._along([j], h)
                    out[j] += (self._log_prior(x + b) - self._log_prior(x - b)) / (2.0 * h[j])
        return np.where(np.isfinite(out), out, 0.0)

    def curvature(self, x: np.ndarray) -> None:
        """Second differences of H (and of log p) at x, kept for :meth:`information`: they depend
        on θ only, and each new E-step's statistics are contracted with them."""
        with np.errstate(all="ignore"):  # a step of 0 or an invalid point: not finite, read as 0
            self._curvature(x)

    def _curvature(self, x: np.ndarray) -> None:
        coords = self.coords
        n = coords.size
        h = coords.steps(x, HESSIAN_STEP, local=True)
        centre = self._flat_natural(x)
        items: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        for group in self.gradient_groups:
            step = self._along(group, h)
            plus, minus = self._flat_natural(x + step), self._flat_natural(x - step)
            for j in group:
                e = self.touched[j]
                items.append((j, j, e, (plus[e] - 2.0 * centre[e] + minus[e]) / (h[j] * h[j])))
        for group in self.pair_groups:
            bi = self._along([self.pairs[k][0] for k in group], h)
            bj = self._along([self.pairs[k][1] for k in group], h)
            pp, pm = self._flat_natural(x + bi + bj), self._flat_natural(x + bi - bj)
            mp, mm = self._flat_natural(x - bi + bj), self._flat_natural(x - bi - bj)
            for k in group:
                i, j = self.pairs[k]
                e = self.pair_entries[k]
                items.append((i, j, e, (pp[e] - pm[e] - mp[e] + mm[e]) / (4.0 * h[i] * h[j])))
        prior = np.zeros((n, n))
        if self.prior:
            p0 = self._log_prior(x)
            moves = [self._along([i], h) for i in range(n)]
            for i, bi in enumerate(moves):
                prior[i, i] = (self._log_prior(x + bi) - 2.0 * p0 + self._log_prior(x - bi)) / (h[i] * h[i])
                for j in range(i + 1, n):
                    bj = moves[j]
                    prior[i, j] = prior[j, i] = (
                        self._log_prior(x + bi + bj) - self._log_prior(x + bi - bj)
                        - self._log_prior(x - bi + bj) + self._log_prior(x - bi - bj)) / (4.0 * h[i] * h[j])
        self.second = (items, prior)

    def information(self, stats: np.ndarray) -> np.ndarray:
        """I_c = −∇²_z Q(· | θ) for the statistics ``stats``, from the last :meth:`curvature`
        (a difference that met an invalid point counts as 0)."""
        items, prior = self.second
        flat = stats.ravel()
        out = -prior  # (a new array) plus −Σ_e S_e ∇²H_e over the differenced pairs
        for i, j, e, values in items:
            with np.errstate(invalid="ignore"):
                value = -float(np.dot(values, flat[e]))
            if np.isfinite(value):
                out[i, j] += value
                if i != j:
                    out[j, i] += value
        return np.where(np.isfinite(out), out, 0.0)


def _colour(supports: list[np.ndarray], size: int) -> list[list[int]]:
    """Greedy colouring: groups of indices whose ``supports`` (entries out of ``size``) are pairwise
    disjoint; each index takes the first colour none of its entries has yet."""
    used = np.zeros((size, max(len(supports), 1)), dtype=bool)  # entry × colour
    groups: list[list[int]] = []
    for index, support in enumerate(supports):
        colour = int(np.argmin(used[support].any(axis=0))) if len(support) else 0
        used[support, colour] = True
        if colour == len(groups):
            groups.append([])
        groups[colour].append(index)
    return groups


class Memory:
    """The last ``size`` secant pairs (s, y) of L-BFGS for the maximization of ℓ, in the
    directions' coordinates: y = ∇ℓ before − ∇ℓ after, so that sᵀy > 0 where ℓ is concave
    (a pair without that curvature is not kept)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pairs: list[tuple[np.ndarray, np.ndarray, float]] = []

    def add(self, s: np.ndarray, y: np.ndarray) -> bool:
        # the curvature test Σ s_i y_i > 0 up to rounding, measured by Σ |s_i y_i|: invariant to each
        # coordinate's scale (a rate near 1e100 next to a probability)
        sy = float(s @ y)
        if not (np.isfinite(sy) and sy > 1e-12 * float(np.abs(s) @ np.abs(y))):
            return False
        self.pairs.append((s, y, 1.0 / sy))
        if len(self.pairs) > self.size:
            self.pairs.pop(0)
        return True

    def clear(self) -> None:
        self.pairs.clear()

    def restrict(self, keep: np.ndarray) -> None:
        """Keep only the coordinates ``keep`` marks in every pair (directions were dropped)."""
        pairs, self.pairs = self.pairs, []
        for s, y, _ in pairs:
            self.add(s[keep], y[keep])

    def direction(self, gradient: np.ndarray, solve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The ascent direction H ∇ℓ by the two-loop recursion from H₀ = γ·I_c⁻¹ (``solve``: v ↦ I_c⁻¹ v),
        γ = sᵀy / yᵀI_c⁻¹y of the newest pair (1 without pairs: then the step is EM's, to first order)."""
        q = gradient.copy()
        alphas = []
        for s, y, rho in reversed(self.pairs):
            alpha = rho * float(s @ q)
            alphas.append(alpha)
            q -= alpha * y
        r = solve(q)
        if self.pairs:
            s, y, rho = self.pairs[-1]
            r *= (1.0 / rho) / float(y @ solve(y))
        for (s, y, rho), alpha in zip(self.pairs, reversed(alphas), strict=True):
            beta = rho * float(y @ r)
            r += s * (alpha - beta)
        return r


def solver(information: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """v ↦ I_c⁻¹ v with I_c's eigenvalues taken in absolute value and raised to 1e-10 of the largest.

    −∇²Q is positive definite at the M-step's point but need not be at θ (a covariance far
    from the E-step's scatter), and differences round; |λ| keeps each direction's scale
    where a floor would send the step far along it (a collapsing component's directions).
    """
    values, vectors = np.linalg.eigh(0.5 * (information + information.T))
    values = np.abs(values)
    top = float(np.max(values)) if values.size else 0.0
    values = np.maximum(values, 1e-10 * top if top > 0 else 1.0)

    def solve(v: np.ndarray) -> np.ndarray:
        return vectors @ ((vectors.T @ v) / values)

    return solve
