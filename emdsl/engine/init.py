"""Starting parameters θ⁽⁰⁾: from responsibilities (k-means++, random, given) or given values."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
from scipy.cluster.vq import kmeans2, vq

from emdsl import compile as compile_
from emdsl import labels
from emdsl.compile import SCAN_ROWS, Plan, blocks
from emdsl.data import is_chunked
from emdsl.engine.estep import EStep, Summary
from emdsl.engine.mstep import Theta, expected_complete_loglik, maximize, natural_matrix
from emdsl.errors import DegenerateComponentWarning, ModelError
from emdsl.latent.joint import JointCategorical


def initial_theta(plan: Plan, estep: EStep, init: Any, rng: np.random.Generator) -> tuple[Theta, float | None]:
    """θ⁽⁰⁾, and the ELBO of the responsibilities it came from (None when θ⁽⁰⁾ was given outright)."""
    if hasattr(init, "params") and hasattr(init, "model"):  # a previous Fit; fixed values stay fixed
        init = {name: {p: v for p, v in values.items() if p not in _held(plan, name)}
                for name, values in labels.tree_values(init.params).items()}
    if isinstance(init, xr.DataArray):
        resp = (_chain_responsibilities(plan, init) if plan.sequences is not None
                else compile_.responsibilities(plan, init))
        return _from_responsibilities(plan, estep, lambda a, b: resp[a:b].T)
    if isinstance(init, Mapping):
        given = compile_.start_values(plan, init)
        if _complete(plan, given):
            return {name: {**given.get(name, {}), **_held(plan, name)} for name in _names(plan)}, None
        hard = _nearest_given_mean(plan, given)
        if hard is None:
            hard = _kmeans_plusplus(plan, rng)
        return _from_responsibilities(plan, estep, _one_hot(plan.K, hard), hold=given)
    if isinstance(init, str) and init in ("kmeans++", "random") and _every_state_labelled(plan):
        # Semi-supervised: start from what the labels say (the supervised estimate from the
        # labelled samples alone) rather than from a clustering the labels may contradict.
        theta, _ = _from_responsibilities(plan, estep, _labelled_only(plan.K, plan.clamp))
        return theta, None
    if isinstance(init, str) and init == "kmeans++":
        return _from_responsibilities(plan, estep, _one_hot(plan.K, _kmeans_plusplus(plan, rng)))
    if isinstance(init, str) and init == "random":
        return _from_responsibilities(plan, estep, _random_responsibilities(plan.K, rng))
    raise ModelError(f"init: expected 'kmeans++', 'random', a DataArray of responsibilities, a mapping of "
                     f"starting values or a Fit, got {init!r}")


def _from_responsibilities(plan: Plan, estep: EStep, resp_of: Any,
                           hold: Mapping[str, Any] | None = None) -> tuple[Theta, float | None]:
    if plan.clamp is not None:
        resp_of = _with_known_states(plan.clamp, resp_of)
    summary: Summary = estep.statistics_from(resp_of)
    theta, _ = maximize(plan, summary.stats, None, hold)
    if plan.sequences is not None and plan.latent is not None:
        # Seeds (k-means++ labels, random responsibilities) ignore time, so their transition
        # counts say little: the chain starts sticky (DESIGN.md §2), unless values are given.
        name = plan.latent.name
        theta[name] = {**plan.latent.structure.default_params(), **(hold or {}).get(name, {}), **plan.latent.held}
    if any(len(node.partial_rows) for node in plan.nodes):
        return theta, None  # holes were filled without θ: those statistics make no ELBO
    elbo = expected_complete_loglik(natural_matrix(plan, theta), summary.stats) + plan.log_base_total
    return theta, elbo + summary.entropy


def _every_state_labelled(plan: Plan) -> bool:
    return plan.clamp is not None and bool(np.all(np.bincount(plan.clamp[plan.clamp >= 0], minlength=plan.K) > 0))


def _labelled_only(K: int, known: np.ndarray) -> Any:
    """Responsibilities that are the labels where known and nothing elsewhere."""
    def resp_of(start: int, stop: int) -> np.ndarray:
        resp = np.zeros((K, stop - start))
        labelled = np.flatnonzero(known[start:stop] >= 0)
        resp[known[start:stop][labelled], labelled] = 1.0
        return resp
    return resp_of


def _with_known_states(known: np.ndarray, resp_of: Any) -> Any:
    """Starting responsibilities with labelled samples set to their known state."""
    def clamped(start: int, stop: int) -> np.ndarray:
        resp = np.array(resp_of(start, stop), dtype=float)
        labelled = np.flatnonzero(known[start:stop] >= 0)
        resp[:, labelled] = 0.0
        resp[known[start:stop][labelled], labelled] = 1.0
        return resp
    return clamped


def _held(plan: Plan, name: str) -> dict[str, np.ndarray]:
    if plan.latent is not None and name == plan.latent.name:
        return plan.latent.held
    return next((node.held for node in plan.nodes if node.name == name), {})


def _names(plan: Plan) -> list[str]:
    return ([plan.latent.name] if plan.latent is not None else []) + [node.name for node in plan.nodes]


def _complete(plan: Plan, given: Mapping[str, Mapping[str, np.ndarray]]) -> bool:
    """Whether every parameter is either given or fixed, so θ⁽⁰⁾ needs no data."""
    families = [(node.name, node.family) for node in plan.nodes]
    if plan.latent is not None:
        families.append((plan.latent.name, plan.latent.family))
    return all(set(family.param_axes()) <= set(given.get(name, {})) | set(_held(plan, name))
               for name, family in families)


def _continuous(plan: Plan, nodes: list | None = None, rescale: bool = True) -> np.ndarray | None:
    """Seeding features of the continuous nodes, (N × D) — for seeding only.

    Each family maps its data (standardized, or in the data's units) to the space it seeds
    in (:meth:`~emdsl.families._base.ObservedFamily.seed_features`: log x for positive
    families); with ``rescale`` the features of families fitted in the data's units are then
    centred and scaled per element, so that k-means++ never sees values near 1e±300 (whose
    squared distances overflow) and no element outweighs the others by its units alone.
    """
    chosen = [node for node in (nodes if nodes is not None else plan.nodes) if node.family.continuous]
    if not chosen:
        return None
    z = np.empty((sum(node.D for node in chosen), plan.n_samples))
    for start, stop in blocks(plan.n_samples, SCAN_ROWS):
        row = 0
        for node in chosen:
            node.read(start, stop, z[row:row + node.D, start:stop])
            row += node.D
    return _seed_space(chosen, z, rescale).T


def _seed_space(chosen: list, z: np.ndarray, rescale: bool = True) -> np.ndarray:
    """The chosen nodes' data ``z`` (D × n, as read) as seeding features, in place; holes at 0."""
    row = 0
    for node in chosen:
        part = z[row:row + node.D]
        part[...] = node.family.seed_features(part)
        if rescale and not node.family.standardize:
            _centre_and_scale(part)
        row += node.D
    # A hole sits at the element's mean (0 in standardized units): seeding needs a point
    # for every sample, and the mean moves no seed towards or away from it.
    np.nan_to_num(z, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return z


def _centre_and_scale(rows: np.ndarray) -> None:
    """Each row (an element over the samples) centred and scaled to unit spread, in place; non-finite → NaN."""
    rows[~np.isfinite(rows)] = np.nan
    for values in rows:
        present = values[~np.isnan(values)]
        if not len(present):
            continue
        unit = float(np.abs(present).max()) or 1.0  # divided first: no square overflows or underflows
        centre = float(np.mean(present / unit))
        spread = float(np.sqrt(np.mean((present / unit - centre) ** 2)))
        values /= unit
        values -= centre
        if spread > 1e-12:
            values /= spread


def _kmeans_plusplus(plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """Each sample's nearest k-means++ seed (scipy), on the continuous nodes' seeding features."""
    if is_chunked(plan):  # dask-backed: seeded on a sample of rows, labels computed chunk by chunk
        from emdsl.engine import chunked

        chosen = [node for node in plan.nodes if node.family.continuous]
        return chunked.kmeans_plusplus(
            plan, rng, lambda z: _scipy_kmeans_plusplus(plan, _seed_space(chosen, np.array(z.T)).T, rng))
    if plan.K == 1:
        return np.zeros(plan.n_samples, dtype=np.intp)
    if isinstance(plan.latent.family, JointCategorical):
        return _kmeans_per_latent(plan, plan.latent.family, rng)
    z = _continuous(plan)
    if z is None:
        return np.argmax(rng.random((plan.n_samples, plan.K)), axis=1)
    return _scipy_kmeans_plusplus(plan, z, rng)


def _kmeans_per_latent(plan: Plan, joint: JointCategorical, rng: np.random.Generator) -> np.ndarray:
    """Several latents: each seeded by k-means++ on the nodes that depend on it alone (on every
    continuous node when none does); a sample's joint state combines its seeds' labels.

    Seeding the Π k joint states as one clustering would ignore that they form a product,
    and start far from any product-shaped optimum.
    """
    parts = []
    for name, member in zip(joint.names, joint.members, strict=True):
        own = [node for node in plan.nodes if node.given is not None and node.given.names == (name,)]
        z = _continuous(plan, own) if own else None
        z = _continuous(plan) if z is None else z
        if member.k == 1:
            parts.append(np.zeros(plan.n_samples, dtype=np.intp))
        elif z is None:
            parts.append(rng.integers(member.k, size=plan.n_samples))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # duplicated points: some states start empty
                parts.append(np.asarray(kmeans2(z, member.k, iter=1, minit="++", rng=rng)[1], dtype=np.intp))
    return np.ravel_multi_index(tuple(parts), joint.shape).astype(np.intp)


def _scipy_kmeans_plusplus(plan: Plan, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each row of ``z`` (N × D, standardized) labelled by its nearest k-means++ seed."""
    with warnings.catch_warnings(record=True) as caught:
        # Duplicated points can leave a seed without members (the M-step handles empty
        # components); with fewer distinct points than states, k-means++ divides 0 by 0.
        warnings.simplefilter("always")
        _, nearest = kmeans2(z, plan.K, iter=1, minit="++", rng=rng)
    if any(issubclass(w.category, RuntimeWarning) for w in caught):
        warnings.warn(f"init='kmeans++': the data have fewer distinct points than the {plan.K} states of "
                      f"{plan.latent.name!r}; some states start empty", DegenerateComponentWarning, stacklevel=5)
    return np.asarray(nearest, dtype=np.intp)


def _nearest_given_mean(plan: Plan, given: Mapping[str, Mapping[str, np.ndarray]]) -> np.ndarray | None:
    """Each sample's nearest given mean, over the continuous nodes whose means were given."""
    nodes = [node for node in plan.nodes if node.family.continuous and "mean" in given.get(node.name, {})]
    if not nodes or plan.K == 1:
        return None
    means = np.hstack([given[node.name]["mean"] for node in nodes])
    if is_chunked(plan):
        from emdsl.engine import chunked

        return chunked.nearest_given_mean(plan, [node.name for node in nodes], means)  # type: ignore[return-value]
    return vq(_continuous(plan, nodes, rescale=False), means, check_finite=False)[0].astype(np.intp)


def _one_hot(K: int, hard: np.ndarray) -> Any:
    def resp_of(start: int, stop: int) -> np.ndarray:
        resp = np.zeros((K, stop - start))
        resp[hard[start:stop], np.arange(stop - start)] = 1.0
        return resp
    return resp_of


def _random_responsibilities(K: int, rng: np.random.Generator) -> Any:
    base = int(rng.integers(2**63))

    def resp_of(start: int, stop: int) -> np.ndarray:
        # Seeded by block position, so the result does not depend on thread scheduling.
        resp = np.random.default_rng([base, start]).random((K, stop - start))
        return resp / resp.sum(axis=0)
    return resp_of


def _chain_responsibilities(plan: Plan, resp: xr.DataArray) -> np.ndarray:
    """Starting p(z_t) of a Markov latent, a DataArray over (sequence dims, time, latent), as rows (N × K)."""
    sequences = plan.sequences
    assert sequences is not None and plan.latent is not None
    dims = (*sequences.sequence_dims, sequences.dim, plan.latent.name)
    if set(resp.dims) != set(dims):
        raise ModelError(f"init: responsibilities of a Markov latent must have dims {dims}, got {resp.dims}")
    values = np.asarray(resp.transpose(*dims).values, dtype=float)
    expected = (*sequences.sequence_shape, sequences.length, plan.K)
    if values.shape != expected:
        raise ModelError(f"init: responsibilities must have shape {expected}, got {values.shape}")
    grid = values.reshape(sequences.n_sequences, sequences.length, plan.K)
    rows = grid[np.arange(sequences.length)[None, :] < sequences.lengths[:, None]]
    if not np.all(np.isfinite(rows)) or np.any(rows < 0) or not np.allclose(rows.sum(axis=1), 1.0, atol=1e-6):
        raise ModelError(f"init: responsibilities must be finite, non-negative and sum to 1 over "
                         f"{plan.latent.name!r} at every observed step")
    return rows
