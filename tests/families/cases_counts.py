"""Contract cases of the count families (and the Exponential), each against scipy.stats.

A case with ``aux`` (Binomial with a trials variable) gets the extra data as a last
argument of ``scipy`` and ``mle``: ``scipy(params, k, d, aux_d)`` with ``aux_d`` the
(n,) column of element d, and ``mle(x, aux)``; see ``test_contract.py``.
"""

from __future__ import annotations

import numpy as np
import scipy.stats as st
from contract import Case

from emdsl.families.bernoulli import Bernoulli
from emdsl.families.binomial import Binomial
from emdsl.families.exponential import Exponential
from emdsl.families.multinomial import Multinomial
from emdsl.families.poisson import Poisson

TRIALS = 12
TOTAL = 15  # multinomial events in the contract all sum to this (declared, so that it can sample)


def _rate(rng, K, D):
    return {"rate": rng.uniform(0.3, 8.0, (K, D))}


def _probs(rng, K, D):
    return {"probs": rng.uniform(0.03, 0.97, (K, D))}


CASES = [
    Case(
        name="poisson",
        make=Poisson,
        params=_rate,
        scipy=lambda params, k, d: st.poisson(params["rate"][k, d]),
        mle=lambda x: {"rate": x.mean(axis=0)},
        bad_values=(-1.0, 2.5, np.inf, -np.inf),
        discrete=True,
    ),
    Case(
        name="bernoulli",
        make=Bernoulli,
        params=_probs,
        scipy=lambda params, k, d: st.bernoulli(params["probs"][k, d]),
        mle=lambda x: {"probs": x.mean(axis=0)},
        bad_values=(-1.0, 0.5, 2.0, np.inf),
        discrete=True,
    ),
    Case(
        name="binomial-fixed-trials",
        make=lambda: Binomial(trials=TRIALS),
        params=_probs,
        scipy=lambda params, k, d: st.binom(TRIALS, params["probs"][k, d]),
        mle=lambda x: {"probs": x.mean(axis=0) / TRIALS},
        bad_values=(-1.0, 2.5, TRIALS + 1.0, np.inf),
        discrete=True,
    ),
    Case(
        name="binomial-trials-variable",
        make=lambda: Binomial(trials="n"),
        params=_probs,
        # Per-sample trials, including 0 (then x = 0 and the sample carries no information).
        aux=lambda rng, n, D: {"trials": rng.integers(0, 40, (n, D)).astype(float)},
        scipy=lambda params, k, d, aux: st.binom(aux["trials"].astype(np.int64), params["probs"][k, d]),
        mle=lambda x, aux: {"probs": x.sum(axis=0) / aux["trials"].sum(axis=0)},
        bad_values=(-1.0, 0.5, 1000.0, np.inf),  # 1000 is above every sample's trials
        discrete=True,
    ),
    Case(
        name="exponential",
        make=Exponential,
        params=_rate,
        scipy=lambda params, k, d: st.expon(scale=1.0 / params["rate"][k, d]),
        mle=lambda x: {"rate": 1.0 / x.mean(axis=0)},
        bad_values=(-0.5, -np.inf, np.inf),
    ),
    Case(
        name="multinomial",
        make=lambda: Multinomial(trials=TOTAL),
        params=lambda rng, K, D: {"probs": rng.dirichlet(np.full(D, 2.0), size=K)},
        # Multivariate: one distribution per state over the whole event (d is ignored).
        scipy=lambda params, k, d: st.multinomial(TOTAL, params["probs"][k]),
        mle=lambda x: {"probs": x.sum(axis=0) / x.sum()},
        bad_values=(-1.0, 2.5, np.inf),
        discrete=True,
    ),
]
