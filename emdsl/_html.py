"""HTML cards for notebooks: Model and Fit reprs."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from emdsl.model import Model
    from emdsl.results import Fit

_STYLE = ("<style>.emdsl-card{font-family:var(--jp-ui-font-family,sans-serif);font-size:13px;"
          "border:1px solid #ccc;border-radius:4px;padding:6px 10px;display:inline-block}"
          ".emdsl-card table{border-collapse:collapse;margin:4px 0}.emdsl-card td,.emdsl-card th"
          "{padding:1px 8px;text-align:left}.emdsl-card th{color:#555;font-weight:600}</style>")


def _e(text: object) -> str:
    return html.escape(str(text))


def model_card(model: Model) -> str:
    """Latents and observed nodes with their family, variables and parameters."""
    rows = []
    for x in model.latents:
        rows.append(f"<tr><td>latent</td><td><b>{_e(x.name)}</b></td><td>{_e(repr(x.family))}</td>"
                    f"<td>{x.family.k} states</td><td>{_e(', '.join(x.family.param_names))}</td></tr>")
    for x in model.observed:
        rows.append(f"<tr><td>observed</td><td><b>{_e(x.name)}</b></td><td>{_e(repr(x.family))}</td>"
                    f"<td>{_e(', '.join(x.variables))}</td><td>{_e(', '.join(x.family.param_names))}</td></tr>")
    return (f"{_STYLE}<div class='emdsl-card'><b>emdsl.Model</b><table><tr><th>role</th><th>name</th>"
            f"<th>family</th><th>variables / states</th><th>parameters</th></tr>{''.join(rows)}</table></div>")


def sparkline(values: np.ndarray, width: int = 160, height: int = 32) -> str:
    """An inline SVG polyline of ``values``."""
    values = np.asarray(values, dtype=float)
    if values.size < 2 or not np.all(np.isfinite(values)):
        return ""
    low, high = values.min(), values.max()
    span = high - low if high > low else 1.0
    x = np.linspace(2, width - 2, values.size)
    y = height - 2 - (values - low) / span * (height - 4)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y, strict=True))
    return (f"<svg width='{width}' height='{height}' role='img' aria-label='log-likelihood per iteration'>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='1.5' points='{points}'/></svg>")


def fit_card(fit: Fit) -> str:
    """Status, log-likelihood, BIC, iterations, a convergence sparkline and parameter tables."""
    status = "converged" if fit.converged else ("stopped" if fit.stopped else "not converged")
    head = (f"<b>emdsl.Fit</b> — {status} after {fit.n_iter} iterations "
            f"(restart {fit.restart + 1} of {fit.n_init})<br>log-likelihood {fit.loglik:.6g} · "
            f"BIC {fit.bic():.6g} · {fit.n_samples} samples {sparkline(fit.trace['loglik'].values)}")
    tables = []
    for name, node in fit.params.children.items():
        for key, da in node.to_dataset().data_vars.items():
            tables.append(f"<div><b>{_e(name)}.{_e(key)}</b> {_e(tuple(da.dims))}{_array_table(da)}</div>")
    return f"{_STYLE}<div class='emdsl-card'>{head}{''.join(tables)}</div>"


def _array_table(da) -> str:
    values = np.asarray(da.values)
    if values.ndim == 0:
        return f" = {values:.6g}"
    if values.ndim == 1:
        values, rows, cols = values[None, :], [""], list(da[da.dims[0]].values)
    elif values.ndim == 2:
        rows, cols = list(da[da.dims[0]].values), list(da[da.dims[1]].values)
    else:
        return f" shape {values.shape}"
    head = "<tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    body = "".join("<tr><th>" + _e(r) + "</th>" + "".join(f"<td>{v:.4g}</td>" for v in row) + "</tr>"
                   for r, row in zip(rows, values, strict=True))
    return f"<table>{head}{body}</table>"
