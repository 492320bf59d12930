"""Quasi-Newton EM's arithmetic (emdsl.engine.quasi_newton) against closed forms and the observed likelihood.

The score must be ∇ℓ (Fisher's identity), the information −∇²Q in closed form where Q has one,
the free directions must keep rows on their simplex and covariances symmetric, and the
two-loop recursion must reproduce the Newton step on a quadratic. The fits themselves
(same optimum as plain EM, monotone, valid proposals, priors, HMMs, several latents) are in
test_accelerate.py, which runs every case with "qn" too.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em
from emdsl.engine import accelerate, quasi_newton
from emdsl.engine.mstep import maximize
from tests.engine.test_accelerate import _hasselblad


def _state(model: em.Model, ds: xr.Dataset, **kwargs):
    """The plan, E-step and an accepted point two plain EM steps into a fit (captured from the run)."""
    captured = {}
    original = accelerate.run

    def spy(method, plan, estep, start, **options):
        captured.update(plan=plan, estep=estep, start=start)
        return original(method, plan, estep, start, **options)

    accelerate.run = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(ds, accelerate="squarem", max_iter=1, **kwargs)
    finally:
        accelerate.run = original
    plan, estep, start = captured["plan"], captured["estep"], captured["start"]
    point = start
    for _ in range(2):
        theta, _ = maximize(plan, point.summary.stats, point.theta)
        point = accelerate.evaluate(plan, estep, theta)
    return plan, estep, point


def _differences(plan, point):
    theta_f, _ = maximize(plan, point.summary.stats, point.theta)
    layout = accelerate._Layout(point.theta, theta_f)
    coords = quasi_newton.Coordinates(plan, layout, layout.flat(point.theta) != layout.flat(theta_f))
    return coords, quasi_newton.Differences(plan, coords, point.theta)


def _hmm(T: int = 600):
    rng = np.random.default_rng(3)
    z = np.zeros(T, dtype=int)
    for t in range(1, T):
        z[t] = z[t - 1] if rng.random() < 0.9 else rng.integers(3)
    ds = xr.Dataset({"x": ("time", np.array([-1.0, 0.0, 1.2])[z] + rng.normal(0, 0.7, T))})
    return em.Model().latent("z", em.Categorical(3), markov="time").observe("x", em.Normal), ds, {"seed": 0}


def _gaussians_with_holes():
    rng = np.random.default_rng(4)
    X = np.concatenate([rng.normal(0, 1, (150, 2)), rng.normal(2, 0.7, (150, 2)) @ [[1, 0.5], [0, 1]]])
    X[rng.random(X.shape) < 0.15] = np.nan
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    return em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal), ds, {"seed": 0}


@pytest.mark.parametrize("case", [_hasselblad, _hmm, _gaussians_with_holes], ids=["poisson", "hmm", "mvn-holes"])
def test_score_is_the_gradient_of_the_observed_log_likelihood(case):
    """Fisher's identity: the differences of Q(· | θ) at the E-step's statistics are ∇ℓ(θ), checked
    against central differences of ℓ itself (an E-step per evaluation) along every free direction."""
    model, ds, kwargs = case()
    plan, estep, point = _state(model, ds, **kwargs)
    coords, differences = _differences(plan, point)
    x = coords.layout.flat(point.theta)
    score = differences.score(x, point.summary.stats)
    h = coords.steps(x, 1e-5)  # (along a simplex: within half its smaller entry)
    checked = 0
    for j in range(coords.size):
        step = differences._along([j], h)
        up = accelerate.evaluate(plan, estep, coords.layout.theta(x + step)).loglik
        down = accelerate.evaluate(plan, estep, coords.layout.theta(x - step)).loglik
        # ℓ's own difference resolves the derivative only where the step moves ℓ far beyond its
        # rounding (not along a probability of 1e-9, a chain's initial state near its vertex)
        if abs(score[j]) * h[j] < 1e-9 * abs(point.loglik):
            continue
        checked += 1
        expected = (up - down) / (2 * h[j])
        assert score[j] == pytest.approx(expected, rel=1e-4, abs=1e-6 * np.max(np.abs(score))), j
    assert checked >= coords.size - 2


def test_information_of_a_poisson_mixture_is_the_closed_form():
    """Q = Σ_k [S_k log λ_k − n_k λ_k + n_k log π_k] with n_k = Σ w r_k, S_k = Σ w r_k x (responsibilities
    computed here by hand): −∂²Q/∂λ_k² = S_k/λ_k², along the simplex direction (π₁ up, π₂ down)
    n₁/π₁² + n₂/π₂², and no cross terms."""
    model, ds, kwargs = _hasselblad()
    plan, _, point = _state(model, ds, **kwargs)
    coords, differences = _differences(plan, point)
    differences.curvature(coords.layout.flat(point.theta))
    information = differences.information(point.summary.stats)
    rate, probs = point.theta["deaths"]["rate"].ravel(), point.theta["z"]["probs"]
    x, w = ds["deaths"].values, ds["days"].values
    log_joint = np.log(probs)[:, None] + x * np.log(rate)[:, None] - rate[:, None]
    r = np.exp(log_joint - np.logaddexp.reduce(log_joint, axis=0))
    n, S = r @ w, r @ (w * x)
    # the directions in the layout's order: z.probs (one), then deaths.rate (two)
    assert coords.layout.keys == [("z", "probs"), ("deaths", "rate")] and coords.size == 3
    expected = np.diag([n[0] / probs[0] ** 2 + n[1] / probs[1] ** 2, S[0] / rate[0] ** 2, S[1] / rate[1] ** 2])
    np.testing.assert_allclose(information, expected, rtol=1e-6, atol=1e-8 * np.max(expected))


def test_with_a_prior_the_information_adds_its_curvature():
    """I_c = −Σ_e S_e ∇²H_e − ∇² log p: the prior's second differences add to the data's on every
    entry, the diagonal and the coupled pairs included (they replaced them there)."""
    model, ds, kwargs = _hasselblad()
    plan, _, point = _state(model, ds, prior="weak", **kwargs)
    coords, differences = _differences(plan, point)
    assert differences.prior
    x = coords.layout.flat(point.theta)
    differences.curvature(x)
    with_prior, prior_hessian = differences.information(point.summary.stats), differences.second[1]
    differences.prior = False
    differences.curvature(x)
    without = differences.information(point.summary.stats)
    assert np.all(np.diag(prior_hessian) < 0)  # the weak prior curves every direction
    np.testing.assert_allclose(with_prior, without - prior_hessian, rtol=1e-12, atol=0)


def test_directions_keep_rows_on_the_simplex_and_covariances_symmetric():
    model, ds, kwargs = _gaussians_with_holes()
    plan, _, point = _state(model, ds, **kwargs)
    coords, _ = _differences(plan, point)
    layout = coords.layout
    rng = np.random.default_rng(0)
    z = rng.normal(scale=1e-3, size=coords.size)
    x = layout.flat(point.theta) + coords.B @ z
    theta = layout.theta(x)
    assert theta is not None
    np.testing.assert_allclose(theta["z"]["probs"].sum(), 1.0, rtol=0, atol=1e-12)
    cov = theta["x"]["covariance"]
    np.testing.assert_array_equal(cov, np.swapaxes(cov, -1, -2))
    # K·(D + D(D+1)/2) + K − 1 directions, and z back from the move
    assert coords.size == 2 * (2 + 3) + 1
    np.testing.assert_allclose(coords.coordinates(coords.B @ z), z, rtol=0, atol=0)


def test_rows_at_a_vertex_are_pinned_and_others_stop_short_of_their_boundary():
    model, ds, kwargs = _hmm()
    plan, _, point = _state(model, ds, **kwargs)
    coords, _ = _differences(plan, point)
    x = coords.layout.flat(point.theta)
    a, b = coords.layout.bounds[coords.layout.keys.index(("z", "transition"))]
    step = np.zeros_like(x)
    step[a:a + 3] = [-2.0 * x[a], x[a], x[a]]  # row 0 would fall below 0 in its first entry
    outside = coords.rows_below(x + step, 0.0)
    assert outside[a:a + 3].all() and not outside[a + 3:b].any()
    scaled = coords.to_boundary(x, step, outside)
    row = (x + scaled)[a:a + 3]
    assert row.sum() == pytest.approx(1.0, abs=1e-12) and row[0] == pytest.approx(0.1 * x[a], rel=1e-12)
    fewer, keep = coords.without(outside)
    assert fewer.size == coords.size - 2 and fewer.pinned[a:a + 3].all() and keep.sum() == fewer.size


def test_two_loop_recursion_is_newtons_step_on_a_quadratic():
    """With H₀ the exact inverse Hessian and pairs from the same quadratic, L-BFGS's direction is the
    Newton step A⁻¹g, whatever the pairs (BFGS keeps an exact inverse Hessian exact)."""
    rng = np.random.default_rng(1)
    M = rng.normal(size=(5, 5))
    A = M @ M.T + 5 * np.eye(5)
    memory = quasi_newton.Memory(3)
    for _ in range(4):
        s = rng.normal(size=5)
        assert memory.add(s, A @ s)
    assert len(memory.pairs) == 3
    g = rng.normal(size=5)
    np.testing.assert_allclose(memory.direction(g, lambda v: np.linalg.solve(A, v)), np.linalg.solve(A, g),
                               rtol=1e-10)
    assert not memory.add(np.ones(5), -np.ones(5))  # no curvature: not kept


def test_solver_keeps_the_scale_of_indefinite_directions():
    """|λ|: a negative eigenvalue from differencing far from the M-step's point keeps its size."""
    solve = quasi_newton.solver(np.diag([4.0, -2.0, 1e-30]))
    np.testing.assert_allclose(solve(np.array([4.0, 2.0, 0.0])), [1.0, 1.0, 0.0])
    assert np.isfinite(solve(np.ones(3))).all()


def test_auto_runs_quasi_newton_where_its_differences_cost_less_than_an_e_step(tmp_path):
    """The choice is a count (machine-independent): on a long sequence an HMM's differences cost
    less than its E-step, on a short one more; 6-D Gaussians with full covariances have many.
    The traces record the choice per restart, and a saved fit keeps it."""
    for case, expected in ((lambda: _hmm(40_000), "qn"), (_hmm, "squarem"), (_six_dimensions, "squarem")):
        model, ds, kwargs = case()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = model.fit(ds, tol=1e-10, max_iter=10_000, **kwargs)
        assert fit.trace["extrapolated"].values.any()
        assert fit.traces.attrs["accelerated_with"] == expected
    fit.save(tmp_path / "fit.emdsl")
    assert em.load(tmp_path / "fit.emdsl").traces.attrs["accelerated_with"] == "squarem"


def test_the_traces_say_when_no_scheme_ran(faithful):
    """Old Faithful converges while "auto" still takes plain steps; accelerate=None never leaves them."""
    model = em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal)
    assert model.fit(faithful, seed=0, n_init=2).traces.attrs["accelerated_with"] == "none,none"
    assert model.fit(faithful, seed=0, accelerate=None).traces.attrs["accelerated_with"] == "none"
    assert model.fit(faithful, seed=0, accelerate="qn").traces.attrs["accelerated_with"] == "qn"


def _six_dimensions():
    rng = np.random.default_rng(5)
    X = np.concatenate([rng.normal(0, 1, (300, 6)), rng.normal(0.8, 1, (300, 6))])
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    return em.Model().latent("z", em.Categorical(2)).observe("x", em.MultivariateNormal), ds, {"seed": 0}


def test_an_explicit_qn_too_dear_to_difference_warns_and_runs_squarem():
    """13-D Gaussians with full covariances: 4·(13 + 91) + 3 = 419 free parameters, beyond
    QN_DIRECTIONS. The fit says so and runs SQUAREM, which reaches plain EM's optimum."""
    rng = np.random.default_rng(6)
    X = np.concatenate([rng.normal(m, 1, (100, 13)) for m in (0.0, 1.5, 3.0, 4.5)])
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(4)).observe("x", em.MultivariateNormal)
    with pytest.warns(UserWarning, match=r"accelerate='qn': 419 free parameters .* running SQUAREM instead"):
        fit = model.fit(ds, seed=0, accelerate="qn", tol=1e-10, max_iter=5000)
    plain = model.fit(ds, seed=0, accelerate=None, tol=1e-10, max_iter=5000)
    assert fit.trace["extrapolated"].values.any()
    assert fit.loglik == pytest.approx(plain.loglik, rel=1e-8)


def test_after_failures_in_a_row_quasi_newton_pauses_for_doubling_runs_of_plain_em(monkeypatch):
    """Every proposal made to fail (its objective read as −∞): the fit is plain EM's, step for step,
    and the proposals' E-steps grow like log₂ of the iterations (pauses of 0, 1, 3, 7, … plain
    steps, at most _PAUSE_MAX), not one or two per iteration."""
    model, ds, kwargs = _hmm()
    original = accelerate.Accelerator._qn_proposal

    def failing(self, *args):
        proposal = original(self, *args)
        return None if proposal is None else dataclasses.replace(proposal, objective=-np.inf)

    monkeypatch.setattr(accelerate.Accelerator, "_qn_proposal", failing)
    monkeypatch.setattr(accelerate.Accelerator, "_PAUSE_MAX", 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = model.fit(ds, accelerate="qn", tol=0.0, max_iter=120, **kwargs)
        plain = model.fit(ds, accelerate=None, tol=0.0, max_iter=120, **kwargs)
    assert not fit.trace["extrapolated"].values.any()
    assert fit.n_iter == plain.n_iter == 120
    np.testing.assert_allclose(fit.trace["loglik"].values, plain.trace["loglik"].values, rtol=1e-12)
    tries = int(fit.trace["e_steps"].values[-1]) - (fit.n_iter + 1)  # one E-step each failed proposal
    # a failure costs one E-step here (no retry: its objective is not finite) and its iteration takes
    # the plain step; failure k then pauses for min(2^(k-1), 8) - 1 plain steps. The first step has no
    # secant pair yet, so the tries come at iterations 2, 3, 5, 9 and then every 8th: 17 of them in 120
    assert 4 <= tries <= 4 + -(-(fit.n_iter - 9) // 8)


def test_a_proposal_where_the_sequence_has_probability_0_is_refused_not_raised():
    """A proposal far out (found on a 3-state HMM): the chain starts in state 1 (the others' initial
    probabilities subnormal, as EM leaves them on its way to a vertex) and state 1's emission of the
    first observation underflows, so the forward pass has nothing left at the first steps. The
    E-step raises ImpossibleDataError (a ModelError naming the step), as it must for a user's own
    parameters; an accelerator refuses such a proposal, counting its E-step, instead of ending the fit."""
    model, ds, kwargs = _hmm()
    plan, estep, point = _state(model, ds, **kwargs)
    far = {name: {key: np.array(value, dtype=float) for key, value in params.items()}
           for name, params in point.theta.items()}
    far["z"]["initial"] = np.array([5e-324, 1.0, 0.0])
    far["x"]["mean"][1] = 500.0
    far["x"]["variance"][1] = 0.5
    with pytest.raises(em.ImpossibleDataError, match="has probability 0 under the parameters"):
        accelerate.evaluate(plan, estep, far)
    accelerator = accelerate.Accelerator("qn", plan, estep, point, tol=1e-10, warn_collapsed=lambda *a: None)
    before = accelerator.e_steps
    assert accelerator._evaluate_proposal(far) is None
    assert accelerator.e_steps == before + 1
    assert accelerator._evaluate_proposal(point.theta).objective == pytest.approx(point.objective, rel=1e-12)


def test_where_little_is_predicted_to_be_left_the_e_step_goes_to_ems_step_and_its_test(monkeypatch):
    """Quasi-Newton's model predicts what is left to gain (½ ∇ℓᵀd, at least EM's sure gain). Where
    that is within tol·|ℓ| the fit takes EM's step instead of a proposal, and EM's test decides: the
    prediction must be true to the maximum (checked against ℓ* of a fit run to tol = 1e-15), and the
    fit must end on a plain EM step that passes EM's test."""
    model, ds, kwargs = _hmm()
    tol = 1e-10
    predictions = []
    original = accelerate.Accelerator._predicted_within_tol

    def spy(self, p, gradient, d, em_bound):
        result = original(self, p, gradient, d, em_bound)
        predictions.append((p.objective, max(0.5 * float(gradient @ d), em_bound - p.objective), result))
        return result

    best = model.fit(ds, accelerate="qn", tol=1e-15, **kwargs).loglik
    monkeypatch.setattr(accelerate.Accelerator, "_predicted_within_tol", spy)
    fit = model.fit(ds, accelerate="qn", tol=tol, **kwargs)
    assert fit.converged
    fired = [(objective, left) for objective, left, result in predictions if result]
    assert fired, "the prediction never fired: every iteration ended on a proposal"
    for objective, left in fired:
        assert left <= tol * abs(objective)
        assert best - objective <= 3 * tol * abs(objective)  # the model's "little is left" is true
    assert not fit.trace["extrapolated"].values[-1]
    gains = np.diff(fit.trace["loglik"].values)
    assert 0 <= gains[-1] <= tol * abs(fit.loglik)
