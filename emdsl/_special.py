"""log B(a, b) accurate where scipy's loses digits: large shape parameters.

scipy's ``betaln`` subtracts log-gamma values of order (a + b)·log(a + b): measured against
mpmath (40 digits), its absolute error reaches 2.9e-7 at (1e8, 100), where the result is
−1483 (a relative error of 2e-10), 6.8e-10 at (1e6, 3), and up to 6e-11 of max(|result|, 1)
for a + b between 10 and 3e4; the form below, used from a + b = 10 on, stays within 2.1e-15
of max(|result|, 1) at 600 random points with a, b from 1e-2 to 1e9. With scipy's, a Beta
component with a concentration α + β of 1e6–1e8 (tightly clustered proportions, or one
collapsing onto a point, capped at 1/floor) got a log-partition wrong by far more than the E-step's
rounding bound (ε times the magnitudes summed) allows, and EM's run-time check fails on
rounding alone (found by the fuzz run: a Beta fitted to one value). Written out from
Stirling's series, the large terms cancel analytically:

    log B(a, b) = (a − ½) log(a/(a+b)) + (b − ½) log(b/(a+b)) − ½ log(a+b) + ½ log 2π
                  + ω(a) + ω(b) − ω(a+b),

with ω(x) = log Γ(x) − [(x − ½) log x − x + ½ log 2π] the Stirling remainder (its
asymptotic series from x = 10, else the difference itself, which is small there). Every
term is then at most of the result's order.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)
#: from this a + b on, the form above (ω's series converges there for the larger argument);
#: below it scipy's betaln, whose arguments are then small enough for its log-gamma differences
_LARGE = 10.0
#: ω's asymptotic series Σ B₂ₖ / (2k(2k − 1) x²ᵏ⁻¹) to k = 8 (B₂ₖ the Bernoulli numbers); the next
#: term, 43867/(244188 x¹⁷), is below 2e-18 from x = 10
_SERIES = (1.0 / 12.0, -1.0 / 360.0, 1.0 / 1260.0, -1.0 / 1680.0, 1.0 / 1188.0, -691.0 / 360360.0, 1.0 / 156.0,
           -3617.0 / 122400.0)


def stirling_remainder(x: np.ndarray) -> np.ndarray:
    """ω(x) = log Γ(x) − [(x − ½) log x − x + ½ log 2π], for x > 0."""
    x = np.asarray(x, dtype=float)
    big = x >= 10.0
    safe = np.where(big, x, 10.0)
    inverse_square = 1.0 / (safe * safe)
    series = np.zeros_like(safe)
    for coefficient in reversed(_SERIES):
        series = series * inverse_square + coefficient
    small = np.where(big, 1.0, x)
    direct = special.gammaln(small) - ((small - 0.5) * np.log(small) - small + _HALF_LOG_2PI)
    return np.where(big, series / safe, direct)


def betaln(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """log B(a, b) for a, b > 0, to a few ulps of the result also for large a and b.

    Examples
    --------
    >>> from emdsl._special import betaln
    >>> float(betaln(2.0, 3.0))  # log(1/12)
    -2.4849066497880004
    """
    a, b = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    total = a + b
    large = total >= _LARGE
    out = special.betaln(a, b)
    if not large.any():
        return out
    a, b, total = (np.where(large, v, _LARGE / 2) for v in (a, b, total))
    # log(x / (a+b)) for the larger of a, b through log1p(−other/(a+b)): multiplied by x − ½,
    # its rounding stays of order the other, not of order x·ε
    with np.errstate(divide="ignore"):  # the branch not taken may be log 0 (one argument ≪ the other)
        log_a = np.where(a >= b, np.log1p(-b / total), np.log(a / total))
        log_b = np.where(b > a, np.log1p(-a / total), np.log(b / total))
    stirling = ((a - 0.5) * log_a + (b - 0.5) * log_b - 0.5 * np.log(total) + _HALF_LOG_2PI
                + stirling_remainder(a) + stirling_remainder(b) - stirling_remainder(total))
    return np.where(large, stirling, out)
