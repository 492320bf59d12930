"""Per-iteration EM for hidden Markov models: emdsl against hmmlearn, same data, same θ⁽⁰⁾.

hmmlearn runs its fastest implementation (``implementation="scaling"``, compiled
forward–backward); each side runs ``N_ITER`` iterations from the same starting
parameters. Times are CPU seconds per iteration (``time.process_time``: on a shared
machine wall-clock time measures the neighbours' load). emdsl's is the median
iteration (E-step + M-step + the monotonicity check), read by a callback;
hmmlearn's is its whole ``fit`` divided by the iterations (it has no per-iteration
clock; its set-up is negligible next to them).

    python benchmarks/bench_hmm.py            # all cases
    python benchmarks/bench_hmm.py --quick    # smaller data, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import xarray as xr
from hmmlearn import hmm

import emdsl as em

N_ITER = 10
TARGET = 0.5  # emdsl / hmmlearn, per iteration


def sticky(K: int, rng: np.random.Generator) -> np.ndarray:
    A = rng.uniform(0.5, 1.5, (K, K)) + np.eye(K) * 4 * K
    return A / A.sum(1, keepdims=True)


def gaussian(T: int, covariance: str = "full", K: int = 8, D: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    truth = hmm.GaussianHMM(K, covariance_type="full")
    truth.n_features = D
    truth.startprob_, truth.transmat_ = np.full(K, 1 / K), sticky(K, rng)
    truth.means_ = rng.normal(0, 3, (K, D))
    truth.covars_ = np.stack([np.eye(D) + 0.3 * np.diag(rng.uniform(size=D)) for _ in range(K)])
    X = truth.sample(T, random_state=seed)[0]
    means0 = X[rng.choice(T, K, replace=False)]
    covars0 = np.stack([np.cov(X.T)] * K)
    if covariance == "diag":
        covars0 = np.diagonal(covars0, axis1=1, axis2=2).copy()
    pi0, A0 = np.full(K, 1 / K), sticky(K, rng)
    reference = hmm.GaussianHMM(K, covariance_type=covariance, n_iter=N_ITER, tol=-np.inf, init_params="",
                                covars_prior=0.0, implementation="scaling")
    reference.startprob_, reference.transmat_, reference.means_, reference.covars_ = pi0, A0, means0, covars0
    ds = xr.Dataset({"x": (("time", "feature"), X)})
    model = (em.Model().latent("z", em.Categorical(K), markov="time")
             .observe("x", em.MultivariateNormal(covariance=covariance)))
    init = {"z": {"initial": pi0, "transition": A0}, "x": {"mean": means0, "covariance": covars0}}
    return f"Gaussian {covariance} K={K} D={D} T={T:.0e}", reference, X, [T], model, ds, init


def categorical(T: int, K: int = 4, levels: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    truth = hmm.CategoricalHMM(K)
    truth.startprob_, truth.transmat_ = np.full(K, 1 / K), sticky(K, rng)
    truth.emissionprob_ = rng.dirichlet(np.ones(levels), K)
    X = truth.sample(T, random_state=seed)[0]
    B0 = rng.dirichlet(np.ones(levels) * 5, K)
    pi0, A0 = np.full(K, 1 / K), sticky(K, rng)
    reference = hmm.CategoricalHMM(K, n_iter=N_ITER, tol=-np.inf, init_params="", implementation="scaling")
    reference.startprob_, reference.transmat_, reference.emissionprob_ = pi0, A0, B0
    ds = xr.Dataset({"x": ("time", X[:, 0].astype(float))})
    model = em.Model().latent("z", em.Categorical(K), markov="time").observe("x", em.Categorical)
    init = {"z": {"initial": pi0, "transition": A0}, "x": {"probs": B0}}
    return f"Categorical K={K} L={levels} T={T:.0e}", reference, X, [T], model, ds, init


def many_short(n: int, length: int = 100, K: int = 4, seed: int = 2):
    rng = np.random.default_rng(seed)
    truth = hmm.GaussianHMM(K, covariance_type="diag")
    truth.n_features = 1
    truth.startprob_, truth.transmat_ = np.full(K, 1 / K), sticky(K, rng)
    truth.means_ = np.arange(K, dtype=float)[:, None] * 2
    truth.covars_ = np.ones((K, 1))
    X = np.stack([truth.sample(length, random_state=seed + i)[0] for i in range(n)])
    means0 = truth.means_ + rng.normal(0, 0.5, (K, 1))
    pi0, A0 = np.full(K, 1 / K), sticky(K, rng)
    reference = hmm.GaussianHMM(K, covariance_type="diag", n_iter=N_ITER, tol=-np.inf, init_params="",
                                covars_prior=0.0, implementation="scaling")
    reference.startprob_, reference.transmat_, reference.means_, reference.covars_ = pi0, A0, means0, np.ones((K, 1))
    ds = xr.Dataset({"x": (("sequence", "time"), X[..., 0])})
    model = em.Model().latent("z", em.Categorical(K), markov="time").observe("x", em.Normal)
    init = {"z": {"initial": pi0, "transition": A0}, "x": {"mean": means0[:, 0], "variance": np.ones(K)}}
    return f"{n} x {length} Normal K={K}", reference, X.reshape(-1, 1), [length] * n, model, ds, init


def run(case) -> tuple[str, float, float, bool]:
    """Seconds of CPU per iteration, emdsl and hmmlearn (CPU, not wall-clock: a shared machine's load
    stretches wall-clock time; emdsl's worker threads are all counted)."""
    name, reference, X, lengths, model, ds, init = case
    t0 = time.process_time()
    reference.fit(X, lengths)
    theirs = (time.process_time() - t0) / N_ITER
    clock: list[float] = []
    fit = model.fit(ds, init=init, max_iter=N_ITER, tol=0,
                    callbacks=[lambda event: clock.append(time.process_time())])
    ours = float(np.median(np.diff(clock)))
    history = np.asarray(reference.monitor_.history)
    agree = bool(np.allclose(fit.trace["loglik"].values[:len(history)], history, rtol=1e-8))
    return name, ours, theirs, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    # warm up: compile the kernels (cached on disk afterwards)
    run(categorical(1000))
    cases = [gaussian(100_000 // scale, "diag"), gaussian(100_000 // scale, "full"), categorical(100_000 // scale),
             many_short(1000 // scale)]
    print(f"{'case (CPU s per iteration)':38s} {'emdsl':>9s} {'hmmlearn':>9s} {'ratio':>7s} {'target':>7s}  same ℓ trace")
    for case in cases:
        name, ours, theirs, agree = run(case)
        print(f"{name:38s} {ours:9.4f} {theirs:9.4f} {ours / theirs:7.3f} {TARGET:7.2f}  {agree}")


if __name__ == "__main__":
    main()
