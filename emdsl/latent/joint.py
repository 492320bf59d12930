"""Several latents: the E-step runs over their joint states (DESIGN.md §2–3, "latent structure").

``latent("a", em.Categorical(2)).latent("b", em.Categorical(3))`` declares two
independent categorical latents, p(a, b) = π_a π_b. The engine sees one latent with
the 2 × 3 joint states (row-major: ``b`` varies fastest), so L = H Φ, the softmax, the
ELBO and every kernel stay as they are. What is particular lives in two places:

* :class:`JointCategorical`, the latent family of the joint: log p(a, b) in H's
  constant column, and each latent's weights from its *marginal* expected counts;
* :class:`Given`, carried by an observed node that depends on a subset of the latents
  (``observe(..., given=("a",))``): its parameters have one row per state of that
  subset; they are *expanded* to the joint states for the E-step (row j of the joint
  takes the row of the subset's state that j projects to) and its block of the summed
  statistics is *reduced* (summed over the other latents) for the M-step. That is the
  exact M-step: Q separates per node, and the node's part of Q only sees the subset.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from emdsl.errors import ModelError
from emdsl.families._base import LatentFamily, Params
from emdsl.families.categorical import log_probs, unit_rows


class JointCategorical(LatentFamily):
    """Independent categorical latents seen as one latent over their joint states.

    Its parameters are ``{member name: weights}``; they come back to users as one
    ``probs`` per latent. Built by :attr:`emdsl.Model.latent_var`, never declared.
    """

    #: set here so that the family registry (users' and em.load's names) leaves it out: never declared
    role = "latent"
    param_names = ()

    def __init__(self, names: Sequence[str], members: Sequence[LatentFamily]) -> None:
        self.names = tuple(names)
        self.members = tuple(members)
        self.shape = tuple(int(m.k) for m in self.members)
        self.k = int(np.prod(self.shape))
        self.states = tuple(itertools.product(*(m.states for m in self.members)))

    @property
    def kind(self) -> str:
        return "Categorical"

    def arguments(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return " × ".join(f"{name}: {member!r}" for name, member in zip(self.names, self.members, strict=True))

    @property
    def fixed(self) -> dict[str, Any]:
        """Fixed weights of the members, by member name."""
        return {name: member.fixed["probs"] for name, member in zip(self.names, self.members, strict=True)
                if "probs" in member.fixed}

    @property
    def prior(self) -> Any:  # type: ignore[override]
        return None  # the members carry their own priors (see bind_member_priors)

    def param_axes(self) -> dict[str, tuple[str, ...]]:
        return {name: ("member",) for name in self.names}

    # -- the engine's interface -----------------------------------------------------------
    def log_weights(self, params: Params) -> np.ndarray:
        """log p(a, b, ...) = Σ_latents log π over the joint states (K,)."""
        total = np.zeros(self.shape)
        for axis, name in enumerate(self.names):
            shape = [1] * len(self.shape)
            shape[axis] = self.shape[axis]
            total = total + log_probs(np.asarray(params[name], dtype=float)).reshape(shape)
        return total.ravel()

    def marginal_counts(self, nk: np.ndarray) -> list[np.ndarray]:
        """Each latent's expected counts from the joint ones (K,): sums over the other latents."""
        grid = np.asarray(nk, dtype=float).reshape(self.shape)
        return [grid.sum(axis=tuple(a for a in range(len(self.shape)) if a != axis))
                for axis in range(len(self.shape))]

    def weights_m_step(self, nk: np.ndarray, hold: Params, prior: Any = None) -> Params:
        """Each latent's weights from its marginal counts (held ones stay), with its own Dirichlet prior."""
        out: Params = {}
        priors = prior or {}
        for name, member, counts in zip(self.names, self.members, self.marginal_counts(nk), strict=True):
            held = {"probs": hold[name]} if name in hold else {}
            out[name] = member.weights_m_step(counts, held, prior=priors.get(name))["probs"]  # type: ignore[attr-defined]
        return out

    def log_prior(self, params: Params, prior: Mapping[str, Any]) -> tuple[float, float]:
        value = size = 0.0
        for name, member in zip(self.names, self.members, strict=True):
            if prior.get(name) is not None:
                part, magnitude = member.log_prior({"probs": params[name]}, prior[name])  # type: ignore[attr-defined]
                value, size = value + part, size + magnitude
        return value, size

    def n_free_params(self) -> int:  # type: ignore[override]
        return sum(member.n_free_params() for member in self.members)  # type: ignore[attr-defined]

    def tidy_params(self, params: Mapping[str, np.ndarray]) -> Params:
        return unit_rows(params, self.names)

    def check_params(self, params: Mapping[str, np.ndarray], where: str, size: int | None = None) -> None:
        for name, member in zip(self.names, self.members, strict=True):
            if name in params:
                member.check_params({"probs": params[name]}, f"{where}[{name!r}]")  # type: ignore[attr-defined]

    def draw(self, params: Params, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw n joint state indices (each latent independently)."""
        parts = [member.draw({"probs": np.asarray(params[name], dtype=float)}, n, rng)  # type: ignore[attr-defined]
                 for name, member in zip(self.names, self.members, strict=True)]
        return np.ravel_multi_index(tuple(parts), self.shape) if n else np.zeros(0, dtype=np.intp)

    def unravel(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each latent's state index of joint state indices."""
        return np.unravel_index(np.asarray(index, dtype=np.intp), self.shape)


class Given:
    """Which latents an observed node depends on, and how its rows map to the joint states.

    ``names`` and ``members`` are every latent of the model (one for a single latent,
    whose nodes may still be shared: ``given=()``), ``given`` the node's subset.
    """

    def __init__(self, names: Sequence[str], members: Sequence[LatentFamily], given: Sequence[str]) -> None:
        shape_all = tuple(int(m.k) for m in members)
        k_all = int(np.prod(shape_all, dtype=int))
        self.names = tuple(name for name in names if name in given)  # the declaration's order
        axes = [list(names).index(name) for name in self.names]
        self.latents = [(name, members[a]) for name, a in zip(self.names, axes, strict=True)]
        self.shape = tuple(shape_all[a] for a in axes)
        self.K = int(np.prod(self.shape, dtype=int))
        grid = np.indices(shape_all).reshape(len(shape_all), -1)
        #: the node's row for each joint state (K_joint,)
        self.index = (np.ravel_multi_index(tuple(grid[a] for a in axes), self.shape).astype(np.intp) if axes
                      else np.zeros(k_all, dtype=np.intp))
        #: (K_joint × K_node) 0/1: the joint states that project to each of the node's rows
        self.gather = np.zeros((k_all, self.K))
        self.gather[np.arange(k_all), self.index] = 1.0

    def reduce(self, stats: np.ndarray) -> np.ndarray:
        """A block of joint statistics (K_joint × …) summed over the latents the node does not depend on."""
        return self.gather.T @ stats

    def expand(self, params: Params, axes: Mapping[str, tuple[str, ...]]) -> Params:
        """The node's parameters with one row per joint state (rows indexed by ``latent`` axes repeated)."""
        return {key: (np.asarray(value)[self.index] if axes.get(key, ())[:1] == ("latent",) else value)
                for key, value in params.items()}


def check_given(where: str, given: Any, declared: Sequence[str]) -> tuple[str, ...] | None:
    """``observe(..., given=...)`` as a tuple of latent names (None: every latent), validated."""
    if given is None:
        return None
    if isinstance(given, str):
        given = (given,)
    try:
        names = tuple(given)
    except TypeError:
        raise ModelError(f"{where}: given must name latents (a tuple of names, () for none), got {given!r}") from None
    for name in names:
        if not isinstance(name, str):
            raise ModelError(f"{where}: given must name latents (strings), got {name!r}")
        if name not in declared:
            known = ", ".join(map(repr, declared)) or "none declared yet"
            raise ModelError(f"{where}: given names {name!r}, which is not a latent of this model "
                             f"(latents: {known}); declare latents before the variables that depend on them")
    if len(set(names)) != len(names):
        raise ModelError(f"{where}: given lists a latent twice: {list(names)}")
    return names
