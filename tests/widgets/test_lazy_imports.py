"""``import emdsl`` stays light: ipywidgets and matplotlib load only when a widget is used."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


HEAVY = "sorted(m for m in ('ipywidgets', 'matplotlib', 'IPython') if m in sys.modules)"


def test_import_emdsl_loads_no_widget_or_plot_library() -> None:
    assert run(f"import sys, emdsl; print({HEAVY})").strip() == "[]"


def test_text_monitor_and_auto_monitor_outside_a_notebook_stay_light() -> None:
    out = run(f"""
        import sys, emdsl as em
        em.widgets.TextMonitor(), em.widgets.auto_monitor()
        model = em.Model().observe("waiting", em.Normal)
        model.fit(em.datasets.load("faithful"), monitor=True)
        print({HEAVY})
    """)
    assert out.strip() == "[]"


def test_convergence_monitor_imports_them_on_first_use() -> None:
    out = run("""
        import sys, emdsl as em
        em.widgets.ConvergenceMonitor
        print(all(m in sys.modules for m in ('ipywidgets', 'matplotlib')), 'matplotlib.pyplot' in sys.modules)
    """)
    assert out.split() == ["True", "False"]  # and never pyplot (global state, inline display)


def test_explore_stays_the_function_after_its_module_loads():
    import emdsl as em

    first = em.widgets.explore
    second = em.widgets.explore
    assert callable(first) and first is second and first.__name__ == "explore"
