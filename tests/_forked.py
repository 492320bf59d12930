"""Run a test's work in a forked child, so that a crash in native code becomes a recorded outcome."""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


#: seconds a child may run: a fuzz case is small, so one that takes longer hangs (an endless loop)
TIMEOUT = 120


def in_child(work: Callable[[], T], on_error: Callable[[BaseException], T], on_crash: Callable[[str], T],
             timeout: int = TIMEOUT) -> T:
    """``work()`` in a forked child, its result pickled back through a pipe.

    An exception in the child becomes ``on_error(error)`` (whatever happens must reach the
    parent; the child never returns into pytest); a child that dies (killed by a signal,
    or silent) becomes ``on_crash("crash (signal N)")``, and one still running after
    ``timeout`` seconds ``on_crash("hang (no result within N s)")``.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        os.close(read)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # SIGALRM's default action ends the process
        signal.alarm(timeout)
        try:
            payload = pickle.dumps(work())
        except BaseException as error:  # noqa: BLE001 - whatever happens must reach the parent
            payload = pickle.dumps(on_error(error))
        with os.fdopen(write, "wb") as out:
            out.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as source:
        payload = source.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return on_crash(f"hang (no result within {timeout} s)")
    if os.WIFSIGNALED(status) or not payload:
        return on_crash(f"crash (signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else '?'})")
    return pickle.loads(payload)
