"""Planners for tests of the operator's planning service, importable in its worker processes.

The service runs plans in spawned processes, which import functions by module name: these live
in a module on the tests' import path (the child inherits sys.path), not inside a test file.
"""

from __future__ import annotations

import time
from typing import Any

from disaggserve.planner import plan_for

SLOW_SECONDS = 3.0


def _burn(seconds: float) -> None:
    """Hold a CPU (and, were it a thread of the operator, the GIL) for `seconds`."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def slow_plan(spec: Any, **kwargs: Any) -> Any:
    """The real planner after SLOW_SECONDS of pure-Python busy work (a cold plan of a large model)."""
    _burn(SLOW_SECONDS)
    return plan_for(spec, **kwargs)


def stuck_plan(spec: Any, **kwargs: Any) -> Any:
    """A planner that never finishes (what requestRate 1e-300 did before the schema refused it)."""
    while True:
        _burn(1.0)


def echo(value: Any) -> Any:
    return value
