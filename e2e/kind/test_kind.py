"""The same end-to-end checks on a real Kubernetes (kind) with the Helm chart and built images.

Skipped, with the reason, where Docker, kind or helm cannot run (this build environment has a
Docker client but no engine). Set DISAGGSERVE_KIND=1 to require it (fail instead of skip).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("run.sh")


def _missing() -> str | None:
    for tool in ("docker", "kind", "helm", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return f"no Docker engine answers `docker info`: {(info.stderr or info.stdout).strip().splitlines()[-1:]}"
    return None


@pytest.mark.timeout(1800)
def test_kind_cluster_serves_tokens_through_the_chart():
    missing = _missing()
    if missing:
        if os.environ.get("DISAGGSERVE_KIND") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "completions and streamed chat OK" in result.stdout
