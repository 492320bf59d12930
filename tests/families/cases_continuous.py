"""Contract cases of the continuous families without a closed-form scale (Gamma, LogNormal, Beta, VonMises).

References are scipy.stats. The maximum-likelihood estimates start from
``scipy.stats.<family>.fit`` and are then polished with scipy.optimize on the score
equations written out here (brentq, or ``root`` for Beta's pair), because scipy's own
fits stop at about 1e-10 (Beta's fsolve) while the families' Newton M-steps converge to
rounding: the Newton-based cases state ``rtol_mle = 1e-11`` (measured: 1e-14), LogNormal's closed form 1e-10.
"""

from __future__ import annotations

import numpy as np
import scipy.stats as st
from contract import Case
from scipy import optimize, special

from emdsl.families.beta import Beta
from emdsl.families.gamma import Gamma
from emdsl.families.lognormal import LogNormal
from emdsl.families.von_mises import VonMises

#: Newton-based M-steps against the polished reference (both converge to rounding)
RTOL_NEWTON = 1e-11


def gamma_mle(x: np.ndarray) -> dict[str, np.ndarray]:
    """Shape solving log a − ψ(a) = log x̄ − mean(log x) (from scipy's fit), rate = a / x̄."""
    shape = []
    for column in x.T:
        start = st.gamma.fit(column, floc=0)[0]
        spread = np.log(column.mean()) - np.log(column).mean()
        shape.append(optimize.brentq(lambda a: np.log(a) - special.digamma(a) - spread, start / 2, start * 2,
                                     xtol=1e-300, rtol=4 * np.finfo(float).eps))
    shape = np.array(shape)
    return {"shape": shape, "rate": shape / x.mean(axis=0)}


def beta_mle(x: np.ndarray) -> dict[str, np.ndarray]:
    """(α, β) solving ψ(α) − ψ(α+β) = mean(log x), ψ(β) − ψ(α+β) = mean(log(1−x)), from scipy's fit."""
    alpha, beta = [], []
    for column in x.T:
        logs = np.array([np.log(column).mean(), np.log1p(-column).mean()])
        start = st.beta.fit(column, floc=0, fscale=1)[:2]
        solution = optimize.root(lambda p: special.digamma(p) - special.digamma(p.sum()) - logs, start,
                                 jac=lambda p: np.diag(special.polygamma(1, p)) - special.polygamma(1, p.sum()),
                                 tol=1e-15)
        alpha.append(solution.x[0])
        beta.append(solution.x[1])
    return {"alpha": np.array(alpha), "beta": np.array(beta)}


def von_mises_mle(x: np.ndarray) -> dict[str, np.ndarray]:
    """μ = atan2(mean sin, mean cos) and κ solving I₁(κ)/I₀(κ) = R̄, from scipy's fit."""
    mean, kappa = [], []
    for column in x.T:
        start = st.vonmises.fit(column, fscale=1)[0]
        c, s = np.cos(column).mean(), np.sin(column).mean()
        length = np.hypot(c, s)
        mean.append(np.arctan2(s, c))
        kappa.append(optimize.brentq(lambda k: special.i1e(k) / special.i0e(k) - length, start / 2, start * 2,
                                     xtol=1e-300, rtol=4 * np.finfo(float).eps))
    return {"mean": np.array(mean), "kappa": np.array(kappa)}


def lognormal_mle(x: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and (biased) variance of log x."""
    log_x = np.log(x)
    return {"mean": log_x.mean(axis=0), "variance": log_x.var(axis=0)}


CASES = [
    Case(
        name="gamma",
        make=Gamma,
        params=lambda rng, K, D: {"shape": rng.uniform(0.5, 8.0, (K, D)), "rate": rng.uniform(0.3, 5.0, (K, D))},
        scipy=lambda params, k, d: st.gamma(params["shape"][k, d], scale=1.0 / params["rate"][k, d]),
        mle=gamma_mle,
        rtol_mle=RTOL_NEWTON,
        bad_values=(0.0, -1.0, np.inf, -np.inf),
    ),
    Case(
        name="lognormal",
        make=LogNormal,
        params=lambda rng, K, D: {"mean": rng.uniform(-1.0, 2.0, (K, D)),
                                  "variance": rng.uniform(0.05, 1.5, (K, D))},
        scipy=lambda params, k, d: st.lognorm(np.sqrt(params["variance"][k, d]),
                                              scale=np.exp(params["mean"][k, d])),
        mle=lognormal_mle,
        rtol_mle=1e-10,
        bad_values=(0.0, -1.0, np.inf, -np.inf),
    ),
    Case(
        name="beta",
        make=Beta,
        # Shapes ≥ 0.6: smaller ones put draws at exactly 0.0 or 1.0 in floating point.
        params=lambda rng, K, D: {"alpha": rng.uniform(0.6, 6.0, (K, D)), "beta": rng.uniform(0.6, 6.0, (K, D))},
        scipy=lambda params, k, d: st.beta(params["alpha"][k, d], params["beta"][k, d]),
        mle=beta_mle,
        rtol_mle=RTOL_NEWTON,
        bad_values=(0.0, 1.0, -0.5, 1.5, np.inf, -np.inf),
    ),
    Case(
        name="vonmises",
        make=VonMises,
        params=lambda rng, K, D: {"mean": rng.uniform(-np.pi, np.pi, (K, D)), "kappa": rng.uniform(0.5, 12.0, (K, D))},
        scipy=lambda params, k, d: st.vonmises(params["kappa"][k, d], loc=params["mean"][k, d]),
        mle=von_mises_mle,
        rtol_mle=RTOL_NEWTON,
        bad_values=(np.inf, -np.inf),
    ),
]
