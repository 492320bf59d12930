"""Block sources (DESIGN.md §3, "Data source"): where the engine's rows come from.

In-memory data are numpy arrays, read block by block in place. Dask-backed data (a
Dataset opened with ``xr.open_zarr``, ``open_mfdataset(chunks=...)`` or ``.chunk()``)
stay lazy: the compiler keeps the dask arrays as the nodes' sources, every scan over
the data (validation, units, log h, seeding) is one dask computation, and each EM
iteration is one dask computation whose per-chunk summaries are tree-summed
(:mod:`emdsl.data.dask_source`, :mod:`emdsl.engine.chunked`). Nothing here imports dask
unless the data are dask-backed.
"""

from __future__ import annotations

import sys
from typing import Any


def is_dask(array: Any) -> bool:
    """Whether ``array`` is a dask array (without importing dask when it is not loaded)."""
    if "dask.array" not in sys.modules:
        return False
    import dask.array as da

    return isinstance(array, da.Array)


def is_chunked(plan: Any) -> bool:
    """Whether a plan's data are dask-backed (the compiler then makes every array of it dask)."""
    arrays = [a for node in plan.nodes for a in (*node.sources, *node.aux.values())] + [plan.weights]
    return any(is_dask(array) for array in arrays)


__all__ = ["is_chunked", "is_dask"]
