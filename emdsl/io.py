"""Saving fits to netCDF and loading them back, validating every field on the way in.

A fit file is data, never code: nothing in it is unpickled or evaluated. Because a
file may be truncated, foreign or edited by hand, :func:`load` checks everything it
reads before using it and raises :class:`~emdsl.ModelError` naming the file and the
field, instead of letting a ``KeyError`` escape or a NaN reach a prediction.

Layout (format version 1), as groups of one netCDF-4 file:

* root attributes: ``emdsl_format``, ``model`` (:meth:`Model.to_json`),
  ``sample_dim`` (JSON), ``restart``, ``converged``, ``stopped``, ``loglik``,
  ``n_params``, ``n_samples``, ``seed`` (decimal text: seeds exceed 64 bits),
  ``weight_total`` (Σ of the sample weights) when the fit records it, and a Markov
  fit's ``sequence_dims`` (JSON list); ``data_dtypes`` (JSON: each observed variable's
  numpy dtype as fitted, which ``sample`` draws in) when recorded;
* ``params/<node>``: one Dataset per latent and observed node, in the data's units;
* ``standardization/<node>``: ``center`` and ``scale`` of each observed node;
* ``traces``: ``loglik``, ``elbo``, ``kl``, ``time`` over ``step``, with the
  ``restart`` and ``iteration`` coordinates;
* ``weights`` (a weighted fit's): ``weights`` over ``row``, flat in the data's order, with
  the ``dims`` and ``shape`` (JSON) they were given over.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from emdsl.errors import ModelError
from emdsl.families._base import Family
from emdsl.model import Model

if TYPE_CHECKING:
    from emdsl.results import Fit

__all__ = ["FORMAT_VERSION", "load", "save"]

#: version of the file layout written by :func:`save`
FORMAT_VERSION = 1

_TRACE_VARIABLES = ("loglik", "elbo", "kl", "time")
_TRACE_COORDS = ("restart", "iteration")
#: per-step coordinates a trace may carry (older files lack them): the check's rounding bound, whether
#: the point was an accelerated proposal, the E-steps spent so far, and the log-posterior with priors
_TRACE_OPTIONAL = ("slack", "extrapolated", "e_steps", "logpost")
# Deflate, the compression netCDF-4 offers everywhere, expands at most about 1032:1, and
# chunks never written cost nothing on disk; so arrays declaring more bytes than this
# multiple of the file's size were not written by save() and would only exhaust memory.
_MAX_EXPANSION = 1100
_SLACK_BYTES = 1 << 20
_SEED = re.compile(r"-?[0-9]{1,100}")


def save(fit: Fit, path: str | os.PathLike[str]) -> None:
    """Write a fit to a netCDF-4 file (no pickle); read it back with :func:`load`.

    Parameters, every restart's trace and the model declaration round-trip
    exactly. The training data are not stored.

    Parameters
    ----------
    fit : Fit
        The fit to write.
    path : str or os.PathLike
        The file to create (overwritten if it exists).

    Examples
    --------
    >>> import os, tempfile
    >>> import emdsl as em
    >>> from emdsl.io import load, save
    >>> fit = em.Model().latent("z", em.Categorical(2)).observe("waiting", em.Normal).fit(
    ...     em.datasets.load("faithful"), seed=0)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save(fit, os.path.join(folder, "fit.nc"))
    ...     back = load(os.path.join(folder, "fit.nc"))
    >>> back.params["z"]["probs"].equals(fit.params["z"]["probs"])
    True
    """
    groups = {
        **{f"params/{name}": node.to_dataset() for name, node in fit.params.children.items()},
        **{f"standardization/{name}": units for name, units in fit.standardization.items()},
        "traces": fit.traces,
    }
    if getattr(fit, "weights", None) is not None:
        # Optional: the weights the fit was given, flat and in the data's order (standard errors of
        # the loaded fit need them; their labels may be tuples, which netCDF does not hold).
        groups["weights"] = xr.Dataset({"weights": ("row", np.asarray(fit.weights.values, dtype=float).ravel())},
                                       attrs={"dims": json.dumps(list(fit.weights.dims)),
                                              "shape": json.dumps(list(fit.weights.shape))})
    tree = xr.DataTree.from_dict(groups)
    tree.attrs = {
        "emdsl_format": FORMAT_VERSION,
        "model": fit.model.to_json(),
        "sample_dim": json.dumps(fit.sample_dim),
        "restart": fit.restart,
        "converged": int(fit.converged),
        "stopped": int(fit.stopped),
        "degenerate": int(fit.degenerate),
        "loglik": fit.loglik,
        "n_params": fit.n_params,
        "n_samples": fit.n_samples,
        "seed": str(fit.seed),
    }
    # Optional: a weighted fit's BIC counts Σ w, not N; older fits have no such attribute.
    weight_total = getattr(fit, "weight_total", None)
    if weight_total is not None:
        tree.attrs["weight_total"] = float(weight_total)
    # Optional: the sequences a Markov fit ran over (predictions find them in new data by name).
    if getattr(fit, "sequence_dims", None) is not None:
        tree.attrs["sequence_dims"] = json.dumps(list(fit.sequence_dims))
    if getattr(fit, "data_dtypes", None):
        tree.attrs["data_dtypes"] = json.dumps(fit.data_dtypes)
    tree.to_netcdf(path, engine="netcdf4")


def load(path: str | os.PathLike[str]) -> Fit:
    """Read a fit written by :func:`save` (or :meth:`Fit.save`), validating every field.

    Nothing in the file is executed or unpickled. The format version, every
    required field and its type, the parameters' dims and shapes against the
    model declaration, their values (finite, and inside the family's range), the
    standardization (finite center, finite positive scale) and the traces are
    checked before the fit is built; the number of latent states is compared with
    the stored parameters before the model is rebuilt, so a doctored declaration
    cannot make the loader allocate without bound.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save`.

    Returns
    -------
    Fit
        The fit, without training data (``fit.data`` is None).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ModelError
        If the file is not a readable netCDF file, or any field is missing, of the
        wrong type or out of range; the message names the file and the field, e.g.
        ``'fit.nc': field params/z/probs: probs must sum to 1, they sum to 1.5``.

    Examples
    --------
    >>> import os, tempfile
    >>> import emdsl as em
    >>> fit = em.Model().observe("waiting", em.Normal).fit(em.datasets.load("faithful"))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     fit.save(os.path.join(folder, "fit.nc"))
    ...     back = em.load(os.path.join(folder, "fit.nc"))
    ...     with open(os.path.join(folder, "fit.nc"), "r+b") as f:
    ...         _ = f.truncate(100)
    ...     try:
    ...         em.load(os.path.join(folder, "fit.nc"))
    ...     except em.ModelError as error:
    ...         print("not a readable emdsl fit" in str(error))
    True
    >>> back.loglik == fit.loglik
    True
    """
    file = os.fspath(path)
    if not os.path.exists(file):
        # A wrong path is the caller's mistake, not a bad file: keep the usual exception.
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), file)
    return _Reader(file).read()


class _Reader:
    """Reads one file; every check names ``file`` and the field it looked at."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, field: str, message: str) -> ModelError:
        return ModelError(f"{self.file!r}: field {field}: {message}")

    def unreadable(self, error: BaseException) -> ModelError:
        return ModelError(f"{self.file!r} is not a readable emdsl fit (netCDF): "
                          f"{type(error).__name__}: {_short(str(error), 200)}")

    # -- the file as a whole ----------------------------------------------------------
    def read(self) -> Fit:
        from emdsl.results import Fit

        tree = self.open()
        attrs = tree.attrs
        self.format_version(attrs)
        groups = {name: self.group(tree, name) for name in ("params", "standardization", "traces")}
        model = self.model(attrs, groups["params"])
        sample_dim = self.sample_dim(attrs)
        standardization = {decl.name: self.units(groups["standardization"], decl, model, sample_dim)
                           for decl in model.observed}
        # a regression's parameters are those of its bound family
        from emdsl.regression import stored_family

        params = {}
        if len(model.latents) > 1:  # several latents: their weights, one child each
            for x in model.latents:
                params[x.name] = self.params(groups["params"], x.name, x.family, model, None)
        elif model.latent_var is not None:
            params[model.latent_var.name] = self.params(groups["params"], model.latent_var.name,
                                                        stored_family(model.latent_var, groups["params"]), model, None)
        for decl in model.observed:
            params[decl.name] = self.params(groups["params"], decl.name, stored_family(decl, groups["params"]), model,
                                            standardization[decl.name]["center"])
        extra = sorted(set(groups["params"].children) - set(params))
        if extra:
            raise self.fail(f"params/{extra[0]}", f"the model declares no node {extra[0]!r}; "
                            f"its nodes are {list(model.names)}")
        traces = self.traces(groups["traces"])
        restarts = int(traces["restart"].values.max()) + 1
        restart = self.integer(attrs, "restart", low=0)
        if restart >= restarts:
            raise self.fail("restart", f"restart {restart} is out of range: the traces hold "
                            f"{restarts} restart{'s' if restarts > 1 else ''}")
        optional: dict[str, Any] = {}
        if "degenerate" in attrs:
            optional["degenerate"] = self.flag(attrs, "degenerate")
        if "sequence_dims" in attrs:
            optional["sequence_dims"] = self.sequence_dims(attrs, model)
        if "data_dtypes" in attrs:
            optional["data_dtypes"] = self.data_dtypes(attrs, model)
        if "weights" in tree.children:
            if "weight_total" not in attrs:
                raise self.fail("weights", "stored without weight_total, their sum")
            optional["weights"] = self.weights(tree.children["weights"].to_dataset(), self.real(attrs, "weight_total"),
                                               optional.get("sequence_dims"), sample_dim)
        if "weight_total" in attrs:
            optional["weight_total"] = self.real(attrs, "weight_total")
            if optional["weight_total"] <= 0:
                raise self.fail("weight_total", f"must be > 0, got {optional['weight_total']!r}")
        return Fit(model, xr.DataTree.from_dict(params), standardization, traces,
                   restart=restart, converged=self.flag(attrs, "converged"),
                   loglik=self.real(attrs, "loglik"), n_params=self.integer(attrs, "n_params", low=0),
                   n_samples=self.integer(attrs, "n_samples", low=1), sample_dim=sample_dim,
                   seed=self.seed(attrs), stopped=self.flag(attrs, "stopped"), **optional)

    def open(self) -> xr.DataTree:
        self.check_sizes()
        try:
            with xr.open_datatree(self.file, engine="netcdf4") as opened:
                return opened.load()
        # Damaged or foreign bytes surface from the netCDF/HDF5 stack and from xarray's
        # decoding under many exception types; all of them mean the same thing here.
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, AttributeError,
                OverflowError, UnicodeError) as error:
            raise self.unreadable(error) from None

    def check_sizes(self) -> None:
        """Refuse arrays larger than the file could hold, before anything is read into memory.

        xarray reads index coordinates while opening, so the declared shapes are
        checked first, through the netCDF library's metadata alone.
        """
        import netCDF4

        try:
            with netCDF4.Dataset(self.file, "r") as nc:
                sizes = _declared_bytes(nc, "")
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, AttributeError,
                OverflowError, UnicodeError) as error:
            raise self.unreadable(error) from None
        limit = _MAX_EXPANSION * os.path.getsize(self.file) + _SLACK_BYTES
        total = sum(size for _, size in sizes)
        if total > limit:
            field, largest = max(sizes, key=lambda item: item[1])
            raise self.fail(field, f"declares {largest:,} bytes of data ({total:,} in all), more than a "
                            f"file of {os.path.getsize(self.file):,} bytes can hold; it was not written "
                            "by emdsl")

    def format_version(self, attrs: Mapping[Hashable, Any]) -> None:
        if "emdsl_format" not in attrs:
            raise self.fail("emdsl_format", "missing: this netCDF file is not an emdsl fit "
                            "(write one with Fit.save)")
        version = self.integer(attrs, "emdsl_format")
        if version != FORMAT_VERSION:
            raise self.fail("emdsl_format", f"format version {version} is not known to this emdsl, "
                            f"which reads version {FORMAT_VERSION}"
                            + ("; upgrade emdsl" if version > FORMAT_VERSION else ""))

    def group(self, tree: xr.DataTree, name: str) -> xr.DataTree:
        child = tree.children.get(name)
        if child is None:
            raise self.fail(name, "missing (expected a group)")
        return child

    # -- scalar attributes ----------------------------------------------------------------
    def attr(self, attrs: Mapping[Hashable, Any], name: str) -> Any:
        if name not in attrs:
            raise self.fail(name, "missing")
        return attrs[name]

    def integer(self, attrs: Mapping[Hashable, Any], name: str, *, low: int | None = None) -> int:
        value = self.attr(attrs, name)
        if not _is_integer(value):
            raise self.fail(name, f"expected an integer, got {_describe(value)}")
        if low is not None and value < low:
            raise self.fail(name, f"must be an integer >= {low}, got {int(value)}")
        return int(value)

    def real(self, attrs: Mapping[Hashable, Any], name: str) -> float:
        value = self.attr(attrs, name)
        if not _is_real(value) or not math.isfinite(float(value)):
            raise self.fail(name, f"expected a finite number, got {_describe(value)}")
        return float(value)

    def flag(self, attrs: Mapping[Hashable, Any], name: str) -> bool:
        value = self.attr(attrs, name)
        if not _is_integer(value) or int(value) not in (0, 1):
            raise self.fail(name, f"expected 0 or 1, got {_describe(value)}")
        return bool(value)

    def text(self, attrs: Mapping[Hashable, Any], name: str) -> str:
        value = self.attr(attrs, name)
        if not isinstance(value, str):
            raise self.fail(name, f"expected text, got {_describe(value)}")
        return value

    def json_attr(self, attrs: Mapping[Hashable, Any], name: str) -> Any:
        """An attribute holding JSON text, parsed."""
        text = self.text(attrs, name)
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise self.fail(name, f"not valid JSON: {_describe(text)}") from None

    def seed(self, attrs: Mapping[Hashable, Any]) -> int:
        value = self.attr(attrs, "seed")
        if _is_integer(value):
            return int(value)
        if not isinstance(value, str) or not _SEED.fullmatch(value):
            raise self.fail("seed", f"expected an integer written in decimal, got {_describe(value)}")
        return int(value)

    def weights(self, ds: xr.Dataset, total: float, sequence_dims: tuple[Hashable, ...] | None,
                sample_dim: Hashable) -> xr.DataArray:
        """The fit's weights: finite, non-negative, summing to ``weight_total`` (their sum over each
        sequence's steps for a Markov fit, which is at least theirs), over the sample or sequence dims."""
        self.exact_variables(ds, ["weights"], "weights")
        da = ds["weights"]
        if da.dims != ("row",):
            raise self.fail("weights/weights", f"expected dims ('row',), got {da.dims}")
        self.numbers(da, "weights/weights")
        values = np.asarray(da.values, dtype=float)
        if np.any(values < 0) or not values.sum() > 0:
            raise self.fail("weights/weights", "weights must be non-negative with a positive sum")
        try:
            dims, shape = json.loads(self.text(ds.attrs, "dims")), json.loads(self.text(ds.attrs, "shape"))
        except (ValueError, RecursionError):
            raise self.fail("weights", "attributes dims and shape must be JSON lists") from None
        expected = [sample_dim] if sequence_dims is None else list(sequence_dims)
        if dims != expected:
            raise self.fail("weights", f"expected dims {expected}, got {_describe(dims)}")
        if (not isinstance(shape, list) or len(shape) != len(dims)
                or not all(_is_integer(n) and n >= 0 for n in shape) or math.prod(shape) != values.size):
            raise self.fail("weights", f"shape {_describe(shape)} does not hold {values.size} weights")
        if sequence_dims is None and not math.isclose(values.sum(), total, rel_tol=1e-9):
            raise self.fail("weights", f"they sum to {values.sum()!r}, not to weight_total {total!r}")
        return xr.DataArray(values.reshape(shape), dims=dims, name="weights")

    def sequence_dims(self, attrs: Mapping[Hashable, Any], model: Model) -> tuple[Hashable, ...]:
        value = self.json_attr(attrs, "sequence_dims")
        if (not isinstance(value, list) or len(set(map(repr, value))) != len(value)
                or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value)):
            raise self.fail("sequence_dims", f"expected a list of distinct dimension names, got {_describe(value)}")
        latent = model.latent_var
        if latent is None or latent.markov is None:
            raise self.fail("sequence_dims", "the model declares no Markov latent, so it has no sequences")
        if latent.markov in value:
            raise self.fail("sequence_dims", f"the chain's own dimension {latent.markov!r} cannot index its sequences")
        return tuple(value)

    def data_dtypes(self, attrs: Mapping[Hashable, Any], model: Model) -> dict[str, str]:
        value = self.json_attr(attrs, "data_dtypes")
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self.fail("data_dtypes", f"expected an object of variable names to dtypes, got {_describe(value)}")
        known = {v for decl in model.observed for v in decl.variables}
        unknown = sorted(set(value) - known)
        if unknown:
            raise self.fail("data_dtypes", f"names {unknown}, which the model does not observe")
        for name, dtype in value.items():
            try:
                kind = np.dtype(dtype).kind
            except TypeError:
                kind = None
            if kind not in tuple("biuf"):  # what sample() may cast to; labels keep the fit's levels
                raise self.fail("data_dtypes", f"{name!r}: {_describe(dtype)} is not a numpy bool, integer or "
                                               "float dtype")
        return value

    def sample_dim(self, attrs: Mapping[Hashable, Any]) -> Hashable:
        value = self.json_attr(attrs, "sample_dim")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.fail("sample_dim", f"expected a dimension name, got {_describe(value)}")
        return value

    # -- the model declaration ------------------------------------------------------------
    def model(self, attrs: Mapping[Hashable, Any], params: xr.DataTree) -> Model:
        text = self.text(attrs, "model")
        try:
            spec = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise self.fail("model", f"not valid JSON ({_short(str(error), 100)})") from None
        if not isinstance(spec, dict):
            raise self.fail("model", f"expected a JSON object, got {_describe(spec)}")
        for key in ("latents", "observed"):
            if not isinstance(spec.get(key), list):
                raise self.fail("model", f"{key!r} must be a list, got {_describe(spec.get(key))}")
            for i, item in enumerate(spec[key]):
                self.declared_item(item, f"{key}[{i}]", observed=key == "observed")
        # A family allocates from its number of states or levels, ``k`` (one label each), so
        # that number is compared with the stored parameters before any family is built.
        stored_k = {item["name"]: self.stored_states(params, item["name"]) for item in spec["latents"]}
        for i, item in enumerate(spec["latents"]):
            k = item["arguments"].get("k")
            if k is not None and _count(k) != stored_k[item["name"]]:
                raise self.fail("model", f"latents[{i}] ({item['name']!r}) declares k={_describe(k)}, "
                                f"but params/{item['name']} holds {stored_k[item['name']]} states")
        for i, item in enumerate(spec["observed"]):
            k = item["arguments"].get("k")
            count = _count(k)
            if count is not None:
                largest = self.largest_axis(params, item["name"])
                if count > largest:
                    raise self.fail("model", f"observed[{i}] ({item['name']!r}) declares k={_describe(k)}, "
                                    f"more than params/{item['name']} holds along any axis ({largest})")
        try:
            model = Model.from_dict(spec)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as error:
            raise self.fail("model", f"the declaration cannot be rebuilt: {type(error).__name__}: "
                            f"{_short(str(error), 200)}") from None
        for decl in (*model.latents, *model.observed):
            try:
                decl.family.param_axes()
            # A registered class that is not a complete family (an abstract helper) fails
            # here in its own way; the file named it, so the file is at fault.
            except Exception as error:  # noqa: BLE001
                raise self.fail("model", f"{_kind(decl.family)} (node {decl.name!r}) is not a "
                                f"usable family: {type(error).__name__}: {_short(str(error), 100)}") from None
        for latent in model.latents:
            if latent.family.k != stored_k[latent.name]:
                raise self.fail("model", f"the latent {latent.name!r} has {latent.family.k} states, but "
                                f"params/{latent.name} holds {stored_k[latent.name]}")
        return model

    def declared_item(self, item: Any, where: str, *, observed: bool) -> None:
        """The shape of one node in the JSON declaration, so that rebuilding it cannot trip on types."""
        if not isinstance(item, dict):
            raise self.fail("model", f"{where} must be an object, got {_describe(item)}")
        fields: dict[str, type | tuple[type, ...]] = {"name": str, "family": str, "arguments": dict}
        if observed:
            fields.update(variables=list, stacked=bool)
        for key, kind in fields.items():
            if not isinstance(item.get(key), kind):
                raise self.fail("model", f"{where}.{key} is missing or of the wrong type: "
                                f"{_describe(item.get(key))}")
        if observed and (not item["variables"] or not all(isinstance(v, str) for v in item["variables"])):
            raise self.fail("model", f"{where}.variables must be a non-empty list of names, "
                            f"got {_describe(item['variables'])}")

    def stored_states(self, params: xr.DataTree, name: Any) -> int:
        child = params.children.get(name)
        if child is None:
            raise self.fail(f"params/{name}", f"missing: the model declares the latent {name!r}")
        sizes = child.to_dataset().sizes
        if name not in sizes:
            raise self.fail(f"params/{name}", f"has no dimension {name!r} for the latent's states")
        return int(sizes[name])

    def largest_axis(self, params: xr.DataTree, name: Any) -> int:
        child = params.children.get(name)
        if child is None:
            raise self.fail(f"params/{name}", f"missing: the model observes {name!r}")
        return max(child.to_dataset().sizes.values(), default=1)

    # -- arrays ---------------------------------------------------------------------------
    def units(self, group: xr.DataTree, decl: Any, model: Model, sample_dim: Hashable) -> xr.Dataset:
        """``center`` and ``scale`` of an observed node; their dims are the node's event dims."""
        field = f"standardization/{decl.name}"
        child = group.children.get(decl.name)
        if child is None:
            raise self.fail(field, f"missing: the model observes {decl.name!r}")
        ds = _decoded(child.to_dataset())
        self.exact_variables(ds, ("center", "scale"), field)
        center, scale = ds["center"], ds["scale"]
        if scale.dims != center.dims:
            raise self.fail(f"{field}/scale", f"dims {scale.dims} differ from center's {center.dims}")
        dims = center.dims
        latents = {x.name for x in model.latents}
        for dim in dims:
            if dim in latents or dim == sample_dim:
                raise self.fail(f"{field}/center", f"dimension {dim!r} cannot be an event dimension: "
                                "it is the latent's or the samples'")
        if decl.stacked:
            dim = getattr(decl.family, "dim", None) or "feature"
            if dims != (dim,) or center.size != len(decl.variables):
                raise self.fail(f"{field}/center", f"expected dims ({dim!r},) of size {len(decl.variables)} "
                                f"(the stacked variables), got {dict(center.sizes)}")
            if dim in center.coords and [str(v) for v in center[dim].values] != list(decl.variables):
                raise self.fail(f"{field}/center", f"coordinate {dim!r} must list the variables "
                                f"{list(decl.variables)}, got {_describe(center[dim].values.tolist())}")
        elif decl.family.multivariate and len(dims) != 1:
            raise self.fail(f"{field}/center", f"{_kind(decl.family)} needs exactly one event "
                            f"dimension, got dims {dims}")
        self.numbers(center, f"{field}/center")
        self.numbers(scale, f"{field}/scale")
        if np.any(scale.values <= 0):
            raise self.fail(f"{field}/scale", f"must be > 0, got {_describe(scale.values.tolist())}")
        self.coordinates(ds, field)
        return ds

    def params(self, group: xr.DataTree, name: str, family: Family, model: Model,
               center: xr.DataArray | None) -> xr.Dataset:
        """One node's parameters: dims from the family's symbolic axes, values checked by the family."""
        field = f"params/{name}"
        child = group.children.get(name)
        if child is None:
            raise self.fail(field, f"missing: the model declares {name!r}")
        ds = _decoded(child.to_dataset())
        kind = _kind(family)
        stored_family = ds.attrs.get("family", kind)
        if stored_family != kind:
            raise self.fail(f"{field}", f"holds {_describe(stored_family)} parameters, but the model "
                            f"declares {kind}")
        axes = family.param_axes()
        self.exact_variables(ds, tuple(axes), field)
        latent = model.latent_var
        from emdsl.compile import node_given

        decl = next((x for x in model.observed if x.name == name), None)
        given = node_given(model, decl) if decl is not None else None
        if given is not None:  # the node depends on some of several latents (or on none)
            latent_dims = [(n, member.k) for n, member in given.latents]
        elif len(model.latents) > 1:  # one of several latents: its own weights
            member = next(x.family for x in model.latents if x.name == name)
            latent_dims = [(name, member.k)]
        else:
            latent_dims = [(latent.name, latent.family.k)] if latent is not None else []
        K = int(np.prod([k for _, k in latent_dims], dtype=np.int64))
        event_dims: tuple[Hashable, ...] = center.dims if center is not None else ()
        event_sizes = dict(center.sizes) if center is not None else {}
        D = int(np.prod(list(event_sizes.values()), dtype=np.int64))
        others: dict[str, tuple[Hashable, int]] = {}  # axes this module has no name for, e.g. "level"
        flat: dict[str, np.ndarray] = {}
        for key, symbolic in axes.items():
            da = ds[key]
            where = f"{field}/{key}"
            dims, shape, internal = self.expected_layout(da, symbolic, latent_dims, K,
                                                         event_dims, event_sizes, D, others, where)
            if da.dims != dims or da.shape != shape:
                raise self.fail(where, f"expected dims {dict(zip(dims, shape, strict=True))} for "
                                f"{kind}, got {dict(da.sizes)}")
            self.numbers(da, where)
            flat[key] = np.asarray(da.values, dtype=float).reshape(internal)
        for x in (model.latents if len(model.latents) > 1 else [latent] if latent is not None else []):
            if x.name in ds.coords and [str(s) for s in ds[x.name].values] != [str(s) for s in x.family.states]:
                raise self.fail(f"{field}/{x.name}", f"the states {_describe(ds[x.name].values.tolist())} "
                                f"differ from the declaration's {list(x.family.states)}")
        self.coordinates(ds, field, center)
        checker = self.bound(family, ds, others, field)
        for key, values in flat.items():
            self.family_check(checker, {key: values}, f"{field}/{key}")
        self.family_check(checker, flat, field)
        return ds

    def expected_layout(self, da: xr.DataArray, symbolic: Sequence[str], latents: Sequence[tuple[Hashable, int]],
                        K: int,
                        event_dims: tuple[Hashable, ...], event_sizes: Mapping[Hashable, int], D: int,
                        others: dict[str, tuple[Hashable, int]], where: str
                        ) -> tuple[tuple[Hashable, ...], tuple[int, ...], list[int]]:
        """Labelled dims and shape a parameter must have, and its internal (flattened) shape."""
        dims: list[Hashable] = []
        shape: list[int] = []
        internal: list[int] = []
        for axis in symbolic:
            if axis == "latent":
                internal.append(K)
                for latent, k in latents:
                    dims.append(latent)
                    shape.append(k)
            elif axis == "event":
                dims.extend(event_dims)
                shape.extend(event_sizes[d] for d in event_dims)
                internal.append(D)
            elif axis == "event_":
                if len(event_dims) != 1:
                    raise self.fail(where, f"a matrix over the event needs exactly one event dimension, "
                                    f"the node has {event_dims}")
                dims.append(f"{event_dims[0]}_")
                shape.append(D)
                internal.append(D)
            else:
                # An axis named by a newer family (e.g. a categorical family's levels): one
                # dimension whose name and size the file gives, the same across the node.
                position = len(dims)
                if position >= da.ndim:
                    raise self.fail(where, f"has dims {da.dims}; the {axis!r} axis is missing")
                found = (da.dims[position], int(da.shape[position]))
                if others.setdefault(axis, found) != found:
                    raise self.fail(where, f"{axis!r} axis {found} differs from the node's {others[axis]}")
                dims.append(found[0])
                shape.append(found[1])
                internal.append(found[1])
        return tuple(dims), tuple(shape), internal

    def bound(self, family: Family, ds: xr.Dataset, others: Mapping[str, tuple[Hashable, int]],
              field: str) -> Family:
        """The family with its level labels, read off the stored parameters (no data are loaded)."""
        if "level" not in others or not hasattr(family, "bound"):
            return family
        dim = others["level"][0]
        levels = ds[dim].values.tolist() if dim in ds.coords else list(range(others["level"][1]))
        try:
            return family.bound(levels)  # type: ignore[attr-defined, no-any-return]
        except (ModelError, ValueError, TypeError) as error:
            raise self.fail(f"{field}/{dim}", f"the levels cannot be used: {_short(str(error), 200)}") from None

    def family_check(self, family: Family, values: Mapping[str, np.ndarray], where: str) -> None:
        try:
            family.check_params(dict(values), f"{self.file!r}: field {where}")
        except ModelError:
            raise
        # The family's check expects well-formed arrays; anything else it trips on is
        # still a bad value in the file, and is reported as one.
        except Exception as error:  # noqa: BLE001
            raise self.fail(where, f"{_kind(family)} cannot check these values: "
                            f"{type(error).__name__}: {_short(str(error), 200)}") from None

    def traces(self, group: xr.DataTree) -> xr.Dataset:
        ds = group.to_dataset()
        self.exact_variables(ds, _TRACE_VARIABLES, "traces")
        for name in (*_TRACE_VARIABLES, *_TRACE_COORDS):
            if name not in ds.variables:
                raise self.fail(f"traces/{name}", "missing")
            if ds[name].dims != ("step",):
                raise self.fail(f"traces/{name}", f"expected dims ('step',), got {ds[name].dims}")
        if ds.sizes["step"] == 0:
            raise self.fail("traces", "empty: a fit records at least its starting point")
        for name in _TRACE_VARIABLES:
            self.numbers(ds[name], f"traces/{name}")
        if np.any(ds["time"].values < 0):
            raise self.fail("traces/time", "must be >= 0 (seconds since the restart began)")
        extra = [str(name) for name in ds.coords if name not in (*_TRACE_COORDS, *_TRACE_OPTIONAL)]
        if extra:
            raise self.fail(f"traces/{extra[0]}", "unexpected coordinate; expected only "
                            f"{list(_TRACE_COORDS + _TRACE_OPTIONAL)}")
        for name in _TRACE_OPTIONAL:
            if name not in ds.coords:
                continue
            if ds[name].dims != ("step",):
                raise self.fail(f"traces/{name}", f"expected dims ('step',), got {ds[name].dims}")
            if name == "extrapolated":
                if ds[name].dtype.kind != "b" and not (ds[name].dtype.kind in "iu" and np.isin(ds[name].values,
                                                                                                  (0, 1)).all()):
                    raise self.fail("traces/extrapolated", f"expected booleans, got {_describe(ds[name].values)}")
            elif name == "e_steps":
                if np.any(self.indices(ds[name], "traces/e_steps") < 1):
                    raise self.fail("traces/e_steps", "must be >= 1 (a restart's first point costs one E-step)")
            else:
                self.numbers(ds[name], f"traces/{name}")
                if name == "slack" and np.any(ds[name].values < 0):
                    raise self.fail("traces/slack", "must be >= 0 (a rounding bound)")
        restart, iteration = (self.indices(ds[name], f"traces/{name}") for name in _TRACE_COORDS)
        # Restarts are stored one after another, each counting its iterations from 0.
        starts = np.flatnonzero(np.diff(restart, prepend=-1) != 0)
        if restart[0] != 0 or np.any(np.diff(restart) < 0) or np.any(np.diff(restart) > 1):
            raise self.fail("traces/restart", "restarts must be numbered 0, 1, ... in order, got "
                            f"{_describe(np.unique(restart).tolist())}")
        expected = np.arange(restart.size) - np.repeat(starts, np.diff(np.append(starts, restart.size)))
        if not np.array_equal(iteration, expected):
            raise self.fail("traces/iteration", "each restart's iterations must count 0, 1, ... in order")
        states = ds.attrs.get("converged")
        if not isinstance(states, str) or any(s not in ("0", "1") for s in states.split(",")) \
                or len(states.split(",")) != starts.size:
            raise self.fail("traces/converged", f"expected one 0 or 1 per restart ({starts.size}), "
                            f"comma-separated, got {_describe(states)}")
        prior = ds.attrs.get("prior")  # fit(prior=...): what the bootstrap and standard errors refit with
        if prior is not None and prior != "weak":
            raise self.fail("traces/prior", f"expected 'weak' (the only fit-wide prior), got {_describe(prior)}")
        return ds

    # -- shared checks ------------------------------------------------------------------
    def exact_variables(self, ds: xr.Dataset, expected: Sequence[str], field: str) -> None:
        missing = [name for name in expected if name not in ds.data_vars]
        if missing:
            raise self.fail(f"{field}/{missing[0]}", "missing")
        extra = [str(name) for name in ds.data_vars if name not in expected]
        if extra:
            raise self.fail(f"{field}/{extra[0]}", f"unexpected variable; expected only {list(expected)}")

    def numbers(self, da: xr.DataArray, field: str) -> None:
        if da.dtype.kind not in "iuf":
            raise self.fail(field, f"expected numbers, got dtype {da.dtype}")
        values = np.asarray(da.values, dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            first = np.unravel_index(int(np.flatnonzero(bad.ravel())[0]), values.shape)
            at = ", ".join(f"{d}={i}" for d, i in zip(da.dims, first, strict=True))
            raise self.fail(field, f"{int(bad.sum())} value(s) are not finite (NaN or ±inf), "
                            f"first {float(values[first])!r}{f' at {at}' if at else ''}")

    def indices(self, da: xr.DataArray, field: str) -> np.ndarray:
        if da.dtype.kind not in "iu" or np.any(da.values < 0):
            raise self.fail(field, f"expected non-negative integers, got dtype {da.dtype}")
        return np.asarray(da.values, dtype=np.int64)

    def coordinates(self, ds: xr.Dataset, field: str, center: xr.DataArray | None = None) -> None:
        """Labels must be distinct (they are selected by), and agree with the standardization's."""
        for name, coord in ds.coords.items():
            if coord.ndim != 1 or name not in ds.dims:
                continue
            labels = [str(v) for v in coord.values]
            if len(set(labels)) != len(labels):
                raise self.fail(f"{field}/{name}", f"coordinate labels must be distinct, got {_describe(labels)}")
            base = str(name)[:-1] if str(name).endswith("_") and str(name)[:-1] in ds.coords else name
            reference = center[base] if center is not None and base in center.coords else \
                ds[base] if base != name else None
            if reference is not None and [str(v) for v in reference.values] != labels:
                raise self.fail(f"{field}/{name}", f"coordinate labels {_describe(labels)} differ from "
                                f"{_describe([str(v) for v in reference.values])}")


def _declared_bytes(group: Any, prefix: str) -> list[tuple[str, int]]:
    """(path, bytes) of every variable in a netCDF4 group and its subgroups, from shapes only."""
    out = []
    for name, variable in group.variables.items():
        try:
            itemsize = np.dtype(variable.dtype).itemsize
        except TypeError:
            itemsize = 8  # variable-length types: count the pointer; the heap is in the file
        count = math.prod(int(n) for n in variable.shape)
        out.append((f"{prefix}{name}", count * max(itemsize, 1)))
    for name, child in group.groups.items():
        out.extend(_declared_bytes(child, f"{prefix}{name}/"))
    return out


def _decoded(ds: xr.Dataset) -> xr.Dataset:
    """Undo netCDF's object dtype on string coordinates, so labels compare as they did."""
    return ds.assign_coords({name: coord.values.astype(str) for name, coord in ds.coords.items()
                             if coord.dtype == object})


def _kind(family: Family) -> str:
    """The family's public name, as written in the file."""
    return str(getattr(family, "kind", type(family).__name__))


def _count(k: Any) -> int | None:
    """How many states or levels a ``k`` argument declares (a number, or a list of labels)."""
    if isinstance(k, list):
        return len(k)
    return int(k) if _is_integer(k) else None


def _is_integer(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _describe(value: Any) -> str:
    """A value (with its type, when that may be what is wrong), shortened: a crafted field can be arbitrarily long."""
    shown = _short(repr(value.item() if isinstance(value, np.generic) else value), 80)
    return shown if isinstance(value, list | tuple) else f"{shown} ({type(value).__name__})"
