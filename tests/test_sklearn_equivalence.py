"""Same data, same starting parameters: 40 EM iterations equal scikit-learn's GaussianMixture."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import GaussianMixture

import emdsl as em
from tests.conftest import as_dataset, blobs

TYPES = ["full", "diag", "spherical", "tied"]


def starting_point(X, K, covariance_type, seed):
    """Parameters after two scikit-learn iterations from a k-means start: a shared θ⁽⁰⁾."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        gm = GaussianMixture(K, covariance_type=covariance_type, max_iter=2, tol=0, reg_covar=0,
                             random_state=seed).fit(X)
    return gm.weights_, gm.means_, gm.covariances_


def precisions(covariance_type, cov):
    return 1.0 / cov if covariance_type in ("diag", "spherical") else np.linalg.inv(cov)


@pytest.mark.parametrize("covariance_type", TYPES)
@pytest.mark.parametrize("K, seed", [(2, 0), (3, 1), (4, 2)])
def test_forty_iterations_equal_scikit_learn(covariance_type, K, seed):
    X = blobs(n=600, centers=((0, 0, 0), (4, 1, 0), (-3, 5, 1), (1, -4, 2)), seed=seed)
    weights, means, covariances = starting_point(X, K, covariance_type, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        ref = GaussianMixture(K, covariance_type=covariance_type, weights_init=weights, means_init=means,
                              precisions_init=precisions(covariance_type, covariances),
                              max_iter=40, tol=0, reg_covar=0).fit(X)
    model = em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal(covariance=covariance_type))
    # plain EM (accelerate=None): forty M-steps, iterate by iterate as scikit-learn's
    fit = model.fit(as_dataset(X), init={"z": {"probs": weights}, "x": {"mean": means, "covariance": covariances}},
                    max_iter=40, tol=0, accelerate=None)
    assert fit.n_iter == 40 and fit.trace.sizes["iteration"] == 41
    np.testing.assert_allclose(fit.params["z"]["probs"], ref.weights_, rtol=1e-6)
    np.testing.assert_allclose(fit.params["x"]["mean"], ref.means_, rtol=1e-6)
    np.testing.assert_allclose(fit.params["x"]["covariance"], ref.covariances_, rtol=1e-6)
    assert fit.score(as_dataset(X)) == pytest.approx(ref.score(X), rel=1e-6)
    np.testing.assert_allclose(fit.score_samples(as_dataset(X)), ref.score_samples(X), rtol=1e-6)
    np.testing.assert_allclose(fit.predict_proba(as_dataset(X)), ref.predict_proba(X), atol=1e-6)
    assert fit.bic() == pytest.approx(ref.bic(X), rel=1e-6)
    assert fit.aic() == pytest.approx(ref.aic(X), rel=1e-6)


def test_normal_with_extra_dims_equals_diag_mixture():
    """Independent Normals over a feature dim are the diagonal-covariance mixture."""
    X = blobs(n=400, seed=4)
    weights, means, covariances = starting_point(X, 3, "diag", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        ref = GaussianMixture(3, covariance_type="diag", weights_init=weights, means_init=means,
                              precisions_init=1 / covariances, max_iter=40, tol=0, reg_covar=0).fit(X)
    fit = em.Model().latent("z", em.Categorical(3)).observe("x", em.Normal).fit(
        as_dataset(X), init={"z": {"probs": weights}, "x": {"mean": means, "variance": covariances}},
        max_iter=40, tol=0, accelerate=None)
    np.testing.assert_allclose(fit.params["x"]["variance"], ref.covariances_, rtol=1e-6)
    assert fit.loglik / len(X) == pytest.approx(ref.score(X), rel=1e-9)
