"""The contract every observed family meets, stated once (distrax's EquivalenceTest is the model).

A family joins the suite with one ``Case`` in a ``cases_*.py`` module: how to make
it, random parameters in the data's units, and the independent reference it must
equal (a scipy.stats frozen distribution per state, and the maximum-likelihood
estimate for one component on complete data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    """One family under the contract.

    Attributes
    ----------
    name : str
        Test id.
    make : callable
        ``make()`` -> the family instance (a declaration, e.g. ``em.Poisson()``).
    params : callable
        ``params(rng, K, D)`` -> ``{name: array}`` of valid parameters, internal layout
        (latent axis first, K states, D elements).
    scipy : callable
        ``scipy(params, k, d)`` -> a frozen ``scipy.stats`` distribution of element d in state k.
    mle : callable
        ``mle(x)`` -> ``{name: (D,) array}``: the maximum-likelihood estimate of one
        component from complete data x (n × D), computed independently (closed form or
        ``scipy.stats.<family>.fit``).
    aux : callable, optional
        ``aux(rng, n, D)`` -> ``{name: (n, D) array}`` of extra data the family reads
        (e.g. Binomial's trials), or None.
    rtol_mle : float
        Tolerance of the M-step against ``mle`` (1e-10 for closed forms; Newton-based
        M-steps converge over iterations, so they state theirs).
    bad_values : list
        Values outside the support, each of which must be reported.
    discrete : bool
        Whether the data are integers.
    """

    name: str
    make: Callable[[], Any]
    params: Callable[[np.random.Generator, int, int], dict[str, np.ndarray]]
    scipy: Callable[[dict[str, np.ndarray], int, int], Any]
    mle: Callable[[np.ndarray], dict[str, np.ndarray]]
    aux: Callable[[np.random.Generator, int, int], dict[str, np.ndarray]] | None = None
    rtol_mle: float = 1e-10
    bad_values: tuple = ()
    discrete: bool = False
