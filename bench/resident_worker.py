"""The line protocol between bench/engine_step.py and the engine processes it measures.

Why resident processes: on this project's shared 2-vCPU hosts a core's speed drifts by 10-20 %
between minutes, so columns measured one process after another (a round each) differed by more
than the changes being measured. Each engine now loads and warms up once, then waits on stdin;
the parent asks every engine for the same metric in turn, so the engines measured against each
other run seconds apart and the ratio of each pair cancels the drift.

Protocol (each reply one stdout line starting with PREFIX, so a library printing to stdout cannot
break it): the engine prints `PREFIX {"ready": {...facts}}` once warmed up, then answers each
command line (`prefill`, `decode B`) with `PREFIX {"wall": tokens/s, "cpu": tokens/CPU-s, ...}`;
end of input ends it. No imports beyond the standard library: both our interpreter and vLLM's run it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

PREFIX = "ENGINE_STEP "


def reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def serve(facts: dict[str, Any], measure: Callable[[str, int], tuple[float, float]],
          extra: Callable[[], dict[str, Any]] | None = None) -> None:
    """Announce readiness, then answer `prefill` / `decode B` lines until stdin closes. `measure(kind,
    batch)` returns (wall, CPU) tokens/s; `extra()` adds per-measurement facts (vLLM's child CPU)."""
    reply({"ready": facts})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        kind, batch = words[0], int(words[1]) if len(words) > 1 else 0
        wall, cpu = measure(kind, batch)
        reply({"wall": wall, "cpu": cpu, **(extra() if extra else {})})
