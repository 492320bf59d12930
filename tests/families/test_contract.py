"""The family contract (``contract.Case``), checked for every case of every ``cases_*`` module.

For each case: log_prob through H Φ + log h equals scipy.stats (also with holes);
the one-component M-step is the maximum-likelihood estimate; weighted sums give the
M-step of the table with rows repeated by the weights; values outside the support
are reported; draws have the reference's means; held parameters stay; bad
constructor arguments raise ``ModelError``.

Elementwise families get ``scipy(params, k, d)`` per element; a ``multivariate``
family gets one distribution per state over the whole event (``d`` is ignored) and
holes are whole events. A case with ``aux`` (extra data such as Binomial's trials,
each (n, D)) gets it as a last argument: ``scipy(params, k, d, aux_d)`` with the
(n,) columns of element d, and ``mle(x, aux)``; ``outside_support`` receives aux in
the orientation of x (b × D).
"""

from __future__ import annotations

import inspect

import cases_continuous
import cases_counts
import numpy as np
import pytest
from contract import Case

from emdsl.errors import ModelError

CASES = cases_counts.CASES + cases_continuous.CASES
K, D, N = 3, 2, 400
#: draws per state in the sampling check, and how many standard errors a mean may be off
N_DRAWS, N_SE = 20000, 5.0
#: M-step repetitions for families whose M-step is a partial (Newton) step from ``previous``
M_STEP_ROUNDS = 100


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request) -> Case:
    return request.param


def _aux(case: Case, rng: np.random.Generator, n: int) -> dict:
    return {} if case.aux is None else case.aux(rng, n, D)


def _reference(case: Case, params: dict, k: int, d: int, aux: dict):
    if case.aux is None:
        return case.scipy(params, k, d)
    return case.scipy(params, k, d, {name: value[:, d] for name, value in aux.items()})


def _mle(case: Case, x: np.ndarray, aux: dict) -> dict:
    return case.mle(x) if case.aux is None else case.mle(x, aux)


def _draw(case: Case, family, params: dict, rng: np.random.Generator, n: int, aux: dict) -> np.ndarray:
    """n × D data from the reference, each row (elementwise: each element) from a random state."""
    states = rng.integers(0, K, n)
    if family.multivariate:
        draws = np.stack([np.asarray(case.scipy(params, k, 0).rvs(size=n, random_state=rng), float)
                          for k in range(K)])
        return draws[states, np.arange(n)]
    x = np.empty((n, D))
    for d in range(D):
        draws = []
        for k in range(K):
            dist = _reference(case, params, k, d, aux)
            draws.append(dist.rvs(size=n, random_state=rng) if case.aux is None else dist.rvs(random_state=rng))
        x[:, d] = np.stack(draws).astype(float)[states, np.arange(n)]
    return x


def _ref_log_prob(case: Case, family, params: dict, x: np.ndarray, aux: dict) -> np.ndarray:
    """n × K reference log-densities, missing elements (or events) contributing 0."""
    out = np.zeros((x.shape[0], K))
    if family.multivariate:
        complete = ~np.isnan(x).any(axis=1)
        for k in range(K):
            out[complete, k] = case.scipy(params, k, 0).logpmf(x[complete]) if case.discrete else \
                case.scipy(params, k, 0).logpdf(x[complete])
        return out
    for k in range(K):
        for d in range(D):
            dist = _reference(case, params, k, d, aux)
            present = ~np.isnan(x[:, d])
            safe = np.where(present, x[:, d], 0.0)
            values = dist.logpmf(safe) if case.discrete else dist.logpdf(safe)
            out[:, k] += np.where(present, values, 0.0)
    return out


def _stats(family, x: np.ndarray, aux: dict, weights: np.ndarray | None = None) -> np.ndarray:
    """The node's block of R Φᵀ for one component with responsibility 1 (times the weights)."""
    phi = np.empty((family.n_rows(x.shape[1]), x.shape[0]))
    family.statistics(x.T, phi, {name: value.T for name, value in aux.items()})
    total = phi.sum(axis=1) if weights is None else phi @ weights
    return total.reshape(1, -1)


def _m_step(family, stats: np.ndarray, hold: dict | None = None) -> dict:
    """The M-step, repeated from its own result for families that take partial steps."""
    params, _ = family.m_step(stats, hold or {}, family.default_params(1, D))
    for _ in range(M_STEP_ROUNDS):
        again, _ = family.m_step(stats, hold or {}, params)
        if all(np.array_equal(again[p], params[p]) for p in params):
            break
        params = again
    return params


def test_log_prob_equals_scipy(case):
    rng = np.random.default_rng(0)
    family = case.make()
    params = case.params(rng, K, D)
    aux = _aux(case, rng, N)
    x = _draw(case, family, params, rng, N, aux)
    ours = family.log_prob(x, params, aux)
    ref = _ref_log_prob(case, family, params, x, aux)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_missing_values_add_nothing(case):
    rng = np.random.default_rng(1)
    family = case.make()
    params = case.params(rng, K, D)
    aux = _aux(case, rng, N)
    x = _draw(case, family, params, rng, N, aux)
    holes = rng.random((N, 1 if family.multivariate else D)) < 0.3
    holes = np.broadcast_to(holes, x.shape)
    x[holes] = np.nan
    ours = family.log_prob(x, params, aux)
    np.testing.assert_allclose(ours, _ref_log_prob(case, family, params, x, aux), rtol=1e-10, atol=1e-12)
    phi = np.empty((family.n_rows(D), N))
    family.statistics(x.T, phi, {name: value.T for name, value in aux.items()})
    assert np.isfinite(phi).all()
    if family.multivariate:
        assert (phi[:, holes[:, 0]] == 0).all()
    else:
        for row in range(phi.shape[0]):
            assert (phi[row, holes[:, row % D]] == 0).all(), f"row {row} is not 0 where its element is missing"


def test_m_step_is_the_mle(case):
    rng = np.random.default_rng(2)
    family = case.make()
    params = case.params(rng, 1, D)
    aux = _aux(case, rng, 5000)
    x = _draw(case, family, {p: np.repeat(v, K, axis=0) for p, v in params.items()}, rng, 5000, aux)
    ours = _m_step(family, _stats(family, x, aux))
    for name, expected in _mle(case, x, aux).items():
        np.testing.assert_allclose(ours[name][0], expected, rtol=case.rtol_mle, atol=0, err_msg=name)


def test_weights_equal_repeated_rows(case):
    rng = np.random.default_rng(3)
    family = case.make()
    params = case.params(rng, K, D)
    aux = _aux(case, rng, 300)
    x = _draw(case, family, params, rng, 300, aux)
    weights = rng.integers(0, 4, 300)
    repeated = {name: np.repeat(value, weights, axis=0) for name, value in aux.items()}
    weighted = _m_step(family, _stats(family, x, aux, weights.astype(float)))
    expanded = _m_step(family, _stats(family, np.repeat(x, weights, axis=0), repeated))
    for name in weighted:
        np.testing.assert_allclose(weighted[name], expanded[name], rtol=1e-10, atol=0, err_msg=name)


def test_values_outside_the_support_are_reported(case):
    rng = np.random.default_rng(4)
    family = case.make()
    params = case.params(rng, K, D)
    aux = _aux(case, rng, 6)
    x = _draw(case, family, params, rng, 6, aux)
    x[0] = np.nan  # a missing event (or elements) is never outside the support
    if not family.multivariate:
        x[1, 0] = np.nan
    answer = family.outside_support(x, aux)
    assert answer is None or not np.asarray(answer[0]).any()
    for value in case.bad_values:
        bad = x.copy()
        bad[3, 1] = value
        answer = family.outside_support(bad, aux)
        assert answer is not None, f"{value!r} is not reported"
        mask, text = answer
        assert mask.shape == x.shape and mask[3, 1], f"{value!r} is not reported"
        assert not mask[0].any() and isinstance(text, str) and text


def test_sample_means_match_the_reference(case):
    rng = np.random.default_rng(5)
    family = case.make()
    params = case.params(rng, K, D)
    for k in range(K):
        aux = _aux(case, rng, N_DRAWS)
        draws = family.sample(params, np.full(N_DRAWS, k), np.random.default_rng(k), aux)
        assert draws.shape == (N_DRAWS, D)
        if family.multivariate:
            dist = case.scipy(params, k, 0)
            mean, var = dist.mean(), np.diag(dist.cov())
        else:
            dists = [_reference(case, params, k, d, aux) for d in range(D)]
            mean = np.array([np.mean(dist.mean()) for dist in dists])
            var = np.array([np.mean(dist.var()) for dist in dists])
        error = np.abs(draws.mean(axis=0) - mean) / np.sqrt(var / N_DRAWS)
        assert (error < N_SE).all(), f"state {k}: means {draws.mean(axis=0)} vs {mean} ({error} s.e.)"


def test_held_parameters_are_kept(case):
    rng = np.random.default_rng(6)
    family = case.make()
    params = case.params(rng, K, D)
    aux = _aux(case, rng, 200)
    x = _draw(case, family, params, rng, 200, aux)
    stats = np.repeat(_stats(family, x, aux), K, axis=0) * rng.uniform(0.5, 1.5, (K, 1))
    for name, value in params.items():
        held, _ = family.m_step(stats, {name: value}, None)
        np.testing.assert_array_equal(np.broadcast_to(held[name], value.shape), value)


def test_bad_constructor_arguments_raise_model_error(case):
    family = case.make()
    cls, arguments = type(family), family.arguments()
    signature = inspect.signature(cls.__init__).parameters
    for name in family.param_names:
        for bad in ("a", [np.nan], [np.inf]):
            with pytest.raises(ModelError):
                cls(**{**arguments, name: bad})
    for name, value in arguments.items():
        if name in family.param_names or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if signature[name].default is not None:  # None where a number is needed
            with pytest.raises(ModelError):
                cls(**{**arguments, name: None})
        for bad in (np.nan, -1.0, [1.0]):
            with pytest.raises(ModelError):
                cls(**{**arguments, name: bad})
