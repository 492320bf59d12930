"""Fuzzing the public API: every generated case fits soundly or raises a ModelError that names the culprit.

Cases combine a model (families, covariance types, fixed and tied parameters, floors,
K from 1 to 6, K ≥ N included), data (1-D and 2-D variables, stacked columns, dtypes,
NaN holes, ±inf, values outside the support, extreme scales and offsets, constant and
duplicated columns) and the arguments of ``fit`` and of the calls on a fit.

A case passes when either

* the fit succeeds: every parameter is finite, each restart's log-likelihood never
  decreases by more than the rounding bound the engine recorded (``slack``), and
  ``fit.loglik`` equals the weighted sum of ``score_samples`` on the training data
  (to 1e-9 relative); predictions, scores, samples and a save/load round trip then
  succeed too, or raise ModelError; or
* ``ModelError`` is raised and its message names a culprit: a variable, node or
  latent of the case, or the argument at fault.

Anything else (another exception, a NaN, a MonotonicityError) is a bug.

``EMDSL_FUZZ_EXAMPLES=2000`` sets the number of examples (default: the hypothesis
profile's, small for CI, derandomized under ``CI=true``); ``EMDSL_FUZZ_REPORT=path``
writes the count of each outcome there as JSON when the module finishes.
"""

from __future__ import annotations

import collections
import dataclasses
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

_SETTINGS = fuzz_settings(None)

OUTCOMES: collections.Counter[str] = collections.Counter()
#: the fit's outcome per model structure (mixture, markov, two latents) and per accelerate=, for the report
BY_FORM: collections.Counter[str] = collections.Counter()
#: with EMDSL_FUZZ_REPORT set, bugs are recorded there (with a reproducer) instead of failing the run,
#: so that one long run counts every outcome
BUGS: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    write_report(outcomes=dict(OUTCOMES.most_common()), by_form=dict(sorted(BY_FORM.items())), bugs=BUGS)


# -- generated cases ---------------------------------------------------------------------

REAL = ("normal", "mvn", "vonmises")
POSITIVE = ("exponential", "gamma", "lognormal")
COUNTS = ("poisson", "binomial", "multinomial")
KINDS = REAL + POSITIVE + COUNTS + ("bernoulli", "beta", "categorical")
FIT_ARGUMENTS = ("init", "n_init", "max_iter", "tol", "seed", "weights", "sample_dim", "callbacks", "data")


@dataclasses.dataclass
class Case:
    model: em.Model
    data: xr.Dataset
    kwargs: dict[str, Any]
    #: names a message may cite: variables, nodes, the latent, arguments at fault
    culprits: set[str]
    #: what was done to the data, for the report
    faults: list[str]


@st.composite
def node_specs(draw, index: int, N: int, K: int, rng: np.random.Generator, labels: np.ndarray,
               K_node: int | None = None):
    """One observed node: (variables {name: DataArray}, observe args, family, culprits, faults).

    ``K`` states generate the values (``labels``); ``K_node`` is the number of parameter sets
    of the node (fewer with ``given=`` a subset of several latents), which fixed values follow.
    """
    kind = draw(st.sampled_from(KINDS))
    name = f"v{index}"
    width = draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["1d", "2d", "stacked"])) if kind == "mvn" else (
        "2d" if kind == "multinomial" else draw(st.sampled_from(["1d", "1d", "2d"])))
    if layout == "1d":
        width = 1
    if kind == "multinomial":
        width = max(width, 2)
    latent = rng.normal(0, 2.5, (K, width))[labels] + rng.normal(size=(N, width))  # a mixture, per component
    faults: list[str] = []
    family, values = _family_and_values(draw, kind, index, latent, K if K_node is None else K_node, width, rng,
                                        faults)
    values = _perturb(draw, kind, values, rng, faults)
    culprits = {name} | ({"floor"} if "floor=0" in faults else set())
    if layout == "stacked":
        columns = [f"{name}_{j}" for j in range(width)]
        variables = {c: xr.DataArray(values[:, j], dims=("sample",)) for j, c in enumerate(columns)}
        observe = (columns, family)
        culprits.update(columns)
    elif layout == "2d":
        dim = "cat" if kind == "multinomial" else "feature"
        dim = f"{dim}{index}"  # each node its own event dim: widths differ between nodes
        variables = {name: xr.DataArray(values, dims=("sample", dim))}
        observe = (name, family)
    else:
        variables = {name: xr.DataArray(values[:, 0], dims=("sample",))}
        observe = (name, family)
    if kind == "binomial" and isinstance(family.trials, str):
        variables[family.trials] = xr.DataArray(np.full(N, 12), dims=("sample",))
        culprits.add(family.trials)
    return variables, observe, culprits, faults


def _family_and_values(draw, kind: str, index: int, latent: np.ndarray, K: int, width: int, rng, faults):
    """A family declaration (with options drawn) and valid values for it."""
    floors = [None, None, 0.0, 1e-12, 1e-2] if kind in ("normal", "mvn") else [None, None, 1e-12, 1e-2]
    floor = draw(st.sampled_from(floors))
    floor_arg = {} if floor is None else {"floor": floor}
    if floor is not None:
        faults.append(f"floor={floor:g}")
    if kind == "normal":
        tied = draw(st.sampled_from([None, None, "variance"]))
        fixed = draw(st.sampled_from([None, None, "mean", "variance"]))
        extra = {"mean": rng.normal(size=K).tolist()} if fixed == "mean" else (
            {"variance": float(rng.uniform(0.5, 2))} if fixed == "variance" else {})
        return em.Normal(tied, **extra, **floor_arg), latent
    if kind == "mvn":
        covariance = draw(st.sampled_from(["full", "diag", "spherical", "tied", "fixed", "EII", "EEI", "VEI", "EVI",
                                           "VEE", "EVE", "VVE", "EEV", "VEV", "EVV"]))
        if covariance == "fixed":
            return em.MultivariateNormal(covariance=np.eye(width), **floor_arg), latent
        mean = {"mean": rng.normal(size=(K, width))} if draw(st.booleans()) and K <= 3 else {}
        return em.MultivariateNormal(covariance=covariance, **mean, **floor_arg), latent
    if kind == "vonmises":
        return em.VonMises(), np.angle(np.exp(1j * latent))
    if kind == "exponential":
        return em.Exponential(), np.exp(latent / 2)
    if kind == "gamma":
        return em.Gamma(), np.exp(latent / 2)
    if kind == "lognormal":
        return em.LogNormal(**floor_arg), np.exp(latent / 2)
    if kind == "beta":
        return em.Beta(), 1 / (1 + np.exp(-latent))
    if kind == "bernoulli":
        return em.Bernoulli(), (latent > 0).astype(float)
    if kind == "poisson":
        rate = {"rate": rng.uniform(0.5, 5, K).tolist()} if draw(st.booleans()) and K <= 3 else {}
        return em.Poisson(**rate), rng.poisson(np.exp(latent / 2)).astype(float)
    if kind == "binomial":
        trials = draw(st.sampled_from([12, "trials"]))
        return em.Binomial(trials), rng.binomial(12, 1 / (1 + np.exp(-latent))).astype(float)
    if kind == "multinomial":
        probs = np.exp(latent) / np.exp(latent).sum(axis=1, keepdims=True)
        return em.Multinomial(f"cat{index}"), np.array([rng.multinomial(10, p) for p in probs], dtype=float)
    # categorical: levels learned from the data, or given
    levels = ["a", "b", "c", "d"]
    codes = np.clip((latent + 4).astype(int) // 2, 0, 3)
    given = draw(st.sampled_from(["learned", "levels", "fixed probs"]))
    if given == "fixed probs":
        # fixed probabilities with structural zeros (a level impossible in some states), per element
        probs = rng.dirichlet(np.ones(4), size=(K, width))
        probs[rng.random(probs.shape) < 0.3] = 0.0
        probs[..., 0] += probs.sum(axis=-1) == 0
        probs /= probs.sum(axis=-1, keepdims=True)
        faults.append("fixed probs with zeros")
        return em.Categorical(levels, probs=probs if width > 1 else probs[:, 0]), \
            np.array(levels, dtype=object)[codes]
    return (em.Categorical(levels) if given == "levels" else em.Categorical()), np.array(levels, dtype=object)[codes]


def _perturb(draw, kind: str, values: np.ndarray, rng, faults: list[str]) -> np.ndarray:
    """Extreme scales and offsets, constant and duplicated columns, holes, bad values, dtypes."""
    N, width = values.shape
    categorical = kind == "categorical"
    if not categorical:
        values = values.astype(float)
        if kind in ("normal", "mvn") + POSITIVE and draw(st.integers(0, 3)) == 0:
            exponent = draw(st.integers(-320, 320))
            half = exponent // 2
            with np.errstate(over="ignore", under="ignore"):  # beyond the float range: ±inf or 0, as a user's data
                values = values * 10.0**half * 10.0**(exponent - half)
            faults.append(f"scale=1e{exponent}")
        if kind in ("normal", "mvn") and draw(st.integers(0, 4)) == 0:
            offset = draw(st.sampled_from([-1, 1])) * 10.0 ** draw(st.integers(-10, 308))
            with np.errstate(over="ignore"):
                values = values + offset
            faults.append(f"offset={offset:.0e}")
    if draw(st.integers(0, 9)) == 0:
        values[:, 0] = values[0, 0]
        faults.append("constant column")
    if width > 1 and draw(st.integers(0, 4)) == 0:
        values[:, 1] = values[:, 0]
        faults.append("duplicated column")
    if N > 1 and draw(st.integers(0, 3)) == 0:
        fraction = draw(st.sampled_from([0.1, 0.5, 1.0]))
        holes = rng.random(values.shape) < fraction
        values = values.astype(object) if categorical else values
        values[holes] = None if categorical else np.nan
        faults.append(f"holes={fraction}")
    bad = draw(st.sampled_from([None] * 16 + ["inf", "-inf", "outside", "huge"]))
    if bad is not None and not categorical:
        i, j = rng.integers(N), rng.integers(width)
        values[i, j] = {"inf": np.inf, "-inf": -np.inf, "huge": 1.7e308,
                        "outside": {"beta": 1.5, "bernoulli": 0.5, "vonmises": np.inf}.get(kind, -1.5)}[bad]
        faults.append(f"bad value {bad}")
    elif bad is not None:
        values[rng.integers(N), rng.integers(width)] = "zz"
        faults.append("unknown level")
    if not categorical and kind in COUNTS + ("bernoulli",) and (np.abs(values) < 2**15).all() and draw(st.booleans()):
        values = values.astype(draw(st.sampled_from([np.int64, np.int32, np.int16])))
        faults.append(f"dtype={values.dtype}")
    elif not categorical and draw(st.integers(0, 5)) == 0:
        with np.errstate(over="ignore"):  # beyond float32's range: ±inf, which must be reported
            values = values.astype(np.float32)
        faults.append("dtype=float32")
    return values


@st.composite
def cases(draw) -> Case:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # one latent (a mixture), a Markov latent over "time", or two independent latents (joint states)
    structure = draw(st.sampled_from(["mixture"] * 6 + ["markov"] * 2 + ["two"] * 2))
    culprits: set[str] = set()
    faults: list[str] = [structure]
    model = em.Model()
    n_sequences = steps = 0
    if structure == "markov":
        n_sequences, steps = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 5, 8, 13]))
        N = n_sequences * steps
        K = draw(st.integers(1, 4))
        sticky = 0.8 * np.eye(K) + 0.2 / K
        labels = np.empty(N, dtype=int)
        for i in range(N):  # row i = (sequence i // steps, step i % steps)
            labels[i] = rng.integers(K) if i % steps == 0 else rng.choice(K, p=sticky[labels[i - 1]])
    else:
        N = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 25, 40, 40, 40]))
        K = draw(st.integers(1, 6 if N > 8 else N + 1))  # K > N now and then, not mostly
        labels = rng.integers(K, size=N)
    latent_name = draw(st.sampled_from(["z", "cluster"]))
    sizes: dict[str, int] = {}
    if structure == "two":
        Ka, Kb = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        K = Ka * Kb
        labels = rng.integers(K, size=N)  # joint state a·Kb + b
        sizes = {"ga": Ka, "gb": Kb}
        model = model.latent("ga", em.Categorical(Ka)).latent("gb", em.Categorical(Kb))
        culprits |= {"ga", "gb", model.latent_var.name}
        latent_name = model.latent_var.name
        has_latent = True
    elif structure == "markov":
        fixed: dict[str, Any] = {}
        transition = draw(st.sampled_from([None, None, "left-right", "zeros"]))
        if transition == "left-right":
            fixed["transition"] = np.eye(K) * 0.7 + np.eye(K, k=1) * 0.3
            fixed["transition"][-1, -1] = 1.0
        elif transition == "zeros":
            matrix = rng.dirichlet(np.ones(K), size=K)
            matrix[rng.random((K, K)) < 0.3] = 0.0
            matrix[np.arange(K), np.arange(K)] += 0.1
            fixed["transition"] = matrix / matrix.sum(axis=1, keepdims=True)
        if draw(st.integers(0, 3)) == 0:
            initial = np.zeros(K)
            initial[0] = 1.0
            fixed["initial"] = initial
        if fixed:
            faults.append(f"markov fixed {sorted(fixed)}")
        model = model.latent(latent_name, em.Categorical(K, **fixed), markov="time")
        culprits |= {latent_name, "time"}
        has_latent = True
    else:
        has_latent = K > 1 or draw(st.booleans())
        if has_latent:
            states = draw(st.sampled_from([K, [f"s{k}" for k in range(K)]]))
            model = model.latent(latent_name, em.Categorical(states))
            culprits.add(latent_name)
    data: dict[str, xr.DataArray] = {}
    faults += [f"N={N}", f"K={K}"]
    for index in range(draw(st.integers(1, 3))):
        given = draw(st.sampled_from([None, None, ("ga",), ("gb",), ()])) if structure == "two" else None
        K_node = K if given is None else int(np.prod([sizes[name] for name in given]))
        variables, (names, family), names_cited, node_faults = draw(node_specs(index, N, K, rng, labels, K_node))
        model = model.observe(names, family) if given is None else model.observe(names, family, given=given)
        data.update(variables)
        culprits |= names_cited | {model.observed[-1].name}
        faults += node_faults + ([f"given={given}"] if given is not None else [])
    if structure == "markov":  # rows → (sequence, step): "sample" holds the sequences
        data = {name: xr.DataArray(np.asarray(da.values).reshape((n_sequences, steps) + da.shape[1:]),
                                   dims=("sample", "time") + da.dims[1:]) for name, da in data.items()}
        N = n_sequences
    ds = xr.Dataset(data)
    known = draw(st.sampled_from([None] * 6 + ["some", "some", "bad"])) if has_latent and K > 1 else None
    if known is not None:  # partly labelled (semi-supervised): a variable named like the latent
        shown = rng.random(len(labels)) < 0.3
        if structure == "two":
            name, codes = draw(st.sampled_from([("ga", labels // sizes["gb"]), ("gb", labels % sizes["gb"])]))
        else:
            name, codes = latent_name, labels
        values = np.where(shown, codes, np.nan)
        if known == "bad":
            values[0] = 99.0  # not a state
            culprits.add(name)
        grid = ("sample", "time") if structure == "markov" else ("sample",)
        ds[name] = xr.DataArray(values.reshape(N, -1) if structure == "markov" else values, dims=grid)
        faults.append(f"known states={known}")
    kwargs: dict[str, Any] = {"seed": seed, "max_iter": draw(st.sampled_from([0, 1, 5, 25])),
                              "tol": draw(st.sampled_from([0.0, 1e-8, 1e-3])), "n_init": draw(st.integers(1, 3))}
    init = draw(st.sampled_from(["kmeans++"] * 4 + ["random", "responsibilities", "bad", "fit-values"]))
    if init == "responsibilities" and has_latent:
        start = rng.dirichlet(np.ones(K), size=N * max(steps, 1))
        if structure == "markov":
            kwargs["init"] = xr.DataArray(start.reshape(N, steps, K), dims=("sample", "time", latent_name))
        elif structure == "two":
            kwargs["init"] = xr.DataArray(start.reshape(N, *sizes.values()), dims=("sample", *sizes))
        else:
            kwargs["init"] = xr.DataArray(start, dims=("sample", latent_name))
        faults.append("init=responsibilities")
    elif init == "bad":
        kwargs["init"] = draw(st.sampled_from(["kmeans", 3, {"nope": {}}, {latent_name: {"probs": [2.0]}}]))
        culprits.add("init")
        faults.append(f"init={kwargs['init']!r}")
    elif init in ("random", "kmeans++"):
        kwargs["init"] = init
    if init == "fit-values":
        faults.append("init=a previous fit")
        kwargs["init"] = "fit-values"  # replaced by a short fit of the same model in the test
    weights = draw(st.sampled_from([None] * 6 + ["ok", "ok", "zero", "negative", "nan", "all-zero"]))
    if weights is not None:
        w = rng.uniform(0.5, 3, N)
        if weights in ("zero", "negative", "nan") and N > 1:
            w[0] = {"zero": 0.0, "negative": -1.0, "nan": np.nan}[weights]
        if weights == "all-zero":
            w[:] = 0
        ds["w"] = xr.DataArray(w, dims=("sample",))
        kwargs["weights"] = "w"
        culprits.add("weights")
        faults.append(f"weights={weights}")
    if draw(st.integers(0, 3)) == 0:
        kwargs["prior"] = "weak"
        faults.append("prior=weak")
    accelerate = draw(st.sampled_from(["default"] * 3 + [None] * 2 + ["squarem", "daarem", "qn"]))
    if accelerate != "default":
        kwargs["accelerate"] = accelerate
    faults.append(f"accelerate={accelerate}")
    for key in ("n_init", "max_iter", "tol", "seed"):
        culprits.add(key)
    return Case(model, ds, kwargs, culprits, faults)


# -- the property --------------------------------------------------------------------------


def _kind(message: str) -> str:
    """A short name for the class of a ModelError, for the report."""
    patterns = [
        ("K > N", r"states but the data have only"), ("constant", r"is constant"),
        ("infinite", r"infinite value"), ("outside support", r"outside the support|not a known level"),
        ("floor=0 collapse", r"floor=0"), ("scale out of range", r"standard deviation of .* (over|under)flows"),
        ("span overflows", r"a span wider"), ("far mean", r"standard deviations from the data's mean"),
        ("weights", r"weights"), ("init", r"^init|init:|init\["), ("all missing", r"no observed value|every value is missing"),
        ("event/dims", r"dimension|dims"), ("trials", r"trials"), ("fixed value", r"fixed value"),
    ]
    return next((kind for kind, pattern in patterns if re.search(pattern, message)), "other")


def _finite_params(fit: em.Fit) -> bool:
    return all(np.isfinite(np.asarray(da.values, dtype=float)).all()
               for node in fit.params.children.values() for da in node.to_dataset().data_vars.values())


def _check_fit(fit: em.Fit, case: Case, tmp_path, outcomes: list[str]) -> None:
    assert _finite_params(fit), fit.params
    traces = fit.traces
    loglik, slack, restart = (traces[v].values for v in ("loglik", "slack", "restart"))
    assert np.isfinite(loglik).all() and np.isfinite(slack).all()
    assert np.isfinite(traces["elbo"].values).all() and np.isfinite(traces["kl"].values).all(), traces
    # with a prior (MAP-EM) the objective that never decreases is the log-posterior
    objective = traces["logpost"].values if "logpost" in traces.coords else loglik
    assert np.isfinite(objective).all(), objective
    for r in np.unique(restart):
        mine = restart == r
        assert np.all(np.diff(objective[mine]) >= -slack[mine][1:]), (r, np.diff(objective[mine]).min())
    scores = fit.score_samples(case.data).values
    weights = case.data["w"].values if "weights" in case.kwargs else np.ones(len(scores))
    # a sample of weight 0 counts for nothing: its value may lie beyond every state (score −∞), never NaN
    counted = weights != 0
    assert not np.isnan(scores).any() and np.isfinite(scores[counted]).all(), scores
    total = float(scores[counted] @ weights[counted])
    assert total == pytest.approx(fit.loglik, rel=1e-9, abs=float(slack.max())), (total, fit.loglik)
    _exercise(fit, case, tmp_path, outcomes)


def _exercise(fit: em.Fit, case: Case, tmp_path, outcomes: list[str]) -> None:
    """Every call on a fit answers with finite values or a ModelError naming its culprit."""
    calls = {"bic": lambda: fit.bic(), "aic": lambda: fit.aic(), "score": lambda: fit.score(case.data),
             "sample": lambda: fit.sample(3, seed=0)}
    if case.model.latent_var is not None:
        calls["predict_proba"] = lambda: fit.predict_proba(case.data)
        calls["predict"] = lambda: fit.predict(case.data)
    for name, call in calls.items():
        try:
            out = call()
        except ModelError as error:
            # the declaration may be at fault here (e.g. sample() needs a family's trials): its kind counts
            kinds = {decl.family.kind for decl in case.model.observed}
            assert _names_a_culprit(str(error), case, extra={name, "data"} | kinds), (name, str(error))
            outcomes.append(f"after fit, {name}: ModelError")
            continue
        if name == "predict":  # a DataArray of states (over sequence and step for a chain), or one per latent
            labelled = out if isinstance(out, xr.Dataset) else {case.model.latents[0].name: out}
            for latent in case.model.latents:
                assert set(np.ravel(labelled[latent.name].values).tolist()) <= set(latent.family.states), out
        elif name == "predict_proba":  # sums to 1 over the latents' states
            states = [dim for dim in out.dims if dim in {x.name for x in case.model.latents}]
            assert np.isfinite(out.values).all() and np.allclose(out.sum(states).values, 1.0), out
        elif name == "score":  # the mean of score_samples: −∞ exactly when a sample (of weight 0) has probability 0
            impossible = bool(np.isneginf(np.asarray(fit.score_samples(case.data).values)).any())
            assert np.isfinite(out) or (impossible and out == -np.inf), (name, out)
        elif name != "sample":
            assert np.isfinite(out), (name, out)
    path = tmp_path / "fit.nc"
    fit.save(path)
    loaded = em.load(path)
    assert loaded.loglik == fit.loglik


def _names_a_culprit(message: str, case: Case, extra: set[str] = frozenset()) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) for name in case.culprits | set(extra))


@long_run_timeout()
@_SETTINGS
@given(case=cases())
def test_every_case_fits_soundly_or_names_the_culprit(case: Case, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    outcomes, bug = _run(case, tmp_path)
    OUTCOMES.update(outcomes)
    accelerate = next(fault for fault in case.faults if fault.startswith("accelerate="))
    for form in (case.faults[0], accelerate):
        BY_FORM[f"{form}: {outcomes[-1].split(':')[0].split(' (')[0]}"] += 1
    if bug is not None:
        if not REPORT:
            raise AssertionError(f"{bug['what']}: {bug['error']}\nfaults: {case.faults}")
        BUGS.append(bug)


def _run(case: Case, tmp_path) -> tuple[list[str], dict[str, Any] | None]:
    """:func:`_outcome`; in a child process for cases at extreme magnitudes, so that a crash in
    native code (scipy) or a hang is a recorded bug, not the end of the test run."""
    return _isolated(case, tmp_path) if _risky(case) else _outcome(case, tmp_path)


def _risky(case: Case) -> bool:
    """Whether the case runs in a forked child: data at extreme magnitudes, where a fork exists."""
    return hasattr(os, "fork") and any(fault.startswith(("scale", "offset", "bad value huge"))
                                       for fault in case.faults)


def _start(case: Case, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``init="fit-values"`` replaced by a short fit of the same model (may raise ModelError)."""
    if isinstance(kwargs.get("init"), str) and kwargs["init"] == "fit-values":
        return {**kwargs, "init": case.model.fit(case.data, **{**kwargs, "init": "kmeans++", "max_iter": 2,
                                                               "n_init": 1})}
    return kwargs


def _reproducer(case: Case) -> dict[str, Any]:
    """What a bug's report holds to rebuild the case: faults, model, arguments, and small data in full."""
    return {"faults": case.faults, "model": repr(case.model),
            "kwargs": {k: repr(v)[:200] for k, v in case.kwargs.items()},
            "data": {name: np.asarray(da.values).tolist() for name, da in case.data.data_vars.items()}
            if case.data.sizes.get("sample", 0) <= 8 else repr(case.data)[:600]}


def _outcome(case: Case, tmp_path) -> tuple[list[str], dict[str, Any] | None]:
    """The outcomes of one case (fit, then the calls on it), and what went wrong if it is a bug."""
    kwargs = dict(case.kwargs)
    outcomes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit = case.model.fit(case.data, **_start(case, kwargs))
        except ModelError as error:
            message = str(error)
            if _names_a_culprit(message, case):
                return [f"ModelError: {_kind(message)}"], None
            return _bug("ModelError naming no culprit", error, case)
        except Exception as error:
            return _bug(f"{type(error).__name__} in fit", error, case)
        try:
            _check_fit(fit, case, tmp_path, outcomes)
        except Exception as error:
            return _bug(f"{type(error).__name__} after fit", error, case)
    return outcomes + ["fit ok" + (" (degenerate)" if fit.status == "degenerate" else "")], None


def _bug(what: str, error: BaseException | str, case: Case) -> tuple[list[str], dict[str, Any]]:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {str(error)[:400]}"
    return [f"BUG: {what}"], {"what": what, "error": message, **_reproducer(case)}


def _isolated(case: Case, tmp_path) -> tuple[list[str], dict[str, Any] | None]:
    """:func:`_outcome` in a forked child; a child killed by a signal, or still running after
    ``_forked.TIMEOUT`` seconds, is a bug."""
    return in_child(lambda: _outcome(case, tmp_path),
                    lambda error: _bug(f"{type(error).__name__} in the child", error, case),
                    lambda crash: _bug(crash, "the process died in native code", case))


# -- classes found by long runs, kept as derandomized examples in every run ----------------------


def _regression_cases() -> dict[str, Case]:
    rng = np.random.default_rng(7)
    x = np.exp(np.r_[rng.normal(0, 0.5, 20), rng.normal(2, 0.5, 20)] / 2)
    huge = x.copy()
    huge[5] = 1.7e308  # with a rate above 1, −rate·x overflows: the cheap rounding bound was infinite
    z = np.repeat([0, 1], 20)
    levels = np.array(list("abcd"), dtype=object)[np.where(z == 0, rng.integers(0, 2, 40), 2 + rng.integers(0, 2, 40))]
    fixed = em.Categorical(list("abcd"), probs=[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    flags = (np.random.default_rng(1188).normal(0, 2.5, (5, 2))[np.random.default_rng(1188).integers(5, size=20)]
             > 0).astype(float)
    sequences = xr.Dataset({"v0": (("sample", "time"), levels.reshape(4, 10))})
    two = em.Model().latent("ga", em.Categorical(2)).latent("gb", em.Categorical(2)).observe("v0", em.Normal,
                                                                                          given=("gb",))
    common = {"n_init", "max_iter", "tol", "seed"}
    return {
        "Gamma, a value near the largest float (infinite slack)": Case(
            em.Model().latent("z", em.Categorical(2)).observe("v0", em.Gamma()),
            xr.Dataset({"v0": ("sample", huge)}), {"seed": 1, "max_iter": 25, "n_init": 2},
            {"v0", "z"} | common, ["mixture", "bad value huge"]),
        "Exponential, a value near the largest float, Markov latent (0 · −∞ in the entropy)": Case(
            em.Model().latent("z", em.Categorical(2), markov="time").observe("v0", em.Exponential()),
            xr.Dataset({"v0": (("sample", "time"), huge.reshape(4, 10))}), {"seed": 1, "max_iter": 25},
            {"v0", "z", "time"} | common, ["markov", "bad value huge"]),
        "Bernoulli, weak prior, weights near 1e100 (the mode rounds to exactly 1)": Case(
            em.Model().latent("z", em.Categorical(5)).observe("v0", em.Bernoulli()),
            xr.Dataset({"v0": (("sample", "feature0"), flags), "w": ("sample", rng.uniform(0.5, 3, 20) * 1e100)}),
            {"seed": 1188, "max_iter": 20, "prior": "weak", "weights": "w"}, {"v0", "z", "weights"} | common,
            ["mixture", "prior=weak", "weights~1e100"]),
        "weak prior on fixed level probabilities with zeros": Case(
            em.Model().latent("z", em.Categorical(2)).observe("v0", fixed),
            xr.Dataset({"v0": ("sample", levels)}), {"seed": 0, "max_iter": 25, "prior": "weak"},
            {"v0", "z"} | common, ["mixture", "fixed probs with zeros", "prior=weak"]),
        "weak prior, fixed probabilities with zeros, Markov latent, plain EM": Case(
            em.Model().latent("z", em.Categorical(2), markov="time").observe("v0", fixed),
            sequences, {"seed": 6, "max_iter": 0, "prior": "weak", "accelerate": None, "init": "fit-values"},
            {"v0", "z", "time"} | common, ["markov", "fixed probs with zeros", "prior=weak"]),
        "weak prior, a left-to-right transition, Markov latent": Case(
            em.Model().latent("z", em.Categorical(2, transition=[[0.7, 0.3], [0.0, 1.0]]), markov="time")
            .observe("v0", em.Normal), xr.Dataset({"v0": (("sample", "time"), np.log(x).reshape(4, 10))}),
            {"seed": 0, "max_iter": 25, "prior": "weak"}, {"v0", "z", "time"} | common, ["markov", "prior=weak"]),
        "init keyed by the joint of two latents": Case(
            two, xr.Dataset({"v0": ("sample", np.log(x))}),
            {"seed": 3, "max_iter": 5, "init": {"ga×gb": {"probs": [2.0]}}, "accelerate": "squarem"},
            {"v0", "ga", "gb", "ga×gb", "init"} | common, ["two", "init={'ga×gb': ...}"]),
        "DAAREM at rates near 1e91 (the ridge's bracket overflowed; its search never ended)": Case(
            em.Model().latent("z", em.Categorical(2)).observe("v0", em.Exponential()),
            xr.Dataset({"v0": ("sample", np.array([2.2785567086110906e-92, 2.4778386069601658e-92,
                                                   1.2224421459907857e-91, 1.2033191410314797e-91,
                                                   3.183552231285955e-91]))}),
            {"seed": 187724, "max_iter": 5, "tol": 0.0, "prior": "weak", "accelerate": "daarem"},
            {"v0", "z"} | common, ["mixture", "scale=1e-91", "prior=weak", "accelerate=daarem"]),
        "DAAREM on two Multinomials of int16 counts (the ridge's bracket underflowed to 0)": Case(
            em.Model().latent("z", em.Categorical(3)).observe("v0", em.Multinomial(dim="cat0"))
            .observe("v1", em.Multinomial(dim="cat1")),
            xr.Dataset({"v0": (("sample", "cat0"), np.array([[8, 1, 1], [10, 0, 0], [7, 3, 0], [7, 3, 0], [6, 4, 0],
                                                             [6, 0, 4], [7, 3, 0], [8, 2, 0]], dtype=np.int16)),
                        "v1": (("sample", "cat1"), np.array([[10, 0], [4, 6], [0, 10], [3, 7], [2, 8], [10, 0],
                                                             [2, 8], [1, 9]], dtype=np.int16))}),
            {"seed": 2, "max_iter": 25, "tol": 0.0, "accelerate": "daarem"},
            {"v0", "v1", "z", "cat0", "cat1"} | common, ["mixture", "dtype=int16", "accelerate=daarem"]),
        "two Gammas of constant columns, a value near the largest float in each (slack ∞)": Case(
            em.Model().latent("z", em.Categorical(5)).observe("v0", em.Gamma()).observe("v1", em.Gamma()),
            xr.Dataset({"v0": ("sample", np.where(np.arange(40) == 11, 1.7e308, 0.6427949531921227)),
                        "v1": ("sample", np.where(np.arange(40) == 13, 1.7e308, 0.652186058668217))}),
            {"seed": 50170, "max_iter": 1, "tol": 1e-3, "n_init": 3, "prior": "weak"},
            {"v0", "v1", "z"} | common, ["mixture", "constant column", "bad value huge", "prior=weak"]),
        "weak prior with a held mean and two latents": Case(
            em.Model().latent("ga", em.Categorical(2)).latent("gb", em.Categorical(2))
            .observe("v0", em.Normal(mean=[0.0, 1.0]), given=("ga",)),
            xr.Dataset({"v0": ("sample", np.log(x))}), {"seed": 2, "max_iter": 25, "prior": "weak", "n_init": 2},
            {"v0", "ga", "gb", "ga×gb"} | common, ["two", "prior=weak"]),
    }


@pytest.mark.parametrize("name", list(_regression_cases()))
def test_classes_found_by_long_runs(name, tmp_path):
    case = _regression_cases()[name]
    _, bug = _run(case, tmp_path)
    assert bug is None, f"{bug['what']}: {bug['error']}"
