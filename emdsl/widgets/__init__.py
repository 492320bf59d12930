"""Notebook widgets and progress displays (ipywidgets is imported only when needed)."""

from __future__ import annotations

from emdsl.widgets.text import TextMonitor

__all__ = ["TextMonitor", "auto_monitor"]


def auto_monitor() -> TextMonitor:
    """The monitor for ``fit(monitor=True)``: a text line outside a notebook frontend."""
    return TextMonitor()
