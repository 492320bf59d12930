"""Small data sets bundled with emdsl, as labelled xarray Datasets."""

from __future__ import annotations

import csv
import io
from importlib import resources
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["available", "load"]

#: how the CSV files spell a missing value (R's ``write.csv``)
_MISSING = "NA"

# Columns are numbers (float, NaN for a hole) unless listed under "text" (object arrays
# of str with a missing marker for a hole, which Categorical reads as a missing label) or
# "integer" (int64; only for columns without holes, whose values are labels more than amounts).
_DESCRIPTIONS: dict[str, dict[str, Any]] = {
    "earthquakes": {
        "title": "Major earthquakes in the world per year, 1900-2006",
        "source": "Zucchini, MacDonald & Langrock (2016), Hidden Markov Models for Time Series: An "
                  "Introduction Using R, 2nd ed., Chapman & Hall/CRC, Table 1.1; compiled from the US "
                  "Geological Survey's Earthquake Hazards Program",
        "licence": "public domain (US government data)",
        "description": "The number of earthquakes of magnitude 7 or more in each of the 107 years "
                       "1900-2006: overdispersed counts (mean 19.4, variance 51.6) with runs of busy "
                       "and quiet years, the book's running example of Poisson mixtures and Poisson "
                       "hidden Markov models.",
        "units": {"quakes": "earthquakes per year"},
        "integer": ("year",),
        "dim": "year",
    },
    "faithful": {
        "title": "Old Faithful geyser eruptions",
        "source": "Härdle (1991), as in R's datasets::faithful; Azzalini & Bowman (1990)",
        "description": "Duration of 272 eruptions of the Old Faithful geyser (Yellowstone) and the "
                       "waiting time until the next one.",
        "units": {"eruptions": "minutes", "waiting": "minutes"},
    },
    "penguins": {
        "title": "Palmer Archipelago (Antarctica) penguins",
        "source": "Horst, Hill & Gorman (2020), palmerpenguins: Palmer Archipelago (Antarctica) "
                  "penguin data, R package version 0.1.0, doi:10.5281/zenodo.3960218; data "
                  "collected by K. Gorman and Palmer Station LTER; copied from the palmerpenguins "
                  "Python package (penguins.csv)",
        "licence": "CC0 1.0 (public domain dedication)",
        "description": "Measurements of 344 penguins of three species (Adélie, Chinstrap, Gentoo) "
                       "on three islands near Palmer Station, 2007–2009: bill length and depth, "
                       "flipper length, body mass, sex and year. 2 penguins have no "
                       "measurements and 11 no recorded sex.",
        "units": {"bill_length_mm": "mm", "bill_depth_mm": "mm", "flipper_length_mm": "mm",
                  "body_mass_g": "g"},
        "text": ("species", "island", "sex"),
        "integer": ("year",),
    },
    "nile": {
        "title": "Annual flow of the river Nile at Aswan, 1871-1970",
        "source": "Cobb (1978), The problem of the Nile: conditional solution to a changepoint problem, "
                  "Biometrika 65(2), 243-251; copied from statsmodels.datasets.nile",
        "licence": "public domain (as statsmodels.datasets.nile states)",
        "description": "Annual flow volume of the Nile at Aswan for the 100 years 1871-1970, with a "
                       "drop around 1898 (the first Aswan dam was begun that year).",
        "units": {"volume": "1e8 m^3"},
        "integer": ("year",),
        # the years are the dimension (a time series), not a column over samples
        "dim": "year",
    },
    "us_rates": {
        "title": "US interest and inflation rates, quarterly, 1959Q1-2009Q3",
        "source": "Federal Reserve Bank of St. Louis (FRED) and the Bureau of Labor Statistics, compiled by "
                  "Skipper Seabold; copied (columns year, quarter, tbilrate, infl, unemp) from "
                  "statsmodels.datasets.macrodata",
        "licence": "public domain (as statsmodels.datasets.macrodata states; US government data)",
        "description": "203 quarters of the 3-month Treasury bill rate (quarterly average of the monthly "
                       "rates), inflation (400 log(CPI_t / CPI_t-1), annualized) and unemployment "
                       "(seasonally adjusted). The relation of the bill rate to inflation changed when the "
                       "Federal Reserve under Volcker turned to fighting inflation in 1979.",
        "units": {"tbilrate": "% per year", "infl": "% per year", "unemp": "%"},
        "integer": ("year", "quarter"),
    },
}

_ATTRS = ("title", "source", "licence", "description")


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(_DESCRIPTIONS)


def load(name: str) -> xr.Dataset:
    """Load a bundled data set.

    Parameters
    ----------
    name : str
        ``"earthquakes"``: the number of major earthquakes ``quakes`` (magnitude 7 or
        more, public domain) in each year 1900-2006, over ``year``: counts for Poisson
        mixtures and Poisson hidden Markov models.

        ``"faithful"``: Old Faithful, variables ``eruptions`` and ``waiting`` over ``sample``.

        ``"penguins"``: the Palmer penguins (CC0), 344 penguins over ``sample``: the
        measurements ``bill_length_mm``, ``bill_depth_mm``, ``flipper_length_mm`` and
        ``body_mass_g`` as floats with NaN for a hole; ``species``, ``island`` and ``sex``
        as object arrays of str with a missing marker for a hole (``None``, or ``NaN``
        where xarray converts object arrays through pandas); ``year`` as integers.
        Use ``.isnull()`` to find the holes of either kind.

        ``"nile"``: the annual flow ``volume`` of the Nile at Aswan (public domain), over
        ``year`` (1871-1970): a time series for hidden Markov models.

        ``"us_rates"``: US 3-month Treasury bill rate ``tbilrate``, inflation ``infl`` and
        unemployment ``unemp`` (public domain), 203 quarters 1959-2009 over ``sample``, with
        ``year`` and ``quarter`` as integers: a regression with two regimes (tutorial 08).

    Returns
    -------
    xarray.Dataset
        Units in each variable's ``units`` attribute; title, source (and licence) in the
        Dataset's attributes.

    Examples
    --------
    >>> import emdsl as em
    >>> ds = em.datasets.load("faithful")
    >>> dict(ds.sizes)
    {'sample': 272}
    >>> penguins = em.datasets.load("penguins")
    >>> int(penguins["sex"].isnull().sum()), int(penguins["body_mass_g"].isnull().sum())
    (11, 2)
    """
    if name not in _DESCRIPTIONS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available())}")
    meta = _DESCRIPTIONS[name]
    text = resources.files(__package__).joinpath(f"{name}.csv").read_text(encoding="utf-8")
    header, *rows = csv.reader(io.StringIO(text))
    dim = meta.get("dim", "sample")
    variables = {}
    coords: dict[str, Any] = {"sample": np.arange(len(rows))} if dim == "sample" else {}
    for i, column in enumerate(header):
        values = _column([row[i] for row in rows], column, meta)
        if column == dim:
            coords[dim] = values
            continue
        attrs = {"units": meta["units"][column]} if column in meta["units"] else {}
        variables[column] = (dim, values, attrs)
    return xr.Dataset(variables, coords=coords, attrs={key: meta[key] for key in _ATTRS if key in meta})


def _column(cells: list[str], column: str, meta: dict[str, Any]) -> np.ndarray:
    """One CSV column as an array of the kind its data set declares."""
    if column in meta.get("text", ()):
        # object dtype, not numpy's fixed-width str: a str array cannot hold a missing value.
        # xarray may turn these None into NaN (it passes object arrays through pandas).
        return np.array([None if cell == _MISSING else cell for cell in cells], dtype=object)
    if column in meta.get("integer", ()):
        return np.array([int(cell) for cell in cells], dtype=np.int64)
    return np.array([np.nan if cell == _MISSING else float(cell) for cell in cells])
