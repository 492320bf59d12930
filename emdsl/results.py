"""Fit: labelled parameters, posterior, trace; predictions, sampling, saving."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from emdsl import labels
from emdsl.compile import SCAN_ROWS, Plan, blocks, compile_plan, start_values
from emdsl.engine.estep import EStep
from emdsl.engine.events import FitInfo, dispatch
from emdsl.engine.init import initial_theta
from emdsl.engine.loop import RestartResult, StopFlag, restart_seeds, run_em
from emdsl.engine.mstep import Theta, natural_matrix
from emdsl.errors import ConvergenceWarning, ModelError
from emdsl.model import Model

if TYPE_CHECKING:
    from emdsl.plot import FitPlotter

#: version of the file layout written by Fit.save
FORMAT_VERSION = 1


class Fit:
    """The result of :meth:`Model.fit`: parameters, posterior, trace and predictions.

    Parameters are labelled (``fit.params[node][param]`` is a DataArray over the
    latent's states and the data's own dims and coordinates) and in the data's
    units. Methods that take ``data`` accept what :meth:`Model.fit` accepts.

    Attributes
    ----------
    model : Model
        The declaration that was fitted.
    params : xarray.DataTree
        One node per latent and per observed node.
    trace : xarray.Dataset
        ``loglik``, ``elbo``, ``kl`` and ``time`` over ``iteration`` for the chosen
        restart; ``traces`` holds every restart over a ``step`` dimension.
    loglik : float
        log p(x | θ̂) on the training data.
    n_iter : int
        M-steps run by the chosen restart.
    converged : bool
        Whether the chosen restart met the convergence test.
    seed : int
        The seed that reproduces this fit.

    Examples
    --------
    >>> import emdsl as em
    >>> ds = em.datasets.load("faithful")
    >>> model = em.Model().latent("z", em.Categorical(2)).observe(
    ...     ["eruptions", "waiting"], em.MultivariateNormal, name="x")
    >>> fit = model.fit(ds, seed=0)
    >>> round(fit.loglik, 3)
    -1130.264
    >>> fit.params["x"]["mean"].sel(feature="waiting").round(1).values.tolist()
    [54.5, 80.0]
    """

    def __init__(
        self,
        model: Model,
        params: xr.DataTree,
        standardization: Mapping[str, xr.Dataset],
        traces: xr.Dataset,
        *,
        restart: int,
        converged: bool,
        loglik: float,
        n_params: int,
        n_samples: int,
        sample_dim: Hashable,
        seed: int,
        stopped: bool = False,
        data: xr.Dataset | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.standardization = dict(standardization)
        self.traces = traces
        self.restart = restart
        self.converged = converged
        self.loglik = loglik
        self.n_params = n_params
        self.n_samples = n_samples
        self.sample_dim = sample_dim
        self.seed = seed
        self.stopped = stopped
        self._data = data

    # -- what the fit found ------------------------------------------------------
    @cached_property
    def trace(self) -> xr.Dataset:
        """The chosen restart's trace over ``iteration``."""
        chosen = self.traces.isel(step=np.flatnonzero(self.traces["restart"].values == self.restart))
        trace = chosen.swap_dims(step="iteration").drop_vars("restart")
        trace.attrs = {**self.traces.attrs, "restart": self.restart}
        return trace

    @property
    def n_iter(self) -> int:
        """Number of M-steps the chosen restart ran."""
        return int(self.trace.sizes["iteration"] - 1)

    @property
    def status(self) -> str:
        """How the fit ended: ``"converged"``, ``"stopped"`` (by a callback or an interrupt) or ``"not converged"``."""
        return "converged" if self.converged else ("stopped" if self.stopped else "not converged")

    @property
    def n_init(self) -> int:
        """Number of restarts that ran."""
        return int(np.unique(self.traces["restart"].values).size)

    @property
    def data(self) -> xr.Dataset | None:
        """The training data (a reference, not a copy); None for a fit loaded from a file."""
        return self._data

    @cached_property
    def posterior(self) -> xr.DataArray:
        """p(latent | x) for each training sample: DataArray (sample, latent)."""
        if self._data is None:
            raise ModelError("posterior: this fit was loaded from a file, which holds no training data; "
                             "use fit.predict_proba(data)")
        return self.predict_proba(self._data).rename("posterior")

    # -- model selection -----------------------------------------------------------
    def bic(self, data: Any = None) -> float:
        """Bayesian information criterion, −2 ℓ + p log N (lower is better).

        Examples
        --------
        Two components describe Old Faithful's waiting times better than one:

        >>> import emdsl as em
        >>> ds = em.datasets.load("faithful")
        >>> one = em.Model().observe("waiting", em.Normal).fit(ds)
        >>> two = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(ds, seed=0)
        >>> two.bic() < one.bic()
        True
        """
        loglik, n = self._loglik_and_size(data)
        return float(-2.0 * loglik + self.n_params * np.log(n))

    def aic(self, data: Any = None) -> float:
        """Akaike information criterion, −2 ℓ + 2p (lower is better)."""
        loglik, _ = self._loglik_and_size(data)
        return float(-2.0 * loglik + 2.0 * self.n_params)

    def _loglik_and_size(self, data: Any) -> tuple[float, int]:
        if data is None:
            return self.loglik, self.n_samples
        scores = self.score_samples(data)
        return float(scores.sum()), scores.size

    # -- predictions ----------------------------------------------------------------
    def predict_proba(self, data: Any) -> xr.DataArray:
        """p(latent | x) for each sample of ``data``: DataArray (sample, latent)."""
        plan, H = self._compiled(data)
        self._need_latent("predict_proba")
        out = np.empty((plan.n_samples, plan.K))
        with _engine(plan) as estep:
            estep.evaluate(H, resp_out=out)
        return labels.states_array(plan, out, "predict_proba")

    def predict(self, data: Any) -> xr.DataArray:
        """The most probable latent state of each sample: DataArray (sample,)."""
        proba = self.predict_proba(data)
        latent = self.model.latent_var
        assert latent is not None
        return proba.idxmax(latent.name).rename(latent.name)

    def score_samples(self, data: Any) -> xr.DataArray:
        """log p(x_n | θ̂) for each sample of ``data``: DataArray (sample,)."""
        plan, H = self._compiled(data)
        out = np.empty(plan.n_samples)
        with _engine(plan) as estep:
            estep.evaluate(H, loglik_out=out)
        for start, stop in blocks(plan.n_samples, SCAN_ROWS):
            out[start:stop] += plan.log_base_measure(start, stop)
        return labels.samples_array(plan, out, "log_likelihood")

    def score(self, data: Any) -> float:
        """Mean log-likelihood per sample of ``data`` (scikit-learn's ``score``)."""
        return float(self.score_samples(data).mean())

    def sample(self, n: int, seed: int | None = None) -> xr.Dataset:
        """Draw ``n`` samples, shaped like the training data; the latent states are a coordinate.

        Examples
        --------
        >>> import emdsl as em
        >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(
        ...     em.datasets.load("faithful"), seed=0)
        >>> draws = fit.sample(5, seed=1)
        >>> sorted(draws.variables)
        ['waiting', 'z']
        """
        if not isinstance(n, int | np.integer) or n < 0:
            raise ModelError(f"sample(n): n must be a non-negative integer, got {n!r}")
        rng = np.random.default_rng(seed)
        values = labels.tree_values(self.params)
        latent = self.model.latent_var
        if latent is not None:
            states = latent.family.sample({"probs": values[latent.name]["probs"].values}, int(n), rng)
        else:
            states = np.zeros(int(n), dtype=np.intp)
        out = xr.Dataset()
        for decl in self.model.observed:
            layout = _Layout(self, decl.name)
            flat = {key: layout.flatten(key, da) for key, da in values[decl.name].items()}
            draws = decl.family.sample(flat, states, rng)
            out.update(layout.dataset(decl, draws))
        if latent is not None:
            state_labels = np.asarray(latent.family.states, dtype=object)[states].tolist()
            out = out.assign_coords({latent.name: ((self.sample_dim,), state_labels)})
        return out

    def _need_latent(self, what: str) -> None:
        if self.model.latent_var is None:
            raise ModelError(f"{what}: the model declares no latent variable, so there is no posterior; "
                             "use score_samples for the density")

    def _compiled(self, data: Any) -> tuple[Plan, np.ndarray]:
        ds = labels.as_dataset(data)
        variables = [v for decl in self.model.observed for v in decl.variables if v in ds.data_vars]
        use_dim = self.sample_dim if variables and all(self.sample_dim in ds[v].dims for v in variables) else None
        plan = compile_plan(self.model, ds, sample_dim=use_dim, fitting=False,
                            standardization={name: (units["center"], units["scale"])
                                             for name, units in self.standardization.items()})
        theta = start_values(plan, labels.tree_values(self.params), "fit parameters")
        return plan, natural_matrix(plan, theta)

    # -- saving ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fit to a netCDF file (no pickle); read it back with :func:`emdsl.load`.

        Parameters, every restart's trace and the model declaration round-trip
        exactly. The training data are not stored.
        """
        tree = xr.DataTree.from_dict({
            **{f"params/{name}": node.to_dataset() for name, node in self.params.children.items()},
            **{f"standardization/{name}": units for name, units in self.standardization.items()},
            "traces": self.traces,
        })
        tree.attrs = {
            "emdsl_format": FORMAT_VERSION,
            "model": self.model.to_json(),
            "sample_dim": json.dumps(self.sample_dim),
            "restart": self.restart,
            "converged": int(self.converged),
            "stopped": int(self.stopped),
            "loglik": self.loglik,
            "n_params": self.n_params,
            "n_samples": self.n_samples,
            "seed": str(self.seed),
        }
        tree.to_netcdf(path, engine="netcdf4")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fit:
        """Read a fit written by :meth:`save`."""
        with xr.open_datatree(path, engine="netcdf4") as opened:
            tree = opened.load()
        attrs = tree.attrs
        if int(attrs.get("emdsl_format", -1)) != FORMAT_VERSION:
            raise ModelError(f"{os.fspath(path)!r} is not an emdsl fit (format {FORMAT_VERSION})")
        params = xr.DataTree.from_dict({name: _decoded(child.to_dataset())
                                        for name, child in tree["params"].children.items()})
        standardization = {name: _decoded(child.to_dataset())
                           for name, child in tree["standardization"].children.items()}
        return cls(Model.from_json(attrs["model"]), params, standardization, tree["traces"].to_dataset(),
                   restart=int(attrs["restart"]), converged=bool(attrs["converged"]),
                   loglik=float(attrs["loglik"]), n_params=int(attrs["n_params"]),
                   n_samples=int(attrs["n_samples"]), sample_dim=json.loads(attrs["sample_dim"]),
                   seed=int(attrs["seed"]), stopped=bool(attrs["stopped"]))

    # -- display --------------------------------------------------------------------
    @property
    def plot(self) -> FitPlotter:
        """Plots of this fit (matplotlib): ``fit.plot.convergence()``, ``.components()``, ``.posterior()``."""
        from emdsl.plot import FitPlotter

        return FitPlotter(self)

    def __repr__(self) -> str:
        lines = [f"Fit: {self.status} after {self.n_iter} iterations (restart {self.restart + 1} of {self.n_init}), "
                 f"log-likelihood {self.loglik:.6g}, BIC {self.bic():.6g}, {self.n_samples} samples"]
        for name, node in self.params.children.items():
            for key, da in node.to_dataset().data_vars.items():
                if da.size <= 6:
                    shown = np.array2string(da.values, precision=4, separator=", ", suppress_small=True)
                else:
                    shown = "(" + ", ".join(f"{d}: {s}" for d, s in da.sizes.items()) + ")"
                lines.append(f"  {name}.{key}: {shown}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from emdsl._html import fit_card

        return fit_card(self)


load = Fit.load


def fit_model(
    model: Model,
    data: Any,
    *,
    init: Any,
    n_init: int,
    max_iter: int,
    tol: float,
    seed: int | None,
    sample_dim: Hashable | None,
    callbacks: Sequence[Callable[..., Any]],
    monitor: bool,
) -> Fit:
    """Compile, initialise, run every restart, keep the best: :meth:`Model.fit`'s body."""
    _check_settings(n_init, max_iter, tol)
    ds = labels.as_dataset(data)
    plan = compile_plan(model, ds, sample_dim=sample_dim)
    seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
    callbacks = list(callbacks)
    if monitor:
        from emdsl.widgets import auto_monitor

        callbacks.append(auto_monitor())
    dispatch(callbacks, "on_fit_start",
             FitInfo(model, n_init, max_iter, tol, plan.n_samples, plan.sample_dim, seed))
    stop = StopFlag()
    runs: list[RestartResult] = []
    label_params = _labeller(plan)
    with _engine(plan) as estep:
        for restart, rng in enumerate(restart_seeds(seed, n_init)):
            if stop.requested:
                break
            try:
                theta, elbo0 = initial_theta(plan, estep, init, rng)
            except KeyboardInterrupt:
                if not runs:
                    raise
                break
            runs.append(run_em(plan, estep, theta, elbo0, restart=restart, n_init=n_init, max_iter=max_iter,
                               tol=tol, callbacks=callbacks, stop=stop, label_params=label_params))
    best = int(np.argmax([run.final for run in runs]))
    chosen = runs[best]
    # A stopped fit did not finish what was asked (DESIGN.md §3), even when the restart it
    # keeps had converged: it is marked not converged; traces.attrs keep each restart's state.
    stopped = any(run.stopped for run in runs)
    fit = Fit(model, label_params(chosen.theta), _units_tree(plan), _traces(runs), restart=best,
              converged=chosen.converged and not stopped, loglik=chosen.final, n_params=plan.n_free_params(),
              n_samples=plan.n_samples, sample_dim=plan.sample_dim, seed=seed, stopped=stopped, data=ds)
    if tol > 0 and max_iter > 0 and not chosen.converged and not fit.stopped:
        change = chosen.loglik[-1] - chosen.loglik[-2] if chosen.n_iter else float("nan")
        warnings.warn(f"EM did not converge in max_iter={max_iter} iterations: the last change of the "
                      f"log-likelihood, {change:.3g}, is above tol·|ℓ| = {tol * abs(chosen.final):.3g}; "
                      "raise max_iter (or tol)", ConvergenceWarning, stacklevel=3)
    dispatch(callbacks, "on_fit_end", fit)
    return fit


def _check_settings(n_init: int, max_iter: int, tol: float) -> None:
    if not isinstance(n_init, int | np.integer) or n_init < 1:
        raise ModelError(f"fit(n_init=...): must be a positive integer, got {n_init!r}")
    if not isinstance(max_iter, int | np.integer) or max_iter < 0:
        raise ModelError(f"fit(max_iter=...): must be a non-negative integer, got {max_iter!r}")
    if not (isinstance(tol, int | float | np.floating) and np.isfinite(tol) and tol >= 0):
        raise ModelError(f"fit(tol=...): must be a finite number >= 0, got {tol!r}")


@contextlib.contextmanager
def _engine(plan: Plan) -> Iterator[EStep]:
    """An E-step runner with BLAS held to one thread: our own workers share the blocks, and
    the products are too small (K × S per block) for BLAS's threads to pay for themselves."""
    with EStep(plan) as estep, threadpool_limits(limits=1, user_api="blas"):
        yield estep


def _labeller(plan: Plan) -> Callable[[Theta], xr.DataTree]:
    def label(theta: Theta) -> xr.DataTree:
        original = dict(theta)
        for node in plan.nodes:
            original[node.name] = node.family.to_original(theta[node.name], node.center, node.scale)
        return labels.params_tree(plan, original)
    return label


def _units_tree(plan: Plan) -> dict[str, xr.Dataset]:
    return {node.name: xr.Dataset({
        "center": labels.labelled(plan, node, ("event",), node.center, "center"),
        "scale": labels.labelled(plan, node, ("event",), node.scale, "scale"),
    }, attrs={"description": "internal units: (x - center) / scale"}) for node in plan.nodes}


def _traces(runs: Sequence[RestartResult]) -> xr.Dataset:
    def stacked(key: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(run, key), dtype=float) for run in runs])

    restart = np.concatenate([np.full(run.n_iter + 1, r) for r, run in enumerate(runs)])
    iteration = np.concatenate([np.arange(run.n_iter + 1) for run in runs])
    return xr.Dataset(
        {
            "loglik": ("step", stacked("loglik"), {"long_name": "log-likelihood log p(x | θ⁽ᵗ⁾)"}),
            "elbo": ("step", stacked("elbo"), {"long_name": "ELBO(q⁽ᵗ⁻¹⁾, θ⁽ᵗ⁾) after the M-step"}),
            "kl": ("step", stacked("kl"), {"long_name": "KL(q⁽ᵗ⁻¹⁾ ‖ p(z | x, θ⁽ᵗ⁾)) = loglik − elbo"}),
            "time": ("step", stacked("time"), {"long_name": "seconds since the restart began", "units": "s"}),
        },
        coords={"restart": ("step", restart), "iteration": ("step", iteration)},
        attrs={"converged": ",".join(str(int(run.converged)) for run in runs)},
    )


def _decoded(ds: xr.Dataset) -> xr.Dataset:
    """Undo netCDF's object dtype on string coordinates, so labels compare as they did."""
    return ds.assign_coords({name: coord.values.astype(str) for name, coord in ds.coords.items()
                             if coord.dtype == object})


class _Layout:
    """A node's event dims and coordinates, read off its labelled parameters (works for loaded fits)."""

    def __init__(self, fit: Fit, name: str) -> None:
        decl = next(x for x in fit.model.observed if x.name == name)
        self.axes = decl.family.param_axes()
        latent = fit.model.latent_var
        self.latent = latent.name if latent is not None else None
        self.K = latent.family.k if latent is not None else 1
        self.sample_dim = fit.sample_dim
        key = next(k for k, axes in self.axes.items() if "event" in axes)
        reference = fit.params[name][key]
        self.dims = [d for d in reference.dims if d != self.latent]
        self.shape = [reference.sizes[d] for d in self.dims]
        self.coords = {d: reference[d].values for d in self.dims if d in reference.coords}
        self.D = int(np.prod(self.shape, dtype=int))

    def flatten(self, key: str, da: xr.DataArray) -> np.ndarray:
        """The internal array: latent axis first (K = 1 without a latent), each event axis flattened to D."""
        shape = [self.K if axis == "latent" else self.D for axis in self.axes[key]]
        return da.values.reshape(shape)

    def dataset(self, decl: Any, draws: np.ndarray) -> xr.Dataset:
        n = draws.shape[0]
        if decl.stacked:
            return xr.Dataset({v: ((self.sample_dim,), draws[:, d]) for d, v in enumerate(decl.variables)})
        return xr.Dataset({decl.variables[0]: xr.DataArray(
            draws.reshape([n, *self.shape]), dims=[self.sample_dim, *self.dims], coords=self.coords)})
