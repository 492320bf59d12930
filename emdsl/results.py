"""Fit: labelled parameters, posterior, trace; predictions, sampling, saving."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.compile import SCAN_ROWS, Plan, blocks, compile_plan, start_values
from emdsl.data import is_chunked
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
    weights : xarray.DataArray or None
        The weights the fit was given: one per sample, or for a Markov latent one per
        sequence (over the sequence dims); None when unweighted.
    sequence_dims : tuple or None
        A Markov latent's sequence dims as fitted (``()`` for one sequence): predictions
        find the sequences by these names. None for a mixture.
    data_dtypes : dict
        Each observed variable's numpy dtype as fitted (bool, integer or float), which
        :meth:`sample` draws in where the draws fit it exactly.

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
        sequence_dims: tuple[Hashable, ...] | None = None,
        data_dtypes: Mapping[str, str] | None = None,
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
        #: a Markov latent's sequence dims as fitted (() for one sequence; None: not recorded, found
        #: again from the data's dims, those before the chain's)
        self.sequence_dims = None if sequence_dims is None else tuple(sequence_dims)
        #: each observed variable's numpy dtype as fitted (text), which :meth:`sample` draws in
        #: (bool, integers, float32); {} when not recorded (older files)
        self.data_dtypes = dict(data_dtypes or {})
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
        """Iterations the chosen restart ran: M-steps (accepted points with acceleration), or epochs
        of online EM (its final full pass at θ̂ is an entry of the trace, not an iteration) plus
        the chunks given to :meth:`partial_fit`."""
        return int(self.trace.sizes["iteration"] - 1 - self._final_passes()[self.restart])

    def _final_passes(self) -> dict[int, int]:
        """Per restart, 1 if its trace holds online EM's final pass (traces' ``final_pass``; older files: none)."""
        ids = [int(r) for r in np.unique(self.traces["restart"].values)]
        flags = [int(v) for v in str(self.traces.attrs.get("final_pass", "")).split(",") if v != ""]
        return dict(zip(ids, flags if len(flags) == len(ids) else [0] * len(ids), strict=True))

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

        final_passes = self._final_passes()
        return xr.Dataset({"loglik": ("restart", self.traces["loglik"].values[last]),
                           "n_iter": ("restart", self.traces["iteration"].values[last]
                                      - np.array([final_passes[int(r)] for r in ids])),
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
        if self._markov is not None:  # a chain's samples, for BIC, are its observed steps
            return float(scores.sum()), self._compiled(data)[0].n_samples
        return float(scores.sum()), scores.size

    # -- streams ----------------------------------------------------------------------
    def partial_fit(self, data: Any, weights: Any = None) -> Fit:
        """Update the fit in place with stepwise EM on a new chunk of a stream; returns the fit.

        The chunk is read in the fit's units and levels, split into the fit's minibatches
        (its ``batch_size``; by default a 32nd of the rows it was fitted to, or of the chunk),
        and each minibatch moves the running statistics by γ_t = (t + 1)^−step_decay
        (:mod:`emdsl.engine.online`), continuing the step count of a ``method="stepwise"``
        fit. A batch-EM fit (``method="em"``) continues from the statistics of its own
        E-step over its training data, counted as one epoch of minibatches. A fit loaded
        from a file keeps neither its data nor running statistics and cannot continue
        (``ModelError``). ``loglik`` becomes the prequential log-likelihood (each chunk
        scored at the parameters it arrived to, added to the fit's own), and the trace
        gains one entry per chunk.

        Examples
        --------
        >>> import numpy as np, xarray as xr, emdsl as em
        >>> rng = np.random.default_rng(0)
        >>> chunk = lambda: xr.Dataset({"x": ("sample", np.r_[rng.normal(0, 1, 500), rng.normal(5, 1, 500)])})
        >>> fit = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal).fit(
        ...     chunk(), method="stepwise", seed=0)
        >>> for _ in range(3):
        ...     fit = fit.partial_fit(chunk())
        >>> sorted(fit.params["x"]["mean"].round(0).values.tolist())
        [0.0, 5.0]
        """
        from emdsl.engine.online import continue_fit

        return continue_fit(self, data, weights)

    # -- predictions ----------------------------------------------------------------
    def predict_proba(self, data: Any) -> xr.DataArray:
        """p(latent | x) for each sample of ``data``: DataArray (sample, latent)."""
        plan, theta, H = self._compiled(data)
        self._need_latent("predict_proba")
        if is_chunked(plan):  # dask-backed data: a lazy result with the data's chunks
            with engine(plan) as estep:
                if plan.sequences is not None:  # over (sequence, time), a chunk per run of whole sequences
                    return labels.chain_array(plan, estep.lazy_chain(H, theta, "posterior"), "predict_proba",
                                              states=True)
                return labels.states_array(plan, estep.lazy(H, theta, "resp"), "predict_proba")
        out = np.empty((plan.n_samples, plan.K))
        with engine(plan) as estep:
            estep.evaluate(H, theta, resp_out=out)
        if plan.sequences is not None:
            # p(z_t | x) over (sequence, time): past a sequence's end the chain runs on unobserved
            from emdsl.latent.markov import fill_padding

            grid = plan.sequences.scatter(out, np.nan)
            fill_padding(grid, plan.sequences.lengths, theta[plan.latent.name]["transition"])
            return labels.chain_array(plan, grid, "predict_proba", states=True)
        return labels.states_array(plan, out, "predict_proba")

    def predict(self, data: Any) -> xr.DataArray:
        """The most probable latent state of each sample: DataArray (sample,) of the latent's states.

        For a Markov latent, the most probable *path* (:meth:`viterbi`), over (sequence, time).
        """
        if self._markov is not None:
            return self.viterbi(data)[0]
        proba = self.predict_proba(data)
        latent = self.model.latent_var
        assert latent is not None
        if hasattr(latent.family, "members"):
            return self._predict_joint(proba, latent)
        states = np.asarray(latent.family.states)
        if proba.chunks is not None:
            best = proba.argmax(latent.name).data.map_blocks(states.take, dtype=states.dtype)
        else:
            best = states[np.asarray(proba.argmax(latent.name).values)]
        return xr.DataArray(best, dims=proba.dims[:1], coords={d: c for d, c in proba.coords.items()
                                                               if d != latent.name}, name=latent.name)

    @staticmethod
    def _predict_joint(proba: xr.DataArray, latent: Any) -> xr.Dataset:
        """Several latents: each one's state in the most probable joint state, a variable per latent."""
        joint = latent.family
        flat = proba.stack({latent.name: list(joint.names)})
        best = flat.argmax(latent.name)
        index = best.data if best.chunks is not None else np.asarray(best.values)
        out = xr.Dataset(coords={d: c for d, c in best.coords.items() if d in best.dims})
        for axis, (name, member) in enumerate(zip(joint.names, joint.members, strict=True)):
            states = np.asarray(member.states)
            if best.chunks is not None:
                labels_ = index.map_blocks(lambda i, axis=axis, states=states: states[joint.unravel(i)[axis]],
                                           dtype=states.dtype)
            else:
                labels_ = states[joint.unravel(index)[axis]]
            out[name] = xr.DataArray(labels_, dims=best.dims)
        return out

    def viterbi(self, data: Any) -> tuple[xr.DataArray, float | xr.DataArray]:
        """The most probable path of a Markov latent and its log-probability log p(x, z*).

        Returns
        -------
        path : DataArray
            The latent's states over the data's (sequence dims, time). Steps after a
            sequence's last observation (NaN padding) are unobserved steps: the path
            goes on along the most probable transitions.
        log_prob : float or DataArray
            log p(x, z* | θ̂) (with log h, as :meth:`score_samples`): a float for one
            sequence, else a DataArray over the sequence dims.

        Examples
        --------
        >>> import numpy as np, xarray as xr, emdsl as em
        >>> ds = xr.Dataset({"x": ("time", np.r_[np.zeros(20), np.ones(20) * 5] + np.sin(np.arange(40)))})
        >>> fit = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal).fit(ds, seed=0)
        >>> path, log_prob = fit.viterbi(ds)
        >>> int((path != path[0]).sum())
        20
        """
        if self._markov is None:
            raise ModelError("viterbi: the model has no Markov latent (declare latent(name, em.Categorical(k), "
                             "markov=dim)); for a mixture, predict gives each sample's most probable state")
        from emdsl.latent.markov import viterbi_paths

        plan, theta, H = self._compiled(data)
        assert plan.sequences is not None and plan.latent is not None
        if is_chunked(plan):  # dask-backed data: lazy paths, a chunk per run of whole sequences
            with engine(plan) as estep:
                path, log_prob = estep.lazy_chain(H, theta, "viterbi")
        else:
            L = np.empty((plan.n_samples, plan.K))
            with engine(plan) as estep:
                estep.emissions(H, theta, L)
            path, log_prob = viterbi_paths(L, plan.sequences, theta[plan.latent.name])
            log_prob += self._base_per_sequence(plan)
        if not is_chunked(plan) and not np.all(np.isfinite(log_prob)):
            from emdsl.latent.markov import viterbi_failure

            s = int(np.flatnonzero(~np.isfinite(log_prob))[0])
            raise ModelError(viterbi_failure(L, plan.sequences, s, plan.latent.name))
        states = np.asarray(self.model.latent_var.family.states, dtype=object)  # type: ignore[union-attr]
        if all(isinstance(v, int | np.integer) for v in states):
            states = states.astype(np.int64)
        elif all(isinstance(v, str) for v in states):
            states = states.astype(str)
        labelled = path.map_blocks(states.take, dtype=states.dtype) if is_chunked(plan) else states[path]
        out = labels.chain_array(plan, labelled, plan.latent.name)
        per_sequence = labels.sequences_array(plan, log_prob, "log_prob")
        return out, (float(per_sequence) if per_sequence.ndim == 0 else per_sequence)

    @property
    def _markov(self) -> str | None:
        latent = self.model.latent_var
        return latent.markov if latent is not None else None

    @staticmethod
    def _base_per_sequence(plan: Plan) -> np.ndarray:
        """Σ log h over each sequence's rows."""
        assert plan.sequences is not None
        base = np.empty(plan.n_samples)
        for start, stop in blocks(plan.n_samples, SCAN_ROWS):
            base[start:stop] = plan.log_base_measure(start, stop)
        return np.add.reduceat(base, plan.sequences.starts[:-1])

    def score_samples(self, data: Any) -> xr.DataArray:
        """log p(x_n | θ̂) for each sample of ``data``: DataArray (sample,).

        For a Markov latent, log p(x_s | θ̂) of each sequence: over the sequence dims (0-d for one).
        A sample so far outside the parameters' range that its log-density is below the float
        range scores −inf (its probability rounds to 0); its posterior is an error.
        """
        plan, theta, H = self._compiled(data)
        if plan.sequences is not None and is_chunked(plan):  # lazy, a chunk per run of whole sequences
            with engine(plan) as estep:
                return labels.sequences_array(plan, estep.lazy_chain(H, theta, "score"), "log_likelihood")
        if plan.sequences is not None:
            out = np.empty(plan.sequences.n_sequences)
            with engine(plan) as estep:
                estep.evaluate(H, theta, loglik_out=out)
            return labels.sequences_array(plan, out + self._base_per_sequence(plan), "log_likelihood")
        if is_chunked(plan):  # dask-backed data: a lazy result with the data's chunks
            with engine(plan) as estep:
                return labels.samples_array(plan, estep.lazy(H, theta, "score"), "log_likelihood")
        out = np.empty(plan.n_samples)
        with engine(plan) as estep:
            estep.evaluate(H, theta, loglik_out=out)
        for start, stop in blocks(plan.n_samples, SCAN_ROWS):
            out[start:stop] += plan.log_base_measure(start, stop)
        return labels.samples_array(plan, out, "log_likelihood")

    def score(self, data: Any, weights: Any = None) -> float:
        """Mean log-likelihood per sample of ``data`` (scikit-learn's ``score``), weighted if ``weights`` given.

        For a Markov latent, the mean log-likelihood per sequence.

        ``weights`` is what :meth:`Model.fit` accepts: a data variable's name or a DataArray.
        """
        scores = self.score_samples(data)
        if weights is None:
            return float(scores.mean())
        plan = self._compiled(data, weights=weights)[0]
        assert plan.weights is not None
        if plan.sequences is not None:  # a chain weighs sequences
            assert plan.sequences.weights is not None
            return float(scores.values.ravel() @ plan.sequences.weights / plan.sequences.weights.sum())
        return float(scores.values @ plan.weights / plan.weights.sum())

    def sample(self, n: int, length: int | None = None, seed: int | None = None) -> xr.Dataset:
        """Draw ``n`` samples, shaped like the training data; the latent states are a coordinate.

        Each variable comes in the dtype it was fitted in where the draws fit it exactly
        (counts as integers, 0/1 as bool, float32 as float32; :attr:`data_dtypes`), else float64.

        For a Markov latent, ``n`` sequences of ``length`` steps each, over
        (``sequence``, the markov dim).

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
        if latent is not None and latent.covariates:
            raise ModelError(f"sample: the weights of {latent.name!r} depend on {list(latent.covariates)}; draws "
                             "need each sample's covariates: use emdsl.regression.simulate(fit, data)")
        regression = next((decl for decl in self.model.observed if decl.covariates), None)
        if regression is not None:
            raise ModelError(f"sample: node {regression.name!r} is a regression on {list(regression.covariates)}; "
                             "its draws need each sample's covariates: use emdsl.regression.simulate(fit, data)")
        if self._markov is not None:
            if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 0:
                raise ModelError(f"sample(n_sequences, length): a Markov latent draws sequences; length must be "
                                 f"a non-negative integer, got {length!r}")
            return self._sample_chain(int(n), int(length), rng, values)
        if length is not None:
            raise ModelError("sample(n, length): length is for a Markov latent's sequences; this model draws "
                             "independent samples (pass the seed as seed=...)")
        if latent is not None and hasattr(latent.family, "members"):
            states = latent.family.draw({name: values[name]["probs"].values for name in latent.family.names},
                                        int(n), rng)
        elif latent is not None:
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
            draws = _named(decl, family.sample, layout.expand(flat), states, rng, {})
            out.update(layout.dataset(decl, draws))
        if latent is not None and hasattr(latent.family, "members"):  # several latents: one coordinate each
            for name, member, index in zip(latent.family.names, latent.family.members,
                                           latent.family.unravel(states), strict=True):
                out = out.assign_coords({name: ((self.sample_dim,), np.asarray(member.states, dtype=object)[index]
                                                .tolist())})
        elif latent is not None:
            state_labels = np.asarray(latent.family.states, dtype=object)[states].tolist()
            out = out.assign_coords({latent.name: ((self.sample_dim,), state_labels)})
        return labels.in_fitted_dtypes(out, self.data_dtypes)

    def _sample_chain(self, n: int, length: int, rng: np.random.Generator, values: Mapping[str, Any]) -> xr.Dataset:
        from emdsl.latent.markov import sample_states

        latent = self.model.latent_var
        assert latent is not None and latent.markov is not None
        paths = sample_states({key: da.values for key, da in values[latent.name].items()}, n, length, rng)
        grid = ("sequence", latent.markov)
        out = xr.Dataset()
        for decl in self.model.observed:
            layout = _Layout(self, decl.name)
            flat = {key: layout.flatten(key, da) for key, da in values[decl.name].items()}
            if layout.family.data_arguments():
                raise ModelError(f"sample: {decl.family!r} reads {sorted(layout.family.data_arguments().values())} "
                                 "from the data, which a simulation does not have; fix them in the declaration")
            drawn = layout.dataset(decl, _named(decl, layout.family.sample, flat, paths.ravel(), rng, {}))
            for variable, da in drawn.data_vars.items():
                out[variable] = xr.DataArray(da.values.reshape((n, length) + da.shape[1:]), dims=grid + da.dims[1:],
                                             coords={d: da[d].values for d in da.dims[1:] if d in da.coords})
        state_labels = np.asarray(latent.family.states, dtype=object)[paths]
        return labels.in_fitted_dtypes(out.assign_coords({latent.name: (grid, state_labels.tolist())}),
                                       self.data_dtypes)

    def _need_latent(self, what: str) -> None:
        if self.model.latent_var is None:
            raise ModelError(f"{what}: the model declares no latent variable, so there is no posterior; "
                             "use score_samples for the density")

    def _sequence_dims_in(self, ds: xr.Dataset) -> tuple[Hashable, ...]:
        """The dims of ``ds`` that index a Markov fit's sequences: those it was fitted over, where the
        data have them; else every dim of the first observed variable that is neither the chain's
        nor one of its node's elements (the fit's parameters carry those), in any order."""
        variables = self._observed_in(ds)
        known = self.sequence_dims
        if known and all(d in ds[v].dims for v in variables for d in known):
            return known
        decl = next(decl for decl in self.model.observed if decl.variables[0] in ds.data_vars)
        elements = set(self.params[decl.name].to_dataset().dims)
        return tuple(d for d in ds[decl.variables[0]].dims if d != self._markov and d not in elements)

    def _observed_in(self, ds: xr.Dataset) -> list[str]:
        """The model's observed variables that ``ds`` holds."""
        return [v for decl in self.model.observed for v in decl.variables if v in ds.data_vars]

    @property
    def prior(self) -> str | None:
        """The fit-wide prior it was fitted with (``fit(prior="weak")``), else None; priors declared on
        families are in :attr:`model`."""
        return str(self.traces.attrs["prior"]) if self.traces.attrs.get("prior") else None

    def _compiled(self, data: Any, weights: Any = None, priors: bool = False) -> tuple[Plan, Theta, np.ndarray]:
        """The plan of ``data`` in the fit's units and levels, θ̂ and H; with ``priors``, the fit's priors
        bound (declared ones, and the weak one, scaled from ``data``, if the fit used it)."""
        ds = labels.as_dataset(data, like=self.model)
        variables = self._observed_in(ds)
        use_dim = self.sample_dim if variables and all(self.sample_dim in ds[v].dims for v in variables) else None
        if self._markov is not None:
            use_dim = self._sequence_dims_in(ds) if variables else None
        from emdsl.regression import Terms

        levels: dict[str, Any] = self.levels
        for name, node in self.params.children.items():  # a regression's terms, with their baselines
            if "term" in node.coords and "baselines" in node["term"].attrs:
                levels[name] = Terms.of(node["term"])
        plan = compile_plan(self.model, ds, sample_dim=use_dim, fitting=False, weights=weights,
                            standardization={name: (units["center"], units["scale"])
                                             for name, units in self.standardization.items()},
                            levels=levels)
        if priors:
            from emdsl.compile import bind_priors

            bind_priors(plan, weak=self.prior == "weak")
        theta = start_values(plan, labels.tree_values(self.params), "fit parameters")
        return plan, theta, natural_matrix(plan, theta)

    @property
    def levels(self) -> dict[str, list[Any]]:
        """The level labels of each categorical node, as learned from the training data
        (and the ``term`` labels of each regression node: new data must give the same terms)."""
        return {name: [v.item() if isinstance(v, np.generic) else v for v in node[dim].values]
                for name, node in self.params.children.items() for dim in ("level", "term") if dim in node.dims}

    def impute(self, data: Any = None) -> xr.Dataset:
        """The data with every missing value replaced by its posterior expectation.

        A hole in element d of sample n becomes E[x_nd | observed part of x_n] =
        Σ_k p(z=k | x_n) E[x_nd | z=k, observed part] (the conditional Gaussian mean for a
        MultivariateNormal); a categorical hole becomes its most probable level under the
        same mixture. Observed values are returned unchanged. With a Markov latent the
        weights are p(z_t = k | the whole sequence), and the NaN padding after a shorter
        sequence's last observation is left as it is (it is not a hole). On dask-backed
        data the result is lazy, except for a Markov latent, whose result is computed
        (each posterior needs its whole sequence).

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
        if self._markov is not None and is_chunked(plan):
            data = labels.as_dataset(data, like=self.model).compute()
            plan, theta, _ = self._compiled(data)
        return impute(plan, theta, labels.as_dataset(data, like=self.model))

    def standard_errors(self, method: Literal["observed", "empirical"] = "observed", data: Any = None
                        ) -> xr.DataTree:
        """Standard errors of the learned parameters: a DataTree shaped like :attr:`params`.

        Parameters
        ----------
        method : {"observed", "empirical"}, default "observed"
            ``"observed"``: from the observed information −∇²ℓ(θ̂), computed as the
            Jacobian of the exact score (Fisher's identity: the score is the E-step's
            statistics times ∂H/∂θ) by Richardson-refined central differences, which
            splits into Louis' complete- minus missing-information terms.
            ``"empirical"``: from the outer product of the per-sample scores (for a Markov
            latent, the per-sequence scores; it needs several sequences). With priors
            (declared, or ``fit(prior="weak")``) both add the prior's curvature −∇² log p(θ̂):
            the errors of the log-posterior's Laplace approximation at the MAP estimate.
        data : Dataset or what :meth:`Model.fit` accepts, optional
            The training data (default: the fit's own; needed for a loaded fit).

        Returns
        -------
        xarray.DataTree
            Standard errors in the data's units, labelled like ``fit.params``. Fixed
            parameters have none and are left out. The mixture weights' errors
            respect Σπ = 1 (delta method from the K − 1 free log-ratios). An entry on
            the boundary of its range (a probability of 0 or 1) gets 0 and is named
            in the node's ``at_boundary`` attr and in a warning. See
            :mod:`emdsl.inference` for the method.

        Examples
        --------
        >>> import emdsl as em
        >>> fit = em.Model().observe("waiting", em.Normal).fit(em.datasets.load("faithful"))
        >>> se = fit.standard_errors()
        >>> round(float(se["waiting"]["mean"]), 4)  # σ̂ / √N
        0.8228
        """
        from emdsl.inference import standard_errors

        return standard_errors(self, method, data)

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
        from emdsl.latent.markov import chain_sizes, describe_sizes

        sizes = chain_sizes(self)  # a hidden Markov model counts sequences and steps, not samples
        lines = [f"Fit: {self.status} after {self.n_iter} iterations (restart {self.restart + 1} of {self.n_init}), "
                 f"log-likelihood {self.loglik:.6g}, BIC {self.bic():.6g}, "
                 + (describe_sizes(sizes) if sizes is not None else f"{self.n_samples} samples")]
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



def _named(decl: Any, draw: Any, *args: Any) -> Any:
    """``draw(*args)``, with a family's ModelError prefixed by the node it was drawing for."""
    try:
        return draw(*args)
    except ModelError as error:
        raise ModelError(f"sample: node {decl.name!r} ({decl.family!r}): {error}") from None


class _Layout:
    """A node's event dims, coordinates and levels, read off its labelled parameters (works for loaded fits)."""

    def __init__(self, fit: Fit, name: str) -> None:
        decl = next(x for x in fit.model.observed if x.name == name)
        self.axes = decl.family.param_axes()
        latent = fit.model.latent_var
        self.latent = latent.name if latent is not None else None
        from emdsl.compile import node_given

        self.given = node_given(fit.model, decl)  # the latents the node depends on, when not simply "the latent"
        self.K = self.given.K if self.given is not None else (latent.family.k if latent is not None else 1)
        self.sample_dim = fit.sample_dim
        key = next(k for k, axes in self.axes.items() if "event" in axes)
        reference = fit.params[name][key]
        latent_dims = {x.name for x in fit.model.latents}
        self.dims = [d for d in reference.dims if d not in latent_dims | {"level"}]
        self.shape = [reference.sizes[d] for d in self.dims]
        self.coords = {d: reference[d].values for d in self.dims if d in reference.coords}
        self.D = int(np.prod(self.shape, dtype=int))
        self.levels = list(reference["level"].values) if "level" in reference.dims else None
        self.family = decl.family.bound(self.levels) if self.levels is not None else decl.family

    def flatten(self, key: str, da: xr.DataArray) -> np.ndarray:
        """The internal array: latent axis first (K = 1 without a latent), each event axis flattened to D."""
        sizes = {"latent": self.K, "level": len(self.levels or ())}
        return da.values.reshape([sizes.get(axis, self.D) for axis in self.axes[key]])

    def expand(self, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Internal parameters with one row per joint state of the model's latents."""
        return flat if self.given is None else self.given.expand(flat, self.axes)

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
