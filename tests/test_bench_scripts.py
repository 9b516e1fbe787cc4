"""Every benchmark script imports and parses its own --help: a bench that no test runs still must
not rot (bench/vllm_disagg_vs_colocated.py imported names bench/disagg_vs_colocated.py had dropped,
and nothing noticed until someone ran it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "loadgen.py")  # loadgen is a library


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports_and_prints_help(script: Path):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_a_window_is_predicted_on_its_own_arrivals():
    """`planner_vs_measured.predict_window` replays a measured window's arrivals: spread-out
    requests all meet the SLOs, the same requests arriving at once do not."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from planner_vs_measured import predict_window

    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "operator" / "disaggserve" / "data" / "profiles" / "small-llama-cpu.json").read_text())
    spread = predict_window(doc, "colocated", 1.0, [float(i) for i in range(40)], 300.0, 50.0)
    burst = predict_window(doc, "colocated", 1.0, [0.0] * 40, 300.0, 50.0)
    assert spread == 1.0 and burst < 0.5, (spread, burst)
