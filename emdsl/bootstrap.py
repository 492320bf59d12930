"""The bootstrap: refit on resampled or simulated data, align the components, collect the parameters."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import xarray as xr
from scipy.optimize import linear_sum_assignment

from emdsl import labels
from emdsl.errors import ConvergenceWarning, DegenerateComponentWarning, ModelError

if TYPE_CHECKING:
    from emdsl.model import Model
    from emdsl.results import Fit

Kind = Literal["nonparametric", "parametric"]


def bootstrap(
    fit: Fit,
    data: Any = None,
    n: int = 200,
    *,
    kind: Kind = "nonparametric",
    seed: int | None = None,
    n_jobs: int | None = None,
    progress: bool = False,
    weights_are_counts: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> xr.Dataset:
    """Bootstrap a fit: refit ``n`` times on resampled (or simulated) data, starting from the fit.

    Every replicate starts from ``fit``'s parameters (``init=fit``), so EM lands on the
    replicate's counterpart of the same optimum; its components are then matched to the
    original ones by a minimum-cost assignment (scipy's ``linear_sum_assignment``) on the
    distance between their parameters, so that ``z=1`` means the same component in every
    replicate even if a refit swapped labels.

    Parameters
    ----------
    fit : Fit
        The fit to bootstrap.
    data : Dataset or what :meth:`Model.fit` accepts, optional
        The data ``fit`` was fitted to (default: the fit's training data).
    n : int, default 200
        Number of replicates.
    kind : {"nonparametric", "parametric"}, default "nonparametric"
        ``"nonparametric"``: the rows are resampled with replacement (multinomial counts
        over the N rows, given to the refit as weights, which is exactly the fit of the
        resampled table); a row keeps its own weight, i.e. weights are part of a row, as
        survey or importance weights are. For a Markov latent the independent units are
        the sequences: whole sequences are resampled the same way (a fit of one sequence
        has nothing to resample: use ``"parametric"``). ``"parametric"``: each replicate is ``fit.sample``
        of the same size (N, or the sum of the weights rounded), drawn from the fitted model
        (with covariates, or a Markov latent: ``emdsl.regression.simulate`` at the data's
        covariates, along the data's sequences).
    seed : int, optional
        Seed of every resampling and refit; the same seed gives the same replicates,
        whatever ``n_jobs``.
    n_jobs : int, optional
        Worker processes (default: one per CPU; 1 runs in this process). Each worker's
        fits run on one thread, so the workers do not oversubscribe the cores.
    progress : bool, default False
        Print a progress line (replicates done, elapsed and remaining time) to stderr.
    weights_are_counts : bool, default False
        The fit's weights are frequency counts (a row stands for that many identical
        samples): resample the expanded table instead, i.e. draw new counts
        Multinomial(Σw, w / Σw); the weights must then be whole numbers.
    max_iter, tol : int, float
        Passed to each refit.

    Returns
    -------
    xarray.Dataset
        One variable per learned parameter, named ``"<node>.<param>"`` and labelled like
        ``fit.params[node][param]``, with a leading ``replicate`` dimension (a node's dim
        whose labels differ from another node's dim of the same name, such as a second
        regression's ``term``, is renamed ``"<dim>_<node>"``); and per
        replicate ``loglik``, ``n_iter`` and ``converged``. Reduce over ``replicate``:
        ``boot.quantile([0.025, 0.975], dim="replicate")``, ``boot.std("replicate")``.

    Examples
    --------
    >>> import emdsl as em
    >>> ds = em.datasets.load("faithful")
    >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(ds, seed=0)
    >>> boot = em.bootstrap(fit, n=4, seed=1, n_jobs=1)
    >>> boot["waiting.mean"].dims
    ('replicate', 'z')
    """
    if kind not in ("nonparametric", "parametric"):
        raise ModelError(f"bootstrap(kind=...): expected 'nonparametric' or 'parametric', got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ModelError(f"bootstrap(n=...): the number of replicates must be a positive integer, got {n!r}")
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, int | np.integer) or n_jobs < 1):
        raise ModelError(f"bootstrap(n_jobs=...): must be a positive integer or None, got {n_jobs!r}")
    if data is None:
        data = fit.data
        if data is None:
            raise ModelError("bootstrap: this fit was loaded from a file and holds no training data; pass the data")
    ds = labels.as_dataset(data)
    latent = fit.model.latent_var
    sequence_dims = None  # a chain's, in these data: its sequences are what is resampled
    if latent is not None and latent.markov is not None:
        sequence_dims = fit._sequence_dims_in(ds)
        if kind == "nonparametric" and not sequence_dims:
            raise ModelError("bootstrap: the data are one sequence of a Markov latent, whose steps are not "
                             "independent and which has no other sequence to resample; use kind='parametric' "
                             "(new paths drawn from the fit)")
    seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)
    children = np.random.SeedSequence(seed).spawn(int(n))
    start = learned_start(fit)
    weights = fit.weights
    if weights is not None and sequence_dims:  # a chain's weights, per sequence, in the order resampled
        weights = weights.transpose(*sequence_dims)
    job = _Job(fit.model, ds, fit.sample_dim, start, kind,
               None if weights is None else np.asarray(weights.values, dtype=float).ravel(),
               weights_are_counts, max_iter, tol, parametric_source(fit, ds) if kind == "parametric" else None,
               sequence_dims, fit.prior)
    if weights_are_counts:
        job.check_counts()
    return _collect(fit, run_replicates(job, children, n_jobs, progress, "bootstrap"), kind, seed)


class Replicating(Protocol):
    """A job that computes one replicate from its seed; picklable, sent once to each worker process."""

    def run(self, seed: np.random.SeedSequence) -> dict[str, Any]: ...


def run_replicates(job: Replicating, children: list[np.random.SeedSequence], n_jobs: int | None, progress: bool,
                   what: str) -> list[dict[str, Any]]:
    """``job.run`` on every seed, in this process (``n_jobs=1``) or in worker processes, in the seeds'
    order whatever the workers' (so that the same seed gives the same replicates for any ``n_jobs``)."""
    n = len(children)
    workers = min(int(n_jobs or os.cpu_count() or 1), n)
    results: list[dict[str, Any] | None] = [None] * n
    meter = _Progress(n, sys.stderr, what) if progress else None
    if workers == 1:
        for r, child in enumerate(children):
            results[r] = job.run(child)
            if meter is not None:
                meter.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(job,)) as pool:
            futures = {pool.submit(_run_in_worker, child): r for r, child in enumerate(children)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if meter is not None:
                    meter.update()
    if meter is not None:
        meter.close()
    return [r for r in results if r is not None]


class _Job:
    """What every replicate needs: picklable, sent once to each worker process."""

    def __init__(self, model: Model, data: xr.Dataset, sample_dim: Hashable, start: dict[str, dict[str, Any]],
                 kind: str, weights: np.ndarray | None, weights_are_counts: bool, max_iter: int, tol: float,
                 source: Any, sequence_dims: tuple[Hashable, ...] | None = None, prior: str | None = None) -> None:
        self.model, self.data, self.sample_dim, self.start = model, data, sample_dim, start
        #: the fit-wide prior the original fit used (a replicate is fitted as it was)
        self.prior = prior
        self.kind, self.weights, self.weights_are_counts = kind, weights, weights_are_counts
        self.max_iter, self.tol, self.source = max_iter, tol, source
        latent = model.latent_var
        chain = latent is not None and latent.markov is not None
        # a chain's refit runs over the sequences the fit did (None: found from the dims before the chain's)
        self.refit_dim = sample_dim if not chain else (None if sequence_dims is None else tuple(sequence_dims))
        #: what is resampled: the rows, or a chain's sequences (its units), over these dims
        self.units: tuple[Hashable, ...] = (sample_dim,) if not chain else tuple(sequence_dims or ())
        self.n_rows = (int(np.prod([data.sizes[d] for d in self.units], dtype=np.int64))
                       if kind == "nonparametric" else 0)

    def check_counts(self) -> None:
        if self.weights is None or not np.all(self.weights == np.round(self.weights)):
            raise ModelError("bootstrap(weights_are_counts=True): the fit's weights must be whole numbers "
                             "(frequency counts of identical rows)")

    def replicate_data(self, rng: np.random.Generator) -> tuple[xr.Dataset, xr.DataArray | None]:
        if self.kind == "parametric":
            assert self.source is not None
            return self.source.draw(rng), None
        if self.weights_are_counts:
            assert self.weights is not None
            total = round(float(self.weights.sum()))
            counts = rng.multinomial(total, self.weights / self.weights.sum()).astype(float)
        else:
            counts = rng.multinomial(self.n_rows, np.full(self.n_rows, 1.0 / self.n_rows)).astype(float)
            if self.weights is not None:
                counts *= self.weights
        shape = tuple(int(self.data.sizes[d]) for d in self.units)
        coords = {d: self.data[d].values for d in self.units if d in self.data.coords}
        return self.data, xr.DataArray(counts.reshape(shape), dims=self.units, coords=coords)

    def run(self, seed: np.random.SeedSequence) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        data, weights = self.replicate_data(rng)
        refit, converged, degenerate = quiet_refit(lambda: self.model.fit(
            data, init=self.start, max_iter=self.max_iter, tol=self.tol, seed=int(rng.integers(2**32)),
            sample_dim=self.refit_dim, weights=weights, prior=self.prior))
        return {"params": labels.tree_values(refit.params), "loglik": refit.loglik, "n_iter": refit.n_iter,
                "converged": converged, "degenerate": degenerate}


def quiet_refit(refit: Callable[[], Fit]) -> tuple[Fit, bool, bool]:
    """A replicate's refit with its warnings caught (a replicate warns through its result, once for
    all): the fit, whether it converged and whether it collapsed, by its flags or its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = refit()
    converged = fit.converged and not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    degenerate = fit.degenerate or any(issubclass(w.category, DegenerateComponentWarning) for w in caught)
    return fit, converged, degenerate


_JOB: Replicating | None = None


def _start_worker(job: Replicating) -> None:
    """A worker's setup: the job once, and one thread per fit (the workers already fill the cores)."""
    global _JOB
    from emdsl.options import OPTIONS

    OPTIONS["n_threads"] = 1
    _JOB = job


def _run_in_worker(seed: np.random.SeedSequence) -> dict[str, Any]:
    assert _JOB is not None
    return _JOB.run(seed)


class _Simulator:
    """Draws parametric replicates from a fit (picklable: a fit's parameters and its model)."""

    def __init__(self, fit: Fit, size: int, data: xr.Dataset | None = None) -> None:
        self.fit, self.size, self.data = fit, size, data

    def draw(self, rng: np.random.Generator) -> xr.Dataset:
        if self.data is not None:  # covariates: responses drawn at the data's own covariates
            from emdsl.regression import simulate

            return simulate(self.fit, self.data, seed=int(rng.integers(2**32)))
        return self.fit.sample(self.size, seed=int(rng.integers(2**32)))


def parametric_source(fit: Fit, data: xr.Dataset, where: str = "bootstrap(kind='parametric')") -> _Simulator:
    """Draws of the data's size from ``fit`` (``where``: what an error message names)."""
    from emdsl.results import Fit

    size = round(fit.weight_total)
    # A light copy of the fit, without its training data: workers only need to sample from it.
    light = Fit(fit.model, fit.params, dict(fit.standardization), fit.traces,
                restart=fit.restart, converged=fit.converged, loglik=fit.loglik, n_params=fit.n_params,
                n_samples=fit.n_samples, sample_dim=fit.sample_dim, seed=fit.seed,
                sequence_dims=getattr(fit, "sequence_dims", None), data_dtypes=getattr(fit, "data_dtypes", None))
    latent = fit.model.latent_var
    regression = any(decl.covariates for decl in fit.model.observed) or (latent is not None and latent.covariates)
    chain = latent is not None and latent.markov is not None
    if (regression or chain) and fit.weights is not None:
        what = "with covariates" if regression else "of a Markov latent (weighted sequences)"
        raise ModelError(f"{where}: a weighted fit {what} has no simulation of the same size"
                         + ("" if chain or not where.startswith("bootstrap") else "; use kind='nonparametric'"))
    # covariates: responses drawn at the data's own; a chain: a path along each of the data's sequences
    return _Simulator(light, size, data if regression or chain else None)


def _collect(fit: Fit, results: list[dict[str, Any]], kind: str, seed: int) -> xr.Dataset:
    """Stack the replicates' parameters over ``replicate``, each aligned to the fit's components."""
    original = labels.tree_values(fit.params)
    latent = fit.model.latent_var
    fixed = _fixed(fit)
    stacked: dict[str, list[np.ndarray]] = {}
    perms = []
    # several latents: each one's states are aligned on its own dim (see _aligned)
    dims = [x.name for x in fit.model.latents] if len(fit.model.latents) > 1 else \
        ([latent.name] if latent is not None else [])
    for result in results:
        perm = _aligned(original, result["params"], dims, fixed) if dims else {}
        perms.append(perm)
        for name, values in original.items():
            for key, da in values.items():
                if key in fixed.get(name, set()):
                    continue
                rep = _permuted(result["params"][name][key], perm)
                if latent is not None and name == latent.name and key == "coef" and latent.name in rep.dims:
                    rep = rep - rep.isel({latent.name: 0})  # a logit's reference is the (new) first state
                stacked.setdefault(f"{name}.{key}", []).append(np.asarray(rep.transpose(*da.dims).values))
    out = xr.Dataset()
    for name, values in original.items():
        for key, da in values.items():
            if f"{name}.{key}" in stacked:
                variable = xr.DataArray(np.stack(stacked[f"{name}.{key}"]), dims=("replicate", *da.dims),
                                        coords=da.coords, attrs=dict(da.attrs))
                # Nodes' own dims may share a name with different labels (each regression's "term"):
                # in one Dataset they would be aligned, so the later one is renamed "<dim>_<node>".
                clash = {d: f"{d}_{name}" for d in da.dims if d in out.coords and d in da.coords
                         and not np.array_equal(out[d].values, da[d].values)}
                out[f"{name}.{key}"] = variable.rename(clash) if clash else variable
    out["loglik"] = ("replicate", np.array([r["loglik"] for r in results]))
    out["n_iter"] = ("replicate", np.array([r["n_iter"] for r in results]))
    out["converged"] = ("replicate", np.array([r["converged"] for r in results]))
    out["degenerate"] = ("replicate", np.array([r["degenerate"] for r in results]))
    if latent is not None:
        out["relabelled"] = ("replicate", np.array([any(np.any(p != np.arange(len(p))) for p in perm.values())
                                                    for perm in perms]))
    out = out.assign_coords(replicate=np.arange(len(results)))
    out.attrs = {"kind": kind, "seed": seed, "n": len(results),
                 "description": f"{kind} bootstrap of the fit's learned parameters (data units); components "
                                "aligned to the fit's by minimum-cost matching"}
    failed = int((~out["converged"]).sum())
    if failed:
        warnings.warn(f"bootstrap: {failed} of {len(results)} replicates did not converge (see the 'converged' "
                      "variable); drop them or raise max_iter", ConvergenceWarning, stacklevel=3)
    return out


def learned_start(fit: Fit) -> dict[str, dict[str, np.ndarray]]:
    """The fit's learned parameters as starting values of a refit (``init=``); fixed ones are declared."""
    fixed = _fixed(fit)
    # plain arrays in the labelled layout: the refits skip aligning coordinates they already share
    return {name: {key: np.asarray(da.values) for key, da in values.items() if key not in fixed[name]}
            for name, values in labels.tree_values(fit.params).items()}


def _fixed(fit: Fit) -> dict[str, set[str]]:
    """The parameters the declaration fixes, per node (they take no starting value and do not vary)."""
    return {name: set(filter(None, child.attrs.get("fixed", "").split(","))) for name, child in
            fit.params.children.items()}


def _permuted(da: xr.DataArray, perm: Mapping[str, np.ndarray]) -> xr.DataArray:
    """A replicate's parameter with each latent dim it has put in the original's order."""
    chosen = {dim: p for dim, p in perm.items() if dim in da.dims}
    return da.isel(chosen) if chosen else da


def _aligned(original: Mapping[str, Mapping[str, xr.DataArray]], replicate: Mapping[str, Mapping[str, Any]],
             dims: list[str], fixed: Mapping[str, set[str]]) -> dict[str, np.ndarray]:
    """Each latent dim's permutation of a replicate's states onto the fit's.

    With several latents a parameter over (a, b) is compared on a's states with b's as
    they stand, so two rounds: the second matches each latent with the others aligned.
    """
    perm = {dim: None for dim in dims}
    for _ in range(2 if len(dims) > 1 else 1):
        for dim in dims:
            current = {name: {key: _permuted(v, {d: p for d, p in perm.items() if p is not None})
                              for key, v in values.items()} for name, values in replicate.items()}
            found = _alignment(original, current, dim, fixed)
            perm[dim] = found if perm[dim] is None else perm[dim][found]
    return perm  # type: ignore[return-value]


def _alignment(original: Mapping[str, Mapping[str, xr.DataArray]], replicate: Mapping[str, Mapping[str, Any]],
               latent: str, fixed: Mapping[str, set[str]]) -> np.ndarray:
    """perm with replicate component perm[k] ≙ original component k, minimising Σ squared scaled distances.

    A positive parameter entry is compared on a log scale (relative differences); any
    other is divided by its spread across the original components (with a tenth of its
    magnitude added, so that components with equal values do not blow the scale up).
    """
    K = None
    cost: Any = 0.0
    for name, values in original.items():
        for key, da in values.items():
            if latent not in da.dims or key in fixed.get(name, set()):
                continue
            a = np.moveaxis(np.asarray(da.values, dtype=float), da.dims.index(latent), 0)
            rep = replicate[name][key]
            b = np.moveaxis(np.asarray(rep.transpose(*da.dims).values, dtype=float), da.dims.index(latent), 0)
            K = a.shape[0]
            a, b = a.reshape(K, -1), b.reshape(K, -1)
            if np.all(a > 0) and np.all(b > 0):
                a, b, spread = np.log(a), np.log(b), 1.0  # relative differences
            else:
                spread = np.sqrt(a.var(axis=0) + 0.01 * (a**2).mean(axis=0) + 1e-300)
            cost = cost + (((b[None, :, :] - a[:, None, :]) / spread) ** 2).sum(axis=2)
    if K is None:  # nothing per component is learned: nothing can have swapped
        return np.arange(next(da.sizes[latent] for v in original.values() for da in v.values()
                              if latent in da.dims))
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(K, dtype=np.intp)
    perm[rows] = cols
    return perm


class _Progress:
    """``bootstrap: 37/200 replicates, 12.3 s, about 54 s left`` on one line, rewritten in place."""

    def __init__(self, total: int, file: IO[str], what: str = "bootstrap") -> None:
        self.total, self.done, self.file, self.what = total, 0, file, what
        self.start = time.perf_counter()
        self.shown = -1.0
        self.update(0)

    def update(self, step: int = 1) -> None:
        self.done += step
        elapsed = time.perf_counter() - self.start
        if 0 < self.done < self.total and elapsed - self.shown < 0.25:
            return  # at most four rewrites a second
        self.shown = elapsed
        left = f", about {elapsed / self.done * (self.total - self.done):.0f} s left" if self.done else ""
        self.file.write(f"\r{self.what}: {self.done}/{self.total} replicates, {elapsed:.1f} s{left}")
        self.file.flush()

    def close(self) -> None:
        self.file.write("\n")
        self.file.flush()
