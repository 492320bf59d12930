"""The immutable declaration of a latent-variable model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from emdsl.errors import ModelError
from emdsl.families._base import Family, LatentFamily, ObservedFamily, family_class
from emdsl.priors import Prior, prior_class

if TYPE_CHECKING:
    from emdsl.results import Fit

#: joins the names of several latents into the name of their joint (the engine's one latent)
JOINT_SEPARATOR = "×"

Init = Literal["kmeans++", "random"] | Mapping[str, Mapping[str, Any]] | Any


@dataclasses.dataclass(frozen=True)
class Latent:
    """A declared latent variable: ``name`` with a latent family (its K states)."""

    name: str
    family: LatentFamily
    #: the dimension a Markov latent runs along (None: a mixture, one state per sample)
    markov: str | None = None
    #: a concomitant model: the weights are a multinomial logit of these data variables
    covariates: tuple[str, ...] = ()


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
    #: a regression: the mean is linear in these data variables (see :mod:`emdsl.regression`)
    covariates: tuple[str, ...] = ()
    intercept: bool = True
    offset: str | None = None
    #: the latents this node depends on (None: every latent; (): shared by all samples)
    given: tuple[str, ...] | None = None


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
    def latent(self, name: str, family: LatentFamily | type[LatentFamily], markov: str | None = None, *,
               covariates: Sequence[str] | None = None) -> Model:
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
        covariates : list of str, optional
            Data variables that move the mixture weights (a concomitant model, flexmix's
            ``concomitant=``): π_k(x) = softmax_k(γ_k · [1, x]), with ``coef`` over
            (latent, ``term``) replacing ``probs`` and the first state as the reference
            (its coefficients are 0). Covariates are encoded as for ``observe``. Not for a
            Markov latent (covariates on its transition rows are not supported).

        Notes
        -----
        Partly labelled data (semi-supervised EM): if the data contain a variable with
        the latent's name, its known values (state labels or indices) clamp the
        posterior of those samples, and NaN or None means unknown. ℓ is then the
        log-likelihood of the data and the known labels together, and when every
        state has a label the fit starts from the labelled samples alone (otherwise k-means'
        clusters are numbered to agree with the labels). With several latents, each may be
        partly labelled this way: a sample keeps the joint states that agree with its known
        labels. For a Markov latent the known states lie on the chain's grid (the sequence
        dims and ``markov``): the forward–backward recursion runs over the paths that agree
        with them, and a labelled step counts as a step of its sequence even where nothing
        is observed.

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
        if covariates is not None:
            from emdsl.regression import check_concomitant

            covariates = check_concomitant(where, family, markov, covariates)
        self._check_free(name, where)
        if self.latents and (markov is not None or covariates or any(x.markov or x.covariates for x in self.latents)):
            raise ModelError(f"{where}: this model already has the latent {self.latents[0].name!r}; several "
                             "latents are independent mixtures: a Markov latent or one with covariates must "
                             "be the model's only latent")
        return dataclasses.replace(self, latents=self.latents + (Latent(name, family, markov, tuple(covariates or ())),))

    def observe(
        self,
        names: str | Sequence[str],
        family: ObservedFamily | type[ObservedFamily],
        *,
        name: str | None = None,
        covariates: Sequence[str] | None = None,
        intercept: bool = True,
        offset: str | None = None,
        given: Sequence[str] | None = None,
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
        covariates : list of str, optional
            Data variables (1-D over the samples) the node's mean is linear in, per latent
            state: a mixture of regressions (em.Normal), with parameters ``coef`` over
            (latent, ``term``) and ``variance``. Numeric covariates (a bool array as 0/1)
            enter as they are, categorical ones (strings, labels in an object array,
            True/False included, or a pandas categorical of any type) one-hot against their
            first level, with terms named ``"sex[male]"``: a pandas categorical's levels keep
            their order (those that occur), other labels are sorted. See :mod:`emdsl.regression`.
        intercept : bool, default True
            Whether the design has the term ``"intercept"``.
        offset : str, optional
            A data variable added to the linear predictor with coefficient 1 (log exposure);
            only for families with a log link.
        given : tuple of str, optional
            The latents this node depends on (default: every latent of the model, as
            declared by the time of the fit). Its parameters are then labelled by exactly
            these latents; ``given=()`` means one set of parameters shared by all samples.

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
        >>> two = (em.Model().latent("a", em.Categorical(2)).latent("b", em.Categorical(3))
        ...        .observe("x", em.Normal, given=("a",)))
        >>> two.observed[0].given
        ('a',)
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
        from emdsl.regression import check_declaration

        covariates, intercept, offset = check_declaration(where, family, variables, covariates, intercept, offset)
        from emdsl.latent.joint import check_given

        given = check_given(where, given, [x.name for x in self.latents])
        self._check_free(node, where)
        for variable in variables:
            for other in self.observed:
                if variable in other.variables:
                    raise ModelError(f"{where}: variable {variable!r} is already observed in node {other.name!r}")
            if variable != node and variable in self.names:
                raise ModelError(f"{where}: {variable!r} is already declared as a node name")
        return dataclasses.replace(self, observed=self.observed + (
            Observed(node, variables, family, stacked, covariates, intercept, offset, given),))

    def _check_free(self, name: str, where: str) -> None:
        if name in self.names or any(name in node.variables for node in self.observed):
            raise ModelError(f"{where}: the name {name!r} is already declared in this model")

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the latent variables, then of the observed nodes."""
        return tuple(x.name for x in self.latents) + tuple(x.name for x in self.observed)

    @property
    def latent_var(self) -> Latent | None:
        """The latent variable, or None for a model with a single component.

        With several latents, their joint: one latent named ``"a×b"`` over the joint
        states (see :mod:`emdsl.latent.joint`), which is what the engine fits.
        """
        if len(self.latents) > 1:
            from emdsl.latent.joint import JointCategorical

            names = [x.name for x in self.latents]
            return Latent(JOINT_SEPARATOR.join(names), JointCategorical(names, [x.family for x in self.latents]))
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
        accelerate: Literal["auto", "squarem", "daarem", "qn"] | None = "auto",
        prior: Literal["weak"] | None = None,
        method: Literal["em", "stepwise", "incremental"] = "em",
        batch_size: int | None = None,
        step_decay: float = 0.6,
        dtype: Literal["float64", "float32"] | None = None,
    ) -> Fit:
        """Fit the model to data with EM.

        Parameters
        ----------
        data : xarray.Dataset, DataArray, pandas.DataFrame or numpy array
            The observed variables. A DataFrame's columns become variables over
            the sample dimension; an unnamed array becomes the variable ``"x"``
            with dims ``("sample",)`` or ``("sample", "feature")``.
        init : {"kmeans++", "random"}, DataArray, mapping or Fit, default "kmeans++"
            Starting point. ``"kmeans++"``: k-means on the continuous variables,
            from greedy k-means++ seeds run to convergence (at most 100 Lloyd
            iterations), then an M-step on its labels. ``"random"``: random responsibilities. A DataArray of
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
        accelerate : {"auto", "qn", "squarem", "daarem"} or None, default "auto"
            Accelerated EM that keeps the guarantee: a proposed point is kept only when
            the objective (the log-likelihood, or the log-posterior ℓ + log p(θ) with
            priors) does not fall below what the EM step from the same point gains,
            otherwise the plain EM step is taken, so the objective still never decreases.
            ``"qn"``: quasi-Newton (L-BFGS from the complete-data information, the metric
            of EM's own step, with the score by Fisher's identity; no extra pass over the
            data). ``"squarem"``: SQUAREM (Varadhan & Roland 2008), a point extrapolated
            from two EM steps. ``"daarem"``: damped Anderson acceleration (Henderson &
            Varadhan 2019).
            ``"auto"``, the default: plain EM steps while EM converges fast, then, once a
            step gains more than a quarter of the previous step's gain (EM is slow),
            quasi-Newton where its differences are cheap (few free parameters per
            component: a univariate HMM, a Poisson mixture, Gaussians in up to 3-D with
            full covariances) and SQUAREM elsewhere. Measured (benchmarks/bench_accelerate.py):
            5.1–15× fewer E-steps than plain EM on slow fits (overlapping components, missing values, hidden Markov
            models, the Hasselblad Poisson mixture) and the same steps as plain EM on fast
            ones; it quietly runs plain EM where acceleration does not apply
            (``method="stepwise"``/``"incremental"``, ``max_iter=0``).
            ``fit.traces.attrs["accelerated_with"]`` says which scheme each restart ran
            (``"none"`` where it only took plain EM steps).
            ``None`` is plain EM, one M-step per iteration, as the ELBO staircase of the
            tutorials shows it (and iterate by iterate as scikit-learn's or hmmlearn's
            EM). With acceleration an iteration is an accepted point (``max_iter``
            counts those): a plain EM step, or one that came through a proposal,
            flagged in ``fit.trace["extrapolated"]`` (no ELBO staircase there);
            ``fit.trace["e_steps"]`` counts the passes over the data. Convergence is
            plain EM's test on an EM step (a plain one, or SQUAREM's stabilizing step
            from an accepted proposal), so a fit ends on an M-step's output.
            An explicit method with an online method is an error.
        prior : {"weak"} or None, default None
            None: maximum likelihood, except for the nodes whose family declares a prior
            (``em.Normal(prior=em.priors.NormalInverseGamma(...))``, see :mod:`emdsl.priors`),
            which get MAP estimates. ``"weak"``: in addition, every node (and the
            latent's weights) that takes a conjugate prior and declares none gets a
            weakly informative one, scaled from the data; it keeps a component from
            collapsing onto a few points. With K states, per element, in the data's units
            (the Gaussians' are mclust's ``priorControl()`` / ``defaultPrior`` with the
            scale multiplied by the dof ν, so that the prior mean of the precision is that of
            var / K^(2/D); docs/design.md, "The weak prior", says why):

            * Normal, and LogNormal on log x: NormalInverseGamma(mean = the data's mean,
              kappa = 0.01, shape = 3/2, scale = 3 var / (2K²)) (ν = 3, ς² = 3 var/K²);
            * MultivariateNormal: NormalInverseWishart(mean = the data's mean,
              kappa = 0.01, dof = D + 2, scale = (D + 2) Σ / K^(2/D)), Σ the covariance of the
              complete events for ``"full"`` and ``"tied"`` (its diagonal when there are at
              most D of them or it is singular), diag(variances) for ``"diag"``, their mean
              times I for ``"spherical"``;
            * Poisson: Gamma(1 + 0.01 x̄, 0.01); Exponential: Gamma(1.01, 0.01 x̄) on the
              rate; Bernoulli, Binomial: Beta(1 + 0.01 p̄, 1 + 0.01 (1 − p̄));
            * observed Categorical: Dirichlet(1 + 0.01 f), f the levels' frequencies;
              Multinomial: Dirichlet(1 + 0.01 c̄), c̄ the mean counts per event;
            * the latent's weights: Dirichlet(1 + 0.01/K).

            Means, variances, x̄, p̄, f and c̄ are the data's (weighted, over observed
            values): besides the Gaussians' scales, each weak prior weighs 0.01 of one
            sample. Gamma, Beta and VonMises have no conjugate prior and stay maximum
            likelihood. With any prior EM climbs the log-posterior ℓ(θ) + log p(θ) (log p
            the priors' normalized log densities): the run-time check and the
            convergence test use it, restarts are compared on it, and ``fit.trace``
            records it as the coordinate ``logpost`` next to ``loglik`` (always present;
            equal to ``loglik`` without priors). ``fit.loglik``, BIC and AIC stay the
            log-likelihood's.

        method : {"em", "stepwise", "incremental"}, default "em"
            ``"em"``: exact EM, a full pass per iteration. ``"stepwise"``: stepwise (online)
            EM (Cappé & Moulines 2009) over minibatches, the running statistics moved by
            steps γ_t = (t + 1)^−step_decay; ``"incremental"``: incremental EM (Neal &
            Hinton 1998), one minibatch's posterior refreshed per step. Both count
            ``max_iter`` in epochs (passes over the minibatches), record the running
            objective per epoch and end with one full pass giving the exact ℓ(θ̂); see
            :mod:`emdsl.engine.online` for what each checks instead of EM's monotonicity.
            Continue a stream with :meth:`Fit.partial_fit`. For a Markov latent a minibatch
            is a run of whole sequences (its independent units), so it needs several.
        batch_size : int, optional
            Rows per minibatch of the online methods (default: each dask chunk, or N / 32
            rows of in-memory data); for a Markov latent, steps, rounded to whole sequences.
        step_decay : float, default 0.6
            α in (0.5, 1] of stepwise EM's steps γ_t = (t + 1)^−α.
        dtype : {"float64", "float32"}, optional
            Precision of the E-step's Φ, L, R and H (default float64). ``"float32"`` halves
            the E-step's memory traffic; the statistics are still summed and the M-step
            still run in float64 (:mod:`emdsl.engine.precision`), and the monotonicity
            check uses float32's rounding bound.

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
                         accelerate=accelerate, prior=prior, method=method, batch_size=batch_size,
                         step_decay=step_decay, dtype=dtype)

    # -- serialisation and display ------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible description that :meth:`from_dict` turns back into this model."""
        return {
            "latents": [{"name": x.name, **_family_to_dict(x.family), **({"markov": x.markov} if x.markov else {}),
                         **({"covariates": list(x.covariates)} if x.covariates else {})}
                        for x in self.latents],
            "observed": [{"name": x.name, "variables": list(x.variables), "stacked": x.stacked,
                          **_family_to_dict(x.family), **_regression_to_dict(x),
                          **({"given": list(x.given)} if x.given is not None else {})} for x in self.observed],
        }

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Model:
        """Recreate a model from :meth:`to_dict`'s output."""
        model = cls()
        for item in spec.get("latents", ()):
            model = model.latent(item["name"], _family_from_dict(item), markov=item.get("markov"),
                                 covariates=item.get("covariates"))
        for item in spec.get("observed", ()):
            names = list(item["variables"]) if item["stacked"] else item["variables"][0]
            model = model.observe(names, _family_from_dict(item), name=item["name"],
                                  covariates=item.get("covariates"), intercept=item.get("intercept", True),
                                  offset=item.get("offset"), given=item.get("given"))
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
            chain += f", weights linear in [1, {', '.join(x.covariates)}]" if x.covariates else ""
            lines.append(f"  latent   {x.name} ~ {x.family!r}{chain}")
        if len(self.latents) > 1:
            lines.append(f"  # latents {', '.join(x.name for x in self.latents)} are independent; "
                         "the fit runs over their joint states")
        for x in self.observed:
            lhs = x.name if not x.stacked and x.variables == (x.name,) else f"{x.name} = [{', '.join(x.variables)}]"
            parents = [y.name for y in self.latents] if x.given is None else list(x.given)
            given = f" | {', '.join(parents)}" if parents else ""
            if x.covariates or not x.intercept:
                terms = ["1"] * x.intercept + list(x.covariates)
                given += f"{',' if given else ' |'} linear in [{', '.join(terms)}]"
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


def _regression_to_dict(decl: Observed) -> dict[str, Any]:
    """A regression node's covariates, intercept and offset (nothing for a plain node)."""
    if not decl.covariates and decl.offset is None:
        return {}
    return {"covariates": list(decl.covariates), "intercept": decl.intercept, "offset": decl.offset}


def _family_to_dict(family: Family) -> dict[str, Any]:
    return {"family": family.kind,
            "arguments": {key: _encode(value) for key, value in family.arguments().items()}}


def _family_from_dict(spec: Mapping[str, Any]) -> Family:
    arguments = {key: _decode(value) for key, value in spec["arguments"].items()}
    return family_class(spec["family"])(**arguments)


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Prior):  # a family's prior: its kind and hyperparameters, like a family
        return {"prior": value.kind, "arguments": {key: _encode(v) for key, v in value.arguments().items()}}
    if hasattr(value, "dims") and hasattr(value, "to_dict"):
        return {"dataarray": value.to_dict(data="list", encoding=False)}
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float | bool) for v in value):
        return list(value)
    return {"array": np.asarray(value).tolist()}


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "prior" in value:
        return prior_class(value["prior"])(**{key: _decode(v) for key, v in value["arguments"].items()})
    if isinstance(value, dict) and "dataarray" in value:
        import xarray as xr

        return xr.DataArray.from_dict(value["dataarray"])
    if isinstance(value, dict) and "array" in value:
        return np.asarray(value["array"], dtype=float)
    return value

