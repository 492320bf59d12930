"""Fit: labelled parameters, posterior, trace; predictions, sampling, saving."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.compile import SCAN_ROWS, Plan, blocks, compile_plan, start_values
from emdsl.engine.estep import engine
from emdsl.engine.mstep import Theta, natural_matrix
from emdsl.errors import ModelError
from emdsl.model import Model

if TYPE_CHECKING:
    from emdsl.plot import FitPlotter

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
        weights: xr.DataArray | None = None,
        weight_total: float | None = None,
        degenerate: bool = False,
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
        self.weights = weights
        self.degenerate = degenerate
        self.weight_total = float(weight_total if weight_total is not None else
                                  (n_samples if weights is None else weights.sum()))

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
        """How the fit ended: ``"degenerate"`` (every restart collapsed), ``"converged"``, ``"stopped"``
        (by a callback or an interrupt) or ``"not converged"``."""
        if self.degenerate:
            return "degenerate"
        return "converged" if self.converged else ("stopped" if self.stopped else "not converged")

    @property
    def restarts(self) -> xr.Dataset:
        """Every restart's outcome over ``restart``: final ``loglik``, ``n_iter``, ``converged``, ``degenerate``."""
        restart = self.traces["restart"].values
        ids = np.unique(restart)
        last = np.array([np.flatnonzero(restart == r)[-1] for r in ids])

        def flags(key: str) -> np.ndarray:
            text = str(self.traces.attrs.get(key, ""))
            values = [bool(int(v)) for v in text.split(",") if v != ""]
            return np.array(values if len(values) == len(ids) else [False] * len(ids))

        return xr.Dataset({"loglik": ("restart", self.traces["loglik"].values[last]),
                           "n_iter": ("restart", self.traces["iteration"].values[last]),
                           "converged": ("restart", flags("converged")),
                           "degenerate": ("restart", flags("degenerate"))},
                          coords={"restart": ids}, attrs={"kept": self.restart})

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

        With weights, N is the sum of the weights: a weight is that many copies of a row.

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

    def _loglik_and_size(self, data: Any) -> tuple[float, float]:
        if data is None:
            return self.loglik, self.weight_total
        scores = self.score_samples(data)
        return float(scores.sum()), scores.size

    # -- predictions ----------------------------------------------------------------
    def predict_proba(self, data: Any) -> xr.DataArray:
        """p(latent | x) for each sample of ``data``: DataArray (sample, latent)."""
        plan, theta, H = self._compiled(data)
        self._need_latent("predict_proba")
        out = np.empty((plan.n_samples, plan.K))
        with engine(plan) as estep:
            estep.evaluate(H, theta, resp_out=out)
        return labels.states_array(plan, out, "predict_proba")

    def predict(self, data: Any) -> xr.DataArray:
        """The most probable latent state of each sample: DataArray (sample,) of the latent's states."""
        proba = self.predict_proba(data)
        latent = self.model.latent_var
        assert latent is not None
        states = np.asarray(latent.family.states)
        best = states[np.asarray(proba.argmax(latent.name).values)]
        return xr.DataArray(best, dims=proba.dims[:1], coords={d: c for d, c in proba.coords.items()
                                                               if d != latent.name}, name=latent.name)

    def score_samples(self, data: Any) -> xr.DataArray:
        """log p(x_n | θ̂) for each sample of ``data``: DataArray (sample,)."""
        plan, theta, H = self._compiled(data)
        out = np.empty(plan.n_samples)
        with engine(plan) as estep:
            estep.evaluate(H, theta, loglik_out=out)
        for start, stop in blocks(plan.n_samples, SCAN_ROWS):
            out[start:stop] += plan.log_base_measure(start, stop)
        return labels.samples_array(plan, out, "log_likelihood")

    def score(self, data: Any, weights: Any = None) -> float:
        """Mean log-likelihood per sample of ``data`` (scikit-learn's ``score``), weighted if ``weights`` given.

        ``weights`` is what :meth:`Model.fit` accepts: a data variable's name or a DataArray.
        """
        scores = self.score_samples(data)
        if weights is None:
            return float(scores.mean())
        plan = self._compiled(data, weights=weights)[0]
        assert plan.weights is not None
        return float(scores.values @ plan.weights / plan.weights.sum())

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
            states = latent.family.draw({"probs": values[latent.name]["probs"].values}, int(n), rng)
        else:
            states = np.zeros(int(n), dtype=np.intp)
        out = xr.Dataset()
        for decl in self.model.observed:
            layout = _Layout(self, decl.name)
            flat = {key: layout.flatten(key, da) for key, da in values[decl.name].items()}
            family = layout.family
            if family.data_arguments():
                raise ModelError(f"sample: {decl.family!r} reads {sorted(family.data_arguments().values())} from the "
                                 "data, which a simulation does not have; fix them in the declaration "
                                 "(e.g. em.Binomial(trials=10)) to sample")
            draws = family.sample(flat, states, rng, {})
            out.update(layout.dataset(decl, draws))
        if latent is not None:
            state_labels = np.asarray(latent.family.states, dtype=object)[states].tolist()
            out = out.assign_coords({latent.name: ((self.sample_dim,), state_labels)})
        return out

    def _need_latent(self, what: str) -> None:
        if self.model.latent_var is None:
            raise ModelError(f"{what}: the model declares no latent variable, so there is no posterior; "
                             "use score_samples for the density")

    def _compiled(self, data: Any, weights: Any = None) -> tuple[Plan, Theta, np.ndarray]:
        ds = labels.as_dataset(data)
        variables = [v for decl in self.model.observed for v in decl.variables if v in ds.data_vars]
        use_dim = self.sample_dim if variables and all(self.sample_dim in ds[v].dims for v in variables) else None
        plan = compile_plan(self.model, ds, sample_dim=use_dim, fitting=False, weights=weights,
                            standardization={name: (units["center"], units["scale"])
                                             for name, units in self.standardization.items()},
                            levels=self.levels)
        theta = start_values(plan, labels.tree_values(self.params), "fit parameters")
        return plan, theta, natural_matrix(plan, theta)

    @property
    def levels(self) -> dict[str, list[Any]]:
        """The level labels of each categorical node, as learned from the training data."""
        return {name: [v.item() if isinstance(v, np.generic) else v for v in node["level"].values]
                for name, node in self.params.children.items() if "level" in node.dims}

    def impute(self, data: Any = None) -> xr.Dataset:
        """The data with every missing value replaced by its posterior expectation.

        A hole in element d of sample n becomes E[x_nd | observed part of x_n] =
        Σ_k p(z=k | x_n) E[x_nd | z=k, observed part] (the conditional Gaussian mean for a
        MultivariateNormal); a categorical hole becomes its most probable level under the
        same mixture. Observed values are returned unchanged.

        Parameters
        ----------
        data : Dataset or what :meth:`Model.fit` accepts, optional
            Default: the training data.

        Examples
        --------
        >>> import numpy as np, xarray as xr, emdsl as em
        >>> ds = em.datasets.load("faithful")
        >>> holes = ds.assign(waiting=ds.waiting.where(ds.sample != 3))
        >>> fit = em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"],
        ...     em.MultivariateNormal, name="x").fit(holes, seed=0)
        >>> bool(np.isnan(fit.impute()["waiting"]).any())
        False
        """
        from emdsl.engine.impute import impute

        if data is None:
            if self._data is None:
                raise ModelError("impute: this fit was loaded from a file and holds no data; pass the data")
            data = self._data
        plan, theta, _ = self._compiled(data)
        return impute(plan, theta, labels.as_dataset(data))

    # -- saving ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fit to a netCDF file (no pickle); read it back with :func:`emdsl.load`.

        Parameters, every restart's trace and the model declaration round-trip
        exactly. The training data are not stored. See :func:`emdsl.io.save`.
        """
        from emdsl.io import save

        save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fit:
        """Read a fit written by :meth:`save`, validating every field; see :func:`emdsl.io.load`."""
        from emdsl.io import load

        return load(path)

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



class _Layout:
    """A node's event dims, coordinates and levels, read off its labelled parameters (works for loaded fits)."""

    def __init__(self, fit: Fit, name: str) -> None:
        decl = next(x for x in fit.model.observed if x.name == name)
        self.axes = decl.family.param_axes()
        latent = fit.model.latent_var
        self.latent = latent.name if latent is not None else None
        self.K = latent.family.k if latent is not None else 1
        self.sample_dim = fit.sample_dim
        key = next(k for k, axes in self.axes.items() if "event" in axes)
        reference = fit.params[name][key]
        self.dims = [d for d in reference.dims if d not in (self.latent, "level")]
        self.shape = [reference.sizes[d] for d in self.dims]
        self.coords = {d: reference[d].values for d in self.dims if d in reference.coords}
        self.D = int(np.prod(self.shape, dtype=int))
        self.levels = list(reference["level"].values) if "level" in reference.dims else None
        self.family = decl.family.bound(self.levels) if self.levels is not None else decl.family

    def flatten(self, key: str, da: xr.DataArray) -> np.ndarray:
        """The internal array: latent axis first (K = 1 without a latent), each event axis flattened to D."""
        sizes = {"latent": self.K, "level": len(self.levels or ())}
        return da.values.reshape([sizes.get(axis, self.D) for axis in self.axes[key]])

    def dataset(self, decl: Any, draws: np.ndarray) -> xr.Dataset:
        n = draws.shape[0]
        if self.levels is not None:  # level codes back to the level labels
            draws = np.asarray(self.levels, dtype=object)[draws.astype(np.intp)]
            if all(isinstance(v, str) for v in self.levels):
                draws = draws.astype(str)
            elif all(isinstance(v, int | np.integer) for v in self.levels):
                draws = draws.astype(int)
        if decl.stacked:
            return xr.Dataset({v: ((self.sample_dim,), draws[:, d]) for d, v in enumerate(decl.variables)})
        return xr.Dataset({decl.variables[0]: xr.DataArray(
            draws.reshape([n, *self.shape]), dims=[self.sample_dim, *self.dims], coords=self.coords)})
