"""HTML cards for notebooks: the rich reprs of Model and Fit.

The cards are self-contained: inline styles only (no ``<style>`` block, no
scripts, no external files), so they look the same in JupyterLab, in
nbconvert's static HTML, in the Sphinx docs and on sites that drop ``<style>``
elements. Colours are translucent greys or ``inherit``, so they read on light
and dark themes. Every piece of user text (names, coordinate labels, family
reprs) goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

    from emdsl.model import Model, Observed
    from emdsl.results import Fit

#: rows and columns shown of a parameter table before the rest is elided
MAX_CELLS = 10
#: parameters with more values than this are shown folded
MAX_OPEN = 64

_CARD = ("font-family:var(--jp-ui-font-family,system-ui,-apple-system,'Segoe UI',sans-serif);font-size:13px;"
         "line-height:1.35;color:inherit;border:1px solid rgba(128,128,128,.4);border-radius:6px;"
         "padding:8px 12px;display:inline-block;max-width:100%;overflow-x:auto;box-sizing:border-box")
_TABLE = "border-collapse:collapse;margin:4px 0 6px 0;font-variant-numeric:tabular-nums;font-size:12px"
_TH = ("padding:2px 8px;text-align:left;font-weight:600;border-bottom:1px solid rgba(128,128,128,.4);"
       "background:rgba(128,128,128,.08)")
_ROWHEAD = "padding:2px 8px;text-align:left;font-weight:600;opacity:.8"
_TD = "padding:2px 8px;text-align:right;border-bottom:1px solid rgba(128,128,128,.15)"
_TDL = "padding:2px 8px;text-align:left;border-bottom:1px solid rgba(128,128,128,.15);vertical-align:top"
_MUTED = "opacity:.7"
_CODE = "font-family:var(--jp-code-font-family,ui-monospace,SFMono-Regular,Menlo,monospace);font-size:12px"
_BADGE = "display:inline-block;padding:0 7px;border-radius:9px;font-size:11px;font-weight:600;color:#fff;background:"
_STATUS_COLOURS = {"converged": "#2e7d32", "not converged": "#c75100", "stopped": "#616161",
                   "degenerate": "#b71c1c"}


def _e(text: object) -> str:
    """Escaped text, quotes included (safe in element content and attribute values)."""
    return html.escape(str(text), quote=True)


def _num(value: float, digits: int = 6) -> str:
    """A float as shown in the cards (``digits`` significant digits)."""
    return f"{float(value):.{digits}g}"


def _card(title: str, *parts: str) -> str:
    return f"<div class='emdsl-card' style=\"{_CARD}\"><div style='font-size:14px'>{title}</div>{''.join(parts)}</div>"


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[str]], row_heads: bool = False) -> str:
    """A table from cells that are already HTML."""
    head = "" if header is None else "<tr>" + "".join(f"<th style='{_TH}'>{h}</th>" for h in header) + "</tr>"
    body = []
    for row in rows:
        cells = [f"<th style='{_ROWHEAD}'>{row[0]}</th>"] if row_heads else []
        style = _TD if row_heads else _TDL
        cells += [f"<td style='{style}'>{cell}</td>" for cell in row[1 if row_heads else 0:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table style='{_TABLE}'>{head}{''.join(body)}</table>"


# -- Model ------------------------------------------------------------------------------
def _event_dim(decl: Observed) -> str | None:
    """The event dim of a stacked node (known before any data are seen)."""
    return (getattr(decl.family, "dim", None) or "feature") if decl.stacked else None


def _shape_text(axes: Sequence[str], latent: tuple[str, int] | None, decl: Observed) -> str:
    dim = _event_dim(decl)
    parts = []
    for axis in axes:
        if axis == "latent" and latent is not None:
            parts.append(f"{_e(latent[0])}: {latent[1]}")
        elif axis in ("event", "event_"):
            name = dim if axis == "event" else f"{dim}_"
            parts.append(f"{_e(name)}: {len(decl.variables)}" if dim is not None
                         else f"<i>dims of {_e(decl.variables[0])}</i>")
    return "(" + ", ".join(parts) + ")" if parts else "scalar"


def _free_count(decl: Observed, k: int) -> tuple[int | None, str]:
    """Free parameters of a node: the number when D is known, else how it grows with D."""
    family = decl.family
    if family.categorical and getattr(family, "levels", None) is None:
        return None, "K × D × (levels − 1)"
    if decl.stacked:
        n = family.n_free_params(k, len(decl.variables))
        return n, str(n)
    per_element = family.n_free_params(k, 1)
    if not family.multivariate and family.n_free_params(k, 2) == 2 * per_element:
        return None, f"{per_element} × D"
    return None, "depends on D"


def model_card(model: Model) -> str:
    """Latents and observed nodes: family, variables and dims, parameters and their counts.

    Examples
    --------
    >>> import emdsl as em
    >>> card = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal)._repr_html_()
    >>> "Categorical(2)" in card
    True
    """
    if not model.latents and not model.observed:
        return _card("<b>emdsl.Model</b>", f"<div style='{_MUTED}'>empty: declare .latent(...) and .observe(...)</div>")
    latent = model.latent_var
    k = latent.family.k if latent is not None else 1
    shape_latent = (latent.name, k) if latent is not None else None
    rows, counts = [], []
    for x in model.latents:
        n = x.family.n_free_params()
        counts.append(n)
        kx = x.family.k
        states = ", ".join(_e(s) for s in x.family.states[:MAX_CELLS]) + (", …" if kx > MAX_CELLS else "")
        params = "<br>".join(f"{_e(p)} ({_e(x.name)}: {kx})" + (" <i>fixed</i>" if p in x.family.fixed else "")
                             for p in x.family.param_names if len(model.latents) == 1 or p == "probs")
        rows.append(["latent", f"<b>{_e(x.name)}</b>", f"<code style='{_CODE}'>{_e(repr(x.family))}</code>",
                     f"{kx} states: {states}", params, str(n)])
    unknown_d = False
    for x in model.observed:
        parents = [y for y in model.latents if x.given is None or y.name in x.given]
        if x.given is not None or len(model.latents) > 1:  # the latents this node depends on
            k = int(np.prod([y.family.k for y in parents], dtype=int))
            shape_latent = (", ".join(y.name for y in parents), k) if parents else None
        n, shown = _free_count(x, k)
        counts.append(n)
        unknown_d |= n is None
        axes = x.family.param_axes()
        params = "<br>".join(f"{_e(p)} {_shape_text(axes[p], shape_latent, x)}"
                             + (" <i>fixed</i>" if p in x.family.fixed else "") for p in x.family.param_names)
        dims = (f"{_e(', '.join(x.variables))} → {_e(_event_dim(x))}" if x.stacked else _e(x.variables[0]))
        given = f" | {_e(', '.join(y.name for y in parents))}" if parents else ""
        rows.append(["observed", f"<b>{_e(x.name)}</b>",
                     f"<code style='{_CODE}'>{_e(repr(x.family))}</code>{given}", dims, params, shown])
    table = _table(["role", "name", "family", "variables / states", "parameters", "free"], rows)
    total = (f"<div>{sum(counts)} free parameters</div>" if not unknown_d else
             f"<div style='{_MUTED}'>D: number of elements per sample of a variable (known once fitted)</div>")
    return _card("<b>emdsl.Model</b>", table, total)


# -- Fit --------------------------------------------------------------------------------
def sparkline(values: Sequence[float] | np.ndarray, width: int = 180, height: int = 36,
              label: str = "log-likelihood per iteration") -> str:
    """An inline SVG line of ``values`` (no matplotlib); empty when there is nothing to draw.

    The hover text (``<title>``) gives the first and last values.

    Examples
    --------
    >>> from emdsl._html import sparkline
    >>> sparkline([-10.0, -5.0, -4.0]).startswith("<svg")
    True
    """
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if values.size < 2 or finite.size < 2:
        return ""
    low, high = float(finite.min()), float(finite.max())
    span = high - low if high > low else 1.0
    x = np.linspace(3, width - 3, values.size)
    y = height - 3 - (values - low) / span * (height - 6)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b, v in zip(x, y, values, strict=True) if np.isfinite(v))
    tip = f"{label}: {_num(finite[0])} → {_num(finite[-1])} over {values.size - 1} iterations"
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' role='img' aria-label='{_e(tip)}' "
            f"style='vertical-align:middle;overflow:visible'><title>{_e(tip)}</title>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' stroke-linejoin='round' points='{points}'/>"
            f"<circle cx='{x[-1]:.1f}' cy='{y[-1]:.1f}' r='2.5' fill='#1f77b4'/></svg>")


def _stat(value: float) -> str:
    """A log-likelihood or criterion: two decimals at the usual magnitudes, else 6 significant digits."""
    value = float(value)
    return f"{value:.2f}" if 1 <= abs(value) < 1e9 else _num(value)


def _summary(fit: Fit) -> str:
    status = fit.status
    badge = f"<span style='{_BADGE}{_STATUS_COLOURS[status]}'>{_e(status)}</span>"
    restarts = f", restart {fit.restart + 1} of {fit.n_init} (best)" if fit.n_init > 1 else ""
    items = [
        ("log-likelihood", _stat(fit.loglik)),
        ("BIC", _stat(fit.bic())),
        ("AIC", _stat(fit.aic())),
        *_size_items(fit),
        ("free parameters", f"{fit.n_params}"),
        ("seed", _e(fit.seed)),
    ]
    cells = "".join(f"<span style='margin-right:14px;white-space:nowrap'><span style='{_MUTED}'>{name}</span> "
                    f"<b>{value}</b></span>" for name, value in items)
    line = sparkline(fit.trace["loglik"].values)
    return (f"<div style='margin:4px 0;display:flex;flex-wrap:wrap;align-items:center;gap:10px'>"
            f"<span>{badge} <span style='{_MUTED}'>after {fit.n_iter} iterations{restarts}</span></span>"
            f"{line}</div><div style='margin:2px 0 4px 0'>{cells}</div>")


def _size_items(fit: Fit) -> list[tuple[str, str]]:
    """How much data: samples, or for a hidden Markov model its markov dim, sequences and observed steps."""
    from emdsl.latent.markov import chain_sizes

    sizes = chain_sizes(fit)
    if sizes is None:
        return [("samples", f"{fit.n_samples}")]
    dim, n_sequences, steps = sizes
    items = [("Markov along", f"<code style='{_CODE}'>{_e(dim)}</code>")]
    if n_sequences is not None:
        items.append(("sequences", f"{n_sequences}"))
    return items + [(f"steps ({_e(dim)})", f"{steps}")]


def _labels(da: xr.DataArray, dim: Any) -> list[str]:
    values = da[dim].values if dim in da.coords else range(da.sizes[dim])
    return [_e(v) for v in values]


def _clip(labels: list[str]) -> tuple[list[str], bool]:
    return (labels[:MAX_CELLS], True) if len(labels) > MAX_CELLS else (labels, False)


def _matrix(values: np.ndarray, rows: list[str], cols: list[str], corner: str = "") -> str:
    """A 2-D array as a table, at most MAX_CELLS × MAX_CELLS with the rest elided."""
    rows, more_rows = _clip(rows)
    cols, more_cols = _clip(cols)
    header = [corner, *cols] + (["…"] if more_cols else [])
    body = []
    for r, row in zip(rows, values, strict=False):
        cells = [_num(v, 4) for v in row[: len(cols)]] + (["…"] if more_cols else [])
        body.append([r, *cells])
    if more_rows:
        body.append(["…"] + [""] * (len(header) - 1))
    return _table(header, body, row_heads=True)


def _param_table(da: xr.DataArray) -> str:
    values = np.asarray(da.values, dtype=float)
    dims = list(da.dims)
    if values.ndim == 0:
        return f" = <b>{_num(values, 4)}</b>"
    if values.ndim == 1:
        return _matrix(values[None, :], [""], _labels(da, dims[0]), _e(dims[0]))
    if values.ndim == 2:
        return _matrix(values, _labels(da, dims[0]), _labels(da, dims[1]), f"{_e(dims[0])} \\ {_e(dims[1])}")
    if values.ndim == 3:
        blocks = []
        labels, more = _clip(_labels(da, dims[0]))
        for i, label in enumerate(labels):
            caption = f"<div style='{_MUTED}'>{_e(dims[0])} = {label}</div>"
            blocks.append(f"<div style='margin-right:12px'>{caption}"
                          f"{_matrix(values[i], _labels(da, dims[1]), _labels(da, dims[2]))}</div>")
        blocks += ["<div style='align-self:center'>…</div>"] if more else []
        return f"<div style='display:flex;flex-wrap:wrap'>{''.join(blocks)}</div>"
    return (f" <span style='{_MUTED}'>{values.size} values, from {_num(np.nanmin(values), 4)} "
            f"to {_num(np.nanmax(values), 4)}</span>")


def _node_section(name: str, node: xr.DataTree) -> str:
    ds = node.to_dataset()
    family = ds.attrs.get("family", "")
    kind = ds.attrs.get("covariance_type", "")
    fixed = {f for f in str(ds.attrs.get("fixed", "")).split(",") if f}
    title = f"<b>{_e(name)}</b> <span style='{_MUTED}'>{_e(family)}{' (' + _e(kind) + ')' if kind else ''}</span>"
    parts = []
    for key, da in ds.data_vars.items():
        dims = ", ".join(f"{_e(d)}: {s}" for d, s in da.sizes.items())
        dims = f" <span style='{_MUTED}'>({dims})</span>" if dims else ""
        held = " <i>fixed</i>" if key in fixed else ""
        table = _param_table(da)
        if da.size > MAX_OPEN:
            # Large parameters stay folded, so the card remains a summary.
            table = f"<details><summary style='cursor:pointer;{_MUTED}'>{da.size} values</summary>{table}</details>"
        parts.append(f"<div style='margin:2px 0 0 12px'><code style='{_CODE}'>{_e(key)}</code>"
                     f"{dims}{held}{table}</div>")
    return (f"<details open style='margin-top:4px'><summary style='cursor:pointer'>{title}</summary>"
            f"{''.join(parts)}</details>")


def fit_card(fit: Fit) -> str:
    """Status, log-likelihood, BIC, iterations, a convergence sparkline and parameter tables.

    Examples
    --------
    >>> import emdsl as em
    >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(
    ...     em.datasets.load("faithful"), seed=0)
    >>> f"{fit.loglik:.6g}" in fit._repr_html_()
    True
    """
    declared = "<br>".join(_e(line.strip()) for line in repr(fit.model).splitlines()[1:])
    model = f"<div style='{_CODE};{_MUTED};margin:2px 0 4px 0'>{declared}</div>"
    sections = "".join(_node_section(name, node) for name, node in fit.params.children.items())
    return _card("<b>emdsl.Fit</b>", _summary(fit), model, sections)
