"""Notebook widgets and progress displays for fits.

``ConvergenceMonitor`` and ``explore`` need ipywidgets and matplotlib; their
modules are imported on first use, so ``import emdsl`` loads neither.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from emdsl.engine.events import Callback
from emdsl.widgets.text import TextMonitor

if TYPE_CHECKING:
    from emdsl.widgets._explore import explore
    from emdsl.widgets.monitor import ConvergenceMonitor

__all__ = ["ConvergenceMonitor", "TextMonitor", "auto_monitor", "explore"]

#: public names whose modules need ipywidgets or matplotlib, loaded on first access
_LAZY = {"ConvergenceMonitor": "emdsl.widgets.monitor", "explore": "emdsl.widgets._explore"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def in_notebook_frontend() -> bool:
    """Whether code runs in a Jupyter kernel that can show widgets (as ``tqdm.autonotebook`` decides).

    Examples
    --------
    >>> in_notebook_frontend()  # doctests run outside a kernel
    False
    """
    ipython = sys.modules.get("IPython")  # not imported: certainly not in a kernel
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    return "IPKernelApp" in shell.config or type(shell).__name__ == "ZMQInteractiveShell"


def auto_monitor() -> Callback:
    """The monitor for ``fit(monitor=True)``: a displayed widget in a notebook, else a text line.

    In a Jupyter kernel with ipywidgets and matplotlib installed this creates a
    :class:`ConvergenceMonitor` and displays it; anywhere else (plain Python,
    terminal IPython, CI) it returns a :class:`TextMonitor` writing to stderr.

    Examples
    --------
    >>> import emdsl as em
    >>> em.widgets.auto_monitor()
    TextMonitor()
    """
    if in_notebook_frontend():
        try:
            from IPython.display import display

            from emdsl.widgets.monitor import ConvergenceMonitor
        except ImportError:  # no ipywidgets or matplotlib: the text line still works
            return TextMonitor()
        monitor = ConvergenceMonitor()
        display(monitor)
        return monitor
    return TextMonitor()
