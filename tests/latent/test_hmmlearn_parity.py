"""Parity with hmmlearn (an independent implementation) from the same starting parameters.

After 20 EM iterations from the same θ⁽⁰⁾ the parameters, the log-likelihood trace and the
Viterbi paths agree to 1e-6: Gaussian (diag and full), categorical, multinomial and Poisson emissions,
one sequence and several of different lengths (NaN-padded here, ``lengths`` there).
hmmlearn's priors are set to their no-prior values so both run maximum likelihood, except in the
tests with priors (Dirichlet on a categorical HMM, normal–inverse-Wishart on a Gaussian one), where both
run the same MAP M-step.
"""

import warnings

import numpy as np
import pytest
import xarray as xr

import emdsl as em

hmm = pytest.importorskip("hmmlearn.hmm")

N_ITER = 20
START = np.array([0.5, 0.3, 0.2])
TRANSITION = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])


def _sample(reference, lengths, seed):
    parts = [reference.sample(n, random_state=seed + i)[0] for i, n in enumerate(lengths)]
    return parts


def _padded(parts, dims, coords=None):
    """Sequences of different lengths as one (sequence, time, ...) array, NaN-padded at the end."""
    T = max(len(p) for p in parts)
    out = np.full((len(parts), T) + parts[0].shape[1:], np.nan)
    for i, p in enumerate(parts):
        out[i, :len(p)] = p
    return xr.DataArray(out, dims=dims, coords=coords or {})


def _run_hmmlearn(model, parts):
    X = np.concatenate(parts)
    model.fit(X, [len(p) for p in parts])
    return model, X


def _same_trace(fit, reference):
    ours = fit.trace["loglik"].values
    theirs = np.asarray(reference.monitor_.history)
    np.testing.assert_allclose(ours[:len(theirs)], theirs, rtol=1e-9)


MEANS = np.array([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]])
COVARIANCES = np.array([[[1.0, 0.3], [0.3, 0.5]], [[0.7, -0.2], [-0.2, 1.2]], [[0.4, 0.0], [0.0, 0.4]]])
MEANS0 = MEANS + np.array([[0.5, -0.3], [-0.4, 0.2], [0.3, 0.5]])
COVARIANCES0 = COVARIANCES * 1.5
A0 = np.array([[0.6, 0.2, 0.2], [0.3, 0.5, 0.2], [0.25, 0.25, 0.5]])
PI0 = np.array([0.2, 0.5, 0.3])
#: the categorical tests' emission probabilities at the start
B0 = np.array([[0.4, 0.3, 0.2, 0.1], [0.2, 0.2, 0.3, 0.3], [0.3, 0.2, 0.3, 0.2]])


def _as_type(covariances, covariance_type):
    return covariances if covariance_type == "full" else np.diagonal(covariances, axis1=1, axis2=2).copy()


def _gaussian(covariance_type):
    model = hmm.GaussianHMM(3, covariance_type=covariance_type)
    model.n_features = 2
    model.startprob_, model.transmat_, model.means_ = START, TRANSITION, MEANS
    model.covars_ = _as_type(COVARIANCES, covariance_type)
    return model


def _gaussian_start(covariance_type):
    """θ⁽⁰⁾ of the Gaussian tests in emdsl's init= form (hmmlearn's reference gets the same)."""
    return {"z": {"initial": PI0, "transition": A0},
            "x": {"mean": MEANS0, "covariance": _as_type(COVARIANCES0, covariance_type)}}


def _same_covariances(fit, reference, atol):
    ours = fit.params["x"]["covariance"].values
    # hmmlearn's covars_ property gives (K, D, D) for every type
    np.testing.assert_allclose(ours if ours.ndim == 3 else np.apply_along_axis(np.diag, -1, ours),
                               reference.covars_, atol=atol)


@pytest.mark.parametrize("covariance_type", ["diag", "full"])
@pytest.mark.parametrize("lengths", [[600], [300, 180, 250]])
def test_gaussian_hmm(covariance_type, lengths):
    parts = _sample(_gaussian(covariance_type), lengths, seed=len(lengths))
    reference = hmm.GaussianHMM(3, covariance_type=covariance_type, n_iter=N_ITER, tol=-np.inf, init_params="",
                                covars_prior=0.0, implementation="scaling")
    reference.startprob_, reference.transmat_, reference.means_ = PI0, A0, MEANS0
    reference.covars_ = _as_type(COVARIANCES0, covariance_type)
    reference, X = _run_hmmlearn(reference, parts)

    dims = ("time", "feature") if len(parts) == 1 else ("sequence", "time", "feature")
    x = xr.DataArray(parts[0], dims=dims) if len(parts) == 1 else _padded(parts, dims)
    family = em.MultivariateNormal(covariance=covariance_type)
    model = em.Model().latent("z", em.Categorical(3), markov="time").observe("x", family)
    # plain EM (accelerate=None), iterate by iterate as hmmlearn runs it
    fit = model.fit(x.to_dataset(name="x"), init=_gaussian_start(covariance_type), max_iter=N_ITER, tol=0,
                    accelerate=None)

    p = fit.params
    np.testing.assert_allclose(p["z"]["initial"].values, reference.startprob_, atol=1e-6)
    np.testing.assert_allclose(p["z"]["transition"].values, reference.transmat_, atol=1e-6)
    np.testing.assert_allclose(p["x"]["mean"].values, reference.means_, atol=1e-6)
    _same_covariances(fit, reference, atol=1e-6)
    _same_trace(fit, reference)
    assert fit.loglik == pytest.approx(reference.score(X, [len(q) for q in parts]), rel=1e-9)

    log_prob, states = reference.decode(X, [len(q) for q in parts], algorithm="viterbi")
    path, ours = fit.viterbi(x.to_dataset(name="x"))
    flat = path.values.reshape(len(parts), -1)
    np.testing.assert_array_equal(np.concatenate([flat[i, :len(q)] for i, q in enumerate(parts)]), states)
    total = ours if isinstance(ours, float) else float(ours.sum())
    if all(len(q) == len(parts[0]) for q in parts):
        assert total == pytest.approx(log_prob, rel=1e-9)


@pytest.mark.parametrize("covariance_type", ["diag", "full"])
def test_gaussian_hmm_with_conjugate_priors(covariance_type):
    """hmmlearn's MAP M-step (Huang, Acero & Hon) is emdsl's normal–inverse-Wishart prior: means_prior m,
    means_weight κ and covars_prior Ψ are the prior's, and covars_weight w counts what emdsl's
    denominators count as ν + D + 2 ("full", so ν = w − 2D − 2) and ν + 3 ("diag", ν = w − 4)."""
    parts = _sample(_gaussian(covariance_type), [600], seed=1)
    mean, kappa, weight = np.array([0.5, 1.0]), 2.0, 10.0
    scale = np.array([[2.0, 0.3], [0.3, 1.5]]) if covariance_type == "full" else np.array([2.0, 1.5])
    reference = hmm.GaussianHMM(3, covariance_type=covariance_type, n_iter=N_ITER, tol=-np.inf, init_params="",
                                implementation="scaling", means_prior=mean, means_weight=kappa,
                                covars_prior=scale, covars_weight=weight)
    reference.startprob_, reference.transmat_, reference.means_ = PI0, A0, MEANS0
    reference.covars_ = _as_type(COVARIANCES0, covariance_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hmmlearn's monitor warns that ℓ falls, as it may under a prior
        reference, _ = _run_hmmlearn(reference, parts)

    dof = weight - 2 * 2 - 2 if covariance_type == "full" else weight - 4
    prior = em.priors.NormalInverseWishart(mean=mean, kappa=kappa, dof=dof, scale=scale)
    model = (em.Model().latent("z", em.Categorical(3), markov="time")
             .observe("x", em.MultivariateNormal(covariance=covariance_type, prior=prior)))
    fit = model.fit(xr.Dataset({"x": (("time", "feature"), parts[0])}), init=_gaussian_start(covariance_type),
                    max_iter=N_ITER, tol=0, accelerate=None)
    p = fit.params
    np.testing.assert_allclose(p["x"]["mean"].values, reference.means_, atol=1e-12)
    _same_covariances(fit, reference, atol=1e-12)
    np.testing.assert_allclose(p["z"]["transition"].values, reference.transmat_, atol=1e-12)
    _same_trace(fit, reference)
    # emdsl checks the log-posterior, which never falls; ℓ alone may, as hmmlearn's warnings say
    assert np.all(np.diff(fit.trace["logpost"].values) >= -fit.trace["slack"].values[1:])


def _categorical_parts():
    """Two sequences (400 and 350 steps) from a 3-state categorical HMM over 4 levels."""
    truth = hmm.CategoricalHMM(3)
    truth.startprob_, truth.transmat_ = START, TRANSITION
    truth.emissionprob_ = np.array([[0.7, 0.2, 0.05, 0.05], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]])
    return _sample(truth, [400, 350], seed=3)


def test_categorical_hmm():
    parts = _categorical_parts()
    reference = hmm.CategoricalHMM(3, n_iter=N_ITER, tol=-np.inf, init_params="", implementation="scaling")
    reference.startprob_, reference.transmat_, reference.emissionprob_ = PI0, A0, B0
    reference, X = _run_hmmlearn(reference, parts)

    x = _padded([p[:, 0].astype(float) for p in parts], ("sequence", "time"))
    model = em.Model().latent("z", em.Categorical(3), markov="time").observe("x", em.Categorical)
    fit = model.fit(x.to_dataset(name="x"), init={"z": {"initial": PI0, "transition": A0}, "x": {"probs": B0}},
                    max_iter=N_ITER, tol=0, accelerate=None)  # plain EM, iterate by iterate as hmmlearn
    np.testing.assert_allclose(fit.params["z"]["initial"].values, reference.startprob_, atol=1e-6)
    np.testing.assert_allclose(fit.params["z"]["transition"].values, reference.transmat_, atol=1e-6)
    np.testing.assert_allclose(fit.params["x"]["probs"].values, reference.emissionprob_, atol=1e-6)
    _same_trace(fit, reference)
    _, states = reference.decode(X, [len(p) for p in parts], algorithm="viterbi")
    path = fit.viterbi(x.to_dataset(name="x"))[0].values
    np.testing.assert_array_equal(np.concatenate([path[0, :400], path[1, :350]]), states)


def test_categorical_hmm_with_dirichlet_priors():
    """hmmlearn's MAP M-step (prior − 1 + counts, normalized) on the start, each transition row and each
    emission row is emdsl's Dirichlet prior on the chain and on the Categorical emission."""
    parts = _categorical_parts()
    alpha, beta = np.array([2.5, 1.5, 3.0]), np.array([1.3, 2.0, 1.1, 4.0])
    reference = hmm.CategoricalHMM(3, n_iter=N_ITER, tol=-np.inf, init_params="", implementation="scaling",
                                   startprob_prior=alpha, transmat_prior=np.tile(alpha, (3, 1)),
                                   emissionprob_prior=np.tile(beta, (3, 1)))
    reference.startprob_, reference.transmat_, reference.emissionprob_ = PI0, A0, B0
    reference, _ = _run_hmmlearn(reference, parts)

    x = _padded([p[:, 0].astype(float) for p in parts], ("sequence", "time")).to_dataset(name="x")
    model = (em.Model().latent("z", em.Categorical(3, prior=em.priors.Dirichlet(alpha)), markov="time")
             .observe("x", em.Categorical(prior=em.priors.Dirichlet(beta))))
    fit = model.fit(x, init={"z": {"initial": PI0, "transition": A0}, "x": {"probs": B0}},
                    max_iter=N_ITER, tol=0, accelerate=None)
    np.testing.assert_allclose(fit.params["z"]["initial"].values, reference.startprob_, atol=1e-12)
    np.testing.assert_allclose(fit.params["z"]["transition"].values, reference.transmat_, atol=1e-12)
    np.testing.assert_allclose(fit.params["x"]["probs"].values, reference.emissionprob_, atol=1e-12)
    _same_trace(fit, reference)  # hmmlearn's monitor records ℓ, as emdsl's loglik does (logpost adds log p)


def test_categorical_hmm_with_a_sticky_transition_prior():
    """A matrix α (one Dirichlet per row of A: hmmlearn's transmat_prior) and π's own α
    (``initial=``, hmmlearn's startprob_prior): the same MAP iterates, and the sticky prior
    holds the diagonal higher than maximum likelihood does."""
    parts = _categorical_parts()
    transition_alpha = 1.0 + np.array([[30.0, 1.0, 0.0], [2.0, 25.0, 0.5], [0.0, 3.0, 40.0]])
    start_alpha = np.array([1.0, 4.0, 2.0])
    reference = hmm.CategoricalHMM(3, n_iter=N_ITER, tol=-np.inf, init_params="", implementation="scaling",
                                   startprob_prior=start_alpha, transmat_prior=transition_alpha)
    reference.startprob_, reference.transmat_, reference.emissionprob_ = PI0, A0, B0
    reference, _ = _run_hmmlearn(reference, parts)

    x = _padded([p[:, 0].astype(float) for p in parts], ("sequence", "time")).to_dataset(name="x")
    sticky = em.priors.Dirichlet(transition_alpha, initial=start_alpha)
    model = em.Model().latent("z", em.Categorical(3, prior=sticky), markov="time").observe("x", em.Categorical)
    init = {"z": {"initial": PI0, "transition": A0}, "x": {"probs": B0}}
    fit = model.fit(x, init=init, max_iter=N_ITER, tol=0, accelerate=None)
    np.testing.assert_allclose(fit.params["z"]["initial"].values, reference.startprob_, atol=1e-12)
    np.testing.assert_allclose(fit.params["z"]["transition"].values, reference.transmat_, atol=1e-12)
    np.testing.assert_allclose(fit.params["x"]["probs"].values, reference.emissionprob_, atol=1e-12)
    _same_trace(fit, reference)
    # log p(θ): π's Dirichlet and each row's own, by scipy
    from scipy import stats

    params = fit.params["z"]
    log_prior = stats.dirichlet(start_alpha).logpdf(params["initial"].values) + sum(
        stats.dirichlet(a).logpdf(row) for a, row in zip(transition_alpha, params["transition"].values, strict=True))
    assert fit.trace["logpost"].values[-1] - fit.trace["loglik"].values[-1] == pytest.approx(log_prior, rel=1e-10)
    plain = em.Model().latent("z", em.Categorical(3), markov="time").observe("x", em.Categorical).fit(
        x, init=init, max_iter=N_ITER, tol=0, accelerate=None)
    assert np.all(np.diag(fit.params["z"]["transition"].values) > np.diag(plain.params["z"]["transition"].values))
    # saved and loaded with the fit; the matrix α is for a chain only
    assert em.Categorical(3, prior=sticky).prior == sticky
    mixture = em.Model().latent("z", em.Categorical(3, prior=sticky)).observe("x", em.Categorical)
    with pytest.raises(em.ModelError, match="initial"):
        mixture.fit(x.isel(sequence=0), seed=0)
    matrix_only = em.Model().latent("z", em.Categorical(3, prior=em.priors.Dirichlet(transition_alpha)))
    with pytest.raises(em.ModelError, match=r"expected shape \(3,\)"):
        matrix_only.observe("x", em.Categorical).fit(x.isel(sequence=0), seed=0)


def test_multinomial_hmm():
    """hmmlearn's MultinomialHMM (counts over categories, n trials per step) is a Multinomial emission;
    ℓ includes the multinomial coefficient in both."""
    truth = hmm.MultinomialHMM(3, n_trials=12)
    truth.startprob_, truth.transmat_ = START, TRANSITION
    truth.emissionprob_ = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hmmlearn's note that its MultinomialHMM changed in 0.3
        parts = _sample(truth, [400], seed=7)
        probs0 = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
        reference = hmm.MultinomialHMM(3, n_trials=12, n_iter=N_ITER, tol=-np.inf, init_params="",
                                       implementation="scaling")
        reference.startprob_, reference.transmat_, reference.emissionprob_ = PI0, A0, probs0
        reference, X = _run_hmmlearn(reference, parts)

    ds = xr.Dataset({"counts": (("time", "category"), parts[0].astype(float))})
    model = em.Model().latent("z", em.Categorical(3), markov="time").observe("counts", em.Multinomial)
    fit = model.fit(ds, init={"z": {"initial": PI0, "transition": A0}, "counts": {"probs": probs0}},
                    max_iter=N_ITER, tol=0, accelerate=None)
    np.testing.assert_allclose(fit.params["z"]["transition"].values, reference.transmat_, atol=1e-12)
    np.testing.assert_allclose(fit.params["counts"]["probs"].values, reference.emissionprob_, atol=1e-12)
    _same_trace(fit, reference)


def test_poisson_hmm():
    truth = hmm.PoissonHMM(3)
    truth.startprob_, truth.transmat_ = START, TRANSITION
    truth.lambdas_ = np.array([[1.0, 10.0], [5.0, 2.0], [15.0, 15.0]])
    parts = _sample(truth, [500], seed=5)
    lambdas0 = np.array([[2.0, 8.0], [4.0, 4.0], [12.0, 10.0]])
    reference = hmm.PoissonHMM(3, n_iter=N_ITER, tol=-np.inf, init_params="", implementation="scaling")
    reference.startprob_, reference.transmat_, reference.lambdas_ = PI0, A0, lambdas0
    reference, X = _run_hmmlearn(reference, parts)

    ds = xr.Dataset({"counts": (("time", "station"), parts[0].astype(float))})
    model = em.Model().latent("z", em.Categorical(3), markov="time").observe("counts", em.Poisson)
    fit = model.fit(ds, init={"z": {"initial": PI0, "transition": A0}, "counts": {"rate": lambdas0}},
                    max_iter=N_ITER, tol=0)
    np.testing.assert_allclose(fit.params["z"]["transition"].values, reference.transmat_, atol=1e-6)
    np.testing.assert_allclose(fit.params["counts"]["rate"].values, reference.lambdas_, rtol=1e-6)
    _same_trace(fit, reference)
    log_prob, states = reference.decode(X, algorithm="viterbi")
    path, ours = fit.viterbi(ds)
    np.testing.assert_array_equal(path.values, states)
    assert ours == pytest.approx(log_prob, rel=1e-9)
