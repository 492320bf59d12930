"""Small data sets bundled with emdsl, as labelled xarray Datasets."""

from __future__ import annotations

from importlib import resources

import numpy as np
import xarray as xr

__all__ = ["available", "load"]

_DESCRIPTIONS = {
    "faithful": {
        "title": "Old Faithful geyser eruptions",
        "source": "Härdle (1991), as in R's datasets::faithful; Azzalini & Bowman (1990)",
        "description": "Duration of 272 eruptions of the Old Faithful geyser (Yellowstone) and the "
                       "waiting time until the next one.",
        "units": {"eruptions": "minutes", "waiting": "minutes"},
    },
}


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(_DESCRIPTIONS)


def load(name: str) -> xr.Dataset:
    """Load a bundled data set.

    Parameters
    ----------
    name : str
        ``"faithful"``: Old Faithful, variables ``eruptions`` and ``waiting`` over ``sample``.

    Returns
    -------
    xarray.Dataset

    Examples
    --------
    >>> import emdsl as em
    >>> ds = em.datasets.load("faithful")
    >>> dict(ds.sizes)
    {'sample': 272}
    """
    if name not in _DESCRIPTIONS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available())}")
    meta = _DESCRIPTIONS[name]
    text = resources.files(__package__).joinpath(f"{name}.csv").read_text()
    header, *rows = text.strip().splitlines()
    columns = header.split(",")
    values = np.array([[float(v) for v in row.split(",")] for row in rows])
    ds = xr.Dataset(
        {column: ("sample", values[:, i], {"units": meta["units"][column]}) for i, column in enumerate(columns)},
        coords={"sample": np.arange(len(values))},
        attrs={key: meta[key] for key in ("title", "source", "description")},
    )
    return ds
