"""Exponential families: one module each, holding all of that family's mathematics."""

from emdsl.families._base import ElementwiseFamily, Family, LatentFamily, ObservedFamily, family_class
from emdsl.families.bernoulli import Bernoulli
from emdsl.families.beta import Beta
from emdsl.families.binomial import Binomial
from emdsl.families.categorical import Categorical
from emdsl.families.exponential import Exponential
from emdsl.families.gamma import Gamma
from emdsl.families.lognormal import LogNormal
from emdsl.families.multinomial import Multinomial
from emdsl.families.multivariate_normal import MultivariateNormal
from emdsl.families.normal import Normal
from emdsl.families.poisson import Poisson
from emdsl.families.von_mises import VonMises

__all__ = [
    "Bernoulli",
    "Beta",
    "Binomial",
    "Categorical",
    "ElementwiseFamily",
    "Exponential",
    "Family",
    "Gamma",
    "LatentFamily",
    "LogNormal",
    "Multinomial",
    "MultivariateNormal",
    "Normal",
    "ObservedFamily",
    "Poisson",
    "VonMises",
    "family_class",
]
