"""The immutable declaration of a latent-variable model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from emdsl.errors import ModelError
from emdsl.families._base import Family, LatentFamily, ObservedFamily, family_class

if TYPE_CHECKING:
    from emdsl.results import Fit

Init = Literal["kmeans++", "random"] | Mapping[str, Mapping[str, Any]] | Any


@dataclasses.dataclass(frozen=True)
class Latent:
    """A declared latent variable: ``name`` with a latent family (its K states)."""

    name: str
    family: LatentFamily
    #: the dimension a Markov latent runs along (None: a mixture, one state per sample)
    markov: str | None = None


@dataclasses.dataclass(frozen=True)
class Observed:
    """A declared observed node: one or more data variables under one family.

    ``stacked`` is True when the variables were given as a list: they form one
    event dimension whose coordinates are the variable names.
    """

    name: str
    variables: tuple[str, ...]
    family: ObservedFamily
    stacked: bool


@dataclasses.dataclass(frozen=True)
class Model:
    """A latent-variable model, declared one call at a time.

    A ``Model`` is an immutable description: :meth:`latent` and :meth:`observe`
    return new models, and :meth:`fit` compiles the declaration against data and
    runs EM. Observed variables are conditionally independent given the latent.

    Examples
    --------
    >>> import emdsl as em
    >>> model = (em.Model()
    ...          .latent("z", em.Categorical(2))
    ...          .observe(["eruptions", "waiting"], em.MultivariateNormal, name="x"))
    >>> model.names
    ('z', 'x')
    >>> fit = model.fit(em.datasets.load("faithful"), seed=0)
    >>> fit.params["z"]["probs"].round(3).values.tolist()
    [0.356, 0.644]
    """

    latents: tuple[Latent, ...] = ()
    observed: tuple[Observed, ...] = ()

    # -- declaring ------------------------------------------------------------
    def latent(self, name: str, family: LatentFamily | type[LatentFamily], markov: str | None = None) -> Model:
        """Declare a latent variable.

        Parameters
        ----------
        name : str
            Name of the latent variable; it becomes the dimension of its states in
            every parameter and in the posterior.
        family : LatentFamily or class
            E.g. ``em.Categorical(3)``.
        markov : str, optional
            A dimension of the data along which the latent is a first-order Markov
            chain (a hidden Markov model): parameters ``initial`` (over ``name``) and
            ``transition`` (over ``name`` and ``<name>_next``) replace the mixture
            weights. Dimensions listed before it in the data (or ``fit(sample_dim=...)``)
            index independent sequences; shorter sequences are NaN-padded at the end.

        Notes
        -----
        Partly labelled data (semi-supervised EM): if the data contain a variable with
        the latent's name, its known values (state labels or indices) clamp the
        posterior of those samples, and NaN or None means unknown. ℓ is then the
        log-likelihood of the data and the known labels together, and when every
        state has a label the fit starts from the labelled samples alone.

        Returns
        -------
        Model
            A new model with the latent added.

        Examples
        --------
        >>> import emdsl as em
        >>> em.Model().latent("z", em.Categorical(3)).names
        ('z',)
        >>> em.Model().latent("z", em.Categorical(2), markov="time").latent_var.markov
        'time'
        """
        where = f"latent({name!r}, ...)" if markov is None else f"latent({name!r}, ..., markov={markov!r})"
        _check_name(name, where)
        family = _instantiate(family, where)
        if family.role != "latent":
            raise ModelError(f"{where}: {family.kind} is a family for observed data; "
                             "a latent needs a latent family such as em.Categorical(k)")
        if markov is not None:
            if not isinstance(markov, str) or not markov:
                raise ModelError(f"{where}: markov must name a dimension of the data (a non-empty string), "
                                 f"got {markov!r}")
            if markov in (name, f"{name}_next"):
                raise ModelError(f"{where}: the chain's dimension cannot be named like the latent's states "
                                 f"({name!r}, {name + '_next'!r})")
            if not hasattr(family, "markov_form"):
                raise ModelError(f"{where}: {family.kind} cannot be a Markov chain; use em.Categorical(k)")
            family = family.markov_form(where)  # type: ignore[attr-defined]
        family.check_latent(where)  # type: ignore[attr-defined]
        self._check_free(name, where)
        if self.latents:
            raise ModelError(f"{where}: this model already has the latent {self.latents[0].name!r}; "
                             "models with several latent variables are not supported yet")
        return dataclasses.replace(self, latents=self.latents + (Latent(name, family, markov),))

    def observe(
        self,
        names: str | Sequence[str],
        family: ObservedFamily | type[ObservedFamily],
        *,
        name: str | None = None,
    ) -> Model:
        """Declare observed data variables and their family.

        Parameters
        ----------
        names : str or list of str
            A data variable, or several 1-D variables to stack into one event
            dimension (``"feature"`` unless the family names another ``dim``),
            whose coordinates are the variable names. Any non-empty string is a
            valid variable name (e.g. a DataFrame column ``"od280/od315"``).
        family : ObservedFamily or class
            E.g. ``em.Normal`` or ``em.MultivariateNormal(covariance="diag")``.
        name : str, optional
            Name of this node in the parameters: a non-empty string without ``/``
            (default: the variable name, or the names joined with ``+``, with any
            ``/`` replaced by ``_``).

        Returns
        -------
        Model
            A new model with the node added.

        Examples
        --------
        >>> import emdsl as em
        >>> m = em.Model().observe(["eruptions", "waiting"], em.MultivariateNormal, name="x")
        >>> m.observed[0].variables
        ('eruptions', 'waiting')
        """
        where = f"observe({names!r}, ...)"
        stacked = not isinstance(names, str)
        if stacked and not _is_iterable_of_names(names):
            hint = f"; a DataFrame's column {names!r} is the variable {str(names)!r}" if isinstance(
                names, int | float) else ""
            raise ModelError(f"{where}: expected a data variable's name (a string) or a list of names, "
                             f"got {type(names).__name__}{hint}")
        # np.str_ (from a pandas Index or a numpy array of names) as plain str, for clean reprs
        variables = tuple(str(v) if isinstance(v, str) else v for v in ((names,) if not stacked else names))
        if not variables:
            raise ModelError(f"{where}: give at least one variable name")
        for variable in variables:
            _check_variable(variable, where)
        if len(set(variables)) != len(variables):
            raise ModelError(f"{where}: a variable is listed twice")
        if name is None:
            node = default_node_name(variables)
        else:
            node = name
            _check_name(node, f"observe({names!r}, ..., name={name!r})")
        family = _instantiate(family, where)
        if family.role != "observed" and hasattr(family, "observed_form"):
            family = family.observed_form()  # em.Categorical serves both roles
        if family.role != "observed":
            raise ModelError(f"{where}: {family.kind} is a latent family; "
                             "observe data with a family such as em.Normal")
        self._check_free(node, where)
        for variable in variables:
            for other in self.observed:
                if variable in other.variables:
                    raise ModelError(f"{where}: variable {variable!r} is already observed in node {other.name!r}")
            if variable != node and variable in self.names:
                raise ModelError(f"{where}: {variable!r} is already declared as a node name")
        return dataclasses.replace(self, observed=self.observed + (Observed(node, variables, family, stacked),))

    def _check_free(self, name: str, where: str) -> None:
        if name in self.names or any(name in node.variables for node in self.observed):
            raise ModelError(f"{where}: the name {name!r} is already declared in this model")

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the latent variables, then of the observed nodes."""
        return tuple(x.name for x in self.latents) + tuple(x.name for x in self.observed)

    @property
    def latent_var(self) -> Latent | None:
        """The latent variable, or None for a model with a single component."""
        return self.latents[0] if self.latents else None

    # -- fitting ----------------------------------------------------------------
    def fit(
        self,
        data: Any,
        *,
        init: Init = "kmeans++",
        n_init: int = 1,
        max_iter: int = 1000,
        tol: float = 1e-8,
        seed: int | np.random.Generator | None = None,
        sample_dim: Hashable | None = None,
        weights: str | Any | None = None,
        callbacks: Sequence[Callable[..., Any]] | None = (),
        monitor: bool = False,
        accelerate: Literal["squarem", "daarem"] | None = None,
    ) -> Fit:
        """Fit the model to data with EM.

        Parameters
        ----------
        data : xarray.Dataset, DataArray, pandas.DataFrame or numpy array
            The observed variables. A DataFrame's columns become variables over
            the sample dimension; an unnamed array becomes the variable ``"x"``
            with dims ``("sample",)`` or ``("sample", "feature")``.
        init : {"kmeans++", "random"}, DataArray, mapping or Fit, default "kmeans++"
            Starting point. ``"kmeans++"``: k-means++ seeding (scipy) on the
            continuous variables, each point assigned to its nearest seed, then an
            M-step. ``"random"``: random responsibilities. A DataArray of
            responsibilities with dims (sample, latent). A mapping of starting values
            ``{"z": {"probs": ...}, "x": {"mean": ..., "covariance": ...}}``; a
            parameter left out is estimated from the data (points are assigned to
            the nearest given mean when means are given). A previous ``Fit``.
        n_init : int, default 1
            Number of restarts; the one with the highest final log-likelihood wins.
        max_iter : int, default 1000
            Number of M-steps at most: the trace holds ℓ(θ⁽⁰⁾) … ℓ(θ⁽ⁿ⁾). ``max_iter=0``
            evaluates the model at the given (or fixed) parameters without an M-step.
        tol : float, default 1e-8
            Stop when ``ℓ(θ⁽ᵗ⁾) − ℓ(θ⁽ᵗ⁻¹⁾) ≤ tol · abs(ℓ(θ⁽ᵗ⁾))``. ``tol=0`` turns the test
            off and runs exactly ``max_iter`` iterations.
        seed : int or numpy.random.Generator, optional
            Seed of every random choice (initialisation, restarts). When None, a
            fresh 32-bit seed is drawn and recorded on the fit, so it can be reproduced;
            a Generator gives the seed as its next draw.
        sample_dim : hashable, optional
            The sample dimension, when it cannot be inferred.
        weights : str or DataArray, optional
            A non-negative weight per sample: the name of a data variable, or a
            DataArray over the sample dimension. Every sufficient statistic, the
            log-likelihood, BIC/AIC and the trace are weighted; fitting distinct rows
            with their counts as weights is exactly the fit of the expanded table.
        callbacks : sequence of callables
            Each receives an :class:`~emdsl.IterationEvent` per iteration; objects
            may also define ``on_fit_start(info)`` and ``on_fit_end(fit)``.
        monitor : bool, default False
            Show a live convergence monitor (a widget in Jupyter, a text line
            elsewhere).
        accelerate : {"squarem", "daarem"} or None, default None
            Accelerated EM that keeps the guarantee: proposals extrapolated from EM
            steps (SQUAREM, Varadhan & Roland 2008; DAAREM, Henderson & Varadhan
            2019) are kept only when the log-likelihood does not fall, otherwise the
            plain EM step is; slow fits (overlapping components, missing values) need
            many fewer E-steps. None is plain EM. An iteration is then an accepted
            point (``max_iter`` counts those); ``fit.trace`` flags proposals in
            ``extrapolated`` (they have no ELBO: elbo = loglik, kl = 0 there) and
            counts the work in ``e_steps``. Convergence is still plain EM's test,
            taken on a plain EM step, so the fit always ends on an M-step's output.

        Returns
        -------
        Fit
            Labelled parameters, posterior, trace and predictions.

        Examples
        --------
        >>> import emdsl as em
        >>> ds = em.datasets.load("faithful")
        >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(ds, seed=0)
        >>> fit.converged
        True
        """
        from emdsl.engine.orchestrate import fit_model

        return fit_model(self, data, init=init, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed,
                         sample_dim=sample_dim, weights=weights, callbacks=callbacks, monitor=monitor,
                         accelerate=accelerate)

    # -- serialisation and display ------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible description that :meth:`from_dict` turns back into this model."""
        return {
            "latents": [{"name": x.name, **_family_to_dict(x.family), **({"markov": x.markov} if x.markov else {})}
                        for x in self.latents],
            "observed": [{"name": x.name, "variables": list(x.variables), "stacked": x.stacked,
                          **_family_to_dict(x.family)} for x in self.observed],
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Model:
        """Recreate a model from :meth:`to_dict`'s output."""
        model = cls()
        for item in spec.get("latents", ()):
            model = model.latent(item["name"], _family_from_dict(item), markov=item.get("markov"))
        for item in spec.get("observed", ()):
            names = list(item["variables"]) if item["stacked"] else item["variables"][0]
            model = model.observe(names, _family_from_dict(item), name=item["name"])
        return model

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Model:
        """Recreate a model from :meth:`to_json`'s output."""
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        if not self.latents and not self.observed:
            return "Model()  # empty: declare .latent(...) and .observe(...)"
        lines = ["Model"]
        for x in self.latents:
            chain = f", Markov along {x.markov!r}" if x.markov is not None else ""
            lines.append(f"  latent   {x.name} ~ {x.family!r}{chain}")
        for x in self.observed:
            lhs = x.name if not x.stacked and x.variables == (x.name,) else f"{x.name} = [{', '.join(x.variables)}]"
            given = f" | {self.latents[0].name}" if self.latents else ""
            lines.append(f"  observe  {lhs} ~ {x.family!r}{given}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from emdsl._html import model_card

        return model_card(self)


def _instantiate(family: Family | type[Family], where: str) -> Family:
    if isinstance(family, type):
        if not issubclass(family, Family):
            raise ModelError(f"{where}: expected an emdsl family such as em.Normal, got {family!r}")
        try:
            return family()
        except TypeError as error:
            raise ModelError(f"{where}: {family.__name__} needs arguments ({error}); "
                             f"e.g. em.Categorical(3)") from None
    if not isinstance(family, Family):
        raise ModelError(f"{where}: expected an emdsl family such as em.Normal, got {family!r}")
    return family


def _check_name(name: object, where: str) -> None:
    """A node or latent name: it names a group of the parameters' DataTree and of a saved file."""
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ModelError(f"{where}: names of latents and nodes must be non-empty strings without '/' "
                         f"(and not '.' or '..'), got {name!r}")


def _check_variable(variable: object, where: str) -> None:
    """A data variable's name: any non-empty string (a DataFrame's column names are kept as they are)."""
    if not isinstance(variable, str) or not variable:
        hint = f"; a DataFrame's column {variable!r} is the variable {str(variable)!r}" if isinstance(
            variable, int | float) else ""
        raise ModelError(f"{where}: data variable names must be non-empty strings, got {variable!r}{hint}")


def _is_iterable_of_names(names: object) -> bool:
    # A list, a tuple, a pandas Index or a numpy array of column names is fine; a number, a
    # mapping or a set (whose order, the order of the event's elements, is arbitrary) is not.
    return hasattr(names, "__iter__") and not isinstance(names, Mapping | bytes | set | frozenset)


def default_node_name(variables: Sequence[str]) -> str:
    """The node name used when ``observe`` gets no ``name=``: the variables joined by ``+``.

    Characters a node name cannot hold (``/``, the separator of DataTree paths and
    netCDF groups) become ``_``, so any column name can be observed.

    Examples
    --------
    >>> default_node_name(["od280/od315_of_diluted_wines"])
    'od280_od315_of_diluted_wines'
    >>> default_node_name(["a", "b"])
    'a+b'
    """
    node = "+".join(variables).replace("/", "_")
    return node if node not in (".", "..") else node.replace(".", "_")


def _family_to_dict(family: Family) -> dict[str, Any]:
    return {"family": family.kind,
            "arguments": {key: _encode(value) for key, value in family.arguments().items()}}


def _family_from_dict(spec: Mapping[str, Any]) -> Family:
    arguments = {key: _decode(value) for key, value in spec["arguments"].items()}
    return family_class(spec["family"])(**arguments)


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if hasattr(value, "dims") and hasattr(value, "to_dict"):
        return {"dataarray": value.to_dict(data="list", encoding=False)}
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float | bool) for v in value):
        return list(value)
    return {"array": np.asarray(value).tolist()}


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "dataarray" in value:
        import xarray as xr

        return xr.DataArray.from_dict(value["dataarray"])
    if isinstance(value, dict) and "array" in value:
        return np.asarray(value["array"], dtype=float)
    return value

