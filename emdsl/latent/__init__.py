"""Latent structures: how emission log-densities become posteriors (DESIGN.md §3, "Latent structure").

``Mixture`` (softmax over independent states) and ``Markov`` (forward–backward along a
dimension) implement one interface, :class:`~emdsl.latent._base.LatentStructure`.
"""

from __future__ import annotations

from emdsl.latent._base import LatentStructure
from emdsl.latent.markov import Markov, Sequences
from emdsl.latent.mixture import Mixture

__all__ = ["LatentStructure", "Markov", "Mixture", "Sequences"]
