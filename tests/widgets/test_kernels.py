"""fit(monitor=True) in real kernels and shells: nbclient, strict and lax nbval, terminal IPython.

None of these can click, so they check that the widget (and its comm poller) neither
hangs nor fails, that later cells still run in order, and that outputs stay stable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

CELLS = [
    """\
import emdsl as em
ds = em.datasets.load("faithful")
model = em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal, name="x")""",
    "fit = model.fit(ds, seed=0, monitor=True)",
    """\
polling = []
monitor = em.widgets.ConvergenceMonitor()
again = model.fit(ds, seed=0, callbacks=[monitor, lambda event: polling.append(monitor._poller.active)])
print("polled", len(polling) > 1 and all(polling))""",
    'print("after", fit.converged, fit.n_iter, round(fit.loglik, 3))',
    "monitor",
]


def notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def execute(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def test_nbclient_shows_the_widget_and_runs_the_next_cells(tmp_path: Path) -> None:
    nb = execute(notebook(tmp_path / "monitor.ipynb"))
    (shown,) = nb.cells[1].outputs
    assert shown.output_type == "display_data"
    assert shown.data["text/plain"] == "ConvergenceMonitor(not started)"
    assert "application/vnd.jupyter.widget-view+json" in shown.data
    assert nb.cells[2].outputs[0].text == "polled True\n"  # the poller found this kernel's layout
    assert nb.cells[3].outputs[0].text.startswith("after True ")
    (final,) = nb.cells[4].outputs
    assert final.data["text/plain"].startswith("ConvergenceMonitor(converged after ")
    counts = [cell.execution_count for cell in nb.cells]
    assert counts == sorted(counts) == list(range(1, len(CELLS) + 1))


def nbval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nbval-current-env",
                           "-q", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_strict_nbval_accepts_an_executed_notebook(tmp_path: Path) -> None:
    path = notebook(tmp_path / "monitor.ipynb")
    nbformat.write(execute(path), path)
    result = nbval("--nbval", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lax_nbval_runs_the_notebook(tmp_path: Path) -> None:
    path = notebook(tmp_path / "monitor.ipynb")
    result = nbval("--nbval-lax", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_terminal_ipython_gets_the_text_line(tmp_path: Path) -> None:
    ipython = Path(sys.executable).with_name("ipython")
    code = CELLS[0] + "\n" + CELLS[1] + '\nprint("done", fit.converged)'
    script = tmp_path / "fit.ipy"
    script.write_text(code)
    result = subprocess.run([str(ipython), "--no-banner", "--colors=nocolor", str(script)], capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "done True" in result.stdout
    assert "restart 1/1  iteration 0/1000" in result.stderr
    assert "converged after" in result.stderr
