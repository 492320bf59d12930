"""Model selection: fit several declarations to the same data and compare them by criterion."""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from emdsl.errors import DegenerateComponentWarning, ModelError
from emdsl.labels import _plain, label_array
from emdsl.model import Model

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from emdsl.results import Fit

Criterion = Literal["bic", "aic", "icl"]
_CRITERIA = ("bic", "aic", "icl")


class Selection:
    """The fits of several models to the same data, and their criteria.

    Attributes
    ----------
    table : xarray.Dataset
        Over a ``model`` dimension (the labels given to :func:`select`): ``loglik``,
        ``n_params``, ``bic``, ``aic``, ``icl`` and a boolean ``degenerate``; ``K`` and
        ``covariance`` as coordinates where the models have them. Lower is better for
        every criterion.
    fits : dict
        The Fit of each label.
    criterion : str
        The criterion ``best`` minimizes.
    """

    def __init__(self, fits: Mapping[Hashable, Fit], criterion: Criterion) -> None:
        self.fits = dict(fits)
        self.criterion = criterion
        self.table = _table(self.fits)

    @property
    def best_label(self) -> Hashable:
        """The label of the model with the lowest criterion among the fits that did not collapse."""
        sound = self.table.where(~self.table["degenerate"], drop=True)
        if sound.sizes["model"] == 0:
            raise ModelError(f"select: every model's fit collapsed (degenerate): {list(self.fits)}; fit "
                             "again with prior='weak', a larger floor=, or fewer components")
        # the label as given: numpy scalars (from a str or int coordinate) unwrapped
        return _plain(sound["model"].values[int(np.argmin(sound[self.criterion].values))])

    @property
    def best(self) -> Fit:
        """The Fit with the lowest criterion among the non-degenerate ones."""
        return self.fits[self.best_label]

    def plot(self, ax: Axes | None = None, *, criterion: Criterion | None = None) -> Figure | Axes:
        """The criterion of every model: one line per covariance type over K, or one point per model.

        Examples
        --------
        >>> import emdsl as em
        >>> ds = em.datasets.load("faithful")
        >>> sel = em.select(em.grid(["eruptions", "waiting"], ks=range(1, 4), covariances=("full", "diag")),
        ...                 ds, seed=0)
        >>> fig = sel.plot()
        """
        from emdsl.plot import new_figure

        criterion = criterion or self.criterion
        fig = new_figure((6.0, 4.0)) if ax is None else None
        if ax is None:
            assert fig is not None
            ax = fig.add_subplot()
        table = self.table
        if "K" in table.coords and "covariance" in table.coords:
            for kind in dict.fromkeys(table["covariance"].values.tolist()):
                part = table.where(table["covariance"] == kind, drop=True).sortby("K")
                ax.plot(part["K"].values, part[criterion].values, marker="o", label=str(kind), gid=f"curve-{kind}")
            ax.set_xlabel("K (number of components)")
            ax.legend(fontsize="small", title="covariance")
        else:
            ax.plot(range(table.sizes["model"]), table[criterion].values, marker="o", gid="curve")
            ax.set_xticks(range(table.sizes["model"]), [str(v) for v in table["model"].values])
            ax.set_xlabel("model")
        best = list(table["model"].values).index(self.best_label)
        x = table["K"].values[best] if "K" in table.coords and "covariance" in table.coords else best
        ax.plot([x], [table[criterion].values[best]], marker="*", ms=16, color="k", linestyle="none",
                label=f"best: {self.best_label}", gid="best")
        ax.set_ylabel(f"{criterion.upper()} (lower is better)")
        ax.set_title(f"model selection by {criterion.upper()}")
        return fig if fig is not None else ax

    def __repr__(self) -> str:
        rows = [f"Selection by {self.criterion.upper()} over {self.table.sizes['model']} models; best: "
                f"{self.best_label!r}"]
        for i, label in enumerate(self.table["model"].values):
            row = self.table.isel(model=i)
            flag = "  degenerate" if bool(row["degenerate"]) else ""
            rows.append(f"  {str(label):<14} loglik {float(row['loglik']):>12.4f}  BIC {float(row['bic']):>12.4f}  "
                        f"AIC {float(row['aic']):>12.4f}  ICL {float(row['icl']):>12.4f}{flag}")
        return "\n".join(rows)


def select(models: Mapping[Hashable, Model], data: Any, criterion: Criterion = "bic", **fit_kwargs: Any) -> Selection:
    """Fit every model to ``data`` and compare them by an information criterion.

    Parameters
    ----------
    models : mapping
        Labels (e.g. ``"K=3 full"``) to :class:`Model`; :func:`grid` builds the usual one.
    data : xarray.Dataset or what :meth:`Model.fit` accepts
        The same data for every model.
    criterion : {"bic", "aic", "icl"}, default "bic"
        What ``Selection.best`` minimizes. ICL (Biernacki, Celeux & Govaert 2000) is
        −2 times the classification log-likelihood of the MAP labels plus BIC's penalty:
        BIC + 2 Σ_n −log r_n,ẑ_n, with ẑ_n the most probable state of sample n, as R's mclust
        and flexmix compute it; it also penalizes overlapping components. For a Markov
        latent ẑ is each sequence's most probable path (Viterbi; Celeux & Durand 2008).
    **fit_kwargs
        Passed to every :meth:`Model.fit` (``seed``, ``n_init``, ``prior``, ...).

    Returns
    -------
    Selection
        ``.table`` (a Dataset over ``model``), ``.best``, ``.fits``, ``.plot()``.

    Examples
    --------
    >>> import emdsl as em
    >>> ds = em.datasets.load("faithful")
    >>> models = {k: em.Model().latent("z", em.Categorical(k)).observe("waiting", em.Normal) for k in (1, 2, 3)}
    >>> em.select(models, ds, seed=0).best_label
    2
    """
    if criterion not in _CRITERIA:
        raise ModelError(f"select(criterion=...): expected one of {_CRITERIA}, got {criterion!r}")
    if not isinstance(models, Mapping):
        raise ModelError(f"select(models=...): expected a mapping of labels to Models, got {type(models).__name__}")
    if not models:
        raise ModelError("select(models=...): the mapping is empty; give at least one Model")
    fits = {}
    for label, model in models.items():
        if not isinstance(model, Model):
            raise ModelError(f"select: models[{label!r}] is a {type(model).__name__}, not an emdsl Model")
        with warnings.catch_warnings():
            # A collapsed candidate is recorded in the table (degenerate) rather than shouted about.
            warnings.simplefilter("ignore", DegenerateComponentWarning)
            try:
                fits[label] = model.fit(data, **fit_kwargs)
            except ModelError as error:
                raise ModelError(f"select: model {label!r} cannot be fitted to these data: {error}") from None
    return Selection(fits, criterion)


#: mclust's 14 covariance models, in its order (``grid(covariances="mclust")``)
MCLUST_MODELS = ("EII", "VII", "EEI", "VEI", "EVI", "VVI", "EEE", "VEE", "EVE", "VVE", "EEV", "VEV", "EVV", "VVV")


def grid(variables: str | Sequence[str], *, ks: Iterable[int] = range(1, 7),
         covariances: str | Sequence[str] = ("full", "diag", "spherical", "tied"), latent: str = "z",
         name: str = "x") -> dict[str, Model]:
    """The usual grid of Gaussian mixtures: numbers of components × covariance types.

    Parameters
    ----------
    variables : str or list of str
        One variable with an event dimension, or several 1-D variables to stack.
    ks : iterable of int, default 1..6
        Numbers of components.
    covariances : sequence of str, or "mclust"
        ``MultivariateNormal`` covariance types; ``"mclust"`` is mclust's 14 models under
        its names (``Mclust()``'s default grid).
    latent, name : str
        Names of the latent and of the observed node.

    Returns
    -------
    dict
        ``{"K=3 full": Model, ...}``, ready for :func:`select` or :func:`~emdsl.widgets.explore`.

    Examples
    --------
    >>> import emdsl as em
    >>> sorted(em.grid(["eruptions", "waiting"], ks=[1, 2], covariances=["full"]))
    ['K=1 full', 'K=2 full']
    >>> len(em.grid(["eruptions", "waiting"], ks=[2, 3], covariances="mclust"))
    28
    """
    from emdsl.families import Categorical, MultivariateNormal

    if isinstance(covariances, str):
        if covariances != "mclust":
            raise ModelError(f"grid(covariances=...): expected a list of covariance types or 'mclust', "
                             f"got {covariances!r}")
        covariances = MCLUST_MODELS
    ks = list(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1]
    if bad:
        raise ModelError(f"grid(ks=...): numbers of components must be positive integers, got {bad}")
    out = {}
    for k in ks:
        for covariance in covariances:
            model = Model()
            if k > 1:
                model = model.latent(latent, Categorical(int(k)))
            out[f"K={k} {covariance}"] = model.observe(variables, MultivariateNormal(covariance=covariance), name=name)
    return out


def _table(fits: Mapping[Hashable, Fit]) -> xr.Dataset:
    labels = list(fits)
    values: dict[str, list[Any]] = {key: [] for key in ("loglik", "n_params", "bic", "aic", "icl", "degenerate")}
    ks, kinds = [], []
    for fit in fits.values():
        values["loglik"].append(fit.loglik)
        values["n_params"].append(fit.n_params)
        values["bic"].append(fit.bic())
        values["aic"].append(fit.aic())
        values["icl"].append(fit.bic() + 2.0 * _classification_cost(fit))
        values["degenerate"].append(bool(getattr(fit, "degenerate", False)))
        latent = fit.model.latent_var
        ks.append(latent.family.k if latent is not None else 1)
        kinds.append(next((getattr(d.family, "covariance_type", None) for d in fit.model.observed
                           if getattr(d.family, "covariance_type", None)), None))
    coords: dict[str, Any] = {"model": label_array(labels), "K": ("model", ks)}
    if all(kind is not None for kind in kinds):
        coords["covariance"] = ("model", kinds)
    return xr.Dataset({key: ("model", np.asarray(v)) for key, v in values.items()}, coords=coords,
                      attrs={"description": "lower is better for every criterion"})


def _classification_cost(fit: Fit) -> float:
    """ℓ minus the classification log-likelihood of the MAP labels on the training data (0 without a
    latent): how much less likely the most probable labelling makes the data than the model does.

    A mixture labels each sample by its most probable (joint) state: −Σ_n w_n log max r_n.
    ICL used to add the posterior's entropy −Σ r log r instead (McLachlan & Peel's form of
    ICL-BIC), which is never smaller; mclust's and flexmix's ICL is the MAP labels' cost, and on
    Old Faithful (mclust's EEE, G = 3) the two differ by 41. A Markov latent's labelling is the
    most probable path of each sequence (Viterbi), as Celeux & Durand (2008) define ICL for hidden
    Markov models: Σ_s w_s (log p(x_s) − log p(x_s, ẑ_s)). The states most probable one step at a
    time need not form a path the chain can take (a fixed zero in the transition matrix).
    """
    if fit.model.latent_var is None or fit.data is None:
        return 0.0
    weights = None if fit.weights is None else np.asarray(fit.weights.values, dtype=float).ravel()
    if fit.model.latent_var.markov is not None:
        _, log_joint = fit.viterbi(fit.data)
        # one sequence: a float and a 0-d array; several: arrays over the sequence dims
        scores = np.ravel(np.asarray(fit.score_samples(fit.data), dtype=float))
        terms = scores - np.ravel(np.asarray(log_joint, dtype=float))
    else:
        resp = np.asarray(fit.posterior.values)  # (sample, states of each latent...)
        terms = -np.log(resp.reshape(len(resp), -1).max(axis=1))
    return float(terms.sum() if weights is None else terms @ weights)
