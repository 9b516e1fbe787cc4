"""The planner and topology are pure code: no torch, kopf, Kubernetes client or HTTP client."""

from __future__ import annotations

import subprocess
import sys


def test_planner_imports_no_io_or_torch():
    code = (
        "import sys, disaggserve.planner, disaggserve.planner.auto, disaggserve.topology\n"
        "import disaggserve.cli_plan\n"
        "bad = [m for m in ('torch', 'kopf', 'kubernetes', 'httpx', 'aiohttp') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
