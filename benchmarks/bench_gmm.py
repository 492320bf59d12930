"""Per-iteration EM: emdsl against scikit-learn's GaussianMixture, same data, same θ⁽⁰⁾.

Prints seconds per iteration for each, the ratio emdsl / scikit-learn, and the
memory each fit adds beyond the data (peak of numpy allocations, tracemalloc).
scikit-learn's iteration is timed as its own loop body (``_e_step`` then
``_m_step``), so neither side pays for initialisation.

    python benchmarks/bench_gmm.py            # all cases
    python benchmarks/bench_gmm.py --quick    # smaller N, for a smoke run
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
import warnings

import numpy as np
import xarray as xr
from sklearn.mixture import GaussianMixture

import emdsl as em

CASES = [  # (N, D, K, covariance type, scikit-learn s/iteration measured when the targets were set, target)
    (1_000_000, 10, 8, "diag", 0.42, 0.2),
    (200_000, 20, 8, "full", 0.44, 0.25),
    (1_000_000, 10, 8, "full", 1.5, 0.1),
    (100_000, 2, 3, "full", 0.031, 0.3),
]


def make_data(N: int, D: int, K: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (K, D))
    labels = rng.integers(K, size=N)
    X = centers[labels] + rng.normal(size=(N, D)) @ (np.eye(D) + 0.2 * rng.normal(size=(D, D)))
    return X, {"centers": X[rng.choice(N, K, replace=False)]}


def start(X: np.ndarray, K: int, covariance: str, centers: np.ndarray) -> dict:
    cov = np.cov(X[:50_000].T)
    covs = {"full": np.stack([cov] * K), "diag": np.stack([np.diag(cov)] * K),
            "spherical": np.full(K, np.diag(cov).mean()), "tied": cov}[covariance]
    return {"weights": np.full(K, 1 / K), "means": centers, "covariances": covs}


def emdsl_iteration(X, K, covariance, theta, n_iter):
    ds = xr.Dataset({"x": (("sample", "feature"), X)})
    model = em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal(covariance=covariance))
    init = {"z": {"probs": theta["weights"]}, "x": {"mean": theta["means"], "covariance": theta["covariances"]}}
    fit = model.fit(ds, init=init, max_iter=n_iter, tol=0)
    return float(np.median(np.diff(fit.trace["time"].values))), fit


def sklearn_iteration(X, K, covariance, theta, n_iter):
    precisions = (1 / theta["covariances"] if covariance in ("diag", "spherical")
                  else np.linalg.inv(theta["covariances"]))
    gm = GaussianMixture(K, covariance_type=covariance, weights_init=theta["weights"], means_init=theta["means"],
                         precisions_init=precisions, reg_covar=0, max_iter=1, tol=0, init_params="random_from_data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X[:1000])  # only to set fitted attributes; the timed loop below runs on all of X
    gm.weights_, gm.means_ = theta["weights"].copy(), theta["means"].copy()
    gm.covariances_ = theta["covariances"].copy()
    from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky
    gm.precisions_cholesky_ = _compute_precision_cholesky(gm.covariances_, covariance)
    times = []
    for _ in range(n_iter):
        t0 = time.perf_counter()
        _, log_resp = gm._e_step(X)
        gm._m_step(X, log_resp)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), gm


def peak_added_mb(run, *args) -> float:
    """Peak memory ``run(*args)`` allocates beyond what already exists (numpy buffers included)."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = run(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return (peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="divide N by 10")
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args()
    header = (f"{'case':<30}{'sklearn s/it':>13}{'emdsl s/it':>12}{'ratio':>8}{'target':>8}"
              f"{'sklearn +MB':>13}{'emdsl +MB':>11}{'max |Δℓ|/|ℓ|':>15}")
    print(header)
    print("-" * len(header))
    for N, D, K, covariance, _, target in CASES:
        N = N // 10 if args.quick else N
        X, extra = make_data(N, D, K)
        theta = start(X, K, covariance, extra["centers"])
        ours, fit = emdsl_iteration(X, K, covariance, theta, args.iterations)
        theirs, gm = sklearn_iteration(X, K, covariance, theta, args.iterations)
        agreement = abs(fit.loglik / N - gm.score(X[:N])) / abs(gm.score(X[:N]))
        ours_mb = peak_added_mb(emdsl_iteration, X, K, covariance, theta, 2)
        theirs_mb = peak_added_mb(sklearn_iteration, X, K, covariance, theta, 2)
        name = f"N={N:.0e} D={D} K={K} {covariance}"
        print(f"{name:<30}{theirs:>13.4f}{ours:>12.4f}{ours / theirs:>8.3f}{target:>8.2f}"
              f"{theirs_mb:>13.1f}{ours_mb:>11.1f}{agreement:>15.2e}", flush=True)
        del X, fit, gm


if __name__ == "__main__":
    main()
