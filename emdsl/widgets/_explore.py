"""Choose the number of components: a slider over fits, the BIC curve and the chosen fit's components.

Why this shape (see /work/shared/ECOSYSTEM.md): every candidate is fitted once,
when the explorer is built, and every picture is a PNG drawn with
``matplotlib.figure.Figure`` into an ``Image`` widget. The images sit in a
``Stack`` whose ``selected_index`` is linked to the slider's ``index`` in the
browser (``jslink``), so moving the slider needs no kernel: it works in a live
notebook, in nbconvert's static HTML, in the Sphinx docs and under nbval, whose
comparison sees only the first display (with the deterministic ``__repr__``).

ipywidgets and matplotlib are imported on first use, so importing this module
(and ``emdsl``) stays light.
"""

from __future__ import annotations

import functools
import html
import numbers
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from emdsl.errors import ModelError
from emdsl.labels import label_array
from emdsl.model import Model
from emdsl.results import Fit

if TYPE_CHECKING:
    import ipywidgets

__all__ = ["explore"]

Criterion = Literal["bic", "aic"]
Candidates = Mapping[Hashable, Model | Fit] | Sequence[Model | Fit] | Callable[[int], Model]

#: resolution of the pictures (PNG, dots per inch); 10 × 4 inches at 80 dpi is 800 × 320 pixels
DPI = 80


def explore(
    models: Candidates,
    data: Any = None,
    *,
    ks: Iterable[int] | None = None,
    criterion: Criterion = "bic",
    aic: bool = False,
    x: str | None = None,
    y: str | None = None,
    fit_kwargs: Mapping[str, Any] | None = None,
) -> ipywidgets.VBox:
    """A widget to choose among fits (usually the number of components) by BIC.

    Every candidate is fitted once, when the widget is built; the slider then
    switches between the pictures of the criterion curve (the chosen candidate
    marked) and of that fit's components (:meth:`FitPlotter.components`). It
    starts at the candidate with the lowest criterion.

    Parameters
    ----------
    models : mapping, sequence or callable
        ``{label: Model or Fit}`` (labels such as K, or names such as
        ``"full"``); a sequence of Models or Fits, labelled by their number of
        latent states (which must then differ); or a function ``k -> Model``
        together with ``ks``.
    data : xarray.Dataset or what :meth:`Model.fit` accepts, optional
        The data to fit the models to; for Fits, the data to plot (default:
        each fit's own training data).
    ks : iterable of int, optional
        The arguments for a callable ``models``, e.g. ``range(1, 7)``.
    criterion : {"bic", "aic"}, default "bic"
        What the starting selection minimises.
    aic : bool, default False
        Also draw the AIC curve.
    x, y : str, optional
        Elements for the components plot (see :meth:`FitPlotter.components`).
    fit_kwargs : mapping, optional
        Passed to every :meth:`Model.fit`; ``seed`` defaults to 0 so the widget
        shows the same fits every time.

    Returns
    -------
    Explorer
        An ``ipywidgets.VBox`` with ``.fit`` (the selected fit), ``.label``,
        ``.fits``, ``.criteria`` (a Dataset of BIC, AIC, log-likelihood per
        candidate), ``.best`` and ``.select(label)``.

    Examples
    --------
    >>> import emdsl as em
    >>> from emdsl.widgets import explore
    >>> ds = em.datasets.load("faithful")
    >>> widget = explore(lambda k: em.Model().latent("z", em.Categorical(k)).observe(
    ...     ["eruptions", "waiting"], em.MultivariateNormal, name="x"), ds, ks=range(1, 4))
    >>> widget.label, widget.fit.n_init
    (2, 1)
    """
    if criterion not in ("bic", "aic"):
        raise ModelError(f"explore(criterion=...): expected 'bic' or 'aic', got {criterion!r}")
    candidates = _candidates(models, ks)
    fits = _fit_all(candidates, data, fit_kwargs)
    plot_data = data if any(isinstance(c, Fit) for _, c in candidates) else None
    return _explorer_class()(fits, criterion=criterion, aic=aic, x=x, y=y, data=plot_data)


# -- candidates and their fits ------------------------------------------------------------
def _n_states(candidate: Model | Fit) -> int:
    model = candidate.model if isinstance(candidate, Fit) else candidate
    return model.latent_var.family.k if model.latent_var is not None else 1


def _candidates(models: Any, ks: Iterable[int] | None) -> list[tuple[Hashable, Model | Fit]]:
    """(label, Model or Fit) pairs from what the user gave, checked."""
    if callable(models) and not isinstance(models, Model | Fit | Mapping | Sequence):
        if ks is None:
            raise ModelError("explore: a function k -> Model needs ks=..., e.g. ks=range(1, 7)")
        items = [(int(k), models(int(k))) for k in ks]
    else:
        if ks is not None:
            raise ModelError("explore(ks=...): only for a function k -> Model; a mapping or a list "
                             "already names its candidates")
        if isinstance(models, Mapping):
            items = list(models.items())
        elif isinstance(models, Sequence) and not isinstance(models, str):
            items = [(_n_states(m) if isinstance(m, Model | Fit) else i, m) for i, m in enumerate(models)]
            labels = [label for label, _ in items]
            if len(set(labels)) != len(labels):
                raise ModelError(f"explore: several candidates have the same number of states {labels}; "
                                 "pass a mapping {label: model} to name them")
        else:
            raise ModelError("explore: expected a mapping {label: Model or Fit}, a list of Models or Fits, "
                             f"or a function k -> Model with ks=...; got {type(models).__name__}")
    if not items:
        raise ModelError("explore: no candidates to choose from")
    for label, candidate in items:
        if not isinstance(candidate, Model | Fit):
            raise ModelError(f"explore: the candidate {label!r} is a {type(candidate).__name__}, "
                             "expected an emdsl Model or Fit")
    return items


def _fit_all(candidates: list[tuple[Hashable, Model | Fit]], data: Any,
             fit_kwargs: Mapping[str, Any] | None) -> dict[Hashable, Fit]:
    kwargs = {"seed": 0, **(fit_kwargs or {})}
    fits: dict[Hashable, Fit] = {}
    for label, candidate in candidates:
        if isinstance(candidate, Fit):
            if data is None and candidate.data is None:
                raise ModelError(f"explore: the fit {label!r} holds no training data (it was loaded from a "
                                 "file); pass the data to plot: explore(fits, data)")
            fits[label] = candidate
        elif data is None:
            raise ModelError("explore: pass the data to fit the models to: explore(models, data)")
        else:
            fits[label] = candidate.fit(data, **kwargs)
    return fits


def criteria(fits: Mapping[Hashable, Fit]) -> xr.Dataset:
    """BIC, AIC, log-likelihood, free parameters and convergence per candidate (dim ``model``).

    Examples
    --------
    >>> import emdsl as em
    >>> from emdsl.widgets._explore import criteria
    >>> fit = em.Model().observe("waiting", em.Normal).fit(em.datasets.load("faithful"))
    >>> criteria({1: fit})["bic"].round(2).values.tolist()
    [2201.79]
    """
    labels = list(fits)
    values = list(fits.values())
    return xr.Dataset(
        {
            "bic": ("model", [f.bic() for f in values], {"long_name": "BIC, −2ℓ + p log N (lower is better)"}),
            "aic": ("model", [f.aic() for f in values], {"long_name": "AIC, −2ℓ + 2p (lower is better)"}),
            "loglik": ("model", [f.loglik for f in values], {"long_name": "log-likelihood"}),
            "n_params": ("model", [f.n_params for f in values], {"long_name": "free parameters"}),
            "converged": ("model", [f.converged for f in values]),
        },
        coords={"model": ("model", label_array(labels) if not _numeric(labels) else labels)},
    )


def _numeric(labels: Sequence[Hashable]) -> bool:
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in labels)


# -- pictures -------------------------------------------------------------------------------
def _picture(fits: Mapping[Hashable, Fit], table: xr.Dataset, selected: int, *, criterion: Criterion,
             aic: bool, x: str | None, y: str | None, data: Any) -> bytes:
    """PNG of the criterion curve with ``selected`` marked, beside that fit's components."""
    from emdsl.plot import figure_png, new_figure

    fig = new_figure((10.0, 4.0))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.35])
    _draw_criteria(left, table, selected, criterion, aic)
    fit = list(fits.values())[selected]
    fit.plot.components(x, y, ax=right, data=data)
    return figure_png(fig, dpi=DPI, tight=False)


def _draw_criteria(ax: Any, table: xr.Dataset, selected: int, criterion: Criterion, aic: bool) -> None:
    labels = list(table["model"].values)
    numeric = _numeric(labels)
    position = np.asarray(labels, dtype=float) if numeric else np.arange(len(labels), dtype=float)
    shown = ["bic", "aic"] if aic else [criterion]
    for name, style in zip(shown, ("-o", "--s"), strict=False):
        ax.plot(position, table[name].values, style, color="C0" if name == "bic" else "C2", ms=5,
                label=name.upper(), gid=f"criterion-{name}")
    best = int(np.argmin(table[criterion].values))
    value = float(table[criterion].values[selected])
    ax.plot([position[selected]], [value], "o", ms=13, mfc="none", mec="C3", mew=2, gid="selected",
            label=f"selected: {_fmt(labels[selected])}")
    ax.plot([position[best]], [float(table[criterion].values[best])], "*", ms=12, color="gold", mec="k",
            mew=0.6, gid="best", label=f"lowest {criterion.upper()}: {_fmt(labels[best])}")
    if numeric:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_xticks(position, [_fmt(v) for v in labels])
    ax.set_xlabel("number of states" if numeric else "model")
    ax.set_ylabel("criterion (lower is better)")
    ax.set_title(f"{_fmt(labels[selected])}: {criterion.upper()} {value:.2f}")
    ax.legend(fontsize="small")


def _fmt(label: Hashable) -> str:
    return f"K={label}" if isinstance(label, numbers.Integral) and not isinstance(label, bool) else str(label)


def _table_html(table: xr.Dataset, criterion: Criterion) -> str:
    """The candidates' numbers as a static table (it needs no kernel to read)."""
    best = int(np.argmin(table[criterion].values))
    head = "".join(f"<th style='padding:1px 8px;text-align:right'>{h}</th>"
                   for h in ("", "log-likelihood", "BIC", "AIC", "parameters", "converged"))
    rows = []
    for i, label in enumerate(table["model"].values):
        weight = "font-weight:700" if i == best else ""
        cells = [html.escape(_fmt(label)), f"{table['loglik'].values[i]:.2f}", f"{table['bic'].values[i]:.2f}",
                 f"{table['aic'].values[i]:.2f}", str(int(table["n_params"].values[i])),
                 "yes" if table["converged"].values[i] else "no"]
        rows.append(f"<tr style='{weight}'>" + "".join(
            f"<td style='padding:1px 8px;text-align:right'>{c}</td>" for c in cells) + "</tr>")
    note = f"lowest {criterion.upper()} in bold"
    return (f"<div style='font-size:12px'><table style='border-collapse:collapse;font-variant-numeric:tabular-nums'>"
            f"<tr>{head}</tr>{''.join(rows)}</table><span style='opacity:.7'>{note}</span></div>")


# -- the widget --------------------------------------------------------------------------------
@functools.cache
def _explorer_class() -> type:
    import ipywidgets as widgets

    class Explorer(widgets.VBox):
        """The widget :func:`explore` returns: a slider over candidate fits and their pictures."""

        def __init__(self, fits: Mapping[Hashable, Fit], *, criterion: Criterion, aic: bool,
                     x: str | None, y: str | None, data: Any) -> None:
            self._fits = dict(fits)
            self._labels = list(self._fits)
            self.criterion = criterion
            self.criteria = criteria(self._fits)
            self.best = self._labels[int(np.argmin(self.criteria[criterion].values))]
            pictures = [_picture(self._fits, self.criteria, i, criterion=criterion, aic=aic, x=x, y=y, data=data)
                        for i in range(len(self._labels))]
            start = self._labels.index(self.best)
            self.slider = widgets.SelectionSlider(
                options=[(_fmt(label), label) for label in self._labels], value=self.best,
                description="K" if _numeric(self._labels) else "model", continuous_update=True,
                layout=widgets.Layout(width="420px"))
            self.images = [widgets.Image(value=png, format="png") for png in pictures]
            self.stack = widgets.Stack(children=self.images, selected_index=start)
            # Linked in the browser, so the pictures follow the slider without a kernel (static
            # HTML, docs); the Python observer keeps the kernel's copy of the state the same.
            self._link = widgets.jslink((self.slider, "index"), (self.stack, "selected_index"))
            self.slider.observe(self._on_index, names="index")
            table = widgets.HTML(_table_html(self.criteria, criterion))
            super().__init__(children=[self.slider, self.stack, table])

        def _on_index(self, change: dict[str, Any]) -> None:
            self.stack.selected_index = change["new"]

        @property
        def label(self) -> Hashable:
            """The selected candidate's label (e.g. its number of states)."""
            return self.slider.value

        @property
        def fit(self) -> Fit:
            """The selected fit."""
            return self._fits[self.slider.value]

        @property
        def fits(self) -> dict[Hashable, Fit]:
            """Every candidate's fit, by label (a copy)."""
            return dict(self._fits)

        def select(self, label: Hashable) -> Fit:
            """Move the slider to ``label`` and return that fit."""
            if label not in self._fits:
                raise ModelError(f"explore: no candidate {label!r}; the candidates are {self._labels}")
            self.slider.value = label
            return self.fit

        def __repr__(self) -> str:
            value = float(self.criteria[self.criterion].values[self._labels.index(self.label)])
            name = self.criterion.upper()
            return (f"explore: {_fmt(self.label)} selected among {[_fmt(v) for v in self._labels]}, "
                    f"{name} {value:.2f}; lowest {name}: {_fmt(self.best)}")

    Explorer.__module__ = __name__
    return Explorer


def __getattr__(name: str) -> Any:
    # The widget class exists once ipywidgets is imported; reach it as emdsl.widgets._explore.Explorer.
    if name == "Explorer":
        return _explorer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

