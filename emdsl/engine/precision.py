"""The E-step in single precision (``fit(..., dtype="float32")``).

Φ, L, R and H are float32: half the memory traffic of the E-step's two matrix products,
and BLAS's sgemm, about twice as fast as dgemm. What is *summed* stays float64:

* each block's R Φᵀ (K × S) is added into float64 statistics, so the error of the sums
  grows with the rows of one block (≈ 1e-7·√rows, blocks of at most 4096 rows here), not
  with N: summed in float32, a sum over 1e8 rows would lose every digit beyond the 7th
  (the increments drop below half an ulp of the running total) and the moments would drift;
* the M-step works on those float64 sums, in float64, and the variances it returns are
  floored (``floor`` · the data's variance): single precision can perturb E[x²] − E[x]²
  by ~1e-6 of the data's variance, never make it negative (scikit-learn#30382 computes
  that difference in float32 and gets negative variances);
* the data are standardized before they are written into Φ, so the squares in Φ are
  O(1) and the cancellation in E[x²] − E[x]² is that of a component's own spread.

The monotonicity check takes float32's epsilon for its rounding bound
(``plan.dtype``; ``engine/loop.py``): ℓ is a sum of float32 terms, and a check at float64's
epsilon would report rounding as a bug.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from emdsl.compile import Plan
from emdsl.engine.estep import EStep, Summary
from emdsl.errors import ModelError

#: rows per block in single precision: the float32 GEMM's error grows like √rows
SINGLE_BLOCK_ROWS = 4096


class Float32EStep(EStep):
    """:class:`EStep` with float32 Φ, L, R and H; statistics summed in float64 across blocks."""

    def __init__(self, plan: Plan, n_threads: int | None = None, block_rows: int | None = None) -> None:
        if plan.clamp is not None:
            # a labelled sample rules out the other states with L = −1e300, which float32 cannot hold
            raise ModelError("fit(dtype='float32'): a semi-supervised fit (the data have a variable named like "
                             "the latent) runs in float64; drop dtype='float32'")
        super().__init__(plan, n_threads=n_threads, block_rows=block_rows or SINGLE_BLOCK_ROWS)
        for buf in self.buffers:
            for name in ("phi", "log_joint", "resp", "scratch"):
                setattr(buf, name, np.empty(getattr(buf, name).size, dtype=np.float32))

    def summarize(self, H: np.ndarray, theta: Mapping[str, Any] | None = None) -> Summary:
        return super().summarize(np.asarray(H, dtype=np.float32), theta)

    def statistics_from(self, resp_of: Callable[[int, int], np.ndarray]) -> Summary:
        return super().statistics_from(lambda a, b: np.asarray(resp_of(a, b), dtype=np.float32))

    def evaluate(self, H: np.ndarray, theta: Mapping[str, Any] | None = None, *,
                 resp_out: np.ndarray | None = None, loglik_out: np.ndarray | None = None) -> None:
        super().evaluate(np.asarray(H, dtype=np.float32), theta, resp_out=resp_out, loglik_out=loglik_out)


def make_estep(plan: Plan, n_threads: int | None = None) -> EStep:
    """The in-memory E-step for a plan, in the plan's precision."""
    if np.dtype(getattr(plan, "dtype", np.float64)) == np.float32:
        return Float32EStep(plan, n_threads=n_threads)
    return EStep(plan, n_threads=n_threads)
