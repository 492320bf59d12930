"""The Stop button in a live JupyterLab: a click during a long fit ends it early, and the notebook goes on.

This is the test that catches a kernel upgrade breaking the comm poller
(emdsl/widgets/_poll.py relies on private ipykernel internals).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat


MAX_ITER = 1000
# ~20 ms per iteration here: without a working Stop the fit would run for ~20 s
SETUP = """\
import numpy as np, xarray as xr, emdsl as em
rng = np.random.default_rng(0)
centers = rng.normal(0, 4, (8, 10))
X = centers[rng.integers(8, size=200_000)] + rng.normal(size=(200_000, 10))
ds = xr.Dataset({"x": (("sample", "feature"), X)})
model = em.Model().latent("z", em.Categorical(8)).observe("x", em.MultivariateNormal)
"""
FIT = f"fit = model.fit(ds, max_iter={MAX_ITER}, tol=0, seed=0, monitor=True)"
AFTER = 'print("AFTER-FIT", fit.n_iter, fit.stopped, fit.converged)'


def write_notebook(root: Path) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in (SETUP, FIT, AFTER)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = root / "stop.ipynb"
    nbformat.write(notebook, path)
    return path


def test_stop_button_ends_a_running_fit(jupyterlab, page, tmp_path: Path) -> None:
    notebook = write_notebook(jupyterlab.root)
    page.goto(f"{jupyterlab.url}/lab/tree/{notebook.name}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                           timeout=60_000)
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus"
                           " === 'idle'", timeout=60_000)
    # not awaited: the command's promise settles only when every cell has run
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

    # the button is enabled when the fit starts; wait until iterations are under way
    stop = page.locator(".jp-OutputArea-output button:has-text('Stop')")
    stop.wait_for(state="visible", timeout=60_000)
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('.jp-OutputArea-output button')]"
        ".find(b => b.textContent.includes('Stop')); return b && !b.disabled; }", timeout=60_000)
    label = page.locator(".jp-OutputArea-output .widget-html-content").first
    page.wait_for_function(
        "() => /iteration [1-9]/.test(document.querySelector('.jp-OutputArea-output .widget-html-content')"
        "?.textContent ?? '')", timeout=60_000)
    page.screenshot(path=str(tmp_path / "running.png"), full_page=True)
    stop.click()

    after = page.locator(".jp-OutputArea-output pre:has-text('AFTER-FIT')")
    after.wait_for(state="visible", timeout=60_000)
    page.screenshot(path=str(tmp_path / "stopped.png"), full_page=True)
    printed = after.inner_text()
    match = re.search(r"AFTER-FIT (\d+) (\w+) (\w+)", printed)
    assert match, printed
    n_iter, stopped, converged = int(match[1]), match[2], match[3]
    assert stopped == "True" and converged == "False", printed
    assert 1 <= n_iter < MAX_ITER // 4, f"the fit ran {n_iter} of {MAX_ITER} iterations: Stop was not seen in time"
    assert f"stopped after {n_iter} iteration" in label.inner_text()
    assert not page.errors, page.errors

    # the notebook saved by the frontend shows the cells ran in order, the fit's before the print's
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")  # awaits the save
    saved = json.loads(notebook.read_text())
    counts = [cell.get("execution_count") for cell in saved["cells"]]
    assert all(isinstance(c, int) for c in counts) and counts == sorted(counts), counts
