"""The fit, orchestrated once: compile, seed, run every restart, keep the best, warn, report.

``Model.fit`` calls :func:`fit_model`; restarts, best-of, the warnings, the monitor and
the stop request (a callback's or Ctrl-C) live here and nowhere else (DESIGN.md §3).
The result is a :class:`~emdsl.Fit`, which only holds what was found: results sit below
the engine in the layers, so the class is imported when a fit ends, not at import time.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from emdsl import labels
from emdsl.compile import Plan, compile_plan
from emdsl.engine.accelerate import check_method, resolve
from emdsl.engine.estep import engine
from emdsl.engine.events import FitInfo, dispatch
from emdsl.engine.init import initial_theta
from emdsl.engine.loop import RestartResult, StopFlag, restart_seeds, run_em
from emdsl.engine import online
from emdsl.engine.mstep import Theta, has_prior
from emdsl.errors import ConvergenceWarning, DegenerateComponentWarning, ModelError
from emdsl.latent.joint import JointCategorical

if TYPE_CHECKING:
    from emdsl.model import Model
    from emdsl.results import Fit

#: a component with less responsibility than this many samples has lost all of it
_LOST = 1e-3
#: ... and one with less than one sample's worth cannot support its parameters (degenerate)
_THIN = 1.0


def fit_model(
    model: Model,
    data: Any,
    *,
    init: Any,
    n_init: int,
    max_iter: int,
    tol: float,
    seed: Any,
    sample_dim: Hashable | None,
    weights: Any,
    callbacks: Sequence[Callable[..., Any]] | None,
    monitor: bool,
    accelerate: Any = "auto",
    prior: Any = None,
    method: Any = "em",
    batch_size: Any = None,
    step_decay: Any = 0.6,
    dtype: Any = None,
) -> Fit:
    """Compile, initialise, run every restart, keep the best: :meth:`Model.fit`'s body."""
    from emdsl.results import Fit

    check_settings(n_init, max_iter, tol)
    check_prior(prior)
    accelerate = check_method(accelerate)
    seed = normalize_seed(seed)
    callbacks = _callbacks(callbacks, monitor)
    ds = labels.as_dataset(data, like=model)
    method = online.check_method(method, batch_size, step_decay, None if accelerate == "auto" else accelerate)
    plan = compile_plan(model, ds, sample_dim=sample_dim, weights=weights, prior=prior)
    accelerate = resolve(accelerate, online=method != "em", max_iter=max_iter)
    plan.dtype = online.check_dtype(dtype)
    dispatch(callbacks, "on_fit_start", FitInfo(model, n_init, max_iter, tol, plan.n_samples, plan.sample_dim, seed))
    stop = StopFlag()
    runs: list[RestartResult] = []
    label_params = labeller(plan)
    with engine(plan) as estep:
        for restart, rng in enumerate(restart_seeds(seed, n_init)):
            if stop.requested:
                break
            try:
                theta, elbo0 = initial_theta(plan, estep, init, rng)
            except KeyboardInterrupt:
                stop.interrupt()
                break
            if method != "em":
                run = online.run_online(plan, estep, theta, method=method, batch_size=batch_size,
                                        step_decay=step_decay, rng=rng, restart=restart, n_init=n_init,
                                        max_iter=max_iter, tol=tol, callbacks=callbacks, stop=stop,
                                        label_params=label_params)
            else:
                run = run_em(plan, estep, theta, elbo0, restart=restart, n_init=n_init, max_iter=max_iter,
                             tol=tol, callbacks=callbacks, stop=stop, label_params=label_params,
                             accelerate=accelerate)
            if run is not None:
                runs.append(run)
    if not runs:
        raise KeyboardInterrupt("fit interrupted before the first restart had a log-likelihood")
    collapsed = [degenerate_reasons(plan, run) for run in runs]
    # A collapsed restart's likelihood is spurious (it grows without bound as a component
    # shrinks onto a few points): it is kept only when every restart collapsed.
    eligible = [r for r, reasons in enumerate(collapsed) if not reasons] or list(range(len(runs)))
    # The best restart is the one highest on the objective EM climbed: ℓ + log p(θ) with priors.
    best = max(eligible, key=lambda r: runs[r].objective)
    chosen = runs[best]
    degenerate = bool(collapsed[best])
    # A stopped fit did not finish what was asked (DESIGN.md §3), even when the restart it
    # keeps had converged: it is marked not converged; traces.attrs keep each restart's state.
    stopped = stop.requested or any(run.stopped for run in runs)
    if stop.interrupted:
        warnings.warn(f"fit interrupted after {len(runs)} of {n_init} restart(s); returning the best finished or "
                      f"partial restart ({best + 1}), marked stopped (not converged)", stacklevel=3)
    if degenerate:
        _warn_degenerate(plan, collapsed[best], len(runs))
    all_traces = traces(runs)
    all_traces.attrs["degenerate"] = ",".join(str(int(bool(reasons))) for reasons in collapsed)
    # which scheme each restart ran ("auto" chooses one per fit, see engine/accelerate.py)
    all_traces.attrs["accelerated_with"] = ",".join(run.accelerated_with for run in runs)
    fit = Fit(model, label_params(chosen.theta), units_tree(plan), all_traces, restart=best,
              converged=chosen.converged and not stopped, loglik=chosen.final, n_params=plan.n_free_params(),
              n_samples=plan.n_samples, sample_dim=plan.sample_dim, seed=seed, stopped=stopped, data=ds,
              weights=_weights_as_given(plan), weight_total=plan.total_weight, degenerate=degenerate,
              sequence_dims=None if plan.sequences is None else plan.sequences.sequence_dims,
              data_dtypes=numpy_dtypes(ds, [v for decl in model.observed for v in decl.variables]))
    if prior is not None:  # what standard errors, the bootstrap and partial_fit fit or differentiate
        fit.traces.attrs["prior"] = prior
    if method != "em":  # what Fit.partial_fit continues from
        fit.traces.attrs["method"] = method
        fit._online = online.StreamState(getattr(chosen, "online", None), batch_size, float(step_decay))
    _warn_lost_components(plan, chosen.theta)
    if tol > 0 and max_iter > 0 and not chosen.converged and not fit.stopped:
        climbed = chosen.objectives  # what the test read: with priors the log-posterior, which is not ℓ
        name, symbol = ("log-posterior", "ℓ + log p(θ)") if has_prior(plan) else ("log-likelihood", "ℓ")
        # the change the test read: online EM's last two epochs, before its final pass
        tested = climbed[:-1] if chosen.final_pass else climbed
        change = tested[-1] - tested[-2] if chosen.n_iter else float("nan")
        warnings.warn(f"EM did not converge in max_iter={max_iter} iterations: the last change of the "
                      f"{name}, {change:.3g}, is above tol·|{symbol}| = {tol * abs(climbed[-1]):.3g}; "
                      "raise max_iter (or tol)", ConvergenceWarning, stacklevel=3)
    dispatch(callbacks, "on_fit_end", fit)
    return fit


def check_settings(n_init: Any, max_iter: Any, tol: Any) -> None:
    """Raise ``ModelError`` for restarts, iterations or a tolerance that cannot be used."""
    if isinstance(n_init, bool) or not isinstance(n_init, int | np.integer) or n_init < 1:
        raise ModelError(f"fit(n_init=...): must be a positive integer, got {n_init!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 0:
        raise ModelError(f"fit(max_iter=...): must be a non-negative integer, got {max_iter!r}")
    if isinstance(tol, bool) or not (isinstance(tol, int | float | np.integer | np.floating)
                                     and np.isfinite(tol) and tol >= 0):
        raise ModelError(f"fit(tol=...): must be a finite number >= 0, got {tol!r}")


def check_prior(prior: Any) -> None:
    """Raise ``ModelError`` unless ``fit(prior=...)`` is None or "weak" (the only fit-wide prior)."""
    if prior is not None and not (isinstance(prior, str) and prior == "weak"):
        hint = ("; a prior on one node is part of its family's declaration, e.g. "
                "em.Normal(prior=em.priors.NormalInverseGamma(...))") if not isinstance(prior, str) else ""
        raise ModelError(f"fit(prior=...): expected None or 'weak' (a weakly informative prior on every "
                         f"parameter that has a conjugate prior), got {prior!r}{hint}")


def normalize_seed(seed: Any) -> int:
    """The fit's seed as a readable non-negative int: given, drawn from a Generator, or fresh."""
    if seed is None:
        return secrets.randbits(32)  # recorded on the fit, so a fresh fit can still be reproduced
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(2**32))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ModelError(f"fit(seed=...): must be a non-negative integer, a numpy Generator or None, got {seed!r}")
    return int(seed)


def _callbacks(callbacks: Any, monitor: bool) -> list[Any]:
    if callbacks is None:
        callbacks = []
    elif callable(callbacks) and not isinstance(callbacks, list | tuple):
        callbacks = [callbacks]
    elif not isinstance(callbacks, list | tuple):
        raise ModelError(f"fit(callbacks=...): expected a list of callables, got {type(callbacks).__name__}")
    bad = [c for c in callbacks if not callable(c)]
    if bad:
        raise ModelError(f"fit(callbacks=...): {bad[0]!r} is not callable")
    callbacks = list(callbacks)
    if monitor:
        from emdsl.widgets import auto_monitor

        callbacks.append(auto_monitor())
    return callbacks


def degenerate_reasons(plan: Plan, run: RestartResult) -> list[str]:
    """Why a restart's optimum is spurious: a variance held at its floor, or a component (almost) empty."""
    reasons = []
    nodes = {node.name: node for node in plan.nodes}
    for name, k, _ in run.floored:
        what = "the shared covariance" if k < 0 else plan.component_label(nodes[name], k)
        reasons.append(f"{nodes[name].where()}: {what} has a variance held at the floor")
    joint = plan.latent.family if plan.latent is not None else None
    if isinstance(joint, JointCategorical) and run.counts is not None:
        # Several latents: a latent's state is lost when its marginal count is; a combination of
        # states may rightly be rare. A node's component counts are its reduced ones.
        for name, member, counts in zip(joint.names, joint.members, joint.marginal_counts(run.counts), strict=True):
            for k in np.flatnonzero(counts < _THIN) if name not in plan.latent.held else ():
                reasons.append(f"state {name}={member.states[k]!r} holds {counts[k]:.3g} samples' worth of "
                               "responsibility")
        for node in plan.nodes:
            if getattr(node.family, "covariance_type", None) == "full" and node.D > 1 and node.given is not None:
                counts = node.given.reduce(run.counts)
                for k in np.flatnonzero(counts < node.D + 1):
                    reasons.append(f"{node.where()}: {plan.component_label(node, k)} holds {counts[k]:.3g} samples' "
                                   f"worth of responsibility, too few for a full covariance over {node.D} features")
    elif plan.latent is not None and run.counts is not None and "probs" not in plan.latent.held:
        for k in np.flatnonzero(run.counts < _THIN):
            reasons.append(f"component {plan.latent.name}={plan.latent.family.states[k]!r} holds "
                           f"{run.counts[k]:.3g} samples' worth of responsibility")
        # A full covariance over D features needs more than D samples: fewer span a flat
        # subspace, and the likelihood (or a weak prior's posterior) rewards shrinking onto it.
        for node in plan.nodes:
            if getattr(node.family, "covariance_type", None) == "full" and node.D > 1:
                for k in np.flatnonzero((run.counts >= _THIN) & (run.counts < node.D + 1)):
                    reasons.append(f"{node.where()}: component {plan.latent.name}="
                                   f"{plan.latent.family.states[k]!r} holds {run.counts[k]:.3g} samples' worth "
                                   f"of responsibility, too few for a full covariance over {node.D} features")
    return reasons


def _warn_degenerate(plan: Plan, reasons: list[str], n_runs: int) -> None:
    """Say that every restart collapsed, why, and what to pass instead."""
    k = plan.K
    fewer = f", or fewer components (em.Categorical({k - 1}))" if k > 1 else ""
    if isinstance(plan.latent.family if plan.latent is not None else None, JointCategorical):
        fewer = ", or fewer states for a latent"
    floors = sorted({node.family.floor for node in plan.nodes if node.family.floor > 0})
    larger = f"a larger floor (e.g. floor={max(floors) * 1000:g} in the family)" if floors else "a larger floor="
    # with a prior already in use, the weak one is no remedy: a stronger one, declared on the node, may be
    remedy = ("a stronger prior declared on the node (e.g. em.Normal(prior=em.priors.NormalInverseGamma(...)))"
              if has_prior(plan) else "prior='weak' (fit(..., prior='weak'))")
    warnings.warn(f"{'every restart' if n_runs > 1 else 'the fit'} collapsed ({'; '.join(reasons[:3])}"
                  f"{'; ...' if len(reasons) > 3 else ''}): its likelihood is spurious and the fit is marked "
                  f"degenerate. Fit again with {remedy}, {larger}{fewer}; "
                  "more restarts (n_init=10) may also find a sound optimum",
                  DegenerateComponentWarning, stacklevel=4)


def _warn_lost_components(plan: Plan, theta: Theta) -> None:
    """Name every component whose weight corresponds to (almost) no sample."""
    joint = plan.latent.family if plan.latent is not None else None
    if isinstance(joint, JointCategorical):  # several latents: each one's weights
        for name, member in zip(joint.names, joint.members, strict=True):
            probs = np.asarray(theta[plan.latent.name][name], dtype=float)
            lost = np.flatnonzero(probs * plan.total_weight < _LOST)
            if len(lost) and name not in plan.latent.held:
                warnings.warn(f"latent({name!r}): state(s) {[member.states[k] for k in lost]} lost all "
                              f"responsibility (weight {probs[lost].max():.3g}); use fewer states, or another "
                              "initialisation (init='random', n_init > 1)", DegenerateComponentWarning, stacklevel=3)
        return
    if plan.latent is None or "probs" not in theta[plan.latent.name]:
        return  # a Markov latent has no weights: its states' occupancy is the E-step's counts
    probs = np.asarray(theta[plan.latent.name]["probs"], dtype=float)
    held = "probs" in plan.latent.held
    lost = np.flatnonzero(probs * plan.total_weight < _LOST)
    if len(lost) and not held:
        states = [plan.latent.family.states[k] for k in lost]
        warnings.warn(f"latent({plan.latent.name!r}): component(s) {states} lost all responsibility (weight "
                      f"{probs[lost].max():.3g}); their parameters are left where they were. Use fewer "
                      "components, or another initialisation (init='random', n_init > 1)",
                      DegenerateComponentWarning, stacklevel=3)


def labeller(plan: Plan) -> Callable[[Theta], xr.DataTree]:
    """θ in internal units → labelled parameters in the data's units."""
    def label(theta: Theta) -> xr.DataTree:
        original = dict(theta)
        for node in plan.nodes:
            original[node.name] = node.family.to_original(theta[node.name], node.center, node.scale)
        return labels.params_tree(plan, original)
    return label


def units_tree(plan: Plan) -> dict[str, xr.Dataset]:
    """Each node's internal units (centre and scale), labelled; categorical nodes keep their levels."""
    out = {}
    for node in plan.nodes:
        units = xr.Dataset({
            "center": labels.labelled(plan, node, ("event",), node.center, "center"),
            "scale": labels.labelled(plan, node, ("event",), node.scale, "scale"),
        }, attrs={"description": "internal units: (x - center) / scale"})
        out[node.name] = units
    return out


def numpy_dtypes(ds: xr.Dataset, names: Sequence[str]) -> dict[str, str]:
    """The numpy dtype (as text) of each named variable of bool, integer or float dtype (not labels,
    not a pandas extension dtype)."""
    return {name: ds[name].dtype.str for name in names
            if name in ds.variables and isinstance(ds[name].dtype, np.dtype) and ds[name].dtype.kind in "biuf"}


def traces(runs: Sequence[RestartResult]) -> xr.Dataset:
    """Every restart's trace, one after the other over ``step``."""
    def stacked(key: str) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(run, key), dtype=float) for run in runs])

    restart = np.concatenate([np.full(len(run.loglik), r) for r, run in enumerate(runs)])
    iteration = np.concatenate([np.arange(len(run.loglik)) for run in runs])
    return xr.Dataset(
        {
            "loglik": ("step", stacked("loglik"), {"long_name": "log-likelihood log p(x | θ⁽ᵗ⁾)"}),
            "elbo": ("step", stacked("elbo"), {"long_name": "ELBO(q⁽ᵗ⁻¹⁾, θ⁽ᵗ⁾) after the M-step"}),
            "kl": ("step", stacked("kl"), {"long_name": "KL(q⁽ᵗ⁻¹⁾ ‖ p(z | x, θ⁽ᵗ⁾)) = loglik − elbo"}),
            "time": ("step", stacked("time"), {"long_name": "seconds since the restart began", "units": "s"}),
        },
        coords={"restart": ("step", restart), "iteration": ("step", iteration),
                "slack": ("step", stacked("slack"), {"long_name": "rounding bound of the monotonicity check"}),
                # Coordinates like slack: they describe each step, and load() accepts exactly four variables.
                "extrapolated": ("step", np.concatenate([np.asarray(run.extrapolated, dtype=bool) for run in runs]),
                                 {"long_name": "came through an accelerated proposal (its elbo, if any, is not from q⁽ᵗ⁻¹⁾)"}),
                "e_steps": ("step", np.concatenate([np.asarray(run.e_steps, dtype=np.int64) for run in runs]),
                            {"long_name": "E-steps spent since the restart began"}),
                # The objective EM climbs; = loglik without a prior (a coordinate, like slack).
                "logpost": ("step", stacked("logpost"),
                            {"long_name": "log-posterior log p(x | θ⁽ᵗ⁾) + log p(θ⁽ᵗ⁾) (= loglik without priors)"})},
        # final_pass: whether a restart's last entry is online EM's full pass at θ̂, not an iteration
        attrs={"converged": ",".join(str(int(run.converged)) for run in runs),
               "final_pass": ",".join(str(int(run.final_pass)) for run in runs)},
    )


def _weights_as_given(plan: Plan) -> xr.DataArray | None:
    """The fit's weights labelled as the user gave them: one per sample, or for a Markov latent one
    per sequence (the plan repeats those along each sequence's steps), over the sequence dims."""
    if plan.weights is None:
        return None
    if plan.sequences is not None and plan.sequences.weights is not None:
        return labels.sequences_array(plan, plan.sequences.weights, "weights")
    return labels.samples_array(plan, plan.weights, "weights")
