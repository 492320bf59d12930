"""Dask chunks as a block source: lazy node sources, one-pass scans, per-chunk plans.

The compiler keeps a dask-backed variable as a dask array of shape (N, d) — never
``.values`` — whose chunks along the sample dimension are the blocks the engine
works on. Rules, chosen so that every chunk is a self-contained piece of the data:

* **A chunk holds whole events.** The dims besides the sample dim (a multivariate
  event, a Normal's extra dims) are rechunked into one chunk each, automatically: a
  chunk that split an event could not compute that event's statistics. Only the
  sample dimension's chunking is the user's (``ds.chunk({"sample": 1_000_000})``).
* **Every array of a plan shares one chunking** along the sample dimension: that of
  the first observed variable. Other variables, the weights and a family's extra data
  (e.g. Binomial's trials) are rechunked to it, and in-memory arrays are wrapped.
* **Every scan is one dask computation**: each chunk reduces to a few numbers per
  element (counts, extremes, moments, the first offending position), which are
  tree-combined; only those travel.

:func:`local_plan` turns the numpy blocks of one chunk (as a dask task sees them) into
an ordinary :class:`~emdsl.compile.Plan` over that chunk, which the in-memory E-step
runs unchanged (:mod:`emdsl.engine.chunked`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: what one 2-D array of a plan's layout is: ("source", node, j), ("aux", node, key), ("weights",)
Slot = tuple[Any, ...]


def _dask():  # noqa: ANN202 (module)
    import dask
    import dask.array

    return dask


# -- sources ----------------------------------------------------------------------------
def values_of(data: Any) -> Any:
    """An xarray variable's data as (N, ...) — a dask array (whole events per chunk) or numpy."""
    from emdsl.data import is_dask

    array = getattr(data, "data", data)
    if is_dask(array):
        return array.rechunk({axis: -1 for axis in range(1, array.ndim)}) if array.ndim > 1 else array
    if (hasattr(array, "isna") and hasattr(array, "to_numpy") and getattr(array.dtype, "kind", "O") in "iufb"
            and bool(np.asarray(array.isna()).any())):
        # a pandas nullable array (boolean, Int64, Float64) with pd.NA: numbers, NA a missing value (NaN)
        return array.to_numpy(dtype=float, na_value=np.nan)
    return np.asarray(data.values if hasattr(data, "values") else data)


def as_rows(array: Any, chunks: tuple[int, ...]) -> Any:
    """``array`` (N, ...) as a dask array with sample ``chunks`` and one chunk along every other axis."""
    da = _dask().array
    if not isinstance(array, da.Array):
        return da.from_array(np.asarray(array), chunks=(chunks,) + tuple(-1 for _ in range(np.ndim(array) - 1)))
    wanted = {0: chunks, **{axis: -1 for axis in range(1, array.ndim)}}
    return array if array.chunks[0] == chunks and all(len(c) == 1 for c in array.chunks[1:]) \
        else array.rechunk(wanted)


def align(plan: Any) -> None:
    """Give every array of a dask-backed plan the sample chunks of its first dask source."""
    from emdsl.data import is_dask

    arrays = [a for node in plan.nodes for a in (*node.sources, *node.aux.values())] + [plan.weights]
    chunks = next(array.chunks[0] for array in arrays if is_dask(array))
    for node in plan.nodes:
        node.sources = [as_rows(source, chunks) for source in node.sources]
        node.aux = {key: as_rows(value, chunks) for key, value in node.aux.items()}
    if plan.weights is not None:
        plan.weights = as_rows(plan.weights, chunks)


def sample_chunks(plan: Any) -> tuple[int, ...]:
    """The sample dimension's chunks shared by every array of a dask-backed plan."""
    return tuple(plan.nodes[0].sources[0].chunks[0])


def describe_chunk(chunks: Sequence[int], row: int, dim: Hashable = "sample") -> str:
    """``chunk 3 of 10 along 'sample' (rows 2000–2999)``: where a global row sits."""
    bounds = np.cumsum((0,) + tuple(chunks))
    i = int(np.searchsorted(bounds, row, side="right") - 1)
    return f"chunk {i} of {len(chunks)} along {dim!r} (rows {int(bounds[i])}–{int(bounds[i + 1]) - 1})"


# -- scans --------------------------------------------------------------------------------
def _tree(parts: list[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Combine delayed parts pairwise, in a tree of depth log2(len(parts))."""
    delayed = _dask().delayed
    while len(parts) > 1:
        parts = [delayed(combine, pure=True)(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def chunk_blocks(arrays: Sequence[Any]) -> tuple[list[int], list[list[Any]]]:
    """Each chunk's start row and delayed blocks, for arrays sharing their sample chunks."""
    first = arrays[0]
    chunks = first.chunks[0]
    blocks = []
    for array in arrays:
        array = as_rows(array, chunks)
        blocks.append(list(array.to_delayed().reshape(len(chunks))))
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int).tolist()
    return starts, [[column[i] for column in blocks] for i in range(len(chunks))]


def scan(arrays: Sequence[Any], fn: Callable[..., T], combine: Callable[[T, T], T], *also: Any) -> Any:
    """``fn(start, *blocks)`` on every chunk, tree-combined: one dask computation.

    With ``also`` (other lazy values), computed in the same pass: returns the tuple
    (the scan's result, *those values).
    """
    dask = _dask()
    starts, blocks = chunk_blocks(arrays)
    parts = [dask.delayed(fn, pure=True)(start, *chunk) for start, chunk in zip(starts, blocks, strict=True)]
    computed = dask.compute(_tree(parts, combine), *also)
    return computed if also else computed[0]


def _first_bad(predicate: Callable[[np.ndarray], np.ndarray], start: int, block: np.ndarray
               ) -> tuple[int, int]:
    """(count, first global flat index in the (N, d) layout, or −1) of the elements ``predicate`` flags."""
    bad = predicate(np.asarray(block))
    count = int(bad.sum())
    if not count:
        return 0, -1
    width = bad.shape[1] if bad.ndim > 1 else 1
    return count, start * width + int(np.flatnonzero(bad.ravel())[0])


def _add_first(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    firsts = [f for f in (a[1], b[1]) if f >= 0]
    return a[0] + b[0], min(firsts) if firsts else -1


def first_bad(array: Any, predicate: Callable[[np.ndarray], np.ndarray]) -> tuple[int, int]:
    """How many elements of ``array`` (N, d) the predicate flags, and the first one's flat index (−1: none)."""
    return scan([array], functools.partial(_first_bad, predicate), _add_first)


def _nonfinite_or_negative(x: np.ndarray) -> np.ndarray:
    return ~np.isfinite(x) | (x < 0)


def _not_count(x: np.ndarray) -> np.ndarray:
    return ~np.isfinite(x) | (x < 0) | (x != np.round(x))


def check_weights(values: Any) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """One pass over dask weights: (non-finite count, first), (negative count, first), any nonzero."""
    def part(start: int, block: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], bool]:
        block = np.asarray(block, dtype=float)
        return (_first_bad(lambda x: ~np.isfinite(x), start, block),
                _first_bad(lambda x: x < 0, start, block), bool(np.any(block != 0)))

    def combine(a: Any, b: Any) -> Any:
        return _add_first(a[0], b[0]), _add_first(a[1], b[1]), a[2] or b[2]

    return scan([values], part, combine)


def check_counts(values: Any) -> tuple[int, int]:
    """One pass: elements that are not non-negative integers (NaN included), and the first one."""
    return first_bad(values, _not_count)


# -- per-node scans of the compiler -------------------------------------------------------
@dataclasses.dataclass
class ValueCheck:
    """What one pass over a node's sources found, per source: ±inf, outside the support, NaN."""

    infinite: list[tuple[int, int]]
    outside: list[tuple[int, int]]
    advice: list[str | None]
    missing: list[bool]
    #: stacked event families: per column (count, first row) of events outside the support
    events: list[tuple[int, int]] | None = None
    event_advice: str | None = None


def _value_block(family: Any, widths: list[int], aux_keys: list[str], stacked_event: bool,
                 start: int, *blocks: np.ndarray) -> ValueCheck:
    sources = [np.asarray(b) for b in blocks[:len(widths)]]
    aux_all = dict(zip(aux_keys, (np.asarray(b, dtype=float) for b in blocks[len(widths):]), strict=True))
    check = ValueCheck([], [], [], [])
    if stacked_event:
        found = family.outside_support(np.hstack([s.astype(float) for s in sources]), aux_all)
        check.events = []
        for column in range(len(widths)):
            if found is not None and found[0][:, column].any():
                rows = np.flatnonzero(found[0][:, column])
                check.events.append((len(rows), start + int(rows[0])))
                check.event_advice = found[1]
            else:
                check.events.append((0, -1))
    row = 0
    for source, width in zip(sources, widths, strict=True):
        floating = source.dtype.kind == "f"
        check.infinite.append(_first_bad(np.isinf, start, source) if floating else (0, -1))
        check.missing.append(bool(floating and np.isnan(source).any()))
        aux = {key: value[:, row:row + width] for key, value in aux_all.items()}
        found = None if stacked_event else family.outside_support(source.astype(float), aux)
        if found is not None and found[0].any():
            check.outside.append(_first_bad(lambda _: found[0], start, source))
            check.advice.append(found[1])
        else:
            check.outside.append((0, -1))
            check.advice.append(None)
        row += width
    return check


def _value_combine(a: ValueCheck, b: ValueCheck) -> ValueCheck:
    out = ValueCheck([_add_first(x, y) for x, y in zip(a.infinite, b.infinite, strict=True)],
                     [_add_first(x, y) for x, y in zip(a.outside, b.outside, strict=True)],
                     [x or y for x, y in zip(a.advice, b.advice, strict=True)],
                     [x or y for x, y in zip(a.missing, b.missing, strict=True)])
    if a.events is not None and b.events is not None:
        out.events = [_add_first(x, y) for x, y in zip(a.events, b.events, strict=True)]
        out.event_advice = a.event_advice or b.event_advice
    return out


def _blocked(part: Callable[..., T], combine: Callable[[T, T], T], start: int, *blocks: np.ndarray) -> T:
    """``part`` over sub-blocks of a chunk, combined: a scan's memory is bounded by a block, not a chunk."""
    from emdsl.compile import SCAN_ROWS

    n = len(blocks[0])
    out = None
    for a in range(0, max(n, 1), SCAN_ROWS):
        piece = part(start + a, *(np.asarray(b)[a:a + SCAN_ROWS] for b in blocks))
        out = piece if out is None else combine(out, piece)
    return out


def _value_part(family: Any, widths: list[int], aux_keys: list[str], stacked_event: bool,
                start: int, *blocks: np.ndarray) -> ValueCheck:
    part = functools.partial(_value_block, family, widths, aux_keys, stacked_event)
    return _blocked(part, _value_combine, start, *blocks)


def _moments_part(weighted: bool, start: int, *blocks: np.ndarray) -> Moments:
    return _blocked(functools.partial(_moments_block, weighted), _moments_combine, start, *blocks)


def check_values(node: Any, weights: Any = None) -> tuple[ValueCheck, Moments]:
    """One pass over a node's sources: ±inf, values outside the support and holes, per source; and
    in the same pass the per-element moments that the compiler's units need (:class:`Moments`,
    weighted by ``weights`` when given), so that a standardized node costs no pass of its own."""
    widths = [int(s.shape[1]) for s in node.sources]
    keys = list(node.aux)
    stacked_event = bool(node.family.multivariate and node.stacked)
    part = functools.partial(_values_and_moments, node.family, widths, keys, stacked_event, weights is not None)
    arrays = [*node.sources, *(node.aux[k] for k in keys), *([] if weights is None else [weights])]
    return scan(arrays, part, _both_combine)


def _values_and_moments(family: Any, widths: list[int], aux_keys: list[str], stacked_event: bool, weighted: bool,
                        start: int, *blocks: np.ndarray) -> tuple[ValueCheck, Moments]:
    n_values = len(widths) + len(aux_keys)
    check = _value_part(family, widths, aux_keys, stacked_event, start, *blocks[:n_values])
    with np.errstate(all="ignore"):  # ±inf in the values is reported by the check, not here
        found = _moments_part(weighted, start, *blocks[:len(widths)], *blocks[n_values:])
    return check, found


def _both_combine(a: tuple[ValueCheck, Moments], b: tuple[ValueCheck, Moments]) -> tuple[ValueCheck, Moments]:
    with np.errstate(all="ignore"):
        return _value_combine(a[0], b[0]), _moments_combine(a[1], b[1])


@dataclasses.dataclass
class Moments:
    """Per element: count, extremes, and mean and Σ squared deviations in units of ``magnitude``.

    ``mass`` is Σ w over the observed values with weights (the count without); the mean and
    the squared deviations are weighted by them.
    """

    count: np.ndarray
    low: np.ndarray
    high: np.ndarray
    magnitude: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    mass: np.ndarray


def _moments_block(weighted: bool, start: int, *blocks: np.ndarray) -> Moments:
    if weighted:
        *blocks, w = blocks
    x = np.hstack([np.asarray(b, dtype=float) for b in blocks])
    observed = ~np.isnan(x)
    count = observed.sum(axis=0).astype(float)
    w = np.asarray(w, dtype=float)[:, None] if weighted else np.ones((len(x), 1))
    mass = np.where(observed, w, 0.0).sum(axis=0) if weighted else count
    low = np.min(np.where(observed, x, np.inf), axis=0)
    high = np.max(np.where(observed, x, -np.inf), axis=0)
    magnitude = np.where(count > 0, np.maximum(np.abs(low), np.abs(high)), 0.0)
    # Each chunk in units of its own largest magnitude: |x / u| ≤ 1, nothing overflows.
    unit = np.where(magnitude > 0, magnitude, 1.0)
    scaled = x / unit
    mean = np.nansum(scaled * w, axis=0) / np.where(mass > 0, mass, 1.0)
    m2 = np.nansum((scaled - mean) ** 2 * w, axis=0)
    return Moments(count, low, high, magnitude, mean, m2, mass)


def _moments_combine(a: Moments, b: Moments) -> Moments:
    """Chan, Golub & LeVeque's parallel update (on the masses), after bringing both parts to the larger unit."""
    magnitude = np.maximum(a.magnitude, b.magnitude)
    unit = np.where(magnitude > 0, magnitude, 1.0)
    fa = np.where(a.magnitude > 0, a.magnitude / unit, 0.0)
    fb = np.where(b.magnitude > 0, b.magnitude / unit, 0.0)
    mean_a, mean_b = a.mean * fa, b.mean * fb
    mass = a.mass + b.mass
    safe = np.where(mass > 0, mass, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (b.mass / safe)
    m2 = a.m2 * fa**2 + b.m2 * fb**2 + delta**2 * (a.mass * (b.mass / safe))
    return Moments(a.count + b.count, np.minimum(a.low, b.low), np.maximum(a.high, b.high), magnitude, mean, m2,
                   mass)


def _pattern_part(start: int, *blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    missing = np.hstack([np.isnan(np.asarray(b, dtype=float)) for b in blocks])
    partial = missing.any(axis=1) & ~missing.all(axis=1)
    rows = np.flatnonzero(partial)
    return rows + start, ~missing[rows]


def _concat(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def partial_rows(node: Any) -> tuple[np.ndarray, np.ndarray]:
    """One pass: the rows whose event is partly observed (sorted) and their observed masks."""
    return scan(list(node.sources), _pattern_part, _concat)


def local_patterns(node: Any) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's partly observed rows (local) and the index of their pattern in ``node.patterns``.

    A node whose family works row by row (a GLM, a concomitant's logit: ``row_by_row``) has
    one pattern, and its rows are those whose first column (the response) is observed.
    """
    if getattr(node.family, "row_by_row", False):
        rows = np.flatnonzero(~np.isnan(np.asarray(node.sources[0][:, 0], dtype=float))).astype(np.intp)
        return rows, np.zeros(len(rows), dtype=np.intp)
    rows, observed = _pattern_part(0, *node.sources)
    if not len(rows):
        return rows, np.zeros(0, dtype=np.intp)
    lookup = {pattern.tobytes(): g for g, pattern in enumerate(node.patterns)}
    keys, inverse = np.unique(observed, axis=0, return_inverse=True)
    index = np.array([lookup[key.tobytes()] for key in keys], dtype=np.intp)
    return rows, index[inverse.ravel()]


def far_values(node: Any, center: np.ndarray, scale: np.ndarray, limit: float
               ) -> tuple[int, int, float, float]:
    """One pass: values beyond ``limit`` standard deviations: (count, first flat index, value, distance)."""
    def part(start: int, *blocks: np.ndarray) -> tuple[int, int, float, float]:
        x = np.hstack([np.asarray(b, dtype=float) for b in blocks])
        distance = np.abs(x / 2 - center / 2) / (scale / 2)
        far = distance > limit
        if not far.any():
            return 0, -1, 0.0, 0.0
        first = int(np.flatnonzero(far.ravel())[0])
        return int(far.sum()), start * x.shape[1] + first, float(x.flat[first]), float(distance.flat[first])

    def combine(a: Any, b: Any) -> Any:
        first = a if a[1] >= 0 and (b[1] < 0 or a[1] <= b[1]) else b
        return (a[0] + b[0],) + tuple(first[1:])

    return scan(list(node.sources), part, combine)


# -- categorical labels -------------------------------------------------------------------
def _missing(values: np.ndarray) -> np.ndarray:
    import pandas as pd

    return np.asarray(pd.isna(values), dtype=bool)


def _unique_labels(tidy: Callable[[Any], Any], start: int, *blocks: np.ndarray) -> set:
    import pandas as pd

    found: set = set()
    for block in blocks:
        values = np.asarray(block).ravel()
        present = values[~_missing(values)] if values.dtype.kind in "fOM" else values
        found.update(tidy(v) for v in pd.unique(present.astype(object) if present.dtype.kind == "O" else present))
    return found


def _union(a: set, b: set) -> set:
    return a | b


def unique_labels(arrays: Sequence[Any], tidy: Callable[[Any], Any]) -> set:
    """One pass: the distinct present labels of dask label arrays (tidied)."""
    return scan(list(arrays), functools.partial(_unique_labels, tidy), _union)


def _encode_block(lookup: dict, tidy: Callable[[Any], Any], block: np.ndarray) -> np.ndarray:
    import pandas as pd

    values = np.asarray(block)
    out = np.full(values.shape, np.nan)
    present = ~_missing(values) if values.dtype.kind in "fOM" else np.ones(values.shape, dtype=bool)
    codes, uniques = pd.factorize(values[present].astype(object) if values.dtype.kind == "O" else values[present])
    mapped = np.array([lookup.get(tidy(v), np.nan) for v in uniques] + [np.nan], dtype=float)
    out[present] = mapped[codes]
    return out


def encode(array: Any, lookup: dict, tidy: Callable[[Any], Any]) -> Any:
    """Labels → float level codes (NaN: missing or unknown), lazily, chunk by chunk."""
    return array.map_blocks(functools.partial(_encode_block, lookup, tidy), dtype=float,
                            meta=np.empty((0,) * array.ndim))


def _unknown_part(lookup: dict, tidy: Callable[[Any], Any], start: int, block: np.ndarray
                  ) -> tuple[int, int, Any]:
    values = np.asarray(block)
    codes = _encode_block(lookup, tidy, values)
    present = ~_missing(values) if values.dtype.kind in "fOM" else np.ones(values.shape, dtype=bool)
    unknown = present & np.isnan(codes)
    if not unknown.any():
        return 0, -1, None
    first = int(np.flatnonzero(unknown.ravel())[0])
    width = values.shape[1] if values.ndim > 1 else 1
    return int(unknown.sum()), start * width + first, tidy(values.ravel()[first])


def unknown_labels(array: Any, lookup: dict, tidy: Callable[[Any], Any]) -> tuple[int, int, Any]:
    """One pass: labels that are not levels: (count, first flat index, first label)."""
    def combine(a: Any, b: Any) -> Any:
        first = a if a[1] >= 0 and (b[1] < 0 or a[1] <= b[1]) else b
        return a[0] + b[0], first[1], first[2]

    return scan([array], functools.partial(_unknown_part, lookup, tidy), combine)


# -- plans over one chunk ---------------------------------------------------------------------
def layout(plan: Any) -> tuple[list[Slot], list[Any]]:
    """The plan's arrays as 2-D dask arrays (sample chunks shared) and what each one is."""
    slots: list[Slot] = []
    arrays: list[Any] = []
    for i, node in enumerate(plan.nodes):
        for j, source in enumerate(node.sources):
            slots.append(("source", i, j))
            arrays.append(source)
        for key, value in node.aux.items():
            slots.append(("aux", i, key))
            arrays.append(value)
    if plan.weights is not None:
        slots.append(("weights",))
        arrays.append(plan.weights[:, None])
    if plan.clamp is not None:
        slots.append(("clamp",))
        known = np.asarray(plan.clamp)  # one column per latent when there are several
        arrays.append(as_rows(known.reshape(len(known), -1), sample_chunks(plan)))
    return slots, arrays


def skeleton(plan: Any) -> Any:
    """The plan without its data (small, picklable): what every chunk's task receives."""
    nodes = [dataclasses.replace(node, sources=[], aux={}) for node in plan.nodes]
    for node in nodes:
        node.partial_rows = np.zeros(0, dtype=np.intp)
        node.partial_pattern = np.zeros(0, dtype=np.intp)
        if getattr(node.family, "design", None) is not None:  # a regression's design: for its M-step only
            node.family = copy.copy(node.family)
            node.family.design = None
    return dataclasses.replace(plan, sample_coords={}, nodes=nodes, weights=None, clamp=None)


def local_plan(skeleton_plan: Any, slots: Sequence[Slot], blocks: Sequence[np.ndarray], offset: int = 0) -> Any:
    """An in-memory plan over one chunk, from that chunk's numpy blocks (one per slot).

    ``offset`` is the chunk's first global row: a Markov latent's chunk holds whole
    sequences, whose layout it takes from the skeleton's (``Sequences.within``).
    """
    sources: dict[int, dict[int, np.ndarray]] = {}
    aux: dict[int, dict[str, np.ndarray]] = {}
    weights = clamp = None
    n = None
    for slot, block in zip(slots, blocks, strict=True):
        block = np.asarray(block)
        n = len(block)
        if slot[0] == "source":
            sources.setdefault(slot[1], {})[slot[2]] = block
        elif slot[0] == "aux":
            aux.setdefault(slot[1], {})[slot[2]] = block
        elif slot[0] == "weights":
            weights = np.ascontiguousarray(block[:, 0], dtype=float)
        else:
            clamp = np.ascontiguousarray(block[:, 0] if block.shape[1] == 1 else block, dtype=np.intp)
    nodes = []
    for i, node in enumerate(skeleton_plan.nodes):
        local = dataclasses.replace(node, sources=[sources[i][j] for j in range(len(sources[i]))],
                                    aux=dict(aux.get(i, {})))
        if node.patterns:
            local.partial_rows, local.partial_pattern = local_patterns(local)
        nodes.append(local)
    plan = dataclasses.replace(skeleton_plan, n_samples=int(n or 0), nodes=nodes, weights=weights, clamp=clamp)
    if plan.sequences is not None:
        plan.sequences = plan.sequences.within(offset, offset + plan.n_samples)
    return plan


def _totals_part(skeleton_plan: Any, slots: Sequence[Slot], start: int, *blocks: np.ndarray
                 ) -> tuple[float, np.ndarray]:
    from emdsl.compile import SCAN_ROWS

    plan = local_plan(skeleton_plan, slots, blocks, start)
    log_base, magnitude = 0.0, np.zeros(plan.n_stats)
    for a in range(0, plan.n_samples, SCAN_ROWS):  # blocks: memory bounded by the block, not the chunk
        b = min(a + SCAN_ROWS, plan.n_samples)
        part = plan.log_base_measure(a, b)
        phi = np.empty((plan.n_stats, b - a))
        plan.read(a, b, phi, np.empty(plan.max_D * (b - a)))
        np.abs(phi, out=phi)
        if plan.weights is None:
            log_base += float(part.sum())
            magnitude += phi.sum(axis=1)
        else:
            log_base += float(part @ plan.weights[a:b])
            magnitude += phi @ plan.weights[a:b]
    return log_base, magnitude


def _add_totals(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> tuple[float, np.ndarray]:
    return a[0] + b[0], a[1] + b[1]


def plan_totals(plan: Any) -> tuple[float, np.ndarray]:
    """One pass: Σ_n w_n log h(x_n) and Σ_n w_n |Φ_sn| (S,) of a dask-backed plan."""
    slots, arrays = layout(plan)
    return scan(arrays, functools.partial(_totals_part, skeleton(plan), slots), _add_totals)


# -- a Markov latent: every chunk holds whole sequences ------------------------------------------
def chain_layout(arrays: dict[Hashable, Any], observed: Sequence[Hashable], n_sequences: int, T: int,
                 n_sequence_dims: int, dim: Hashable, where: str) -> tuple[dict[Hashable, Any], np.ndarray]:
    """The data of a Markov latent as lazy rows, each chunk a run of whole sequences.

    ``arrays`` maps each variable to its data over (sequence dims..., ``dim``, event dims...)
    (dask or numpy); a sequence's length is judged on the ``observed`` ones. The forward–backward recursion runs along a whole sequence, so a
    chunk must hold whole sequences: the chunks along the *first* sequence dim are the
    user's (``ds.chunk({"sequence": 100})``), every other sequence dim, the markov dim
    and the event dims become one chunk each. Chunks along the markov dim are merged with
    a warning (a chunk then holds its sequences' every step: chunk along the sequences
    instead); one sequence chunked along time becomes one chunk. Returns each variable as
    a dask array of rows (Σ lengths, event...) over sequences laid out as in memory (each
    one's steps up to its last observed one, consecutive) and every sequence's length
    (one pass over the data).
    """
    import warnings

    da = _dask().array
    if not n_sequence_dims:  # one sequence: a sequence axis of size 1
        arrays = {name: (value[None] if isinstance(value, da.Array) else np.asarray(value)[None])
                  for name, value in arrays.items()}
    axis_t = max(n_sequence_dims, 1)
    lazy = [value for value in arrays.values() if isinstance(value, da.Array)]
    if any(len(value.chunks[axis_t]) > 1 for value in lazy):
        advice = (f"chunk along the sequence dims instead (and ds.chunk({{{dim!r}: -1}}))" if n_sequence_dims
                  else "the data are one sequence, which is one chunk")
        warnings.warn(f"{where}: the data are chunked along the markov dimension {dim!r}; a chunk must hold whole "
                      f"sequences, so those chunks are merged (each chunk then holds every step of its "
                      f"sequences): {advice}", UserWarning, stacklevel=4)
    reference = lazy[0]
    sequence_chunks = reference.chunks[0]
    inner = int(np.prod(reference.shape[1:axis_t], dtype=np.int64))
    seq_chunks = tuple(int(c) * inner for c in sequence_chunks)  # sequences per chunk, inner dims flattened
    out: dict[Hashable, Any] = {}
    for name, value in arrays.items():
        if isinstance(value, da.Array):
            value = value.rechunk({0: sequence_chunks, **{axis: -1 for axis in range(1, value.ndim)}})
        else:
            value = da.from_array(value, chunks=(sequence_chunks,) + tuple(-1 for _ in range(value.ndim - 1)))
        out[name] = value.reshape((n_sequences, T) + value.shape[axis_t + 1:])
        out[name] = out[name].rechunk({0: seq_chunks})  # no-op: the merged leading axes keep their chunks
    names = list(out)
    grids = [out[name] for name in names]
    judged = [out[name] for name in dict.fromkeys(observed)]
    lengths_parts = [_dask().delayed(_chain_lengths, pure=True)(*blocks)
                     for blocks in zip(*(list(g.to_delayed().reshape(len(g.chunks[0]))) for g in judged), strict=True)]
    lengths = np.concatenate(_dask().compute(*lengths_parts)).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(seq_chunks)])
    for name, grid in zip(names, grids, strict=True):
        pieces = []
        for i, block in enumerate(grid.to_delayed().reshape(len(grid.chunks[0]))):
            mine = lengths[bounds[i]:bounds[i + 1]]
            rows = int(mine.sum())
            task = _dask().delayed(_trim_chain, pure=True)(block, mine)
            pieces.append(da.from_delayed(task, shape=(rows,) + grid.shape[2:], dtype=grid.dtype))
        out[name] = da.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]
    return out, lengths


def _chain_lengths(*grids: np.ndarray) -> np.ndarray:
    """Each sequence's length (its last observed step + 1; 0: nothing observed) in one chunk (c, T, ...)."""
    present = None
    for grid in grids:
        values = np.asarray(grid)
        flat = values.reshape(values.shape[:2] + (-1,))
        if flat.dtype.kind == "f":
            observed = ~np.isnan(flat)
        elif flat.dtype.kind == "O":
            observed = ~_missing(flat)
        else:
            observed = np.ones(flat.shape, dtype=bool)
        observed = observed.any(axis=2)
        present = observed if present is None else present | observed
    assert present is not None
    T = present.shape[1]
    return np.where(present.any(axis=1), T - np.argmax(present[:, ::-1], axis=1), 0)


def _trim_chain(grid: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A chunk's (c, T, ...) data as rows: each sequence's steps up to its length, consecutive."""
    values = np.asarray(grid)
    keep = np.arange(values.shape[1])[None, :] < lengths[:, None]
    return values[keep]


def _statistics_part(skeleton_plan: Any, slots: Sequence[Slot], start: int, *blocks: np.ndarray) -> np.ndarray:
    from emdsl.compile import SCAN_ROWS

    plan = local_plan(skeleton_plan, slots, blocks, start)
    total = np.zeros(plan.n_stats)
    for a in range(0, plan.n_samples, SCAN_ROWS):
        b = min(a + SCAN_ROWS, plan.n_samples)
        phi = np.empty((plan.n_stats, b - a))
        plan.read(a, b, phi, np.empty(plan.max_D * (b - a)))
        total += phi.sum(axis=1) if plan.weights is None else phi @ plan.weights[a:b]
    return total


def data_statistics(plan: Any) -> np.ndarray:
    """One pass: Σ_n w_n Φ_n (S,) of a dask-backed plan (what fit(prior="weak") scales its priors from)."""
    slots, arrays = layout(plan)
    return scan(arrays, functools.partial(_statistics_part, skeleton(plan), slots), np.add)
