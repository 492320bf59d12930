"""Starting parameters θ⁽⁰⁾: from responsibilities (k-means++, random, given) or given values."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xarray as xr
from scipy.cluster.vq import kmeans2, vq
from scipy.spatial.distance import cdist

from emdsl import compile as compile_
from emdsl import labels
from emdsl.compile import SCAN_ROWS, Plan, blocks
from emdsl.data import is_chunked
from emdsl.engine.estep import EStep, Summary
from emdsl.engine.mstep import Theta, expected_complete_loglik, maximize, natural_matrix, on_model
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
        # given values lie on the model's structure (mclust's constrained covariances) once projected
        given = on_model(plan, compile_.start_values(plan, init))
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
        resp_of = (_with_known_states(plan.clamp, resp_of) if plan.clamp.ndim == 1
                   else _with_known_joint_states(plan, resp_of))
    summary: Summary = estep.statistics_from(resp_of)
    theta, _ = maximize(plan, summary.stats, None, hold)
    if plan.sequences is not None and plan.latent is not None:
        # Seeds (k-means++ labels, random responsibilities) ignore time, so their transition
        # counts say little: the chain starts sticky (DESIGN.md §2), unless values are given,
        # moved towards the transitions between consecutive labelled steps where there are some.
        name = plan.latent.name
        chain = plan.latent.structure.default_params()
        if plan.clamp is not None and plan.clamp.ndim == 1:
            chain = _labelled_chain(plan.clamp, plan.sequences, chain)
        theta[name] = {**chain, **(hold or {}).get(name, {}), **plan.latent.held}
    if any(len(node.partial_rows) for node in plan.nodes):
        return theta, None  # holes were filled without θ: those statistics make no ELBO
    elbo = expected_complete_loglik(natural_matrix(plan, theta), summary.stats) + plan.log_base_total
    return theta, elbo + summary.entropy


def _labelled_chain(known: np.ndarray, sequences: Any, sticky: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A chain's starting π and A: the sticky default's as a Dirichlet mean with K pseudo-counts per row,
    updated by the (weighted) labelled first steps and transitions between consecutive labelled steps.

    The pseudo-counts keep every entry positive: a zero in the start would be a structural zero
    that EM never leaves, and a few labelled transitions must not rule any out.
    """
    K = len(sticky["initial"])
    starts = sequences.starts
    weights = sequences.weights_of(0, sequences.n_sequences)
    first = np.zeros(K)
    pairs = np.zeros((K, K))
    for s in range(sequences.n_sequences):
        labels = known[starts[s]:starts[s + 1]]
        if not len(labels) or weights[s] == 0:
            continue
        if labels[0] >= 0:
            first[labels[0]] += weights[s]
        both = (labels[:-1] >= 0) & (labels[1:] >= 0)
        np.add.at(pairs, (labels[:-1][both], labels[1:][both]), weights[s])
    initial = (first + K * sticky["initial"]) / (first.sum() + K)
    transition = (pairs + K * sticky["transition"]) / (pairs.sum(axis=1, keepdims=True) + K)
    return {"initial": initial, "transition": transition}


def _every_state_labelled(plan: Plan) -> bool:
    return plan.clamp is not None and plan.clamp.ndim == 1 and bool(np.all(np.bincount(plan.clamp[plan.clamp >= 0], minlength=plan.K) > 0))


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


def _with_known_joint_states(plan: Plan, resp_of: Any) -> Any:
    """Several latents: starting responsibilities kept to the joint states that agree with each sample's
    known labels (spread evenly over them where the start put a sample elsewhere)."""
    from emdsl.engine.estep import allowed_states

    def clamped(start: int, stop: int) -> np.ndarray:
        resp = np.array(resp_of(start, stop), dtype=float)
        known = plan.clamp[start:stop]
        rows = np.flatnonzero((known >= 0).any(axis=1))
        if len(rows):
            allowed = allowed_states(plan, known[rows]).T  # (K × m)
            part = resp[:, rows] * allowed
            total = part.sum(axis=0)
            part = np.where(total > 0, part / np.where(total > 0, total, 1.0), allowed / allowed.sum(axis=0))
            resp[:, rows] = part
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
    """Seeding features of the nodes k-means++ seeds on (``seeds_kmeans``: continuous, not regressions), (N × D).

    Each family maps its data (standardized, or in the data's units) to the space it seeds
    in (:meth:`~emdsl.families._base.ObservedFamily.seed_features`: log x for positive
    families); with ``rescale`` the features of families fitted in the data's units are then
    centred and scaled per element, so that k-means++ never sees values near 1e±300 (whose
    squared distances overflow) and no element outweighs the others by its units alone.
    """
    chosen = [node for node in (nodes if nodes is not None else plan.nodes) if node.family.seeds_kmeans]
    if not chosen:
        return None
    z = np.empty((sum(node.D for node in chosen), plan.n_samples))
    for start, stop in blocks(plan.n_samples, SCAN_ROWS):
        row = 0
        for node in chosen:
            node.read(start, stop, z[row:row + node.D, start:stop])
            row += node.D
    return _seed_space(chosen, z, rescale, weights=plan.weights)[0].T


def _seed_space(chosen: list, z: np.ndarray, rescale: bool = True, scaling: np.ndarray | None = None,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The chosen nodes' data ``z`` (D × n, as read) as seeding features, in place; holes at 0.

    Returns ``z`` and the per-element (unit, centre, spread) it was rescaled by (D × 3;
    1, 0, 1 where it was not). With ``scaling`` given (from a sample of the rows: the
    dask path), the rows are rescaled by it instead of by their own; with ``weights`` (per
    sample) the centre and spread count a sample that many times, as the standardized
    families' units do (``compile.units._units``).
    """
    used = np.tile([1.0, 0.0, 1.0], (len(z), 1))
    row = 0
    for node in chosen:
        part = z[row:row + node.D]
        part[...] = node.family.seed_features(part)
        if rescale and not node.family.standardize:
            used[row:row + node.D] = _centre_and_scale(
                part, None if scaling is None else scaling[row:row + node.D], weights)
        row += node.D
    # A hole sits at the element's mean (0 in standardized units): seeding needs a point
    # for every sample, and the mean moves no seed towards or away from it.
    np.nan_to_num(z, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return z, used


def _centre_and_scale(rows: np.ndarray, scaling: np.ndarray | None = None,
                      weights: np.ndarray | None = None) -> np.ndarray:
    """Each row (an element over the samples) centred and scaled to unit spread, in place; non-finite → NaN.

    Returns the (unit, centre, spread) of each row (d × 3); with ``scaling`` given, rows are
    rescaled by those instead of their own; with ``weights``, centre and spread are weighted.
    """
    rows[~np.isfinite(rows)] = np.nan
    used = np.tile([1.0, 0.0, 1.0], (len(rows), 1)) if scaling is None else np.asarray(scaling, dtype=float)
    for values, own in zip(rows, used, strict=True):
        if scaling is None:
            seen = ~np.isnan(values)
            present = values[seen]
            mass = np.ones(len(present)) if weights is None else np.asarray(weights, dtype=float)[seen]
            if not mass.sum() > 0:  # no observed value counts (the compiler refuses such elements)
                continue
            unit = float(np.abs(present).max()) or 1.0  # divided first: no square overflows or underflows
            centre = float(np.average(present / unit, weights=mass))
            spread = float(np.sqrt(np.average((present / unit - centre) ** 2, weights=mass)))
            own[:] = unit, centre, spread if spread > 1e-12 else 1.0
        values /= own[0]
        values -= own[1]
        values /= own[2]
    return used


#: Lloyd's iterations after the k-means++ seeds, at most (k-means stops earlier, when no label changes)
KMEANS_MAX_ITER = 100
#: k-means also stops once a step moves the centres by at most this fraction of the data's mean
#: variance (Σ_k ‖Δc_k‖², scikit-learn's KMeans ``tol``, whose GaussianMixture start this is).
#: Without it, 600k points in six overlapping clusters ran all 100 steps, a few labels still
#: swapping each time: 2.6 s, the time of 110 E-steps of that fit (benchmarks/bench_accelerate.py).
KMEANS_TOL = 1e-4


def kmeans_plusplus_seeds(z: np.ndarray, k: int, rng: np.random.Generator,
                          weights: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Greedy k-means++ seeds among the rows of ``z`` (Arthur & Vassilvitskii 2007, as scikit-learn draws them).

    Each next seed is the best of 2 + ⌊ln k⌋ candidates drawn ∝ squared distance to the
    nearest seed (the one that lowers the total squared distance most): plain k-means++
    (scipy's ``minit="++"``) puts two seeds in one of four well-separated clusters more
    often, and Lloyd's iterations cannot move a seed out of a cluster it shares (four
    10-D Gaussian clusters, 20 starts each on 3 data sets: 85–95% at the optimum, against
    95–100%). With ``weights`` (per row, ≥ 0) a row counts as that many copies of itself:
    drawn ∝ weight × squared distance (the first ∝ weight), judged on the weighted total, so
    a row of weight 0 is never a seed and a frequency table seeds as its expanded rows would.
    Returns the seeds (k × D) and whether the data have fewer distinct points than k.
    """
    trials = 2 + int(np.log(k))
    seeds = np.empty((k, z.shape[1]))
    mass = None if weights is None else np.asarray(weights, dtype=float)
    mass_so_far = None if mass is None else np.cumsum(mass)

    def any_row() -> int:
        return int(rng.integers(len(z))) if mass_so_far is None else int(_draw(mass_so_far, None, rng.uniform(size=1))[0])

    seeds[0] = z[any_row()]
    nearest = cdist(seeds[:1], z, "sqeuclidean")[0]
    too_few = False
    for j in range(1, k):
        cumulative = np.cumsum(nearest if mass is None else nearest * mass)
        total = nearest.sum() if mass is None else None  # (the unweighted draw as it always was)
        if not cumulative[-1] > 0:  # every point (of positive weight) is a seed already
            too_few = True
            seeds[j] = z[any_row()]
            continue
        picks = _draw(cumulative, total, rng.uniform(size=trials))
        candidates = np.minimum(nearest[None, :], cdist(z[picks], z, "sqeuclidean"))  # trials × n
        best = int(np.argmin(candidates.sum(axis=1) if mass is None else candidates @ mass))
        seeds[j] = z[picks[best]]
        nearest = candidates[best]
    return seeds, too_few


def _draw(cumulative: np.ndarray, total: float | None, uniform: np.ndarray) -> np.ndarray:
    """Rows drawn ∝ their increments of ``cumulative`` (a running sum ending > 0), one per uniform.

    ``total`` (default: the running sum's end) scales the uniforms; with the end itself and
    side="right", a row whose increment is 0 (weight 0, or a seed already) is never drawn.
    """
    scale = cumulative[-1] if total is None else total
    return np.minimum(np.searchsorted(cumulative, uniform * scale, side="right"), len(cumulative) - 1)


def kmeans(z: np.ndarray, k: int, rng: np.random.Generator,
           weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """k-means on the rows of ``z`` (n × D): k-means++ seeds, then Lloyd's iterations to convergence.

    From :func:`kmeans_plusplus_seeds`, iterates (each point to its nearest centre, each
    centre to its points' mean: scipy's ``kmeans2``, one step at a time) until no label
    changes or a step moves the centres by at most :data:`KMEANS_TOL` of the data's mean
    variance, at most :data:`KMEANS_MAX_ITER` times, as scikit-learn's GaussianMixture
    starts (a converged KMeans): the assignment to the seeds alone starts EM far from the
    clusters more often (wine, ``prior="weak"``: 6 of 20 single starts reached the
    cultivars, against 20 of 20; docs/design.md). A centre left without points keeps its
    place (scipy's ``missing="warn"``, silenced): its state may start empty, which the
    M-step handles. With ``weights`` the seeds and the means are weighted (scipy's k-means
    takes no weights, so Lloyd's step is written here: scipy's ``vq`` labels, weighted
    means); a centre whose points all weigh 0 keeps its place. Returns the labels (n,),
    the centres (k × D, the means of their labels) and whether the data have fewer
    distinct points than ``k``.
    """
    weights = None if weights is None else np.asarray(weights, dtype=float)  # a sequence is welcome too
    centres, too_few = kmeans_plusplus_seeds(z, k, rng, weights)
    labels = None
    spread = _mean_variance(z, weights) * KMEANS_TOL
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        for _ in range(KMEANS_MAX_ITER + 1):
            # labels of the current centres, and the centres moved to their means
            if weights is None:
                moved, nearest = kmeans2(z, centres, iter=1, minit="matrix", check_finite=False)
            else:
                moved, nearest = _weighted_lloyd_step(z, centres, weights)
            if labels is not None and np.array_equal(nearest, labels):
                break  # a fixed point: the centres are the means of the labels they induce
            shift = float(np.sum((moved - centres) ** 2))
            centres, labels = moved, nearest
            if shift <= spread:
                break  # the centres have stopped moving, as scikit-learn's KMeans judges it
    return np.asarray(labels, dtype=np.intp), np.asarray(centres, dtype=float), too_few


def _mean_variance(z: np.ndarray, weights: np.ndarray | None) -> float:
    """The (weighted) variance of each column of ``z``, averaged over the columns."""
    if weights is None:
        return float(np.mean(np.var(z, axis=0))) if len(z) else 0.0
    total = float(weights.sum())
    if not total > 0:
        return 0.0
    mean = weights @ z / total
    return float(np.mean(weights @ (z - mean) ** 2 / total))


def _weighted_lloyd_step(z: np.ndarray, centres: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centre, and each centre moved to its rows' weighted mean (kept if they weigh 0)."""
    labels = vq(z, centres, check_finite=False)[0]
    k = len(centres)
    mass = np.bincount(labels, weights=weights, minlength=k)
    sums = np.stack([np.bincount(labels, weights=weights * column, minlength=k) for column in z.T], axis=1)
    moved = centres.copy()
    held = mass > 0
    moved[held] = sums[held] / mass[held, None]
    return moved, labels


def _kmeans_plusplus(plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """Each sample's k-means label (k-means++ seeds run to convergence, :func:`kmeans`) on the
    continuous nodes' seeding features."""
    if is_chunked(plan):  # dask-backed: seeded on a sample of rows, labels computed chunk by chunk
        from emdsl.engine import chunked

        chosen = [node for node in plan.nodes if node.family.seeds_kmeans]

        def on_rows(raw: np.ndarray, weights: np.ndarray | None,
                    rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            z, scaling = _seed_space(chosen, np.array(raw.T), weights=weights)
            labels, centres = _scipy_kmeans(plan, z.T, rng, weights)
            order = _agreeing(labels, plan.K, None if plan.clamp is None else plan.clamp[rows], weights)
            return order[labels], centres[np.argsort(order)], scaling

        if plan.K > 1 and isinstance(plan.latent.family, JointCategorical):  # K = 1: maybe no latent at all
            if plan.n_samples <= chunked.SEED_SAMPLE:
                return _kmeans_per_latent(plan, plan.latent.family, rng, *_gathered(plan, chosen))
            return _sampled_per_latent(plan, plan.latent.family, rng, chosen)
        return chunked.kmeans_plusplus(plan, rng, on_rows)
    if plan.K == 1:
        return np.zeros(plan.n_samples, dtype=np.intp)
    if isinstance(plan.latent.family, JointCategorical):
        return _kmeans_per_latent(plan, plan.latent.family, rng)
    z = _continuous(plan)
    if z is None:
        return np.argmax(rng.random((plan.n_samples, plan.K)), axis=1)
    labels = _scipy_kmeans(plan, z, rng, plan.weights)[0]
    return _agreeing(labels, plan.K, plan.clamp, plan.weights)[labels]


def _agreeing(labels: np.ndarray, k: int, known: np.ndarray | None, weights: np.ndarray | None) -> np.ndarray:
    """The renumbering of k-means' clusters (``order[cluster]`` = state) that agrees with the most
    (weight of) labelled samples: ``known`` holds their states, −1 where unknown.

    k-means numbers its clusters arbitrarily. Labelled samples keep their state in the
    E-step, so a start that calls their cluster by another number contradicts them: EM
    then spends its first iterations swapping components, and can end in another optimum
    (measured: 3 states with labels for two of them, 3 of 8 seeds ended 0.21 lower in ℓ
    before this; with two latents, one labelled, starts that contradicted the labels took 54
    iterations instead of 42–43).
    """
    identity = np.arange(k)
    if known is None or k < 2:
        return identity
    rows = np.flatnonzero(known >= 0)
    if not len(rows):
        return identity
    from scipy.optimize import linear_sum_assignment

    agree = np.zeros((k, k))
    np.add.at(agree, (labels[rows], known[rows]), 1.0 if weights is None else np.asarray(weights, float)[rows])
    clusters, states = linear_sum_assignment(agree, maximize=True)
    order = np.empty(k, dtype=np.intp)
    order[clusters] = states
    return order


def _kmeans_per_latent(plan: Plan, joint: JointCategorical, rng: np.random.Generator,
                       features: Callable[[list | None], np.ndarray | None] | None = None,
                       weights: np.ndarray | None = None, seeded: list[LatentSeeding] | None = None,
                       n_rows: int | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """Several latents: each seeded by k-means (:func:`kmeans`) on the nodes that depend on it
    alone (on every continuous node when none does); a sample's joint state combines their labels.

    Seeding the Π k joint states as one clustering would ignore that they form a product,
    and start far from any product-shaped optimum. ``features(nodes)`` gives the seeding
    features of those nodes (None: every continuous node) of the rows seeded, with their
    ``weights``: :func:`_continuous` and the fit's weights unless given (dask: :func:`_gathered`,
    the rows gathered). With ``seeded`` (a list), how each latent was seeded is appended to it
    (:class:`LatentSeeding`), to label rows that were not seeded; ``n_rows``: how many rows
    ``features`` gives (default: the plan's), ``rows``: which (default: all). Each latent's
    clusters are numbered to agree with its labelled samples (:func:`_agreeing`).
    """
    if features is None:
        features, weights = (lambda nodes: _continuous(plan, nodes)), plan.weights
    parts: list[np.ndarray] = []
    shared: list[int] = []  # the latents seeded on every continuous node, by position
    for position, (name, member) in enumerate(zip(joint.names, joint.members, strict=True)):
        own = [node for node in plan.nodes if node.given is not None and node.given.names == (name,)]
        z = features(own) if own else None
        on_shared = z is None
        offsets = None
        if on_shared:
            z = features(None)
            if z is not None and shared:
                offsets = _cluster_means(z, [parts[i] for i in shared], [joint.members[i].k for i in shared], weights)
                z = z - offsets[_group([parts[i] for i in shared], [joint.members[i].k for i in shared])]
        n = plan.n_samples if n_rows is None else n_rows
        centres = None
        if member.k == 1:
            parts.append(np.zeros(n, dtype=np.intp))
        elif z is None:
            parts.append(rng.integers(member.k, size=n))
        else:
            labels, centres, _ = kmeans(z, member.k, rng, weights)  # duplicates: some states may start empty
            if plan.clamp is not None:
                known = plan.clamp[:, position] if rows is None else plan.clamp[rows, position]
                order = _agreeing(labels, member.k, known, weights)
                labels, centres = order[labels], centres[np.argsort(order)]
            parts.append(labels)
        if seeded is not None:
            nodes = None if on_shared else [node for node in own if node.family.seeds_kmeans]
            seeded.append(LatentSeeding(member.k, nodes, centres, list(shared) if offsets is not None else [], offsets))
        if on_shared and z is not None and member.k > 1:
            shared.append(position)
    return np.ravel_multi_index(tuple(parts), joint.shape).astype(np.intp)


def _sampled_per_latent(plan: Plan, joint: JointCategorical, rng: np.random.Generator, chosen: list) -> Any:
    """Several latents on a dask plan beyond ``chunked.SEED_SAMPLE`` rows: seeded one by one on a
    uniform sample of that many rows (:func:`_kmeans_per_latent`), every row then labelled inside
    its chunk's task by each latent's nearest centre, in the sample's seeding space
    (:class:`emdsl.engine.chunked.NearestJoint`)."""
    from emdsl.engine import chunked

    rows = np.sort(rng.choice(plan.n_samples, chunked.SEED_SAMPLE, replace=False))
    raw, weights = (chunked.gather_weighted_rows(plan, chunked.seed_nodes(plan), rows) if chosen
                    else (np.zeros((len(rows), 0)), None))
    scalings: dict[frozenset, np.ndarray] = {}
    seeded: list[LatentSeeding] = []
    _kmeans_per_latent(plan, joint, rng, _columns(chosen, raw, weights, scalings), weights, seeded, len(rows), rows)
    for seeding in seeded:
        seeding.scaling = scalings.get(frozenset(map(id, chosen if seeding.nodes is None else seeding.nodes)))
    return chunked.NearestJoint(plan, chosen, joint.shape, seeded, int(rng.integers(2**63)))


@dataclasses.dataclass
class LatentSeeding:
    """How :func:`_kmeans_per_latent` seeded one latent: enough to label rows it did not see
    (a dask plan beyond ``chunked.SEED_SAMPLE`` rows, :class:`emdsl.engine.chunked.NearestJoint`)."""

    k: int
    #: the nodes it was seeded on (None: every continuous node)
    nodes: list | None
    #: its k-means centres (None: labels drawn at random, or k = 1)
    centres: np.ndarray | None
    #: the earlier latents (positions) whose joint clusters' means ``offsets`` were subtracted first
    within: list[int]
    offsets: np.ndarray | None
    #: the per-element (unit, centre, spread) of its seeding space, on the rows seeded
    scaling: np.ndarray | None = None


def _gathered(plan: Plan, chosen: list) -> tuple[Callable[[list | None], np.ndarray | None], np.ndarray | None]:
    """:func:`_continuous` for a dask-backed plan of at most ``chunked.SEED_SAMPLE`` rows, and the
    fit's weights of its rows: every row of the continuous nodes ``chosen`` gathered in one pass,
    so that several latents are seeded one by one exactly as in memory."""
    from emdsl.engine import chunked

    if not chosen:
        return (lambda nodes: None), None
    raw, weights = chunked.gather_weighted_rows(plan, chunked.seed_nodes(plan), np.arange(plan.n_samples))
    return _columns(chosen, raw, weights), weights


def _columns(chosen: list, raw: np.ndarray, weights: np.ndarray | None,
             scalings: dict[frozenset, np.ndarray] | None = None) -> Callable[[list | None], np.ndarray | None]:
    """Seeding features of some of the nodes ``chosen`` from their data as read (``raw``, rows ×
    their columns); with ``scalings``, each call's per-element scaling is kept there under the
    set of its nodes' ids."""
    stops = np.cumsum([node.D for node in chosen])

    def features(nodes: list | None) -> np.ndarray | None:
        wanted = {id(node) for node in (chosen if nodes is None else nodes)}
        picked = [node for node in chosen if id(node) in wanted]
        if not picked:
            return None
        columns = np.concatenate([np.arange(stop - node.D, stop) for node, stop in zip(chosen, stops, strict=True)
                                  if id(node) in wanted])
        z, used = _seed_space(picked, np.array(raw[:, columns].T), weights=weights)
        if scalings is not None:
            scalings[frozenset(map(id, picked))] = used
        return z.T

    return features


def _group(labels: list[np.ndarray], ks: list[int]) -> np.ndarray:
    """Each row's joint cluster of the given latents' labels (ks: their numbers of states)."""
    return np.ravel_multi_index(tuple(labels), tuple(ks))


def _cluster_means(z: np.ndarray, labels: list[np.ndarray], ks: list[int], weights: np.ndarray | None) -> np.ndarray:
    """The (weighted) mean of ``z`` over each joint cluster of the latents seeded before on the same
    features (0 for an empty one): a latent that shares its variables with others explains what
    those leave, and seeded on the same features the labellings would coincide and leave joint
    states empty."""
    group = _group(labels, ks)
    w = np.ones(len(z)) if weights is None else np.asarray(weights, dtype=float)
    size = int(np.prod(ks))
    mass = np.bincount(group, weights=w, minlength=size)
    sums = np.stack([np.bincount(group, weights=w * column, minlength=size) for column in z.T], axis=1)
    return sums / np.where(mass > 0, mass, 1.0)[:, None]


def _scipy_kmeans(plan: Plan, z: np.ndarray, rng: np.random.Generator,
                  weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``z`` (N × D, seeding features) labelled by k-means (:func:`kmeans`, weighted by the
    fit's weights of those rows); and the centres."""
    labels, centres, too_few = kmeans(z, plan.K, rng, weights)
    if too_few:
        warnings.warn(f"init='kmeans++': the data have fewer distinct points than the {plan.K} states of "
                      f"{plan.latent.name!r}; some states start empty", DegenerateComponentWarning, stacklevel=5)
    return labels, centres


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
        resp = row_uniforms(base, start, stop, K).T
        return resp / resp.sum(axis=0)
    return resp_of


#: rows per random stream of a random start (see :func:`row_uniforms`)
RANDOM_STREAM_ROWS = 4096


def row_uniforms(seed: int, start: int, stop: int, width: int) -> np.ndarray:
    """Uniforms for the rows ``start:stop`` ((stop − start) × width), each row's the same however the rows are cut.

    Row i's values come from the stream seeded by (seed, i // :data:`RANDOM_STREAM_ROWS`): a
    block or chunk that begins inside a stream draws the stream and keeps its rows. Seeding
    by the block's own start made a random start depend on the engine's block size
    (``em.set_options(block_rows=...)``) and on dask's chunks, so the same seed gave another
    fit on chunked data (found by fuzzing dask against memory).
    """
    if stop <= start:
        return np.empty((0, width))
    first, last = start // RANDOM_STREAM_ROWS, (stop - 1) // RANDOM_STREAM_ROWS
    drawn = np.concatenate([np.random.default_rng([seed, stream]).random((RANDOM_STREAM_ROWS, width))
                            for stream in range(first, last + 1)])
    offset = start - first * RANDOM_STREAM_ROWS
    return drawn[offset:offset + stop - start]


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
    rows = grid[sequences.observed]
    if not np.all(np.isfinite(rows)) or np.any(rows < 0) or not np.allclose(rows.sum(axis=1), 1.0, atol=1e-6):
        raise ModelError(f"init: responsibilities must be finite, non-negative and sum to 1 over "
                         f"{plan.latent.name!r} at every observed step")
    return rows
