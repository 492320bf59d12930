"""Markov latents (hidden Markov models): exact E-step, EM's guarantee, labels and bad input."""

import itertools
import warnings

import numpy as np
import pytest
import scipy.stats as st
import xarray as xr
from scipy.special import logsumexp

import emdsl as em
from tests.engine.test_monotone import check_trace

INITIAL = np.array([0.6, 0.3, 0.1])
TRANSITION = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
MEAN = np.array([-1.0, 0.5, 2.0])
VARIANCE = np.array([0.5, 1.0, 2.0])


def _hmm(K=3, markov="time", **fixed):
    return em.Model().latent("z", em.Categorical(K, **fixed), markov=markov).observe("x", em.Normal)


def _given(initial=INITIAL, transition=TRANSITION):
    return {"z": {"initial": initial, "transition": transition}, "x": {"mean": MEAN, "variance": VARIANCE}}


def _enumerate(x, initial, transition, log_emission):
    """log p(x) and p(z_t | x) of one sequence by summing over all K^T paths (NaN: missing, emission 1)."""
    K, T = len(initial), len(x)
    paths = np.array(list(itertools.product(range(K), repeat=T)))
    emission = np.where(np.isnan(x)[None, :], 0.0, log_emission(np.nan_to_num(x))[paths, np.arange(T)])
    log_joint = (np.log(initial)[paths[:, 0]] + np.log(transition)[paths[:, :-1], paths[:, 1:]].sum(axis=1)
                 + emission.sum(axis=1))
    total = logsumexp(log_joint)
    weights = np.exp(log_joint - total)
    posterior = np.stack([np.bincount(paths[:, t], weights, minlength=K) for t in range(T)])
    return total, posterior


def _normal_emission(values):
    return st.norm(MEAN[:, None], np.sqrt(VARIANCE)[:, None]).logpdf(values[None, :])


@pytest.mark.filterwarnings("ignore::emdsl.DegenerateComponentWarning")  # 10 steps, 3 states: thin by design
def test_brute_force_enumeration_equals_loglik_and_posterior():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=6) * 2, np.r_[rng.normal(size=4), np.nan, np.nan]])  # second: padded
    x[0, 2] = np.nan  # a hole in the middle: a missing observation
    ds = xr.Dataset({"x": (("sequence", "time"), x)})
    fit = _hmm().fit(ds, init=_given(), max_iter=0)
    expected = [_enumerate(row[: 6 if i == 0 else 4], INITIAL, TRANSITION, _normal_emission) for i, row in enumerate(x)]
    assert fit.loglik == pytest.approx(sum(e[0] for e in expected), rel=1e-12)
    np.testing.assert_allclose(fit.score_samples(ds).values, [e[0] for e in expected], rtol=1e-12)
    posterior = fit.posterior.values
    np.testing.assert_allclose(posterior[0], expected[0][1], atol=1e-12)
    np.testing.assert_allclose(posterior[1, :4], expected[1][1], atol=1e-12)
    # past the end of the second sequence, the chain runs on unobserved: γ_t = γ_{t−1} A
    np.testing.assert_allclose(posterior[1, 4], expected[1][1][3] @ TRANSITION, atol=1e-12)
    # Viterbi: the most probable path of the enumeration
    path, log_prob = fit.viterbi(ds)
    K, T = 3, 6
    paths = np.array(list(itertools.product(range(K), repeat=T)))
    row = x[0]
    emission = np.where(np.isnan(row)[None, :], 0.0, _normal_emission(np.nan_to_num(row))[paths, np.arange(T)])
    scores = (np.log(INITIAL)[paths[:, 0]] + np.log(TRANSITION)[paths[:, :-1], paths[:, 1:]].sum(axis=1)
              + emission.sum(axis=1))
    np.testing.assert_array_equal(path.values[0], paths[np.argmax(scores)])
    assert float(log_prob[0]) == pytest.approx(scores.max(), rel=1e-12)


def test_weights_are_per_sequence_copies():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 40)) + np.repeat([0.0, 3.0], 20)
    ds = xr.Dataset({"x": (("sequence", "time"), x), "w": ("sequence", [2.0, 1.0, 0.0])})
    weighted = _hmm(2).fit(ds, weights="w", init=_given(INITIAL[:2] / INITIAL[:2].sum(),
                                                         np.array([[0.9, 0.1], [0.2, 0.8]])) | {
        "x": {"mean": MEAN[:2], "variance": VARIANCE[:2]}}, max_iter=5, tol=0)
    copies = xr.Dataset({"x": (("sequence", "time"), x[[0, 0, 1]])})
    expanded = _hmm(2).fit(copies, init=_given(INITIAL[:2] / INITIAL[:2].sum(), np.array([[0.9, 0.1], [0.2, 0.8]]))
                           | {"x": {"mean": MEAN[:2], "variance": VARIANCE[:2]}}, max_iter=5, tol=0)
    assert weighted.loglik == pytest.approx(expanded.loglik, rel=1e-10)
    for node, param in (("z", "transition"), ("z", "initial"), ("x", "mean"), ("x", "variance")):
        np.testing.assert_allclose(weighted.params[node][param].values, expanded.params[node][param].values,
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", [em.Normal(), em.MultivariateNormal(), em.MultivariateNormal(covariance="diag")])
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_loglik_never_decreases(family, init):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 60, 2)) + rng.integers(0, 3, size=(4, 60, 1)) * 2.0
    x[1, 50:] = np.nan  # padding
    x[2, 10, 0] = np.nan  # a hole inside an event (the conditional Gaussian for MultivariateNormal)
    ds = xr.Dataset({"x": (("sequence", "time", "feature"), x)})
    model = em.Model().latent("z", em.Categorical(3), markov="time").observe("x", family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", em.DegenerateComponentWarning)
        fit = model.fit(ds, init=init, n_init=2, max_iter=40, tol=0, seed=3)
    check_trace(fit)
    assert fit.n_iter == 40


def test_mixed_emissions_and_missing_levels_monotone():
    rng = np.random.default_rng(4)
    T = 150
    state = (np.arange(T) // 25) % 2
    ds = xr.Dataset({"y": ("time", rng.normal(state * 2.0)),
                     "c": ("time", np.where(rng.random(T) < 0.8, state, 1 - state).astype(float)),
                     "n": ("time", rng.poisson(1 + 4 * state).astype(float))})
    ds["c"][5] = np.nan
    model = (em.Model().latent("z", em.Categorical(2), markov="time").observe("y", em.Normal)
             .observe("c", em.Categorical).observe("n", em.Poisson))
    fit = model.fit(ds, max_iter=30, tol=0, seed=0)
    check_trace(fit)
    assert (fit.predict(ds).values == state).mean() in (pytest.approx(1.0, abs=0.05), pytest.approx(0.0, abs=0.05))


def test_long_sequence_stays_finite():
    rng = np.random.default_rng(5)
    T = 1_000_000
    state = (np.arange(T) // 1000) % 2
    ds = xr.Dataset({"x": ("time", rng.normal(state * 3.0))})
    fit = _hmm(2).fit(ds, max_iter=2, tol=0, seed=0)
    assert np.isfinite(fit.loglik) and fit.loglik < -1e6
    assert np.isfinite(fit.trace["elbo"].values).all()
    check_trace(fit)


def test_structural_zeros_stay_zero_and_fixed_values_held():
    rng = np.random.default_rng(6)
    x = np.r_[rng.normal(0, 1, 50), rng.normal(4, 1, 50), rng.normal(8, 1, 50)]
    ds = xr.Dataset({"x": ("time", x)})
    left_right = np.array([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]])
    start = {"z": {"initial": [1.0, 0.0, 0.0], "transition": left_right}, "x": {"mean": [1.0, 3.0, 7.0]}}
    fit = _hmm(3).fit(ds, init=start, max_iter=50, seed=0)
    A = fit.params["z"]["transition"].values
    assert np.all(A[left_right == 0] == 0)
    np.testing.assert_array_equal(fit.predict(ds).values, np.repeat([0, 1, 2], 50))
    fixed = _hmm(3, transition=left_right).fit(ds, init={"x": {"mean": [1.0, 3.0, 7.0]}}, max_iter=20, seed=0)
    np.testing.assert_array_equal(fixed.params["z"]["transition"].values, left_right)
    assert fixed.params["z"].attrs["fixed"] == "transition"
    assert fixed.n_params == 2 + 3 * 2  # initial and the emissions


def test_labels_and_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 30)) + np.repeat([0.0, 3.0], 15)
    ds = xr.Dataset({"x": (("run", "step"), x)}, coords={"run": ["a", "b"], "step": np.arange(30) * 0.5})
    model = em.Model().latent("z", em.Categorical(["low", "high"]), markov="step").observe("x", em.Normal)
    fit = model.fit(ds, seed=0)
    assert fit.params["z"]["transition"].dims == ("z", "z_next")
    assert fit.params["z"]["transition"].coords["z_next"].values.tolist() == ["low", "high"]
    np.testing.assert_allclose(fit.params["z"]["transition"].sum("z_next"), 1.0)
    assert fit.posterior.dims == ("run", "step", "z")
    assert fit.posterior.coords["step"].values.tolist() == ds.step.values.tolist()
    path, log_prob = fit.viterbi(ds)
    assert path.dims == ("run", "step") and set(np.unique(path.values)) <= {"low", "high"}
    assert log_prob.dims == ("run",)
    assert fit.predict(ds).equals(path)
    assert em.Model.from_json(model.to_json()) == model
    assert "Markov along 'step'" in repr(model)
    fit.save(tmp_path / "hmm.nc")
    back = em.load(tmp_path / "hmm.nc")
    xr.testing.assert_allclose(back.params["z"]["transition"], fit.params["z"]["transition"])
    xr.testing.assert_allclose(back.predict_proba(ds), fit.posterior.rename("predict_proba"))


def test_sample_sequences():
    fit = _hmm(3).fit(xr.Dataset({"x": ("time", np.random.default_rng(8).normal(size=200))}),
                      init=_given(), max_iter=0)
    draws = fit.sample(400, 60, seed=1)
    assert draws["x"].dims == ("sequence", "time") and draws["z"].shape == (400, 60)
    z = np.asarray(draws["z"].values, dtype=int)
    np.testing.assert_allclose(np.bincount(z[:, 0], minlength=3) / 400, INITIAL, atol=0.07)
    counts = np.zeros((3, 3))
    np.add.at(counts, (z[:, :-1], z[:, 1:]), 1)
    np.testing.assert_allclose(counts / counts.sum(1, keepdims=True), TRANSITION, atol=0.03)
    x = draws["x"].values[z == 2]
    assert x.mean() == pytest.approx(MEAN[2], abs=0.1) and x.var() == pytest.approx(VARIANCE[2], rel=0.1)


# -- bad input -------------------------------------------------------------------------------

def test_markov_dim_missing_from_data():
    ds = xr.Dataset({"x": ("sample", np.arange(5.0))})
    with pytest.raises(em.ModelError, match="without the dimension 'time'"):
        _hmm(2).fit(ds)


def test_transition_rows_must_sum_to_one():
    with pytest.raises(em.ModelError, match="row 1 sums to 0.9"):
        em.Categorical(2, transition=[[0.5, 0.5], [0.3, 0.6]])
    ds = xr.Dataset({"x": ("time", np.arange(10.0))})
    with pytest.raises(em.ModelError, match="transition: row 0 sums to 1.2"):
        _hmm(2).fit(ds, init={"z": {"transition": [[0.6, 0.6], [0.5, 0.5]]}})


def test_fixed_zeros_that_make_a_sequence_impossible_name_the_step():
    x = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 0.0, 0.1])
    ds = xr.Dataset({"x": ("time", x)}, coords={"time": np.arange(7) * 10})
    model = em.Model().latent("z", em.Categorical(2, initial=[1.0, 0.0], transition=[[0.0, 1.0], [0.0, 1.0]]),
                              markov="time").observe("c", em.Categorical)
    ds["c"] = ("time", [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    # state 0 only at t = 0 and emitting level 0 only, state 1 emitting level 1 only: step 5 is impossible
    with pytest.raises(em.ModelError, match="time=50"):
        model.fit(ds, init={"c": {"probs": [[1.0, 0.0], [0.0, 1.0]]}}, max_iter=0)


def test_sequence_of_length_zero():
    x = np.ones((3, 5)) * np.arange(5)
    x[1] = np.nan
    ds = xr.Dataset({"x": (("sequence", "time"), x)}, coords={"sequence": ["a", "b", "c"]})
    with pytest.raises(em.ModelError, match="sequence='b' has no observation"):
        _hmm(2).fit(ds)


def test_viterbi_on_a_mixture():
    ds = em.datasets.load("faithful")
    fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(ds, seed=0)
    with pytest.raises(em.ModelError, match="no Markov latent"):
        fit.viterbi(ds)


def test_declaration_errors():
    with pytest.raises(em.ModelError, match="parameters of a Markov latent"):
        em.Model().latent("z", em.Categorical(2, transition=[[1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(em.ModelError, match="no mixture weights"):
        em.Model().latent("z", em.Categorical(2, probs=[0.5, 0.5]), markov="time")
    with pytest.raises(em.ModelError, match="initial and transition are parameters"):
        em.Model().observe("x", em.Categorical(2, initial=[0.5, 0.5]))


def test_responsibilities_as_a_start():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 30)) + np.repeat([0.0, 3.0], 15)
    ds = xr.Dataset({"x": (("sequence", "time"), x)})
    resp = xr.DataArray(rng.dirichlet([1.0, 1.0], size=(2, 30)), dims=("sequence", "time", "z"))
    fit = _hmm(2).fit(ds, init=resp, max_iter=10, tol=0)
    check_trace(fit)
    # θ⁽⁰⁾ is the M-step of those responsibilities (emissions) and the sticky chain; the ELBO
    # of the independent-steps q they define is a true lower bound of ℓ(θ⁽⁰⁾)
    assert fit.trace["elbo"].values[0] < fit.trace["loglik"].values[0]
    with pytest.raises(em.ModelError, match="must have dims"):
        _hmm(2).fit(ds, init=resp.rename(time="t"))


def test_known_states_clamp_the_chain_exactly_as_enumeration_over_agreeing_paths():
    """Labels (a variable named like the latent, NaN/None where unknown): ℓ is log p(x, labels), the
    sum over the paths that agree with them, and the posterior is theirs; ragged sequences, holes,
    labels by name and a label past a sequence's last observation (a step of its own)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6)) * 1.5
    x[0, 2] = np.nan
    x[1, 4:] = np.nan  # the second sequence's observations end at step 3 ...
    names = np.array(["a", "b", "c"], dtype=object)
    known = np.full((2, 6), None, dtype=object)
    known[0, [1, 4]] = names[[2, 0]]
    known[1, [0, 4]] = names[[1, 2]]  # ... and its state is known at step 4
    ds = xr.Dataset({"x": (("sequence", "time"), x), "z": (("sequence", "time"), known)})
    model = em.Model().latent("z", em.Categorical(list(names)), markov="time").observe("x", em.Normal)
    fit = model.fit(ds, init=_given(), max_iter=0)
    codes = np.array([[-1 if v is None else list(names).index(v) for v in row] for row in known])
    total = 0.0
    for s, length in ((0, 6), (1, 5)):
        # a label rules out the other states at its step, observed or not
        labelled = codes[s, :length]
        paths = np.array([p for p in itertools.product(range(3), repeat=length)
                          if all(k < 0 or k == state for k, state in zip(labelled, p, strict=True))])
        values = x[s, :length]
        emission = np.where(np.isnan(values), 0.0, st.norm.logpdf(np.nan_to_num(values), MEAN[paths],
                                                                  np.sqrt(VARIANCE)[paths]))
        log_joint = (np.log(INITIAL)[paths[:, 0]] + np.log(TRANSITION)[paths[:, :-1], paths[:, 1:]].sum(axis=1)
                     + emission.sum(axis=1))
        part = logsumexp(log_joint)
        posterior = np.stack([np.bincount(paths[:, t], np.exp(log_joint - part), minlength=3) for t in range(length)])
        total += part
        np.testing.assert_allclose(fit.posterior.isel(sequence=s, time=slice(0, length)).values, posterior,
                                   atol=1e-12)
    assert fit.loglik == pytest.approx(total, rel=1e-12)
    assert fit.n_samples == 11  # 6 steps, and 5: the labelled step 4 counts


@pytest.fixture(scope="module")
def labelled_chain() -> tuple[xr.Dataset, np.ndarray]:
    """Two sequences of a 3-state chain with overlapping emissions; 10% of the steps labelled."""
    rng = np.random.default_rng(1)
    z = np.zeros((2, 400), dtype=int)
    for s in range(2):
        z[s, 0] = rng.integers(3)
        for t in range(1, 400):
            z[s, t] = rng.choice(3, p=TRANSITION[z[s, t - 1]])
    x = np.array([-1.0, 0.0, 1.0])[z] + rng.normal(0, 0.6, z.shape)
    known = np.where(rng.random(z.shape) < 0.1, z, np.nan)
    return xr.Dataset({"x": (("sequence", "time"), x), "z": (("sequence", "time"), known)}), z


def test_known_states_fix_the_states_meaning_everywhere_a_chain_goes(labelled_chain):
    ds, z = labelled_chain
    known = ~np.isnan(ds["z"].values)
    fit = _hmm(3).fit(ds, seed=0, tol=1e-10)
    check_trace(fit)
    # no label switching: state k is the chain at −1, 0, 1 as the labels say, from any seed
    assert np.all(np.diff(fit.params["x"]["mean"].values) > 0)
    for seed in (1, 2):
        other = _hmm(3).fit(ds, seed=seed, tol=1e-10)
        assert other.loglik == pytest.approx(fit.loglik, rel=1e-8)
    # every state is labelled: the start is the supervised estimate from the labelled steps alone
    start = _hmm(3).fit(ds, seed=0, max_iter=0).params["x"]["mean"].values
    np.testing.assert_allclose(start, [ds["x"].values[known & (z == k)].mean() for k in range(3)], rtol=1e-12)
    # the decoded path and the posterior keep the labels; plain and accelerated EM agree
    path = fit.predict(ds).values
    assert np.array_equal(path[known], ds["z"].values[known].astype(int))
    assert np.all(fit.posterior.values[known].max(axis=1) == 1.0)
    plain = _hmm(3).fit(ds, seed=0, tol=1e-12, accelerate=None)
    assert plain.loglik == pytest.approx(fit.loglik, rel=1e-8)
    # dask-backed data (a chunk per sequence) give the in-memory E-step
    lazy = _hmm(3).fit(ds.chunk(sequence=1), init=fit, max_iter=2, accelerate=None)
    eager = _hmm(3).fit(ds, init=fit, max_iter=2, accelerate=None)
    assert lazy.loglik == pytest.approx(eager.loglik, rel=1e-12)
    # labels help: decoding the unlabelled steps beats the unlabelled fit's best relabelling
    unlabelled = _hmm(3).fit(ds.drop_vars("z"), seed=0, tol=1e-10).predict(ds.drop_vars("z")).values
    best = max(np.mean(np.array(perm)[unlabelled][~known] == z[~known]) for perm in itertools.permutations(range(3)))
    assert np.mean(path[~known] == z[~known]) >= best


def test_known_states_move_the_chains_start_towards_the_labelled_transitions():
    """θ⁽⁰⁾'s π and A: the sticky default as a Dirichlet mean with K pseudo-counts per row, updated by
    the weighted labelled first steps and the transitions between consecutive labelled steps (a pair
    across a sequence boundary or an unlabelled step is not one); every entry stays positive."""
    known = np.full((3, 6), np.nan)
    known[0] = [0, 1, 2, 0, np.nan, 1]  # pairs 0→1, 1→2, 2→0; first step 0
    known[1, 1:4] = [2, 2, 1]  # pairs 2→2, 2→1; first step unknown
    known[2, :2] = [1, 0]  # weight 2: pair 1→0 twice, first step 1 twice
    x = np.random.default_rng(3).normal(size=(3, 6))
    ds = xr.Dataset({"x": (("sequence", "time"), x), "z": (("sequence", "time"), known),
                     "w": ("sequence", [1.0, 1.0, 2.0])})
    start = _hmm(3).fit(ds, weights="w", seed=0, max_iter=0).params["z"]
    sticky = em.Categorical(3).markov_form("test").default_params()
    first = np.array([1.0, 2.0, 0.0])
    pairs = np.zeros((3, 3))
    for (i, j), w in {(0, 1): 1, (1, 2): 1, (2, 0): 1, (2, 2): 1, (2, 1): 1, (1, 0): 2}.items():
        pairs[i, j] += w
    np.testing.assert_allclose(start["initial"].values, (first + 3 * sticky["initial"]) / (first.sum() + 3),
                               rtol=1e-12)
    np.testing.assert_allclose(start["transition"].values,
                               (pairs + 3 * sticky["transition"]) / (pairs.sum(axis=1, keepdims=True) + 3),
                               rtol=1e-12)
    assert np.all(start["transition"].values > 0)
    # values given for the chain win over the labels'
    given = {"z": {"transition": np.full((3, 3), 1 / 3)}}
    held = _hmm(3).fit(ds, weights="w", seed=0, init=given, max_iter=0).params["z"]["transition"].values
    np.testing.assert_allclose(held, 1 / 3, rtol=1e-12)


def test_known_states_of_a_chain_must_lie_on_its_grid_and_be_states():
    ds = xr.Dataset({"x": (("sequence", "time"), np.arange(20.0).reshape(2, 10))})
    with pytest.raises(em.ModelError, match=r"known states 'z' must be over the chain's grid \('sequence', 'time'\)"):
        _hmm(2).fit(ds.assign(z=("time", np.zeros(10))))
    with pytest.raises(em.ModelError, match="not states of 'z'"):
        _hmm(2).fit(ds.assign(z=(("sequence", "time"), np.full((2, 10), 5.0))))


@pytest.mark.filterwarnings("ignore::emdsl.DegenerateComponentWarning")  # state 1 is never reached, by design
def test_outlier_far_from_every_allowed_state_stays_exact():
    """A step whose allowed states emit e^-2000 times worse than a ruled-out one: rescaled, not lost."""
    x = np.array([0.0, 0.1, 60.0, 0.2])
    ds = xr.Dataset({"x": ("time", x)})
    initial, transition = np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.5, 0.5]])  # state 1 never reached
    mean, variance = np.array([0.0, 60.0]), np.array([1.0, 1.0])
    fit = _hmm(2).fit(ds, init={"z": {"initial": initial, "transition": transition},
                                "x": {"mean": mean, "variance": variance}}, max_iter=0)
    expected = st.norm(0.0, 1.0).logpdf(x).sum()  # the only path: state 0 throughout
    assert fit.loglik == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(fit.posterior.sel(z=0).values, 1.0)


def test_criteria_on_new_data_match_the_fit():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(3, 50)) + np.repeat([0.0, 3.0], 25)
    x[0, 40:] = np.nan
    ds = xr.Dataset({"x": (("sequence", "time"), x)})
    fit = _hmm(2).fit(ds, seed=0)
    assert fit.bic(ds) == pytest.approx(fit.bic(), rel=1e-10)
    assert fit.aic(ds) == pytest.approx(fit.aic(), rel=1e-10)
    assert fit.score(ds) == pytest.approx(fit.loglik / 3, rel=1e-10)  # mean per sequence
    assert fit.n_samples == 140  # observed steps, the padding trimmed


@pytest.mark.parametrize("threads, rows, keep_phi", [(1, 50, True), (2, 50, True), (2, 10_000, True), (1, 30, False)])
def test_blocks_and_threads_do_not_change_the_result(threads, rows, keep_phi, monkeypatch):
    """Blocks hold whole sequences (one longer than a block is a block of its own), on any number of threads;
    a block whose Φ is not kept is read twice (for L, then for R Φᵀ)."""
    if not keep_phi:
        monkeypatch.setattr("emdsl.engine.estep._CHAIN_PHI_BYTES", 0)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(7, 80)) + np.repeat([0.0, 3.0], 40)
    x[3, 20:] = np.nan
    ds = xr.Dataset({"x": (("sequence", "time"), x)})
    # plain EM (accelerate=None): fifteen M-steps, whose sums differ by rounding only (an accelerated
    # path takes step lengths that amplify such differences, a² times)
    reference = _hmm(2).fit(ds, seed=0, max_iter=15, tol=0, accelerate=None)
    with em.set_options(n_threads=threads, block_rows=rows):
        fit = _hmm(2).fit(ds, seed=0, max_iter=15, tol=0, accelerate=None)
    assert fit.loglik == pytest.approx(reference.loglik, rel=1e-12)
    np.testing.assert_allclose(fit.params["z"]["transition"].values, reference.params["z"]["transition"].values,
                               rtol=1e-10)


def test_plots_of_a_chain():
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 60)) + np.repeat([0.0, 3.0], 30)
    x[1, 45:] = np.nan
    ds = xr.Dataset({"x": (("sequence", "time"), x)}, coords={"sequence": ["a", "b"], "time": np.arange(60) * 2})
    fit = _hmm(2).fit(ds, seed=0)
    fig = fit.plot.states(sequence={"sequence": "b"})
    top, bottom = fig.axes
    # the data drawn over the padded grid, and the posterior filling [0, 1] at every step
    assert top.lines[0].get_xdata().tolist() == (np.arange(60) * 2).tolist()
    # every observed step drawn once, in the colour of its Viterbi state; the padding not at all
    drawn = [np.asarray(c.get_offsets()) for c in top.collections]
    assert sum(int(np.isfinite(d).all(axis=1).sum()) for d in drawn) == 45
    path = fit.predict(ds).sel(sequence="b").values[:45]
    for j, d in enumerate(drawn):
        assert int(np.isfinite(d).all(axis=1).sum()) == int((path == j).sum())
    assert len(bottom.collections) == 2  # one band of p(z_t | x) per state
    assert len(fit.plot.posterior().axes) == 2  # a chain's posterior is drawn over time
    # the components panel weighs each state by its share of the observed steps
    weights = fit.plot._weights(fit.posterior.stack(row=("sequence", "time")).transpose("row", "z").values)
    np.testing.assert_allclose(weights.sum(), 1.0)
    assert len(fit.plot.components().axes) == 1
    mixture = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(
        em.datasets.load("faithful"), seed=0)
    with pytest.raises(em.ModelError, match="no Markov latent"):
        mixture.plot.states()


def test_text_and_html_name_the_chain_sequences_and_steps(tmp_path):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 40))
    x[1, 30:] = np.nan  # padding: the steps counted are the observed ones
    ds = xr.Dataset({"x": (("run", "time"), x)})
    fit = _hmm(2).fit(ds, seed=0)
    assert "3 sequences, 110 steps along 'time'" in repr(fit) and "samples" not in repr(fit).splitlines()[0]
    card = fit._repr_html_()
    assert "Markov along" in card and ">time</code>" in card and "sequences</span> <b>3</b>" in card
    assert "steps (time)</span> <b>110</b>" in card and ">samples<" not in card
    one = _hmm(2).fit(ds.isel(run=0), seed=0)
    assert "1 sequence, 40 steps along 'time'" in repr(one)
    fit.save(tmp_path / "chain.nc")  # no training data in the file: the steps only
    assert "110 steps along 'time'" in repr(em.load(tmp_path / "chain.nc"))


@pytest.mark.parametrize("chunks", [None, 4])
def test_a_sequence_of_weight_0_that_no_state_can_emit_adds_nothing(chunks):
    """Like a mixture's sample of weight 0, such a sequence is ignored (it was refused as impossible):
    the fit is the fit without it, in memory and on dask."""
    left_right = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    model = em.Model().latent("z", em.Categorical(3, initial=[1.0, 0.0, 0.0], transition=left_right),
                              markov="time").observe("x", em.Normal)
    rng = np.random.default_rng(3)
    x = np.array([0.0, 0.0, 100.0, 100.0, 200.0]) + rng.normal(size=(12, 5))
    x[9] = [0.0, 100.0, 200.0, 0.0, 0.0]  # a left-to-right chain never returns to state 0
    w = np.ones(12)
    w[9] = 0.0
    ds = xr.Dataset({"x": (("sequence", "time"), x), "w": ("sequence", w)}, coords={"sequence": np.arange(12)})
    start = {"x": {"mean": [0.0, 100.0, 200.0], "variance": [1.0, 1.0, 1.0]}}
    with pytest.raises(em.ModelError, match=r"sequence=9, time=3 has probability 0"):
        model.fit(ds, init=start, max_iter=0)  # with weight 1 it is refused, as before
    data = ds if chunks is None else ds.chunk({"sequence": chunks})
    fit = model.fit(data, weights="w", init=start, tol=1e-12)
    without = model.fit(ds.drop_sel(sequence=9), weights="w", init=start, tol=1e-12)
    assert fit.n_iter == without.n_iter
    np.testing.assert_allclose(fit.trace["loglik"].values, without.trace["loglik"].values, rtol=1e-10)
    for name in ("mean", "variance"):
        np.testing.assert_allclose(fit.params["x"][name].values, without.params["x"][name].values, rtol=1e-10)


def test_a_sequence_of_weight_0_that_no_state_can_emit_scores_minus_infinity():
    # a weight-0 sequence counts for nothing in the fit; scoring it is log p = −∞ (as a mixture's
    # sample), and a posterior or path for it is refused, naming the step no state can emit
    rng = np.random.default_rng(2)
    x = rng.exponential(0.1, (3, 8))
    x[0, 5] = 1.7e308  # rate × x overflows for the fitted rates (≈ 10): log-density −∞ in every state
    ds = xr.Dataset({"x": (("sequence", "time"), x), "w": ("sequence", [0.0, 1.0, 2.0])})
    model = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Exponential)
    fit = model.fit(ds, weights="w", seed=0)
    assert np.isfinite(fit.loglik)
    for data in (ds, ds.chunk(sequence=1)):
        scores = np.asarray(fit.score_samples(data).values)
        assert scores[0] == -np.inf and np.all(np.isfinite(scores[1:]))
    for call in (fit.predict_proba, fit.predict):
        with pytest.raises(em.ModelError, match=r"sequence=0, time=5 .*no state can emit the observation"):
            call(ds)
