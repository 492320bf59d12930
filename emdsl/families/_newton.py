"""Safeguarded Newton ascent: the M-step of families whose Q has no closed-form maximizer.

Gamma's shape, Beta's α and β and von Mises' κ maximize a concave Q; a few Newton
steps that never lower Q are a generalized-EM step (DESIGN.md §1), and run to
convergence they are the exact M-step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Fn = Callable[[np.ndarray], np.ndarray]
_EPS = float(np.finfo(float).eps)


def newton_ascent(start: np.ndarray, low: float, high: float, value: Fn, slope: Fn, curvature: Fn,
                  free: np.ndarray | None = None, steps: int = 50, rtol: float = 1e-12) -> np.ndarray:
    """Maximize concave functions elementwise by projected Newton, never lowering them.

    θ is (..., P), its free coordinates kept inside the box [low, high]; ``value`` (...),
    ``slope`` (..., P) and ``curvature`` (..., P, P) are the function's per unit weight.
    Coordinates not ``free`` (held) and those at a bound the slope pushes against stay
    put. A step is halved until the function does not decrease (to its rounding, 16 ε
    relative: near the top the change is below it) or the slope at its end still points
    along it, which on a concave function proves the rise. Stops at |Δθ| ≤ rtol·|θ| or
    after ``steps`` steps: the result is a generalized-EM step even when not converged.
    """
    start = np.asarray(start, dtype=float)
    free = np.ones(start.shape, bool) if free is None else free
    theta = np.where(free, np.clip(start, low, high), start)
    going = np.ones(theta.shape[:-1], bool)
    current = value(theta)
    eye = np.eye(theta.shape[-1])
    for _ in range(steps):
        g = slope(theta)
        pinned = ~free | ((theta >= high) & (g > 0)) | ((theta <= low) & (g < 0))
        hess = np.where(pinned[..., :, None] | pinned[..., None, :], 0.0, curvature(theta)) - eye * pinned[..., None]
        step = -np.linalg.solve(hess, np.where(pinned, 0.0, g)[..., None])[..., 0]
        step[~going | ~np.isfinite(step).all(axis=-1)] = 0.0
        going &= (step != 0).any(axis=-1)
        todo, t = going.copy(), 1.0
        while todo.any() and t > 1e-18:
            trial = np.where(free, np.clip(theta + t * step, low, high), theta)
            move = trial - theta
            new = value(trial)
            with np.errstate(invalid="ignore"):  # inf·0 where a trial leaves the domain: not ok
                rise = (new >= current - 16 * _EPS * (1.0 + np.abs(current))) | (
                    (slope(trial) * move).sum(axis=-1) >= 0)
            ok = todo & rise & np.isfinite(new)
            done = ok & (np.abs(move) <= rtol * np.abs(theta)).all(axis=-1)
            theta, current = np.where(ok[..., None], trial, theta), np.where(ok, new, current)
            going &= ~done
            todo &= ~ok
            t *= 0.5
        going &= ~todo  # no rise left along the Newton direction: at the top, to rounding
        if not going.any():
            break
    return theta
