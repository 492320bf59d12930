"""Global engine options, set like ``xarray.set_options``."""

from __future__ import annotations

from typing import Any

OPTIONS: dict[str, Any] = {
    "n_threads": None,  # worker threads over blocks; None: one per CPU when the work per row pays for it
    "block_rows": None,  # rows per block; None: chosen from the number of statistics
}


class set_options:  # noqa: N801 (used like a function, as in xarray)
    """Set engine options globally or, as a context manager, temporarily.

    Parameters
    ----------
    n_threads : int, optional
        Worker threads that share the blocks of an E-step (default: one per CPU,
        or one when each row carries little work, S·K < 64, where threads cost more
        than they save).
    block_rows : int, optional
        Samples per block; memory added by a fit grows with it (default: chosen so
        that one worker's block of statistics fits in 16 MB).

    Examples
    --------
    >>> import emdsl as em
    >>> with em.set_options(n_threads=1):
    ...     pass
    """

    def __init__(self, **kwargs: Any) -> None:
        self.old = {}
        for key, value in kwargs.items():
            if key not in OPTIONS:
                raise ValueError(f"unknown option {key!r}; options are {sorted(OPTIONS)}")
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"option {key!r} must be a positive integer or None, got {value!r}")
            self.old[key] = OPTIONS[key]
        OPTIONS.update(kwargs)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        OPTIONS.update(self.old)
