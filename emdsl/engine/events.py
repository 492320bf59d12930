"""What the EM loop tells its callbacks: one event per iteration, plus start and end."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xarray as xr

    from emdsl.model import Model
    from emdsl.results import Fit


@dataclasses.dataclass(frozen=True)
class FitInfo:
    """Sent to ``on_fit_start`` before the first restart."""

    model: Model
    n_init: int
    max_iter: int
    tol: float
    n_samples: int
    sample_dim: Hashable
    seed: int


@dataclasses.dataclass(frozen=True, eq=False)
class IterationEvent:
    """The state of EM after an iteration (``iteration == 0``: the starting parameters).

    Attributes
    ----------
    restart, n_init : int
        Which restart (0-based) of how many.
    iteration, max_iter : int
        M-steps done so far in this restart, and the most allowed.
    loglik : float
        log p(x | θ⁽ᵗ⁾).
    elbo : float
        ELBO(q⁽ᵗ⁻¹⁾, θ⁽ᵗ⁾): the bound right after the M-step, before the E-step
        closes the gap.
    kl : float
        KL(q⁽ᵗ⁻¹⁾ ‖ p(z | x, θ⁽ᵗ⁾)) = loglik − elbo ≥ 0.
    delta : float or None
        loglik − previous loglik (None at iteration 0).
    elapsed : float
        Seconds since this restart began.
    converged : bool
        Whether this iteration met the convergence test.
    extrapolated : bool
        Whether the point came through an accelerated proposal (``fit(accelerate=...)``)
        rather than one EM step from the previous point: its ``elbo`` is not
        ELBO(q⁽ᵗ⁻¹⁾, θ⁽ᵗ⁾) (for DAAREM's proposals there is none: ``elbo == loglik``,
        ``kl == 0``), so the staircase leaves it out.
    """

    restart: int
    n_init: int
    iteration: int
    max_iter: int
    loglik: float
    elbo: float
    kl: float
    delta: float | None
    elapsed: float
    converged: bool
    _params: Callable[[], xr.DataTree] = dataclasses.field(repr=False)
    _stop: Callable[[], None] = dataclasses.field(repr=False)
    extrapolated: bool = False

    @property
    def params(self) -> xr.DataTree:
        """The current parameters, labelled like ``Fit.params`` (built on request)."""
        return self._params()

    def request_stop(self) -> None:
        """End the fit after this iteration; it returns the best parameters so far, not converged."""
        self._stop()


class Callback:
    """Base for callbacks that want more than one call per iteration.

    A plain callable is called with each :class:`IterationEvent`. A ``Callback``
    receives the same through :meth:`on_iteration`, and also hears when the fit
    starts and ends.

    Examples
    --------
    >>> import emdsl as em
    >>> class Count(em.Callback):
    ...     n = 0
    ...     def on_iteration(self, event):
    ...         self.n += 1
    >>> counter = Count()
    >>> _ = em.Model().observe("waiting", em.Normal).fit(em.datasets.load("faithful"), callbacks=[counter])
    >>> counter.n >= 2
    True
    """

    def on_fit_start(self, info: FitInfo) -> None:
        """Called once, before the first restart."""

    def on_iteration(self, event: IterationEvent) -> None:
        """Called after every iteration of every restart."""

    def on_fit_end(self, fit: Fit) -> None:
        """Called once with the result."""

    def __call__(self, event: IterationEvent) -> None:
        self.on_iteration(event)


def dispatch(callbacks: Any, method: str, argument: Any) -> None:
    """Call ``method`` on every callback that has it (plain callables get iteration events)."""
    for callback in callbacks:
        handler = getattr(callback, method, None)
        if handler is not None:
            handler(argument)
        elif method == "on_iteration":
            callback(argument)
