"""Matplotlib figures of a fit: convergence, components and responsibilities.

``fit.plot`` returns a :class:`FitPlotter`. Every method takes ``ax=``: given an
Axes it draws there and returns that Axes; without one it draws a new figure and
returns it.

A new figure is a :class:`matplotlib.figure.Figure` made without pyplot, so no
global figure list is touched and the notebook's inline backend never shows it a
second time at the end of the cell. A bare matplotlib ``Figure`` has no rich
display of its own, so the figures returned here are a small subclass whose
``_repr_png_`` renders the figure: the value of a cell then shows as one PNG in
JupyterLab, in nbconvert's static HTML, in the Sphinx docs (myst-nb) and under
nbval (which compares the ``text/plain`` part, ``<Figure size ... with N Axes>``,
and skips images).

matplotlib is imported inside the functions, so ``import emdsl`` never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from emdsl.errors import ModelError
from emdsl.families._base import Marginal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from emdsl.results import Fit

__all__ = ["FitPlotter", "figure_png", "new_figure"]

# Above this many samples the stacked responsibilities are drawn from an even
# subsample of the sorted order: the picture is the same and drawing stays fast.
_MAX_STACKED_POINTS = 2000


# -- figures that display themselves ---------------------------------------------------
@functools.cache
def _figure_class() -> type[Figure]:
    from matplotlib.figure import Figure as MplFigure

    class Figure(MplFigure):
        """A matplotlib Figure that shows itself as a PNG in Jupyter, without pyplot."""

        def _repr_png_(self) -> bytes:
            return figure_png(self)

    Figure.__module__ = __name__
    return Figure


def new_figure(figsize: tuple[float, float] = (6.4, 4.8), **kwargs: Any) -> Figure:
    """A new constrained-layout figure that displays as a PNG in notebooks.

    Examples
    --------
    >>> from emdsl.plot import new_figure
    >>> fig = new_figure((3, 2))
    >>> fig._repr_png_()[:4]
    b'\\x89PNG'
    """
    return _figure_class()(figsize=figsize, layout="constrained", **kwargs)


def figure_png(fig: Figure, dpi: float | None = None, *, tight: bool = True) -> bytes:
    """The figure rendered to PNG bytes (Agg), trimmed to its content when ``tight``.

    ``tight=False`` skips the trimming, which draws the figure a second time; a
    constrained-layout figure already fills its canvas.

    Examples
    --------
    >>> from emdsl.plot import new_figure, figure_png
    >>> figure_png(new_figure((2, 2)), dpi=50)[:4]
    b'\\x89PNG'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi, bbox_inches="tight" if tight else None)
    return buffer.getvalue()


def state_colors(k: int) -> np.ndarray:
    """One RGB colour per latent state (k × 3), the same in every emdsl plot."""
    from matplotlib import colormaps

    if k <= 10:
        return np.asarray(colormaps["tab10"].colors)[:k, :3]
    if k <= 20:
        return np.asarray(colormaps["tab20"].colors)[:k, :3]
    return colormaps["viridis"](np.linspace(0, 1, k))[:, :3]


# -- one scalar element of the observed data ------------------------------------------
@dataclasses.dataclass(frozen=True)
class Element:
    """One scalar coordinate of the observed data: a 1-D variable, or one entry of a variable.

    ``data_index`` selects it from the data variable (positional, over the event
    dims), ``param_index`` from the node's labelled parameters.
    """

    label: str
    node: str
    variable: str
    family: Any
    data_index: Mapping[Hashable, int]
    param_index: Mapping[Hashable, int]
    aliases: tuple[str, ...] = ()


def _per_state(da: xr.DataArray, latent: str | None, k: int) -> np.ndarray:
    """A parameter reduced to the latent dim (and a level dim if any), as (K, ...), broadcast over states."""
    if latent is not None and latent in da.dims:
        da = da.transpose(latent, ...)
    values = np.asarray(da.values, dtype=float)
    if latent is None or latent not in da.dims:
        values = values[None]
    return np.broadcast_to(values, (k,) + values.shape[1:]).copy()


def _element_values(params: xr.Dataset, family: Any, element: Element, latent: str | None,
                    k: int) -> dict[str, np.ndarray]:
    """Each parameter of one element per state: ``{name: (K,) or (K, levels)}``.

    A covariance gives the element's own variance (its diagonal entry), so that every
    family's ``marginal`` sees one element, whatever the parameter's layout.
    """
    out = {}
    for key, axes in family.param_axes().items():
        da = params[key]
        index = {d: i for d, i in element.param_index.items() if d in da.dims}
        if "event_" in axes:
            ((dim, i),) = element.param_index.items()
            index[f"{dim}_"] = i
        out[key] = _per_state(da.isel(index), latent, k)
    return out


def _covariance_entry(cov: xr.DataArray, i: Mapping[Hashable, int], j: Mapping[Hashable, int]) -> xr.DataArray:
    """Σ_ij from a covariance in any of the layouts full, tied, diag or spherical."""
    ((dim, a),) = i.items()
    ((_, b),) = j.items()
    if f"{dim}_" in cov.dims:
        return cov.isel({dim: a, f"{dim}_": b})
    if a != b:
        return xr.zeros_like(cov.isel({dim: a}) if dim in cov.dims else cov)
    return cov.isel({dim: a}) if dim in cov.dims else cov


def _event_reference(params: xr.Dataset, family: Any) -> xr.DataArray:
    """A parameter that carries the node's event dims (and not the second covariance axis)."""
    axes = family.param_axes()
    keys = [key for key, ax in axes.items() if "event" in ax and "event_" not in ax]
    keys = keys or [key for key, ax in axes.items() if "event" in ax]
    return params[keys[0]]


def elements(fit: Fit) -> list[Element]:
    """Every plottable scalar element of the model's observed nodes, in declaration order."""
    latent = fit.model.latent_var.name if fit.model.latent_var is not None else None
    latent_dims = {latent, "level", *(x.name for x in fit.model.latents)}
    out: list[Element] = []
    for decl in fit.model.observed:
        if _is_regression(decl):
            from emdsl.regression import stored_family

            family = stored_family(decl, fit.params)
            out.append(Element(decl.variables[0], decl.name, decl.variables[0], family, {}, {}))
            continue
        params = fit.params[decl.name].to_dataset()
        reference = _event_reference(params, decl.family)
        dims = [d for d in reference.dims if d not in latent_dims]
        if decl.stacked:
            (dim,) = dims
            out.extend(Element(v, decl.name, v, decl.family, {}, {dim: i}) for i, v in enumerate(decl.variables))
            continue
        variable = decl.variables[0]
        shape = [reference.sizes[d] for d in dims]
        for index in np.ndindex(*shape):
            where = dict(zip(dims, index, strict=True))
            names = [str(reference[d].values[i]) if d in reference.coords else str(i)
                     for d, i in where.items()]
            label = f"{variable}[{', '.join(names)}]" if names else variable
            aliases = tuple(names) if len(names) == 1 and dims[0] in reference.coords else ()
            out.append(Element(label, decl.name, variable, decl.family, where, where, aliases))
    return out


def _is_regression(decl: Any) -> bool:
    """Whether an observed declaration is a regression (``observe(..., covariates=...)``)."""
    return bool(getattr(decl, "covariates", ())) or not getattr(decl, "intercept", True)


def find_element(fit: Fit, name: str) -> Element:
    """The element called ``name`` (a label such as ``"waiting"`` or ``"x[waiting]"``, or a coordinate)."""
    found = elements(fit)
    for element in found:
        if element.label == name:
            return element
    matches = [e for e in found if name in e.aliases]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(repr(e.label) for e in found[:12]) + (", ..." if len(found) > 12 else "")
    if matches:
        raise ModelError(f"plot: {name!r} is ambiguous, it names {[e.label for e in matches]}; use one of those")
    raise ModelError(f"plot: no plottable element {name!r} in this model; choose from {listing}")


# -- the plotter ------------------------------------------------------------------------
class FitPlotter:
    """Plots of a :class:`~emdsl.Fit`, reached as ``fit.plot``.

    Each method draws on ``ax`` when given (and returns it), or on a new
    :class:`matplotlib.figure.Figure` (returned; it displays as a PNG in Jupyter
    and is not registered with pyplot).

    Examples
    --------
    >>> import emdsl as em
    >>> fit = em.Model().latent("z", em.Categorical(2)).observe(
    ...     ["eruptions", "waiting"], em.MultivariateNormal, name="x").fit(em.datasets.load("faithful"), seed=0)
    >>> fig = fit.plot.components()
    >>> len(fig.axes)
    1
    """

    def __init__(self, fit: Fit) -> None:
        self._fit = fit

    def __repr__(self) -> str:
        chain = ", .states()" if self._markov is not None else ""
        return f"FitPlotter: .convergence(), .components(x, y), .posterior(){chain}"

    # -- helpers --------------------------------------------------------------------
    @property
    def _latent(self) -> str | None:
        latent = self._fit.model.latent_var
        return latent.name if latent is not None else None

    @property
    def _states(self) -> list[Any]:
        """The latent's states; with several latents, their joint states (tuples), which the plots draw."""
        latent = self._fit.model.latent_var
        return list(latent.family.states) if latent is not None else [None]

    @property
    def _several(self) -> list[Any]:
        """The declared latents when there are several (the plots then draw their joint states), else []."""
        latents = self._fit.model.latents
        return list(latents) if len(latents) > 1 else []

    def _node_params(self, node: str) -> xr.Dataset:
        """A node's parameters with one row per state the plots draw: with several latents, per joint
        state (a node that depends on some of them repeats its rows over the others)."""
        ds = self._fit.params[node].to_dataset()
        several = self._several
        if not several:
            return ds
        names = [x.name for x in several]
        joint = xr.Dataset(attrs=ds.attrs)
        for key, da in ds.data_vars.items():
            missing = {x.name: list(x.family.states) for x in several if x.name not in da.dims}
            da = (da.expand_dims(missing) if missing else da).transpose(*names, ...)
            rest = da.dims[len(names):]
            joint[key] = xr.DataArray(da.values.reshape((-1, *da.shape[len(names):])), dims=(self._latent, *rest),
                                      coords={d: da[d].values for d in rest if d in da.coords})
        return joint

    def _weights(self, resp: np.ndarray | None = None) -> np.ndarray:
        if self._latent is None:
            return np.ones(1)
        if self._several:  # independent latents: p(a, b) = π_a π_b, over the joint states
            weights = np.ones(1)
            for x in self._several:
                weights = np.multiply.outer(weights, np.asarray(self._fit.params[x.name]["probs"].values, dtype=float))
            return weights.ravel()
        params = self._fit.params[self._latent]
        if "transition" in params:
            # A Markov latent has no weights: the share of the steps shown in each state
            # (the long-run share when no steps are at hand; a chain may be absorbed).
            if resp is not None and len(resp):
                return resp.mean(axis=0)
            return stationary(np.asarray(params["transition"].values, dtype=float))
        if "probs" not in params:
            # Weights that depend on covariates (a concomitant latent): the share of the samples shown.
            return resp.mean(axis=0) if resp is not None and len(resp) else np.full(len(self._states), np.nan)
        return np.asarray(params["probs"].values, dtype=float)

    @property
    def _markov(self) -> str | None:
        latent = self._fit.model.latent_var
        return latent.markov if latent is not None else None

    def _state_label(self, k: int) -> str:
        if self._several:
            return ", ".join(f"{x.name}={state}" for x, state in zip(self._several, self._states[k], strict=True))
        return f"{self._latent}={self._states[k]}" if self._latent is not None else "model"

    def _data(self, data: Any, what: str) -> xr.Dataset:
        if data is not None:
            from emdsl.labels import as_dataset

            return as_dataset(data)
        held = self._fit.data
        if held is None:
            raise ModelError(f"plot.{what}: this fit holds no training data (it was loaded from a file); "
                             f"pass the data to plot: fit.plot.{what}(data=ds)")
        return held

    def _responsibilities(self, data: Any, what: str) -> tuple[xr.Dataset, np.ndarray]:
        """The data and p(z | x) for each sample, (N, K) ((N, 1) of ones without a latent)."""
        ds = self._data(data, what)
        if self._latent is None:
            n = ds.sizes[self._fit.sample_dim]
            return ds, np.ones((n, 1))
        proba = self._fit.posterior if data is None else self._fit.predict_proba(ds)
        if self._markov is not None and self._fit.sample_dim not in proba.dims:
            # several sequences: their steps side by side, as the fit saw them
            steps = [d for d in proba.dims if d != self._latent]
            proba = proba.stack({self._fit.sample_dim: steps})
            ds = ds.transpose(*steps, ...).stack({self._fit.sample_dim: steps})
        if self._markov is not None:
            # steps with nothing observed (a shorter sequence's padding) are not data to draw
            seen = np.zeros(ds.sizes[self._fit.sample_dim], dtype=bool)
            for v in self._fit._observed_in(ds):
                seen |= ds[v].notnull().any([d for d in ds[v].dims if d != self._fit.sample_dim]).values
            if not seen.all():
                ds, proba = ds.isel({self._fit.sample_dim: seen}), proba.isel({self._fit.sample_dim: seen})
        if self._several:  # the joint posterior (sample, a, b, ...) over the joint states
            names = [x.name for x in self._several]
            values = np.asarray(proba.transpose(self._fit.sample_dim, *names).values)
            return ds, values.reshape(values.shape[0], -1)
        return ds, np.asarray(proba.transpose(self._fit.sample_dim, self._latent).values)

    # -- convergence --------------------------------------------------------------------
    def convergence(self, ax: Axes | None = None, *, kl: bool | None = None,
                    figsize: tuple[float, float] | None = None) -> Figure | Axes:
        """Log-likelihood per iteration for every restart, and the ELBO staircase.

        For the chosen restart the ELBO is drawn under the log-likelihood as a
        staircase: at iteration t the M-step has raised the bound to
        ELBO(q⁽ᵗ⁻¹⁾, θ⁽ᵗ⁾) = ``elbo[t]``, and the E-step then closes the gap up to
        ℓ(θ⁽ᵗ⁾) = ``loglik[t]`` (a vertical step of height KL). The KL gap itself
        is shown on a log axis.

        In an accelerated fit (``fit(accelerate=...)``, by default ``"auto"``) the iterations
        that came from an extrapolated proposal are drawn as open diamonds on the
        log-likelihood; no M-step raised a bound from q⁽ᵗ⁻¹⁾ there, so the staircase and the
        KL gap skip them. A plain EM fit (``accelerate=None``) draws the whole staircase.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw the log-likelihood and ELBO.
        kl : bool, optional
            Draw the KL gap. Default: in a second panel when this method makes the
            figure, not at all when ``ax`` is given; ``kl=True`` with ``ax`` uses a
            twin axis on the right.
        figsize : (width, height), optional
            Size of a new figure.

        Returns
        -------
        Figure or Axes
            The new figure, or ``ax``.

        Examples
        --------
        >>> import emdsl as em
        >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(
        ...     em.datasets.load("faithful"), seed=0, n_init=2)
        >>> fig = fit.plot.convergence()
        >>> len(fig.axes[0].get_lines())   # a log-likelihood line per restart, the ELBO, the extrapolated
        4
        """
        fig, main, kl_ax = self._convergence_axes(ax, kl, figsize)
        self._draw_logliks(main)
        self._draw_extrapolated(main)
        self._draw_elbo(main)
        if kl_ax is not None:
            self._draw_kl(kl_ax)
        self._zoom(main)
        main.legend(loc="lower right", fontsize="small")
        return fig if fig is not None else main

    def _convergence_axes(self, ax: Axes | None, kl: bool | None,
                          figsize: tuple[float, float] | None) -> tuple[Figure | None, Axes, Axes | None]:
        from matplotlib.ticker import MaxNLocator

        if ax is not None:
            main, fig = ax, None
            kl_ax = ax.twinx() if kl else None
        elif kl is False:
            fig = new_figure(figsize or (6.4, 4.0))
            main, kl_ax = fig.add_subplot(), None
        else:
            fig = new_figure(figsize or (6.4, 5.6))
            main, kl_ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
            kl_ax.set_xlabel("iteration")
        main.xaxis.set_major_locator(MaxNLocator(integer=True))
        status = self._fit.status
        main.set_title(f"EM: {status} after {self._fit.n_iter} iterations")
        main.set_ylabel("log-likelihood")
        if kl_ax is None or ax is not None:
            main.set_xlabel("iteration")  # else the KL panel below carries it
        return fig, main, kl_ax

    def _zoom(self, ax: Axes) -> None:
        """Fit the y range to the log-likelihoods and the later ELBO steps.

        The first ELBO (of the starting responsibilities, often hard assignments)
        can lie far below everything else and would flatten the picture, so the
        range leaves it out; its step is cut at the bottom edge.
        """
        elbo = np.where(_extrapolated(self._fit.trace), np.nan, self._fit.trace["elbo"].values)
        values = np.concatenate([self._fit.traces["loglik"].values, elbo[1:]])
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        pad = 0.06 * (high - low) if high > low else max(1.0, 1e-3 * abs(high))
        ax.set_ylim(low - pad, high + pad)

    def _draw_logliks(self, ax: Axes) -> None:
        traces = self._fit.traces
        restarts = np.unique(traces["restart"].values)
        others = 0
        # The chosen restart first, so that it leads the legend.
        for r in sorted(restarts, key=lambda r: int(r) != self._fit.restart):
            step = traces.isel(step=np.flatnonzero(traces["restart"].values == r))
            chosen = int(r) == self._fit.restart
            if chosen:
                label = f"log-likelihood ℓ(θ), restart {r + 1}" + (" (best)" if len(restarts) > 1 else "")
            else:
                label = "other restarts" if others == 0 else "_nolegend_"
                others += 1
            ax.plot(step["iteration"].values, step["loglik"].values, color="C0" if chosen else "0.6",
                    lw=2 if chosen else 1, alpha=1 if chosen else 0.7, zorder=3 if chosen else 2,
                    marker="o" if chosen else None, ms=3, label=label, gid=f"loglik-restart-{int(r)}")

    def _draw_elbo(self, ax: Axes) -> None:
        trace = self._fit.trace
        iteration = trace["iteration"].values
        # (t, elbo_t) -> (t, loglik_t): the E-step closes the gap; -> (t+1, elbo_t+1): the M-step
        x = np.repeat(iteration, 2)
        # an extrapolated point had no M-step from q⁽ᵗ⁻¹⁾: the staircase breaks there instead of rising
        elbo = np.where(_extrapolated(trace), np.nan, trace["elbo"].values)
        y = np.column_stack([elbo, trace["loglik"].values]).ravel()
        ax.plot(x, y, color="C1", lw=1, drawstyle="default", gid="elbo",
                label="ELBO(q, θ): M-step raises it, E-step closes the gap")

    def _draw_extrapolated(self, ax: Axes) -> None:
        trace = self._fit.trace
        chosen = _extrapolated(trace)
        if chosen.any():
            ax.plot(trace["iteration"].values[chosen], trace["loglik"].values[chosen], ls="none", marker="D",
                    ms=5, mfc="white", mec="C0", zorder=4, gid="extrapolated",
                    label="extrapolated (accelerated EM): no ELBO step")

    def _draw_kl(self, ax: Axes) -> None:
        trace = self._fit.trace
        gap = np.asarray(trace["kl"].values, dtype=float)
        # a log axis cannot show a closed (zero) gap; an extrapolated point has no gap from q⁽ᵗ⁻¹⁾
        shown = np.where((gap > 0) & ~_extrapolated(trace), gap, np.nan)
        ax.plot(trace["iteration"].values, shown, color="C3", marker=".", lw=1, gid="kl",
                label="KL gap = ℓ − ELBO")
        ax.set_yscale("log")
        ax.set_ylabel("KL gap (log)")
        if not np.isfinite(shown).any():
            ax.text(0.5, 0.5, "KL gap is 0 at every iteration", transform=ax.transAxes, ha="center",
                    va="center", color="0.4")

    # -- components -----------------------------------------------------------------------
    def components(self, x: str | None = None, y: str | None = None, ax: Axes | None = None, *,
                   data: Any = None, bins: int | str = "auto",
                   figsize: tuple[float, float] | None = None) -> Figure | Axes:
        """The data coloured by responsibility, with each component's fitted density.

        Two elements: a scatter plot whose colours blend the states' colours by
        p(z | x), with each Gaussian component's mean and its 1σ and 2σ
        covariance ellipses. One element: a histogram split by responsibility
        (stacked, as a density) with the weighted component densities π_k p(x | z=k)
        and their sum; a discrete family is drawn with bars at its support.

        Parameters
        ----------
        x, y : str, optional
            Elements to plot: a 1-D variable (``"waiting"``), an entry of a
            variable (``"x[waiting]"``, or the coordinate ``"waiting"`` when
            unambiguous). Default: the first two continuous elements, or the only
            one. ``x`` alone draws the histogram of ``x``.
        ax : matplotlib Axes, optional
            Where to draw.
        data : Dataset or what ``Model.fit`` accepts, optional
            Data to show; default the training data. A loaded fit holds none, so
            it needs ``data``.
        bins : int or str, default "auto"
            Histogram bins (1-D), as for :func:`numpy.histogram_bin_edges`.
        figsize : (width, height), optional
            Size of a new figure.

        Returns
        -------
        Figure or Axes
            The new figure, or ``ax``.

        Examples
        --------
        >>> import emdsl as em
        >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(
        ...     em.datasets.load("faithful"), seed=0)
        >>> ax = fit.plot.components().axes[0]
        >>> len(ax.get_lines())   # two weighted components and the mixture
        3
        """
        regression = self._regression_choice(x, y)
        first, second = self._chosen_elements(x, y) if regression is None else (regression[0], None)
        ds, resp = self._responsibilities(data, "components")
        fig = new_figure(figsize or (6.0, 4.8)) if ax is None else None
        if ax is None:
            assert fig is not None
            ax = fig.add_subplot()
        if regression is not None:
            self._draw_regression(ax, regression[0], regression[1], ds, resp)
        elif second is None:
            self._draw_1d(ax, first, ds, resp, bins)
        else:
            self._draw_2d(ax, first, second, ds, resp)
        return fig if fig is not None else ax

    def _chosen_elements(self, x: str | None, y: str | None) -> tuple[Element, Element | None]:
        if x is None and y is not None:
            raise ModelError("plot.components: give x when giving y")
        if x is not None:
            first = find_element(self._fit, x)
            second = find_element(self._fit, y) if y is not None else None
            if second is not None and second == first:
                raise ModelError(f"plot.components: x and y are the same element {first.label!r}")
            return first, second
        found = [e for e in elements(self._fit) if not _regression_family(e.family)]
        continuous = [e for e in found if getattr(e.family, "continuous", False)] or found
        if not continuous:
            raise ModelError("plot.components: the model observes no variable that can be plotted")
        return continuous[0], (continuous[1] if len(continuous) > 1 else None)

    # -- regression nodes -------------------------------------------------------------------
    def _regression_choice(self, x: str | None, y: str | None) -> tuple[Element, str] | None:
        """The regression element and the covariate to draw it against, or None for the other plots.

        ``components()`` picks the first regression node when the first plottable element is one;
        ``components("y")`` draws the regression node of ``y`` against its first numeric covariate;
        ``components(x="dose", y="y")`` (either order) against the covariate ``dose``.
        """
        found = {e.label: e for e in elements(self._fit) if _regression_family(e.family)}
        if not found:
            return None
        if x is None and y is None:
            every = elements(self._fit)
            first = next((e for e in every if getattr(e.family, "continuous", False)), every[0] if every else None)
            if first is None or first.label not in found:
                return None
            return first, _default_covariate(first.family)
        named = [name for name in (x, y) if name is not None]
        chosen = [found[name] for name in named if name in found]
        if not chosen:
            return None
        element = chosen[0]
        others = [name for name in named if name != element.label]
        if not others:
            return element, _default_covariate(element.family)
        (other,) = others
        if other in element.family.covariates:
            return element, other
        raise ModelError(f"plot.components: {element.label!r} is a regression on {list(element.family.covariates)}; "
                         f"it is drawn against one of its covariates, e.g. components(x="
                         f"{_default_covariate(element.family)!r}, y={element.label!r}), not against {other!r}")

    def _draw_regression(self, ax: Axes, element: Element, covariate: str, ds: xr.Dataset,
                         resp: np.ndarray) -> None:
        """The response against one covariate, coloured by p(z | data), with each state's fitted mean.

        Normal: each state's line x_nᵀβ_k with a ±1σ band; Poisson: e^{xᵀβ_k}, against y e^{−o} (a rate per
        unit exposure) when there is an offset; Bernoulli and Binomial: the logistic curve, against the
        observed share y / n. The other terms are held at their mean over the data shown.
        """
        from emdsl.regression import design_matrix

        fit, family = self._fit, element.family
        decl = next(d for d in fit.model.observed if d.name == element.node)
        params = self._node_params(element.node)
        k = resp.shape[1]
        terms = [str(t) for t in params["term"].values]
        coef = _per_state(params["coef"].transpose(..., "term"), self._latent, k)  # (K, T)
        where = f"plot.components({element.label!r})"
        design, _ = design_matrix(ds, decl.covariates, decl.intercept, fit.sample_dim, where, terms)
        y = np.asarray(ds[element.variable].transpose(fit.sample_dim).values, dtype=float)
        offset = (np.asarray(ds[decl.offset].values, dtype=float) if getattr(decl, "offset", None)
                  else np.zeros(len(y)))
        trials = getattr(family, "trials", None)
        if family.kind == "Binomial":
            n = (np.asarray(ds[trials].values, dtype=float) if isinstance(trials, str)
                 else np.full(len(y), float(trials)))
            y = y / n
        if family.kind == "Poisson" and getattr(decl, "offset", None):
            y = y * np.exp(-offset)
        columns = [j for j, t in enumerate(terms) if t == covariate or t.startswith(f"{covariate}[")]
        numeric = terms[columns[0]] == covariate if columns else True
        base = design.mean(axis=0) if len(design) else np.zeros(len(terms))
        if numeric:
            xv = np.asarray(ds[covariate].values, dtype=float)
            pad = 0.03 * (np.ptp(xv) or 1.0)
            grid = np.linspace(xv.min() - pad, xv.max() + pad, 200)
            rows = np.tile(base, (len(grid), 1))
            rows[:, columns[0]] = grid
        else:  # a categorical covariate: its levels at 0, 1, …; the baseline level has no column
            kept = [terms[j][len(covariate) + 1:-1] for j in columns]
            text = np.array([str(v) for v in ds[covariate].values.tolist()], dtype=object)
            levels = [v for v in sorted(set(text)) if v not in kept][:1] + kept if decl.intercept else kept
            codes = {level: i for i, level in enumerate(levels)}
            xv = np.array([codes[v] for v in text], dtype=float)
            xv = xv + np.random.default_rng(0).uniform(-0.15, 0.15, len(xv))  # jitter, reproducibly
            grid = np.arange(len(levels), dtype=float)
            rows = np.tile(base, (len(grid), 1))
            rows[:, columns] = 0.0
            for i, level in enumerate(levels):
                if level in kept:
                    rows[i, columns[kept.index(level)]] = 1.0
            ax.set_xticks(grid, levels)
        eta = rows @ coef.T  # (grid, K)
        if family.kind == "Poisson":
            curve = np.exp(np.minimum(eta, 700.0))
        elif family.kind in ("Bernoulli", "Binomial"):
            curve = 0.5 * (1.0 + np.tanh(0.5 * eta))
        else:
            curve = eta
        keep = np.isfinite(y)
        colors = state_colors(k)
        ax.scatter(xv[keep], y[keep], c=np.clip(resp[keep] @ colors, 0, 1), s=12, alpha=0.6, linewidths=0,
                   gid="data")
        weights = self._weights(resp)
        style = {} if numeric else {"marker": "o"}
        sd = None
        if family.kind == "Normal":
            sd = np.sqrt(np.broadcast_to(np.asarray(params["variance"].values, dtype=float).reshape(-1), (k,)))
        for j in range(k):
            label = self._state_label(j) + (f" (π={weights[j]:.2f})" if self._latent else "")
            ax.plot(grid, curve[:, j], color=colors[j], lw=2, label=label, gid=f"line-{j}", **style)
            if sd is not None and numeric:
                ax.fill_between(grid, curve[:, j] - sd[j], curve[:, j] + sd[j], color=colors[j], alpha=0.12,
                                linewidth=0, gid=f"band-{j}")
        ax.set_xlabel(self._axis_label(ds, Element(covariate, element.node, covariate, family, {}, {})))
        response = self._axis_label(ds, element)
        if family.kind == "Binomial":
            response = f"{element.label} / {trials if isinstance(trials, str) else f'{trials} trials'}"
        elif family.kind == "Poisson" and getattr(decl, "offset", None):
            response = f"{element.label} · exp(−{decl.offset})"
        ax.set_ylabel(response)
        what = {"Normal": "lines (±1σ)" if numeric else "means", "Poisson": "mean rates" if getattr(decl, "offset", None) else "means",
                "Bernoulli": "probabilities", "Binomial": "probabilities"}.get(family.kind, "means")
        held = " (other terms at their mean)" if len(terms) - int(decl.intercept) > len(columns) else ""
        coloured = f"coloured by p({self._latent} | data), " if self._latent else ""
        ax.set_title(f"{element.node}: {coloured}fitted {what}{held}", fontsize="medium")
        ax.legend(fontsize="small", loc="best")

    def _marginal(self, element: Element) -> Marginal:
        params = self._node_params(element.node)
        family = element.family
        if "level" in params.dims:
            family = family.bound(list(params["level"].values))
        k = len(self._states)
        return family.marginal(_element_values(params, family, element, self._latent, k))

    def _values(self, ds: xr.Dataset, element: Element, levels: Sequence[Any] | None = None) -> np.ndarray:
        """The element's data as floats; labels become their level codes (NaN where missing)."""
        if element.variable not in ds.data_vars:
            raise ModelError(f"plot.components: the data have no variable {element.variable!r}")
        da = ds[element.variable].isel(element.data_index)
        values = np.asarray(da.transpose(self._fit.sample_dim).values)
        if levels is None:
            return values.astype(float)
        codes = {level: i for i, level in enumerate(levels)}
        tidy = [v.item() if isinstance(v, np.generic) else v for v in values.tolist()]
        return np.array([codes.get(int(v) if isinstance(v, float) and v.is_integer() else v, np.nan)
                         for v in tidy], dtype=float)

    def _axis_label(self, ds: xr.Dataset, element: Element) -> str:
        units = ds[element.variable].attrs.get("units") if element.variable in ds.data_vars else None
        return f"{element.label} [{units}]" if units else element.label

    def _draw_2d(self, ax: Axes, a: Element, b: Element, ds: xr.Dataset, resp: np.ndarray) -> None:
        labelled = [e.label for e, m in ((a, self._marginal(a)), (b, self._marginal(b))) if m.levels is not None]
        if labelled:
            raise ModelError(f"plot.components(x, y): a scatter needs two numeric elements; {labelled} "
                             f"{'is' if len(labelled) == 1 else 'are'} categorical: draw "
                             f"{'it' if len(labelled) == 1 else 'each'} alone (components(x=...))")
        colors = state_colors(resp.shape[1])
        xv, yv = self._values(ds, a), self._values(ds, b)
        ax.scatter(xv, yv, c=np.clip(resp @ colors, 0, 1), s=12, alpha=0.75, linewidths=0, gid="data")
        ma, mb = self._marginal(a), self._marginal(b)
        cov = self._pair_covariance(a, b, ma, mb)
        weights = self._weights(resp)
        for k in range(resp.shape[1]):
            label = self._state_label(k) + (f" (π={weights[k]:.2f})" if self._latent else "")
            ax.plot([ma.mean[k]], [mb.mean[k]], marker="X", ms=9, color=colors[k], mec="white", mew=1,
                    linestyle="none", label=label, gid=f"mean-{k}")
            if cov is not None:
                for n_sigma, style in ((1, "-"), (2, "--")):
                    ax.add_patch(_ellipse((ma.mean[k], mb.mean[k]), cov[k], n_sigma, colors[k], style))
        ax.set_xlabel(self._axis_label(ds, a))
        ax.set_ylabel(self._axis_label(ds, b))
        what = f"coloured by p({self._latent} | x)" if self._latent else "one component"
        ax.set_title(f"{a.node}: data {what}" + ("; ellipses 1σ, 2σ" if cov is not None else ""))
        ax.legend(fontsize="small", loc="best")

    def _pair_covariance(self, a: Element, b: Element, ma: Marginal, mb: Marginal) -> np.ndarray | None:
        """The (K, 2, 2) covariance of two Gaussian elements per state, or None if either is not Gaussian."""
        if ma.variance is None or mb.variance is None:
            return None
        k = len(ma.mean)
        cross = np.zeros(k)
        # Nodes are independent given z; within a MultivariateNormal node the covariance couples them.
        if a.node == b.node and "covariance" in self._fit.params[a.node].data_vars:
            cov = self._node_params(a.node)["covariance"]
            cross = _per_state(_covariance_entry(cov, a.param_index, b.param_index), self._latent, k)
        return np.stack([np.column_stack([ma.variance, cross]), np.column_stack([cross, mb.variance])], axis=1)

    def _draw_1d(self, ax: Axes, element: Element, ds: xr.Dataset, resp: np.ndarray, bins: int | str) -> None:
        marginal = self._marginal(element)
        values = self._values(ds, element, marginal.levels)
        keep = np.isfinite(values)
        values, resp = values[keep], resp[keep]
        colors = state_colors(resp.shape[1])
        weights = self._weights(resp)
        labels = [self._state_label(k) for k in range(resp.shape[1])]
        if marginal.levels is not None:
            support = np.arange(len(marginal.levels), dtype=float)
            edges = np.append(support, support[-1] + 1) - 0.5
            grid = support
            ax.set_xticks(support, [str(level) for level in marginal.levels])
        elif marginal.discrete:
            support = np.arange(np.floor(values.min()), np.ceil(values.max()) + 1)
            edges = np.append(support, support[-1] + 1) - 0.5
            grid = support
        else:
            edges = np.histogram_bin_edges(values, bins=bins)
            pad = 0.05 * (values.max() - values.min() or 1.0)
            grid = np.linspace(values.min() - pad, values.max() + pad, 400)
        ax.hist([values] * resp.shape[1], bins=edges, weights=list(resp.T), stacked=True, density=True,
                color=list(colors), alpha=0.45)
        parts = weights[:, None] * marginal.density(grid)
        style = {"marker": "o", "linestyle": ":"} if marginal.discrete else {}
        for k in range(resp.shape[1]):
            ax.plot(grid, parts[k], color=colors[k], lw=2, label=f"π·p(x | {labels[k]})" if self._latent
                    else "p(x)", gid=f"density-{k}", **style)
        if self._latent is not None:
            # Dashed, so that a component it coincides with stays visible beneath it.
            ax.plot(grid, parts.sum(axis=0), color="k", lw=1.2, ls=(0, (4, 3)), label="mixture p(x)",
                    gid="mixture", **({"marker": "."} if marginal.discrete else {}))
        ax.set_xlabel(self._axis_label(ds, element))
        ax.set_ylabel("probability" if marginal.discrete else "density")
        split = f", histogram split by p({self._latent} | x)" if self._latent else ""
        ax.set_title(f"{element.node}: fitted components{split}")
        ax.legend(fontsize="small", loc="best")

    # -- posterior --------------------------------------------------------------------------
    def posterior(self, ax: Axes | None = None, *, kind: Literal["stacked", "certainty"] | None = None,
                  data: Any = None, threshold: float = 0.9,
                  figsize: tuple[float, float] | None = None) -> Figure | Axes:
        """The responsibilities p(z | x): who belongs where, and how surely.

        ``"stacked"``: each sample is a column of height 1 split into its
        responsibilities, samples sorted by their most probable state and then by
        certainty, so the width of each colour is that state's share of the data
        and the ragged edges are the uncertain samples. ``"certainty"``: a
        histogram of max_k p(z=k | x), split by the most probable state.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw.
        kind : {"stacked", "certainty"}, optional
            Default: both side by side in a new figure, ``"stacked"`` when ``ax`` is given.
        data : optional
            New data (default: the training data; needed for a loaded fit).
        threshold : float, default 0.9
            The titles count samples whose largest responsibility is below it.
        figsize : (width, height), optional
            Size of a new figure.

        Returns
        -------
        Figure or Axes
            The new figure, or ``ax``.

        Examples
        --------
        >>> import emdsl as em
        >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(
        ...     em.datasets.load("faithful"), seed=0)
        >>> len(fit.plot.posterior().axes)
        2
        """
        if kind not in (None, "stacked", "certainty"):
            raise ModelError(f"plot.posterior(kind=...): expected 'stacked' or 'certainty', got {kind!r}")
        if self._latent is None:
            raise ModelError("plot.posterior: the model declares no latent variable, so there are no "
                             "responsibilities to show")
        if self._markov is not None and kind is None:
            return self.states(ax=ax, data=data, figsize=figsize)
        _, resp = self._responsibilities(data, "posterior")
        if ax is not None:
            (self._draw_certainty if kind == "certainty" else self._draw_stacked)(ax, resp, threshold)
            return ax
        if kind is None:
            fig = new_figure(figsize or (9.0, 3.6))
            left, right = fig.subplots(1, 2, width_ratios=[2.2, 1])
            self._draw_stacked(left, resp, threshold)
            self._draw_certainty(right, resp, threshold)
        else:
            fig = new_figure(figsize or (6.4, 3.6))
            (self._draw_certainty if kind == "certainty" else self._draw_stacked)(fig.add_subplot(), resp, threshold)
        return fig

    def states(self, variable: str | None = None, *, sequence: Mapping[Hashable, Any] | int = 0,
               ax: Axes | None = None, data: Any = None, figsize: tuple[float, float] | None = None
               ) -> Figure | Axes:
        """A Markov latent over time: the data coloured by the Viterbi path, and p(z_t | x) below.

        Parameters
        ----------
        variable : str, optional
            The data variable drawn over time (default: the first continuous one).
        sequence : int or mapping, default 0
            Which sequence, when the data hold several: its position, or its labels
            ``{"sequence": "a"}``.
        ax : matplotlib Axes, optional
            Draw only the posterior there.
        data : optional
            New data (default: the training data).
        figsize : (width, height), optional
            Size of a new figure.

        Returns
        -------
        Figure or Axes

        Examples
        --------
        >>> import numpy as np, xarray as xr, emdsl as em
        >>> ds = xr.Dataset({"x": ("time", np.r_[np.zeros(30), np.ones(30) * 4] + np.cos(np.arange(60)))})
        >>> fit = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal).fit(ds, seed=0)
        >>> len(fit.plot.states().axes)
        2
        """
        if self._markov is None:
            raise ModelError("plot.states: the model has no Markov latent (latent(..., markov=dim)); "
                             "use plot.posterior() for a mixture")
        ds = self._data(data, "states")
        proba = self._fit.posterior if data is None else self._fit.predict_proba(ds)
        path = self._fit.predict(ds)
        time_dim = self._markov
        others = [d for d in path.dims if d != time_dim]
        if others:
            sizes = [path.sizes[d] for d in others]
            if isinstance(sequence, Mapping):
                lacking = [d for d in others if d not in sequence]
                if lacking:
                    raise ModelError(f"plot.states(sequence=...): give a label for every sequence dim {others}, "
                                     f"missing {lacking}")
                chosen = {d: sequence[d] for d in others}
                try:
                    proba, path, ds = proba.sel(chosen), path.sel(chosen), ds.sel(chosen)
                except (KeyError, IndexError):
                    raise ModelError(f"plot.states(sequence={sequence!r}): no such sequence; the labels are "
                                     + "; ".join(f"{d}: {list(path[d].values)[:10]}" if d in path.coords
                                                 else f"{d}: 0..{path.sizes[d] - 1}" for d in others)) from None
            else:
                count = int(np.prod(sizes))
                valid = isinstance(sequence, int | np.integer) and not isinstance(sequence, bool)
                if not (valid and 0 <= sequence < count):
                    raise ModelError(f"plot.states(sequence={sequence!r}): expected the number of a sequence, "
                                     f"0 to {count - 1}, or a mapping of labels over {others}")
                index = dict(zip(others, np.unravel_index(int(sequence), sizes), strict=True))
                proba, path, ds = proba.isel(index), path.isel(index), ds.isel(index)
        states = list(self._states)
        k = len(states)
        colors = state_colors(k)
        times = path[time_dim].values if time_dim in path.coords else np.arange(path.sizes[time_dim])
        resp = np.asarray(proba.transpose(time_dim, self._latent).values)
        if ax is None:
            fig = new_figure(figsize or (9.0, 5.0))
            top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.4, 1])
        else:
            fig, top, bottom = None, None, ax
        if top is not None:
            name = variable or next((e.variable for e in elements(self._fit)
                                     if getattr(e.family, "continuous", False)), elements(self._fit)[0].variable)
            if name not in ds.data_vars:
                raise ModelError(f"plot.states: the data have no variable {name!r}")
            values = ds[name]
            extra = [d for d in values.dims if d != time_dim]
            if extra:  # an event: its first element
                values = values.isel({d: 0 for d in extra})
            y = np.asarray(values.values)
            position = {state: j for j, state in enumerate(states)}
            code = np.array([position[v] for v in path.values.tolist()])
            top.plot(times, y, color="0.75", lw=0.8, zorder=1)
            for j in range(k):
                chosen = code == j
                top.scatter(times[chosen], y[chosen], s=12, color=colors[j], zorder=2,
                            label=self._state_label(j))
            top.set_ylabel(str(name))
            top.set_title(f"{name} over {time_dim}, coloured by the most probable path (Viterbi)")
            top.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        bottom.stackplot(times, resp.T, colors=list(colors), alpha=0.85, step="mid",
                         labels=[self._state_label(j) for j in range(k)])
        bottom.set_ylim(0, 1)
        bottom.set_xlim(times[0], times[-1]) if len(times) > 1 else None
        bottom.set_xlabel(str(time_dim))
        bottom.set_ylabel(f"p({self._latent}_t | x)")
        if top is None:
            bottom.legend(fontsize="small", loc="lower left", framealpha=0.8)
        return fig if fig is not None else bottom

    def _draw_stacked(self, ax: Axes, resp: np.ndarray, threshold: float) -> None:
        n, k = resp.shape
        best = resp.argmax(axis=1)
        order = np.lexsort((-resp.max(axis=1), best))
        shown = order[np.unique(np.linspace(0, n - 1, min(n, _MAX_STACKED_POINTS)).round().astype(int))]
        position = np.linspace(0, n - 1, len(shown)) if len(shown) < n else np.arange(n)
        colors = state_colors(k)
        ax.stackplot(position, resp[shown].T, colors=list(colors), alpha=0.85, step="mid",
                     labels=[f"{self._state_label(j)}: {np.sum(best == j)} samples" for j in range(k)])
        for boundary in np.cumsum(np.bincount(best, minlength=k))[:-1]:
            ax.axvline(boundary - 0.5, color="white", lw=1)
        ax.set_xlim(0, max(n - 1, 1))
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"samples, sorted by most probable {self._latent}")
        ax.set_ylabel(f"p({self._latent} | x)")
        uncertain = int(np.sum(resp.max(axis=1) < threshold))
        ax.set_title(f"responsibilities: {uncertain} of {n} samples below {threshold:g}")
        ax.legend(fontsize="small", loc="lower left", framealpha=0.8)

    def _draw_certainty(self, ax: Axes, resp: np.ndarray, threshold: float) -> None:
        _, k = resp.shape
        best, top = resp.argmax(axis=1), resp.max(axis=1)
        edges = np.linspace(1.0 / k, 1.0, 21)
        colors = state_colors(k)
        ax.hist([top[best == j] for j in range(k)], bins=edges, stacked=True, color=list(colors), alpha=0.85,
                label=[self._state_label(j) for j in range(k)])
        ax.axvline(threshold, color="0.3", lw=1, ls="--")
        ax.set_xlabel(f"max p({self._latent} | x)")
        ax.set_ylabel("samples")
        ax.set_title("certainty of the assignments")


def _regression_family(family: Any) -> bool:
    """Whether an element's family is a regression's (it has terms and covariates)."""
    return hasattr(family, "terms") and hasattr(family, "covariates") and hasattr(family, "intercept")


def _default_covariate(family: Any) -> str:
    """The covariate a regression is drawn against: its first numeric one, else its first."""
    covariates = list(family.covariates)
    if not covariates:
        raise ModelError("plot.components: a regression without covariates (intercept only) has nothing to "
                         "draw it against")
    numeric = [c for c in covariates if c in family.terms]
    return numeric[0] if numeric else covariates[0]


def stationary(transition: np.ndarray) -> np.ndarray:
    """The long-run share of time in each state: π = π A, Σ π = 1 (least squares if A is reducible)."""
    k = transition.shape[0]
    system = np.vstack([transition.T - np.eye(k), np.ones((1, k))])
    target = np.append(np.zeros(k), 1.0)
    share = np.linalg.lstsq(system, target, rcond=None)[0]
    share = np.clip(share, 0.0, None)
    return share / share.sum()


def _ellipse(center: tuple[float, float], cov: np.ndarray, n_sigma: float, color: Any, style: str) -> Any:
    """The Mahalanobis contour at ``n_sigma`` of a 2-D Gaussian."""
    from matplotlib.patches import Ellipse

    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, 0.0)
    angle = float(np.degrees(np.arctan2(vectors[1, 1], vectors[0, 1])))
    width, height = 2 * n_sigma * np.sqrt(values[1]), 2 * n_sigma * np.sqrt(values[0])
    return Ellipse(center, width, height, angle=angle, fill=False, edgecolor=color, linestyle=style, lw=1.5,
                   gid=f"ellipse-{n_sigma}sigma")


def _extrapolated(trace: xr.Dataset) -> np.ndarray:
    """Which iterations of a trace are accelerated proposals (all False for plain EM or older files)."""
    if "extrapolated" in trace.coords or "extrapolated" in trace.data_vars:
        return np.asarray(trace["extrapolated"].values, dtype=bool)
    return np.zeros(trace.sizes["iteration"], dtype=bool)
