"""Fuzzing every family at extreme magnitudes (issue 7): a correct finite fit, or a ModelError naming the culprit.

Each case is one observed family (every registered one that data can be generated for)
under a latent with a random K, on data scaled to 1e-300..1e300 (continuous families), or
counts up to 1e15 and beyond (count families), with holes, weights, the odd value near
the largest float, a random ``init`` and, where the family takes one, a ``floor``. The
contract (DESIGN.md §5) is checked as ``tests/test_fuzz.py`` checks it: finite parameters,
a finite trace that never decreases beyond the recorded rounding slack, and ``fit.loglik``
equal to the weighted sum of ``score_samples``; or ``ModelError`` naming the variable, the
node, or the argument at fault. Never a NaN, a crash in native code, or a MonotonicityError.

``EMDSL_FUZZ_EXAMPLES=400`` sets the number of examples (default: a short CI subset,
derandomized under ``CI=true`` by the suite's hypothesis profile); ``EMDSL_FUZZ_REPORT=path``
records every outcome (and the reproducer of every failure) there as JSON instead of failing.
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from typing import Any

import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

import emdsl as em
from emdsl.errors import ModelError
from tests._forked import in_child
from tests._fuzzing import REPORT, fuzz_settings, long_run_timeout, write_report

_SETTINGS = fuzz_settings(25)
OUTCOMES: collections.Counter[str] = collections.Counter()
BUGS: list[dict[str, Any]] = []

REAL = ("Normal", "MultivariateNormal", "VonMises")
POSITIVE = ("Exponential", "Gamma", "LogNormal")
UNIT = ("Beta", "Bernoulli")
COUNTS = ("Poisson", "Binomial", "Multinomial")
FAMILIES = REAL + POSITIVE + UNIT + COUNTS + ("Categorical",)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    write_report(outcomes=dict(OUTCOMES.most_common()), bugs=BUGS)


@st.composite
def cases(draw) -> dict[str, Any]:
    kind = draw(st.sampled_from(FAMILIES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    N = draw(st.sampled_from([3, 8, 20, 40]))
    K = draw(st.integers(1, min(5, N)))
    D = draw(st.integers(2, 3)) if kind in ("MultivariateNormal", "Multinomial") else draw(st.sampled_from([1, 1, 2]))
    labels = rng.integers(K, size=N)
    latent = rng.normal(0, 2.5, (K, D))[labels] + rng.normal(size=(N, D))
    floor = draw(st.sampled_from([None, None, 1e-12, 1e-3] + ([0.0] if kind in ("Normal", "MultivariateNormal")
                                                                 else [])))
    floor_arg = {} if floor is None or kind not in ("Normal", "MultivariateNormal", "LogNormal", "Gamma") \
        else {"floor": floor}
    exponent = draw(st.integers(-300, 300))
    scale = 10.0 ** exponent
    faults = [f"{kind}", f"N={N}", f"K={K}", f"D={D}"] + [f"floor={floor}"] * bool(floor_arg)
    family: Any
    if kind in REAL:
        values = latent * scale if kind != "VonMises" else np.angle(np.exp(1j * latent))
        family = em.VonMises() if kind == "VonMises" else getattr(em, kind)(**floor_arg)
    elif kind in POSITIVE:
        values = np.exp(latent / 2) * scale
        family = getattr(em, kind)(**floor_arg)
    elif kind == "Beta":
        values, family = 1 / (1 + np.exp(-latent)), em.Beta()
    elif kind == "Bernoulli":
        values, family = (latent > 0).astype(float), em.Bernoulli()
    elif kind == "Categorical":
        values = np.array(list("abcd"), dtype=object)[np.clip((latent + 4).astype(int) // 2, 0, 3)]
        family = em.Categorical()
    else:
        magnitude = 10.0 ** draw(st.integers(0, 15))
        mean = np.exp(latent / 2) * magnitude
        if kind == "Poisson":
            values, family = rng.poisson(np.minimum(mean, 1e18)).astype(float), em.Poisson()
        elif kind == "Binomial":
            trials = int(min(magnitude, 1e13)) + 1
            values = rng.binomial(trials, 1 / (1 + np.exp(-latent))).astype(float)
            family = em.Binomial(trials) if trials <= 1e12 else em.Binomial("n")
            faults.append(f"trials={trials}")
        else:
            probs = np.exp(latent) / np.exp(latent).sum(axis=1, keepdims=True)
            values = np.array([rng.multinomial(int(magnitude), p) for p in probs], dtype=float)
            family = em.Multinomial("cat")
        faults.append(f"counts~{magnitude:g}")
    if kind in REAL + POSITIVE:
        faults.append(f"scale=1e{exponent}")
    if draw(st.integers(0, 5)) == 0 and kind not in ("Categorical",):
        values[rng.integers(N), rng.integers(D)] = draw(st.sampled_from([1.7e308, 5e-324, -1.7e308, 1e-310]))
        faults.append("extreme value")
    if draw(st.booleans()):
        holes = rng.random(values.shape) < draw(st.sampled_from([0.1, 0.3]))
        if kind == "Multinomial":
            holes = np.repeat(holes[:, :1], D, axis=1)
        values = values.astype(object) if kind == "Categorical" else values
        values[holes] = None if kind == "Categorical" else np.nan
        faults.append("holes")
    dims = ("sample", "cat") if kind == "Multinomial" else ("sample", "feature")
    ds = xr.Dataset({"x": (dims, values) if D > 1 or kind == "Multinomial" else ("sample", values[:, 0])})
    if kind == "Binomial" and family.trials == "n":
        ds["n"] = xr.DataArray(np.full(values.shape if D > 1 else N, trials),
                               dims=dims if D > 1 else ("sample",))
    kwargs: dict[str, Any] = {"seed": seed, "init": draw(st.sampled_from(["kmeans++", "random"])),
                              "max_iter": draw(st.sampled_from([0, 3, 20])), "n_init": draw(st.integers(1, 2))}
    accelerate = draw(st.sampled_from(["auto", "auto", None]))  # the default (SQUAREM) and plain EM
    if accelerate is None:
        kwargs["accelerate"] = None
    faults.append(f"accelerate={accelerate}")
    if draw(st.integers(0, 3)) == 0:
        kwargs["prior"] = "weak"
        faults.append("prior=weak")
    if draw(st.booleans()):
        w = rng.uniform(0.5, 3, N) * 10.0 ** draw(st.sampled_from([0, 0, -100, 100]))
        ds["w"] = xr.DataArray(w, dims=("sample",))
        kwargs["weights"] = "w"
        faults.append(f"weights~{w.max():.0e}")
    model = em.Model()
    if K > 1 or draw(st.booleans()):
        model = model.latent("z", em.Categorical(K))
    return {"model": model.observe("x", family), "data": ds, "kwargs": kwargs, "faults": faults}


_CULPRITS = ("x", "z", "w", "n", "weights", "floor", "seed", "init")


def _names_a_culprit(message: str) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) for name in _CULPRITS)


def _outcome(case: dict[str, Any]) -> tuple[str, str | None]:
    """(the outcome, what went wrong if it is a bug)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit = case["model"].fit(case["data"], **case["kwargs"])
        except ModelError as error:
            return ("ModelError", None) if _names_a_culprit(str(error)) else (
                "BUG", f"ModelError naming no culprit: {error}")
        except Exception as error:  # noqa: BLE001 - anything else is the bug being looked for
            return "BUG", f"{type(error).__name__} in fit: {str(error)[:400]}"
        try:
            for node in fit.params.children.values():
                for name, da in node.to_dataset().data_vars.items():
                    assert np.isfinite(np.asarray(da.values, dtype=float)).all(), f"{name}: {da.values}"
            traces = fit.traces
            loglik, slack, restart = (traces[v].values for v in ("loglik", "slack", "restart"))
            assert np.isfinite(loglik).all() and np.isfinite(slack).all(), (loglik, slack)
            assert np.isfinite(traces["elbo"].values).all() and np.isfinite(traces["kl"].values).all(), traces
            # with prior="weak" the objective that never decreases is the log-posterior
            objective = traces["logpost"].values if "logpost" in traces.coords else loglik
            assert np.isfinite(objective).all(), objective
            for r in np.unique(restart):
                mine = restart == r
                assert np.all(np.diff(objective[mine]) >= -slack[mine][1:]), ("decrease", np.diff(objective[mine]))
            scores = fit.score_samples(case["data"]).values
            assert np.isfinite(scores).all(), scores
            weights = case["data"]["w"].values if "weights" in case["kwargs"] else np.ones(len(scores))
            total = float(scores @ weights)
            assert total == pytest.approx(fit.loglik, rel=1e-9, abs=float(slack.max())), (total, fit.loglik)
        except ModelError as error:
            return ("ModelError after fit", None) if _names_a_culprit(str(error)) else (
                "BUG", f"ModelError after fit naming no culprit: {error}")
        except Exception as error:  # noqa: BLE001
            return "BUG", f"{type(error).__name__} after fit: {str(error)[:400]}"
    return "fit ok", None


def _isolated(case: dict[str, Any]) -> tuple[str, str | None]:
    """:func:`_outcome` in a forked child, so that a crash in native code is a recorded bug."""
    if not hasattr(os, "fork"):
        return _outcome(case)
    return in_child(lambda: _outcome(case), lambda error: ("BUG", f"{type(error).__name__} in the child"),
                    lambda crash: ("BUG", crash))


@long_run_timeout()
@_SETTINGS
@given(case=cases())
def test_every_family_at_every_magnitude_fits_or_names_the_culprit(case):
    outcome, bug = _isolated(case)
    OUTCOMES[outcome] += 1
    if bug is None:
        return
    if not REPORT:
        raise AssertionError(f"{bug}\nfaults: {case['faults']}\nmodel: {case['model']!r}\nkwargs: {case['kwargs']}")
    BUGS.append({"bug": bug, "faults": case["faults"], "model": repr(case["model"]),
                 "kwargs": {k: repr(v) for k, v in case["kwargs"].items()}})
