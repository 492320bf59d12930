"""The compiled plan: the layout of Φ and H over the nodes, and scans of the data in blocks."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator
from functools import cached_property
from typing import Any

import numpy as np

from emdsl.data import is_chunked, is_dask
from emdsl.errors import ModelError
from emdsl.families._base import BoundPrior, LatentFamily, ObservedFamily, Params
from emdsl.latent import LatentStructure, Sequences
from emdsl.latent.joint import Given, JointCategorical
from emdsl.model import Model


#: rows per block when scanning data outside EM iterations (validation, units, log h, seeding)
SCAN_ROWS = 65536
#: bytes of one block of Φ (n_stats × rows) when scanning it outside EM iterations: SCAN_ROWS rows
#: of a full 20-D covariance's 231 statistics would take 121 MB, 4× the data of 2e5 × 20
SCAN_PHI_BYTES = 16 << 20


def phi_rows(n_stats: int) -> int:
    """Rows per block of a scan over Φ: :data:`SCAN_ROWS`, fewer when its n_stats rows would pass
    :data:`SCAN_PHI_BYTES`."""
    return max(256, min(SCAN_ROWS, SCAN_PHI_BYTES // (8 * max(n_stats, 1))))


@dataclasses.dataclass(eq=False)
class Node:
    """An observed node bound to data: where its rows sit in Φ, its units and its holes."""

    name: str
    family: ObservedFamily
    variables: tuple[str, ...]
    stacked: bool
    event_dims: tuple[Hashable, ...]
    event_shape: tuple[int, ...]
    event_coords: dict[Hashable, list]
    #: (N, d) arrays (views of the data where possible), in event order; NaN where missing
    sources: list[np.ndarray]
    center: np.ndarray
    scale: np.ndarray
    offset: int = 0
    held: Params = dataclasses.field(default_factory=dict)
    #: the node's conjugate prior in internal units (declared, or fit(prior="weak")'s), or None
    prior: BoundPrior | None = None
    #: extra data the family reads (e.g. Binomial's trials), each (N, D)
    aux: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: level labels of a categorical node (the codes in ``sources`` index them)
    levels: tuple[Any, ...] | None = None
    #: whether some element is missing somewhere (set by the compiler)
    has_missing: bool = False
    #: samples whose event is partly observed (sorted), their pattern's index, and the
    #: patterns (D booleans, True = observed): the conditional-Gaussian rows of an event family
    partial_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    partial_pattern: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    patterns: list[np.ndarray] = dataclasses.field(default_factory=list)
    #: the latents the node depends on when not all of them, or when there are several
    #: (its parameters have one row per state of that subset; see emdsl.latent.joint)
    given: Given | None = None

    @property
    def D(self) -> int:
        return int(np.prod(self.event_shape, dtype=int))

    @property
    def n_rows(self) -> int:
        return self.family.n_rows(self.D)

    @cached_property
    def inverse_scale(self) -> np.ndarray:
        return 1.0 / self.scale

    def where(self) -> str:
        if not self.stacked:
            return f"observe({self.variables[0]!r}, {self.family.kind})"
        if len(self.variables) <= 4:
            return f"observe({list(self.variables)!r}, {self.family.kind})"
        shown = ", ".join(map(repr, self.variables[:2]))
        return f"observe([{shown}, … {len(self.variables)} variables], {self.family.kind}, name={self.name!r})"

    def read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Write the node's data for samples [start, stop) into ``out`` (D × n), standardized; NaN = missing."""
        row = 0
        for source in self.sources:
            width = source.shape[1]
            rows = out[row:row + width]
            if self.family.standardize:
                np.subtract(source[start:stop].T, self.center[row:row + width, None], out=rows)
                rows *= self.inverse_scale[row:row + width, None]
            else:
                rows[...] = source[start:stop].T
            row += width

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The node's data for the given samples (D × len(rows)), standardized."""
        x = np.hstack([source[rows] for source in self.sources]).T.astype(float)
        if self.family.standardize:
            x = (x - self.center[:, None]) * self.inverse_scale[:, None]
        return x

    def find_patterns(self) -> None:
        """Group the samples whose event is partly observed by their pattern of holes."""
        if not (self.family.multivariate and hasattr(self.family, "patterns")):
            return
        if is_dask(self.sources[0]):  # one dask pass; a chunk's task finds its own rows again
            from emdsl.data import dask_source

            self.partial_rows, observed = dask_source.partial_rows(self)
            if len(self.partial_rows):
                keys, inverse = np.unique(observed, axis=0, return_inverse=True)
                self.patterns = list(keys)
                self.partial_pattern = inverse.ravel().astype(np.intp)
            return
        missing = np.hstack([np.isnan(np.asarray(s, dtype=float)) for s in self.sources])
        partial = missing.any(axis=1) & ~missing.all(axis=1)
        self.partial_rows = np.flatnonzero(partial)
        if len(self.partial_rows):
            keys, inverse = np.unique(~missing[self.partial_rows], axis=0, return_inverse=True)
            self.patterns = list(keys)
            self.partial_pattern = inverse.ravel().astype(np.intp)

    def read_aux(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The family's extra data for samples [start, stop), each (D × n)."""
        return {key: value[start:stop].T for key, value in self.aux.items()}


@dataclasses.dataclass(eq=False)
class LatentNode:
    """The latent variable of a plan."""

    name: str
    family: LatentFamily
    held: Params = dataclasses.field(default_factory=dict)
    #: the Dirichlet prior on the weights in internal form (declared, or fit(prior="weak")'s), or None
    prior: BoundPrior | None = None
    #: how its posterior is computed from the emissions: a mixture's softmax or a chain's forward–backward
    structure: LatentStructure | None = None


@dataclasses.dataclass(eq=False)
class Plan:
    """A model compiled against data: everything the engine needs, as plain arrays."""

    model: Model
    sample_dim: Hashable
    n_samples: int
    sample_coords: dict[Hashable, np.ndarray]
    latent: LatentNode | None
    nodes: list[Node]
    #: per-sample weights (N,), or None when every sample counts once
    weights: np.ndarray | None = None
    #: known latent state per sample (−1 = unknown), from a data variable named like the latent
    clamp: np.ndarray | None = None
    #: for a Markov latent: how the rows form sequences (each sequence's rows consecutive)
    sequences: Sequences | None = None
    #: precision of Φ, L, R and H in the E-step (``fit(dtype=...)``); sums are float64 either way
    dtype: Any = np.float64

    @property
    def K(self) -> int:
        """Number of components (1 when the model has no latent)."""
        return self.latent.family.k if self.latent is not None else 1

    @property
    def n_stats(self) -> int:
        """Rows of Φ: the constant row plus every node's rows."""
        return 1 + sum(node.n_rows for node in self.nodes)

    @property
    def max_D(self) -> int:
        """The widest node: the scratch rows a block needs to read one node's data."""
        return max(node.D for node in self.nodes)

    @property
    def total_weight(self) -> float:
        """Σ_n w_n: the effective number of samples (N when unweighted), as BIC counts them."""
        return float(self.n_samples if self.weights is None else self.weights.sum())

    def read(self, start: int, stop: int, out: np.ndarray, scratch: np.ndarray) -> None:
        """Fill Φ (n_stats × n) for samples [start, stop); ``scratch`` holds ≥ max_D × n floats."""
        out[0] = 1.0
        n = stop - start
        for node in self.nodes:
            x = scratch[:node.D * n].reshape(node.D, n)
            node.read(start, stop, x)
            node.family.statistics(x, out[node.offset:node.offset + node.n_rows], node.read_aux(start, stop))

    def log_base_measure(self, start: int, stop: int) -> np.ndarray:
        """Σ_v log h_v(x_n) over present elements for samples [start, stop), in the data's units."""
        total = np.zeros(stop - start)
        for node in self.nodes:
            x = np.empty((node.D, stop - start))
            node.read(start, stop, x)
            total += node.family.log_base_measure(x, node.read_aux(start, stop))
            if node.family.standardize:  # the Jacobian of the internal units
                total -= (~np.isnan(x) * np.log(node.scale)[:, None]).sum(axis=0)
        return total

    @cached_property
    def log_base_total(self) -> float:
        """Σ_n w_n Σ_v log h_v(x_n): constant over iterations, so computed once."""
        if is_chunked(self):
            return self._chunked_totals[0]
        total = 0.0
        for a, b in blocks(self.n_samples, SCAN_ROWS):
            part = self.log_base_measure(a, b)
            total += float(part.sum() if self.weights is None else part @ self.weights[a:b])
        return total

    @cached_property
    def phi_magnitude(self) -> np.ndarray:
        """Σ_n w_n |Φ_sn| (S,), then the latent's own columns: the size of the E-step's sums (rounding slack)."""
        out = np.zeros(self.n_stats)
        for a, b in blocks(self.n_samples, phi_rows(self.n_stats)) if not is_chunked(self) else ():
            phi = np.empty((self.n_stats, b - a))
            self.read(a, b, phi, np.empty(self.max_D * (b - a)))
            np.abs(phi, out=phi)
            out += phi.sum(axis=1) if self.weights is None else phi @ self.weights[a:b]
        if is_chunked(self):
            out = self._chunked_totals[1].copy()
        _check_sums(self, out)
        if self.latent is not None and self.latent.structure is not None and self.latent.structure.n_stats:
            out = np.concatenate([out, self.latent.structure.stats_magnitude(self)])
        return out

    @cached_property
    def _chunked_totals(self) -> tuple[float, np.ndarray]:
        """Σ w log h and Σ w |Φ| of dask-backed data, in one pass (both are needed by the first iteration)."""
        from emdsl.data import dask_source

        return dask_source.plan_totals(self)

    def n_free_params(self) -> int:
        """Number of learned scalars, for BIC and AIC."""
        latent = self.latent.family.n_free_params() if self.latent is not None else 0
        return latent + sum(node.family.n_free_params(self.components(node), node.D) for node in self.nodes)

    def components(self, node: Node) -> int:
        """Rows of a node's parameters: K, or the states of the latents it depends on."""
        return node.given.K if node.given is not None else self.K

    def component_label(self, node: Node | None, k: int) -> str:
        """``"component z='a'"`` for row k of a node's parameters (of the latent's states when node is None)."""
        if node is not None and node.given is not None:
            if not node.given.latents:
                return "the shared component"
            where = np.unravel_index(k, node.given.shape)
            return "component " + ", ".join(f"{name}={member.states[i]!r}" for (name, member), i
                                             in zip(node.given.latents, where, strict=True))
        if self.latent is None:
            return "the single component"
        family = self.latent.family
        if isinstance(family, JointCategorical):
            return "component " + ", ".join(f"{name}={member.states[i]!r}" for name, member, i
                                            in zip(family.names, family.members, family.unravel(k), strict=True))
        return f"component {self.latent.name}={family.states[k]!r}"

    def expand(self, node: Node, params: Params) -> Params:
        """A node's parameters with one row per joint state, as the E-step uses them."""
        return params if node.given is None else node.given.expand(params, node.family.param_axes())


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most ``size`` rows covering n rows."""
    for start in range(0, n, size):
        yield start, min(start + size, n)
_HUGE = np.finfo(float).max


def _check_sums(plan: Plan, magnitude: np.ndarray) -> None:
    """Refuse a node whose Σ_n w_n |Φ_sn| overflows: the E-step's sums R Φᵀ and H Φ would be ±inf or NaN.

    Families fitted in the data's units (Gamma, Exponential, counts) sum x itself over the
    samples, so values near 1e308 overflow even though each one is a float.
    """
    for node in plan.nodes:
        rows = magnitude[node.offset:node.offset + node.n_rows]
        if np.isfinite(rows).all():
            continue
        largest = max((float(np.nanmax(np.abs(np.where(np.isfinite(s), s, np.nan)), initial=0.0))
                       for _, _, s in _element_blocks(node)), default=0.0) if node.sources else 0.0
        total = plan.total_weight
        power = int(np.ceil(np.log10(max(largest, 1.0)) + np.log10(max(total, 1.0)) - 300))
        label = f"variable {node.variables[0]!r}" if len(node.variables) == 1 else f"variables {list(node.variables)!r}"
        raise ModelError(f"{node.where()}: {label} reaches {largest!r}, and summed over the {total:g} (weighted) "
                         f"samples its statistics overflow float64 (beyond {_HUGE:.4g}); {node.family.kind} works "
                         f"in the data's units: divide it by 1e{max(power, 1)}")


def _element_blocks(node: Node) -> Iterator[tuple[slice, int, np.ndarray]]:
    """(the node's elements, the first sample, float64 values (b × width)) over every source and block."""
    n = len(node.sources[0])
    row = 0
    for source in node.sources:
        width = source.shape[1]
        for a, b in blocks(n, SCAN_ROWS):
            yield slice(row, row + width), a, np.asarray(source[a:b], dtype=float)
        row += width
