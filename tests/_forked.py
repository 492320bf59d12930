"""Run a test's work in a forked child, so that a crash in native code becomes a recorded outcome."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_child(work: Callable[[], T], on_error: Callable[[BaseException], T], on_crash: Callable[[str], T]) -> T:
    """``work()`` in a forked child, its result pickled back through a pipe.

    An exception in the child becomes ``on_error(error)`` (whatever happens must reach the
    parent; the child never returns into pytest); a child that dies (killed by a signal,
    or silent) becomes ``on_crash("crash (signal N)")``.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        os.close(read)
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
    if os.WIFSIGNALED(status) or not payload:
        return on_crash(f"crash (signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else '?'})")
    return pickle.loads(payload)
