"""The bundled data sets, checked against pandas' CSV reader and the data sets' published facts."""

from importlib import resources

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import emdsl as em

MEASUREMENTS = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
LABELS = ["species", "island", "sex"]


def _csv(name: str) -> pd.DataFrame:
    """The bundled file as pandas reads it: an independent parser of the same bytes."""
    with resources.as_file(resources.files("emdsl.datasets").joinpath(f"{name}.csv")) as path:
        return pd.read_csv(path, na_values=["NA"], keep_default_na=False)


@pytest.fixture(scope="module")
def penguins() -> xr.Dataset:
    return em.datasets.load("penguins")


def test_available_lists_them_all():
    assert em.datasets.available() == ["earthquakes", "faithful", "nile", "penguins", "us_rates"]


def test_unknown_name_says_what_exists():
    with pytest.raises(ValueError, match="earthquakes, faithful, nile, penguins, us_rates"):
        em.datasets.load("iris")


def test_faithful_unchanged():
    ds = em.datasets.load("faithful")
    with resources.files("emdsl.datasets").joinpath("faithful.csv").open() as file:
        expected = np.loadtxt(file, delimiter=",", skiprows=1)
    assert dict(ds.sizes) == {"sample": 272}
    assert list(ds.data_vars) == ["eruptions", "waiting"]
    for i, name in enumerate(ds.data_vars):
        assert ds[name].dtype == np.float64
        np.testing.assert_array_equal(ds[name].values, expected[:, i])
        assert ds[name].attrs == {"units": "minutes"}
    np.testing.assert_array_equal(ds["sample"].values, np.arange(272))
    # no licence line was added to faithful's attributes
    assert set(ds.attrs) == {"title", "source", "description"}


def test_penguins_shape_and_dtypes(penguins):
    assert dict(penguins.sizes) == {"sample": 344}
    assert list(penguins.data_vars) == ["species", "island", "bill_length_mm", "bill_depth_mm",
                                        "flipper_length_mm", "body_mass_g", "sex", "year"]
    np.testing.assert_array_equal(penguins["sample"].values, np.arange(344))
    for name in MEASUREMENTS:
        assert penguins[name].dtype == np.float64
    for name in LABELS:
        values = penguins[name].values
        assert values.dtype == object
        present = values[~penguins[name].isnull().values]
        assert all(type(v) is str for v in present)
    assert penguins["year"].dtype == np.int64
    assert set(np.unique(penguins["year"])) == {2007, 2008, 2009}


def test_penguins_holes_match_the_csv(penguins):
    frame = _csv("penguins")
    for name in frame.columns:
        assert int(penguins[name].isnull().sum()) == int(frame[name].isna().sum()), name
    # the counts the palmerpenguins documentation gives: 2 penguins unmeasured, 11 unsexed
    assert [int(penguins[name].isnull().sum()) for name in MEASUREMENTS] == [2, 2, 2, 2]
    assert int(penguins["sex"].isnull().sum()) == 11


def test_penguins_values_match_the_csv(penguins):
    frame = _csv("penguins")
    for name in MEASUREMENTS:
        np.testing.assert_array_equal(penguins[name].values, frame[name].to_numpy(dtype=float))
    for name in LABELS:
        ours = penguins[name].values
        theirs = frame[name].to_numpy(dtype=object)
        holes = frame[name].isna().to_numpy()
        np.testing.assert_array_equal(penguins[name].isnull().values, holes)
        assert list(ours[~holes]) == list(theirs[~holes])
    np.testing.assert_array_equal(penguins["year"].values, frame["year"].to_numpy())


def test_penguins_published_counts(penguins):
    species, counts = np.unique(penguins["species"].values.astype(str), return_counts=True)
    assert dict(zip(species, counts.tolist())) == {"Adelie": 152, "Chinstrap": 68, "Gentoo": 124}
    sexes, counts = np.unique(penguins["sex"].dropna("sample").values.astype(str), return_counts=True)
    assert dict(zip(sexes, counts.tolist())) == {"female": 165, "male": 168}


def test_penguins_attributes(penguins):
    assert {"title", "source", "licence", "description"} <= set(penguins.attrs)
    assert "CC0" in penguins.attrs["licence"]
    assert "Horst" in penguins.attrs["source"] and "palmerpenguins" in penguins.attrs["source"]
    assert {name: penguins[name].attrs.get("units") for name in MEASUREMENTS} == {
        "bill_length_mm": "mm", "bill_depth_mm": "mm", "flipper_length_mm": "mm", "body_mass_g": "g"}


def test_penguins_labels_with_holes_are_categorical_levels(penguins):
    # the holes of a text column are missing labels, not a level of their own
    fit = em.Model().observe("sex", em.Categorical).fit(penguins)
    probs = fit.params["sex"]["probs"]
    assert list(probs["level"].values) == ["female", "male"]
    np.testing.assert_allclose(probs.values, np.array([165, 168]) / 333)


def test_us_rates_match_the_file_and_the_volcker_years():
    ds = em.datasets.load("us_rates")
    frame = _csv("us_rates")
    assert dict(ds.sizes) == {"sample": 203}
    for column in frame.columns:
        np.testing.assert_array_equal(ds[column].values, frame[column].values)
    assert (int(ds["year"][0]), int(ds["quarter"][0]), int(ds["year"][-1]), int(ds["quarter"][-1])) == (1959, 1, 2009, 3)
    # the bill rate peaked above 15% in 1981 (FRED's TB3MS), inflation in double digits around 1980
    peak = int(np.argmax(ds["tbilrate"].values))
    assert int(ds["year"][peak]) == 1981 and float(ds["tbilrate"].max()) > 15
    assert ds.attrs["licence"].startswith("public domain")


def test_earthquakes_match_the_file_and_the_books_summary():
    ds = em.datasets.load("earthquakes")
    frame = _csv("earthquakes")
    assert dict(ds.sizes) == {"year": 107} and list(ds.data_vars) == ["quakes"]
    np.testing.assert_array_equal(ds["year"].values, frame["year"].values)
    np.testing.assert_array_equal(ds["quakes"].values, frame["quakes"].values)
    np.testing.assert_array_equal(ds["year"].values, np.arange(1900, 2007))
    # Zucchini, MacDonald & Langrock (2016) §1.2.3: mean 19.364, variance 51.573
    assert round(float(ds["quakes"].mean()), 3) == 19.364
    assert round(float(ds["quakes"].var(ddof=1)), 3) == 51.573
    assert ds["quakes"].attrs == {"units": "earthquakes per year"}
    assert ds.attrs["licence"].startswith("public domain")
