"""Helpers for end-to-end tests: finding the tools they drive (kubectl, helm, docker)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> str | None:
    """A binary from PATH or the project's .venv/bin (scripts/test installs helm and kubectl there)."""
    return shutil.which(name) or (
        str(ROOT / ".venv" / "bin" / name) if (ROOT / ".venv" / "bin" / name).exists() else None
    )


def require_tool(name: str) -> str:
    """In CI a missing tool is a failure (the install step broke); elsewhere a skip with the reason."""
    found = tool(name)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed; scripts/test installs it")
    pytest.skip(f"{name} is not installed (run scripts/install-helm.sh)")
