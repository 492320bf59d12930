"""Crafted fit files: em.load must turn every damaged, foreign or edited file into a ModelError.

Each case starts from a real saved fit, damages it in one way, and loads it in a
child process with its address space capped, so that a crash inside the netCDF/HDF5
library, or an allocation driven by a doctored size, cannot take the test run down:
the child must exit normally and report a ``ModelError`` naming the file and the field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import pytest
import xarray as xr

import emdsl as em

# Loads every path given on the command line and prints one JSON line per file.
# Anything at all (MemoryError included) is reported, so the parent can tell a wrong
# exception from a crash (a crash shows as a non-zero exit status instead).
CHILD = """
import json, resource, sys
limit = 4 << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import emdsl as em
for path in sys.argv[1:]:
    try:
        em.load(path)
        outcome = {"path": path, "error": None, "message": ""}
    except BaseException as error:
        outcome = {"path": path, "error": type(error).__name__, "message": str(error)}
    print(json.dumps(outcome), flush=True)
"""

UNREADABLE = "not a readable emdsl fit"


# -- ways to edit a file ------------------------------------------------------------------
def _group(nc: netCDF4.Dataset, path: str) -> Any:
    for part in filter(None, path.split("/")):
        nc = nc.groups[part]
    return nc


def set_attrs(group: str = "", **changes: Any) -> Callable[[Path], None]:
    """Set (or, with None, delete) attributes of a group."""
    def edit(path: Path) -> None:
        with netCDF4.Dataset(path, "a") as nc:
            target = _group(nc, group)
            for name, value in changes.items():
                if value is None:
                    target.delncattr(name)
                else:
                    target.setncattr(name, value)
    return edit


def set_values(variable: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    """Overwrite a variable's values in place (same shape and type)."""
    def edit(path: Path) -> None:
        group, name = variable.rsplit("/", 1)
        with netCDF4.Dataset(path, "a") as nc:
            var = _group(nc, group).variables[name]
            var.set_auto_mask(False)
            var[...] = change(np.array(var[...]))
    return edit


def edit_model(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """Rewrite the JSON model declaration."""
    def edit(path: Path) -> None:
        with netCDF4.Dataset(path, "a") as nc:
            spec = json.loads(nc.getncattr("model"))
            spec = change(spec) or spec
            nc.setncattr("model", json.dumps(spec))
    return edit


def rewrite(change: Callable[[dict[str, xr.Dataset]], None]) -> Callable[[Path], None]:
    """Restructure the file through xarray: ``change`` edits {group path: Dataset} in place."""
    def edit(path: Path) -> None:
        with xr.open_datatree(path, engine="netcdf4") as opened:
            groups = {key: ds.copy() for key, ds in opened.load().to_dict().items()}
        change(groups)
        xr.DataTree.from_dict(groups).to_netcdf(path, engine="netcdf4", mode="w")
    return edit


def truncate(fraction: float) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return edit


def overwrite_bytes(path: Path) -> None:
    path.write_bytes(b"This is not netCDF, it only pretends to be.\n" * 50)


def corrupt_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2048] = bytes(range(256)) * 8
    path.write_bytes(bytes(data))


def foreign(path: Path) -> None:
    xr.Dataset({"temperature": ("time", [11.5, 12.0])}, attrs={"title": "weather"}).to_netcdf(
        path, engine="netcdf4")


def huge_declared_variable(path: Path) -> None:
    """80 GB declared, nothing written: HDF5 stores unwritten chunks as nothing at all."""
    with netCDF4.Dataset(path, "a") as nc:
        traces = nc.groups["traces"]
        traces.createDimension("big", 10**10)
        traces.createVariable("junk", "f8", ("big",), chunksizes=(1024,))


def huge_declared_coordinate(path: Path) -> None:
    """An index coordinate is read while opening: without a size check, that is the allocation."""
    with netCDF4.Dataset(path, "a") as nc:
        group = nc.groups["params"].groups["x"]
        group.createDimension("big", 10**10)
        group.createVariable("big", "i8", ("big",), chunksizes=(1024,))


def drop_group(key: str) -> Callable[[Path], None]:
    return rewrite(lambda groups: groups.pop(key))


def _drop_variable(key: str, name: str) -> Callable[[dict[str, xr.Dataset]], None]:
    def change(groups: dict[str, xr.Dataset]) -> None:
        groups[key] = groups[key].drop_vars(name)
    return change


def _transpose_mean(groups: dict[str, xr.Dataset]) -> None:
    groups["/params/x"]["mean"] = groups["/params/x"]["mean"].transpose()


def _mean_with_three_rows(groups: dict[str, xr.Dataset]) -> None:
    ds = groups["/params/x"]
    groups["/params/x"] = ds.assign(mean=(("w", "feature"), np.ones((3, 2))))


def _three_states(groups: dict[str, xr.Dataset]) -> None:
    groups["/params/z"] = xr.Dataset({"probs": ("z", [0.2, 0.3, 0.5])}, coords={"z": [0, 1, 2]},
                                     attrs=groups["/params/z"].attrs)


def _extra_node(groups: dict[str, xr.Dataset]) -> None:
    groups["/params/y"] = groups["/params/z"]


def _string_mean(groups: dict[str, xr.Dataset]) -> None:
    mean = groups["/params/x"]["mean"]
    # A new DataArray, not a copy: a copy keeps the float encoding, which would cast the text back.
    groups["/params/x"]["mean"] = xr.DataArray(np.full(mean.shape, "1.0"), dims=mean.dims)


def _swapped_features(groups: dict[str, xr.Dataset]) -> None:
    groups["/params/x"] = groups["/params/x"].assign_coords(
        feature=["waiting", "eruptions"], feature_=["waiting", "eruptions"])


def _relabelled_states(groups: dict[str, xr.Dataset]) -> None:
    for key in ("/params/z", "/params/x"):
        groups[key] = groups[key].assign_coords(z=[5, 6])


def _renumbered_restarts(groups: dict[str, xr.Dataset]) -> None:
    traces = groups["/traces"]
    groups["/traces"] = traces.assign_coords(restart=("step", np.full(traces.sizes["step"], 3)))


def _set_k(k: Any) -> Callable[[dict], None]:
    def change(spec: dict) -> None:
        spec["latents"][0]["arguments"]["k"] = k
    return change


def _set_family(spec: dict) -> None:
    spec["observed"][0]["family"] = "Evil"


def _unexpected_argument(spec: dict) -> None:
    spec["observed"][0]["arguments"]["command"] = "rm -rf /"


def _not_definite(covariance: np.ndarray) -> np.ndarray:
    covariance[0] = [[1.0, 2.0], [2.0, 1.0]]
    return covariance


# name: (edit, the field the error must name, or None for "the file is unreadable"), each
# run in a child of its own when ``alone`` (the cases that feed damaged bytes to HDF5).
CASES: dict[str, tuple[Callable[[Path], None], str | None, bool]] = {
    "truncated to half": (truncate(0.5), None, True),
    "truncated to 100 bytes": (truncate(100 / 20_000), None, True),
    "empty file": (truncate(0.0), None, True),
    "not netCDF": (overwrite_bytes, None, True),
    "bytes overwritten in the middle": (corrupt_middle, None, True),
    "80 GB variable declared": (huge_declared_variable, "traces/junk", True),
    "80 GB coordinate declared": (huge_declared_coordinate, "params/x/big", True),
    "foreign netCDF": (foreign, "emdsl_format", False),
    "format version 2": (set_attrs(emdsl_format=np.int64(2)), "emdsl_format", False),
    "format version as text": (set_attrs(emdsl_format="1"), "emdsl_format", False),
    "loglik missing": (set_attrs(loglik=None), "loglik", False),
    "loglik as text": (set_attrs(loglik="-1130.2"), "loglik", False),
    "loglik NaN": (set_attrs(loglik=np.nan), "loglik", False),
    "n_samples negative": (set_attrs(n_samples=np.int64(-5)), "n_samples", False),
    "n_params fractional": (set_attrs(n_params=1.5), "n_params", False),
    "restart out of range": (set_attrs(restart=np.int64(7)), "restart", False),
    "converged is 2": (set_attrs(converged=np.int64(2)), "converged", False),
    "seed not a number": (set_attrs(seed="12; import os"), "seed", False),
    "sample_dim not JSON": (set_attrs(sample_dim="sample"), "sample_dim", False),
    "model not JSON": (set_attrs(model="Model().latent('z', Categorical(2))"), "model", False),
    "model a JSON list": (edit_model(lambda spec: [spec]), "model", False),
    "model missing": (set_attrs(model=None), "model", False),
    "k = 10**9": (edit_model(_set_k(10**9)), "model", False),
    "k as text": (edit_model(_set_k("2")), "model", False),
    "k with 10**5000 digits": (set_attrs(model='{"latents": [{"name": "z", "family": "Categorical", '
                                         f'"arguments": {{"k": 1{"0" * 5000}}}}}], "observed": []}}'),
                               "model", False),
    "unknown family": (edit_model(_set_family), "model", False),
    "unexpected family argument": (edit_model(_unexpected_argument), "model", False),
    "scale 0": (set_values("standardization/x/scale", lambda v: v * 0), "standardization/x/scale", False),
    "scale NaN": (set_values("standardization/x/scale", lambda v: v * np.nan), "standardization/x/scale",
                  False),
    "scale negative": (set_values("standardization/x/scale", lambda v: -v), "standardization/x/scale",
                       False),
    "center infinite": (set_values("standardization/x/center", lambda v: v + np.inf),
                        "standardization/x/center", False),
    "probs negative": (set_values("params/z/probs", lambda v: np.array([-0.5, 1.5])), "params/z/probs",
                       False),
    "probs not summing to 1": (set_values("params/z/probs", lambda v: v * 2), "params/z/probs", False),
    "mean NaN": (set_values("params/x/mean", lambda v: v * np.nan), "params/x/mean", False),
    "covariance not positive definite": (set_values("params/x/covariance", _not_definite),
                                         "params/x/covariance", False),
    "mean transposed": (rewrite(_transpose_mean), "params/x/mean", False),
    "mean with 3 rows": (rewrite(_mean_with_three_rows), "params/x/mean", False),
    "mean as text": (rewrite(_string_mean), "params/x/mean", False),
    "covariance missing": (rewrite(_drop_variable("/params/x", "covariance")), "params/x/covariance",
                           False),
    "params/x missing": (drop_group("/params/x"), "params/x", False),
    "params missing": (rewrite(lambda g: [g.pop(k) for k in list(g) if k.startswith("/params")]),
                       "params", False),
    "3 states stored, 2 declared": (rewrite(_three_states), "model", False),
    "undeclared node": (rewrite(_extra_node), "params/y", False),
    "family attribute edited": (set_attrs("params/x", family="Normal"), "params/x", False),
    "state labels edited": (rewrite(_relabelled_states), "params/z/z", False),
    "feature labels swapped": (rewrite(_swapped_features), "params/x/feature", False),
    "standardization missing": (drop_group("/standardization/x"), "standardization/x", False),
    "trace loglik NaN": (set_values("traces/loglik", lambda v: v * np.nan), "traces/loglik", False),
    "trace time negative": (set_values("traces/time", lambda v: v - 1e6), "traces/time", False),
    "trace elbo missing": (rewrite(_drop_variable("/traces", "elbo")), "traces/elbo", False),
    "traces restart renumbered": (rewrite(_renumbered_restarts), "traces/restart", False),
    "traces converged flags": (set_attrs("traces", converged="yes"), "traces/converged", False),
    "traces prior unknown": (set_attrs("traces", prior="strong"), "traces/prior", False),
    "weight_total zero": (set_attrs(weight_total=0.0), "weight_total", False),
    "sequence_dims not a list": (set_attrs(sequence_dims='"seq"'), "sequence_dims", False),
    "sequence_dims on a mixture": (set_attrs(sequence_dims='["seq"]'), "sequence_dims", False),
    "data_dtypes of an unknown variable": (set_attrs(data_dtypes='{"y": "<f8"}'), "data_dtypes", False),
    "data_dtypes not a dtype": (set_attrs(data_dtypes='{"waiting": "date"}'), "data_dtypes", False),
    "data_dtypes of labels": (set_attrs(data_dtypes='{"waiting": "<U3"}'), "data_dtypes", False),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[em.Fit, Path]:
    path = tmp_path_factory.mktemp("io") / "good.nc"
    fit = (em.Model().latent("z", em.Categorical(2))
           .observe(["eruptions", "waiting"], em.MultivariateNormal, name="x")
           .fit(em.datasets.load("faithful"), seed=0))
    fit.save(path)
    return fit, path


@pytest.fixture(scope="module")
def good_file(saved: tuple[em.Fit, Path]) -> Path:
    return saved[1]


def _load_in_child(paths: list[Path]) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    # The child must import the emdsl under test, wherever pytest found it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(em.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True,
                          timeout=60, env=env)
    outcomes = {}
    for line in done.stdout.splitlines():
        outcome = json.loads(line)
        outcomes[outcome["path"]] = outcome
    return done, outcomes


@pytest.fixture(scope="module")
def outcomes(good_file: Path) -> dict[str, tuple[subprocess.CompletedProcess, dict | None, Path]]:
    """Craft every file, load them in as few children as isolation allows; results by case name."""
    folder = good_file.parent
    paths: dict[str, Path] = {}
    for i, (name, (edit, _, _)) in enumerate(CASES.items()):
        paths[name] = folder / f"case{i:02d}.nc"
        shutil.copyfile(good_file, paths[name])
        edit(paths[name])
    control = folder / "control.nc"
    shutil.copyfile(good_file, control)
    batches = [[name] for name, (_, _, alone) in CASES.items() if alone]
    batches.append(["control", *(name for name, (_, _, alone) in CASES.items() if not alone)])
    paths["control"] = control
    results = {}
    for batch in batches:
        done, found = _load_in_child([paths[name] for name in batch])
        for name in batch:
            results[name] = (done, found.get(str(paths[name])), paths[name])
    return results


def test_child_loads_an_untouched_file(outcomes):
    done, outcome, _ = outcomes["control"]
    assert done.returncode == 0, done.stderr
    assert outcome == {"path": outcome["path"], "error": None, "message": ""}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_file_raises_model_error_naming_file_and_field(case, outcomes):
    done, outcome, path = outcomes[case]
    assert done.returncode == 0, f"the child did not exit normally ({done.returncode}): {done.stderr[-2000:]}"
    assert outcome is not None, done.stderr[-2000:]
    assert outcome["error"] == "ModelError", outcome
    message = outcome["message"]
    assert repr(str(path)) in message
    field = CASES[case][1]
    if field is None:
        assert UNREADABLE in message
    else:
        assert f"field {field}:" in message


def test_good_file_round_trips_exactly(saved, faithful):
    fit, path = saved
    back = em.load(path)
    assert back.model == fit.model
    for name in fit.params.children:
        xr.testing.assert_identical(back.params[name].to_dataset(), fit.params[name].to_dataset())
    for name, units in fit.standardization.items():
        xr.testing.assert_identical(back.standardization[name], units)
    xr.testing.assert_identical(back.traces, fit.traces)
    assert (back.loglik, back.n_params, back.n_samples, back.seed, back.restart, back.converged,
            back.stopped, back.sample_dim) == (fit.loglik, fit.n_params, fit.n_samples, fit.seed,
                                               fit.restart, fit.converged, fit.stopped, fit.sample_dim)
    xr.testing.assert_identical(back.predict_proba(faithful), fit.predict_proba(faithful))


def test_fit_load_and_save_delegate_to_emdsl_io(tmp_path, good_file):
    back = em.Fit.load(good_file)
    back.save(tmp_path / "again.nc")
    again = em.load(tmp_path / "again.nc")
    for name in back.params.children:
        xr.testing.assert_identical(again.params[name].to_dataset(), back.params[name].to_dataset())


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        em.load(tmp_path / "nowhere.nc")


@pytest.mark.parametrize("chain", [False, True])
def test_a_weighted_fit_keeps_its_weights_and_standard_errors(tmp_path, chain):
    """Without its weights, the loaded fit's standard errors were an unweighted fit's (silently)."""
    rng = np.random.default_rng(0)
    if chain:
        x = rng.normal(size=(3, 80))
        x[:, 40:] += 3
        ds = xr.Dataset({"x": (("seq", "time"), x), "w": ("seq", [1.0, 2.0, 3.0])}, coords={"seq": ["a", "b", "c"]})
        model = em.Model().latent("z", em.Categorical(2), markov="time").observe("x", em.Normal)
    else:
        ds = xr.Dataset({"x": ("sample", np.r_[rng.normal(0, 1, 100), rng.normal(4, 1, 100)]),
                         "w": ("sample", rng.integers(1, 5, 200).astype(float))})
        model = em.Model().latent("z", em.Categorical(2)).observe("x", em.Normal)
    fit = model.fit(ds, weights="w", seed=0, tol=1e-12)
    fit.save(tmp_path / "weighted.nc")
    back = em.load(tmp_path / "weighted.nc")
    np.testing.assert_array_equal(back.weights.values, fit.weights.values)
    assert back.weights.dims == fit.weights.dims
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a chain's initial probability on its boundary, alike in both
        expected, got = fit.standard_errors(), back.standard_errors(data=ds)
    np.testing.assert_allclose(got["x"]["mean"].values, expected["x"]["mean"].values, rtol=1e-10)


@pytest.mark.parametrize(("edit", "message"), [
    (set_values("weights/weights", lambda v: -v), "non-negative"),
    (set_values("weights/weights", lambda v: v * np.nan), "not finite"),
    (set_values("weights/weights", lambda v: v * 2), "not to weight_total"),
    (set_attrs("weights", dims='["draw"]'), "expected dims"),
    (set_attrs("weights", shape="[3]"), "does not hold"),
    (set_attrs(weight_total=None), "without weight_total"),
])
def test_crafted_weights_are_refused_naming_the_field(tmp_path, edit, message):
    rng = np.random.default_rng(1)
    ds = xr.Dataset({"x": ("sample", rng.normal(size=50)), "w": ("sample", rng.integers(1, 4, 50).astype(float))})
    path = tmp_path / "weighted.nc"
    em.Model().observe("x", em.Normal).fit(ds, weights="w").save(path)
    edit(path)
    with pytest.raises(em.ModelError, match=f"field weights.*{message}"):
        em.load(path)
