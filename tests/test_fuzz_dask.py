"""Fuzzing dask against memory: a fit on chunked data is the in-memory fit, or the same refusal.

Every case that ``tests/test_fuzz.py`` generates (one latent, a Markov latent or two latents;
every family; holes, bad values, extreme magnitudes, weights, starts, priors, acceleration) is
fitted twice with the same arguments: on the Dataset in memory and on it chunked along
``sample`` in chunks of 1 to 7 rows. A case passes when

* both fit, to the same log-likelihood (1e-8 relative, or the recorded rounding slack: the
  sums over chunks are the in-memory sums in another order; 10·tol relative when rounding moved
  the stopping test by an iteration), and ``score_samples`` on the chunked data (a lazy
  output) equals it on the data in memory; or
* both raise ``ModelError`` naming a culprit of the case.

Anything else is a bug: one path refuses what the other fits, an exception that is not a
``ModelError``, or another optimum. Cases at extreme magnitudes run in a forked child, as in
``tests/test_fuzz.py`` (with dask's synchronous scheduler there: the parent's thread pool does
not exist in a forked child).

``EMDSL_FUZZ_EXAMPLES=300`` sets the number of examples (default 40, derandomized under
``CI=true``); ``EMDSL_FUZZ_REPORT=path`` records every outcome and the reproducer of every
bug there as JSON instead of failing.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

from emdsl.errors import ModelError
from tests._forked import in_child
from tests._fuzzing import REPORT, fuzz_settings, long_run_timeout, write_report
from tests.test_fuzz import Case, _names_a_culprit, _reproducer, _risky, _start, cases

dask = pytest.importorskip("dask")
pytest.importorskip("dask.array")

_SETTINGS = fuzz_settings(40)
OUTCOMES: collections.Counter[str] = collections.Counter()
BUGS: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    write_report(outcomes=dict(OUTCOMES.most_common()), bugs=BUGS)


def _ending(case: Case, data: xr.Dataset, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """How a fit of ``case`` on ``data`` ends: ("fit", (ℓ, iterations, slack, scores)), ("refused", message)
    for a ModelError that names a culprit, or ("bug", what happened)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fit = case.model.fit(data, **kwargs)
        except ModelError as error:
            if _names_a_culprit(str(error), case):
                return "refused", str(error)
            return "bug", f"ModelError naming no culprit: {str(error)[:400]}"
        except Exception as error:  # noqa: BLE001 - any other exception is the finding
            return "bug", f"{type(error).__name__} in fit: {str(error)[:400]}"
        try:
            scores = np.asarray(fit.score_samples(data).values, dtype=float)
        except ModelError as error:
            scores = f"refused: {str(error)[:200]}"
        except Exception as error:  # noqa: BLE001
            return "bug", f"{type(error).__name__} in score_samples: {str(error)[:400]}"
    slack = fit.traces["slack"].values
    if not (np.isfinite(fit.loglik) and np.isfinite(slack).all()):  # as tests/test_fuzz.py checks
        return "bug", f"a fit with ℓ = {fit.loglik!r} and rounding slack up to {slack.max()!r}"
    return "fit", (float(fit.loglik), int(fit.n_iter), float(slack.max()), scores)


def _both(case: Case, chunk: int) -> tuple[tuple[str, Any], tuple[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            kwargs = _start(case, dict(case.kwargs))
        except ModelError:  # the model itself is refused: both fits below say so
            kwargs = {**case.kwargs, "init": "kmeans++"}
    return _ending(case, case.data, kwargs), _ending(case, case.data.chunk({"sample": chunk}), kwargs)


def _isolated(case: Case, chunk: int) -> tuple[tuple[str, Any], tuple[str, Any]]:
    def work() -> tuple[tuple[str, Any], tuple[str, Any]]:
        with dask.config.set(scheduler="synchronous"):
            return _both(case, chunk)

    def failed(what: str) -> tuple[tuple[str, Any], tuple[str, Any]]:
        return ("bug", what), ("bug", what)

    return in_child(work, lambda error: failed(f"{type(error).__name__} in the child: {error}"), failed)


def _difference(in_memory: tuple[str, Any], chunked: tuple[str, Any], tol: float) -> str | None:
    """What differs between the two endings of fits with ``fit(tol=tol)`` (None: they agree)."""
    for ending in (in_memory, chunked):
        if ending[0] == "bug":
            return ending[1]
    if in_memory[0] != chunked[0]:
        return f"in memory: {in_memory[0]}; chunked: {chunked[0]} ({str(chunked[1])[:300]}; {str(in_memory[1])[:300]})"
    if in_memory[0] == "refused":
        return None
    (loglik, n_iter, slack, scores), (got, got_iter, got_slack, got_scores) = in_memory[1], chunked[1]
    # Rounding can move a change of ℓ across tol·|ℓ| and the stop by an iteration, which moves ℓ by
    # about that much; the same iterations must give the same ℓ.
    rel = 1e-8 if n_iter == got_iter else max(1e-8, 10 * tol)
    if not got == pytest.approx(loglik, rel=rel, abs=max(slack, got_slack)):
        return f"log-likelihood: {loglik!r} in memory ({n_iter} iterations), {got!r} chunked ({got_iter})"
    if isinstance(scores, str) or isinstance(got_scores, str):
        return None if isinstance(scores, str) == isinstance(got_scores, str) else \
            f"score_samples: {str(scores)[:200]} in memory, {str(got_scores)[:200]} chunked"
    # Per-sample scores move linearly with the parameters, where ℓ (flat at an optimum) hides
    # them: an accelerated fit's long steps carry the chunks' summation-order rounding into the
    # parameters (measured on 30 small weighted Gamma mixtures, 25 SQUAREM iterations: scores
    # differing by up to 8e-9 against 1e-11 for plain EM), so the bound is relative to the largest.
    finite = np.isfinite(scores)
    scale = float(np.max(np.abs(scores[finite]))) if finite.any() else 0.0
    if not np.allclose(got_scores, scores, rtol=rel, atol=max(slack, got_slack, rel * scale)):
        return f"score_samples differ by up to {np.max(np.abs(got_scores - scores))!r}"
    return None


@long_run_timeout()
@_SETTINGS
@given(case=cases(), chunk=st.integers(1, 7))
def test_chunked_data_fit_like_data_in_memory(case: Case, chunk: int) -> None:
    in_memory, chunked = _isolated(case, chunk) if _risky(case) else _both(case, chunk)
    OUTCOMES[f"{in_memory[0]} / {chunked[0]}"] += 1
    difference = _difference(in_memory, chunked, float(case.kwargs["tol"]))
    if difference is None:
        return
    if not REPORT:
        raise AssertionError(f"{difference}\nfaults: {case.faults}, chunks of {chunk}")
    BUGS.append({"difference": difference, "chunk": chunk, **_reproducer(case)})
