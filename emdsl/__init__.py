"""emdsl: declare latent-variable models in one line and fit them with EM over xarray data.

>>> import emdsl as em
>>> model = em.Model().latent("z", em.Categorical(2)).observe(["eruptions", "waiting"], em.MultivariateNormal)
>>> fit = model.fit(em.datasets.load("faithful"), seed=0)
"""

from emdsl import datasets, priors, regression, widgets
from emdsl.bootstrap import bootstrap
from emdsl.engine.events import Callback, FitInfo, IterationEvent
from emdsl.errors import (
    ConvergenceWarning,
    DegenerateComponentWarning,
    ImpossibleDataError,
    ModelError,
    MonotonicityError,
)
from emdsl.families import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Exponential,
    Gamma,
    LogNormal,
    Multinomial,
    MultivariateNormal,
    Normal,
    Poisson,
    VonMises,
)
from emdsl.lrt import bootstrap_lrt
from emdsl.model import Model
from emdsl.options import set_options
from emdsl.results import Fit, load
from emdsl.select import Selection, grid, select

__version__ = "0.1.0"

__all__ = [
    "Bernoulli",
    "Beta",
    "Binomial",
    "Callback",
    "Categorical",
    "ConvergenceWarning",
    "DegenerateComponentWarning",
    "Exponential",
    "Fit",
    "FitInfo",
    "Gamma",
    "ImpossibleDataError",
    "IterationEvent",
    "LogNormal",
    "Model",
    "ModelError",
    "MonotonicityError",
    "Multinomial",
    "MultivariateNormal",
    "Normal",
    "Poisson",
    "Selection",
    "VonMises",
    "bootstrap",
    "bootstrap_lrt",
    "datasets",
    "grid",
    "load",
    "priors",
    "regression",
    "select",
    "set_options",
    "widgets",
]
