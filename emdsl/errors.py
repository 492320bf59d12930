"""Exceptions and warnings raised by emdsl."""

from __future__ import annotations

__all__ = [
    "ConvergenceWarning",
    "DegenerateComponentWarning",
    "ImpossibleDataError",
    "ModelError",
    "MonotonicityError",
]


class ModelError(ValueError):
    """A declaration, its data or its starting values cannot be fitted as given.

    The message names the variable (and where useful the dimension and position),
    says what was expected, what arrived, and what to do.
    """


class ImpossibleDataError(ModelError):
    """The data have probability 0 under the parameters: at some step of a sequence, no state that
    the initial distribution and the transitions allow can emit the observation (in floating point:
    every such state's emission probability underflows)."""


class MonotonicityError(RuntimeError):
    """The log-likelihood decreased during EM, which the algorithm rules out.

    EM (and generalized EM) never decreases log p(x | θ); a decrease beyond
    floating-point noise means a bug in an E- or M-step. Please report it with
    the model and data that produced it.
    """


class DegenerateComponentWarning(UserWarning):
    """A component collapsed: its variance hit the floor, or it lost all responsibility."""


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the log-likelihood converged to ``tol``."""
