"""Widget messages while a cell blocks the kernel: what lets a Stop button work mid-fit.

A fit runs inside one cell, so the kernel's event loop is blocked and a click on a
widget (a ``comm_msg``) waits in the kernel's queue until the cell ends — too late.
On ipykernel >= 7.1 the shell messages for the main thread wait on an inproc zmq
socket (shell channel thread -> main thread). :class:`CommPoller` reads that socket
between iterations, handles the ``comm_msg`` ones at once, and holds everything
else (the next cell's ``execute_request``, completions, ...) to hand back, in order,
through the kernel's own receive callback once the fit is over.

These are private ipykernel internals. Every access is guarded: outside a kernel,
off the kernel's main thread, or on a kernel laid out differently, the poller is
simply inactive — the Stop button is then handled after the cell, never an error.
tests/browser/test_jupyterlab.py clicks Stop in a live JupyterLab to catch a kernel
upgrade that changes the layout.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

#: messages taken off the socket that are not comm_msg, oldest first, with the callback to return them to
_held: list[tuple[Callable[[Any], Any], list[Any]]] = []
#: pollers between start() and stop()
_active: set[int] = set()
#: shells on which the end-of-cell safety net is registered
_guarded_shells: set[int] = set()


class _Route(NamedTuple):
    """Where the main thread's shell messages arrive, and how the kernel handles them."""

    socket: Any  # zmq PAIR socket the main thread reads
    receive: Callable[[Any], Any]  # the kernel's callback for that socket (returns a coroutine)
    session: Any  # jupyter_client Session: unpacks and checks signatures
    comm_msg: Callable[[Any, Any, Any], None]  # kernel.comm_manager.comm_msg(stream, idents, msg)
    shell: Any  # the IPython shell, for the end-of-cell safety net


def kernel_route() -> _Route | None:
    """The main thread's message route in a running ipykernel >= 7.1, or None."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
        kernel = getattr(shell, "kernel", None)
        if kernel is None:
            return None
        thread = kernel.shell_channel_thread
        # zmq sockets belong to one thread: only the thread that runs cells may read this one
        if threading.current_thread() is not thread.parent_thread:
            return None
        pair = thread.manager._shell_channel_to_main
        receive = pair.to_stream._recv_callback
        route = _Route(pair.to_socket, receive, kernel.session, kernel.comm_manager.comm_msg, shell)
    except Exception:  # an unknown kernel layout: no polling rather than an error
        log.debug("no comm polling: unknown kernel layout", exc_info=True)
        return None
    if route.socket is None or route.receive is None or route.session is None:
        return None
    return route


class CommPoller:
    """Handle widget (comm) messages while the current cell keeps the kernel busy.

    Parameters
    ----------
    interval : float, default 0.1
        Seconds between two looks at the socket (a look costs a few µs; ~10 Hz is
        quick enough for a click).

    Examples
    --------
    >>> poller = CommPoller()
    >>> poller.start()  # outside a kernel there is nothing to poll
    False
    >>> poller.poll()
    0
    >>> poller.stop()
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._route: _Route | None = None
        self._last = -float("inf")

    @property
    def active(self) -> bool:
        """Whether polling reaches a kernel (between :meth:`start` and :meth:`stop`)."""
        return self._route is not None

    def start(self) -> bool:
        """Find the kernel's message route; returns whether polling will do anything."""
        self._route = kernel_route()
        self._last = -float("inf")
        if self._route is not None:
            _active.add(id(self))
            _release_at_end_of_cell(self._route.shell)
        return self._route is not None

    def poll(self) -> int:
        """Handle the comm messages waiting now (at most every ``interval`` s); returns how many."""
        route = self._route
        if route is None:
            return 0
        now = time.perf_counter()
        if now - self._last < self.interval:
            return 0
        self._last = now
        handled = 0
        try:
            while route.socket.poll(0):
                frames = route.socket.recv_multipart(copy=False)
                if _is_comm_msg(route.session, frames):
                    _handle_comm_msg(route, frames)
                    handled += 1
                else:
                    _held.append((route.receive, frames))
        except Exception:  # the socket closed under us (kernel shutting down): stop polling
            log.debug("comm polling stopped", exc_info=True)
            self.stop()
        return handled

    def stop(self) -> None:
        """Stop polling; once no poller is left, hand the held messages back to the kernel."""
        _active.discard(id(self))
        self._route = None
        if not _active:
            release_held()


def _is_comm_msg(session: Any, frames: list[Any]) -> bool:
    try:
        _, parts = session.feed_identities(frames, copy=False)
        header = session.deserialize(parts, content=False, copy=False)["header"]
    except Exception:  # not a Jupyter message (e.g. the kernel's "stop aborting" marker)
        return False
    return header.get("msg_type") == "comm_msg"


def _handle_comm_msg(route: _Route, frames: list[Any]) -> None:
    try:
        idents, parts = route.session.feed_identities(frames, copy=False)
        msg = route.session.deserialize(parts, content=True, copy=False)
        # the stream argument is unused by the comm manager (replies go through the comm)
        route.comm_msg(None, idents, msg)
    except Exception:
        log.warning("a widget message could not be handled during the fit", exc_info=True)


def release_held() -> None:
    """Give the held messages back to the kernel, oldest first, as if just received.

    Each becomes a task queued on the kernel's shell lock, so they run after the
    current cell and before anything still waiting on the socket.
    """
    while _held:
        receive, frames = _held.pop(0)
        try:
            result = receive(frames)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)
        except Exception:
            log.error("a held kernel message could not be handed back", exc_info=True)


def _release_at_end_of_cell(shell: Any) -> None:
    """Hand held messages back when the cell ends, even if the fit raised before ``stop``."""
    if id(shell) in _guarded_shells:
        return
    try:
        shell.events.register("post_run_cell", _end_of_cell)
    except Exception:
        log.debug("no end-of-cell hook", exc_info=True)
        return
    _guarded_shells.add(id(shell))


def _end_of_cell(*_: Any) -> None:
    _active.clear()
    release_held()
