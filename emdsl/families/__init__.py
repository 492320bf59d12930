"""Exponential families: one module each, holding all of that family's mathematics."""

from emdsl.families._base import ElementwiseFamily, Family, LatentFamily, ObservedFamily, family_class
from emdsl.families.categorical import Categorical
from emdsl.families.multivariate_normal import MultivariateNormal
from emdsl.families.normal import Normal

__all__ = [
    "Categorical",
    "ElementwiseFamily",
    "Family",
    "LatentFamily",
    "MultivariateNormal",
    "Normal",
    "ObservedFamily",
    "family_class",
]
