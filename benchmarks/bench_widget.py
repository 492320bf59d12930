"""What the live ConvergenceMonitor costs a fit: the same fit with and without it, in one run.

Fits alternate (without, with, without, with, ...) so drifts in machine speed hit both;
the widget is warmed up first (matplotlib's import and font cache are a one-time
cost of the session, not of a fit). Prints, per case, the median fit time without
and with the monitor, their ratio, the time the monitor itself measured spending
(a less noisy figure than the difference of two fit times), its drawings of the
plots, and the median seconds between two drawings while the fit ran (the plots
must keep up with a long fit, not appear only at its end).

    python benchmarks/bench_widget.py              # in this process (widget messages go nowhere)
    python benchmarks/bench_widget.py --kernel     # inside a Jupyter kernel, via nbclient,
                                                   # so every update is sent as a comm message
    python benchmarks/bench_widget.py --quick      # fewer iterations, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

import emdsl as em
from emdsl.widgets.monitor import ConvergenceMonitor

CASES = [  # (N, D, K, n_init): a long fit with restarts (issue 7's), a 1e5-sample model worth
    (600_000, 3, 6, 2),  # watching, and a fast one where fixed costs show
    (100_000, 10, 8, 1),
    (100_000, 2, 3, 1),
]


def make_data(N: int, D: int, K: int, seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (K, D))
    X = centers[rng.integers(K, size=N)] + rng.normal(size=(N, D)) @ (np.eye(D) + 0.2 * rng.normal(size=(D, D)))
    return xr.Dataset({"x": (("sample", "feature"), X)})


def timed_fit(model: em.Model, ds: xr.Dataset, n_init: int, max_iter: int, monitor: object | None) -> float:
    callbacks = [monitor] if monitor is not None else []
    start = time.perf_counter()
    model.fit(ds, seed=0, n_init=n_init, max_iter=max_iter, tol=0, callbacks=callbacks)
    return time.perf_counter() - start


class TimedMonitor(ConvergenceMonitor):
    """The monitor, noting when each drawing during the fit (not the final one) ends."""

    def __init__(self) -> None:
        super().__init__()
        self.drawn_at: list[float] = []

    def _draw_plot(self, chosen: int | None) -> None:
        super()._draw_plot(chosen)
        if chosen is None:
            self.drawn_at.append(time.perf_counter())


def measure(N: int, D: int, K: int, n_init: int, max_iter: int, repeats: int) -> dict[str, float]:
    """Median fit seconds without and with the monitor, and the monitor's own accounting."""
    ds = make_data(N, D, K)
    model = em.Model().latent("z", em.Categorical(K)).observe("x", em.MultivariateNormal)
    timed_fit(model, ds, 1, 3, ConvergenceMonitor())  # warm-up: imports, fonts, BLAS
    without, with_, spent, redraws, gaps = [], [], [], [], []
    for _ in range(repeats):
        without.append(timed_fit(model, ds, n_init, max_iter, None))
        monitor = TimedMonitor()
        with_.append(timed_fit(model, ds, n_init, max_iter, monitor))
        # what the monitor timed itself spending: numbers, parameters, drawings, the result
        spent.append(monitor._spent)
        redraws.append(monitor.n_redraws)
        gaps.extend(np.diff(monitor.drawn_at))
    return {"N": N, "D": D, "K": K, "n_init": n_init, "iterations": max_iter,
            "without": statistics.median(without), "with": statistics.median(with_),
            "spent": statistics.median(spent), "redraws": statistics.median(redraws),
            "gap": statistics.median(gaps) if gaps else float("nan")}


def report(rows: list[dict[str, float]], where: str) -> None:
    header = (f"{'case (' + where + ')':<40}{'without s':>10}{'with s':>9}{'ratio':>8}"
              f"{'monitor s':>11}{'share':>8}{'redraws':>9}{'every s':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        restarts = f" x{row['n_init']}" if row["n_init"] > 1 else ""
        name = f"N={row['N']:.0e} D={row['D']} K={row['K']} {row['iterations']} it{restarts}"
        print(f"{name:<40}{row['without']:>10.3f}{row['with']:>9.3f}{row['with'] / row['without']:>8.3f}"
              f"{row['spent']:>11.3f}{row['spent'] / row['with']:>8.1%}{row['redraws']:>9.0f}"
              f"{row['gap']:>9.2f}", flush=True)


def run_here(max_iter: int, repeats: int) -> None:
    report([measure(*case, max_iter, repeats) for case in CASES], "this process")


def run_in_kernel(max_iter: int, repeats: int) -> None:
    """The same measurement in a Jupyter kernel, where widget updates are real comm messages."""
    import nbformat
    from nbclient import NotebookClient

    here = Path(__file__).resolve()
    code = (f"import runpy\nbench = runpy.run_path({str(here)!r})\n"
            f"bench['report']([bench['measure'](*case, {max_iter}, {repeats}) for case in bench['CASES']],"
            " 'Jupyter kernel')")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(nb, timeout=1800, kernel_name="python3").execute()
    for output in nb.cells[0].outputs:
        if output.output_type == "stream":
            sys.stdout.write(output.text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", action="store_true", help="measure inside a Jupyter kernel (nbclient)")
    parser.add_argument("--quick", action="store_true", help="50 iterations, 1 repeat")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    max_iter, repeats = (50, 1) if args.quick else (args.iterations, args.repeats)
    (run_in_kernel if args.kernel else run_here)(max_iter, repeats)


if __name__ == "__main__":
    main()
