"""What the fuzz modules share: their size from the environment, a long run's time limit, the JSON report.

``EMDSL_FUZZ_EXAMPLES=N`` sets the number of examples of a run by hand (CI runs each module's
short default, derandomized under ``CI=true`` by the suite's hypothesis profile);
``EMDSL_FUZZ_REPORT=path`` records every outcome and every bug's reproducer there as JSON
instead of failing at the first bug.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

EXAMPLES = os.environ.get("EMDSL_FUZZ_EXAMPLES")
REPORT = os.environ.get("EMDSL_FUZZ_REPORT")


def fuzz_settings(default: int | None) -> settings:
    """Hypothesis settings of a fuzz test: ``EMDSL_FUZZ_EXAMPLES`` examples, else ``default`` (None:
    the suite's profile's), no deadline (a case may be slow at extreme magnitudes)."""
    examples = int(EXAMPLES) if EXAMPLES else default
    size = {} if examples is None else {"max_examples": examples}
    return settings(**size, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def long_run_timeout() -> pytest.MarkDecorator:
    """pytest-timeout's limit for a fuzz test: a long run by hand (10,000 examples take about 9
    minutes) would outlast the suite's 600 s a test (pyproject.toml), so it gets a second an
    example; a hang inside one case is ``_forked.TIMEOUT``'s to find."""
    return pytest.mark.timeout(max(600, int(EXAMPLES)) if EXAMPLES else 600)


def write_report(**sections: Any) -> None:
    """The run's outcomes and bugs, as JSON at ``EMDSL_FUZZ_REPORT`` (nothing without it)."""
    if REPORT:
        with open(REPORT, "w") as out:
            json.dump(sections, out, indent=1, default=repr)
