"""Fixtures for the chart tests: a real helm, required under CI."""

from __future__ import annotations

import pytest

from chart.chartlib import HelmMissing, helm_binary, in_ci


@pytest.fixture(scope="session")
def helm_bin() -> str:
    """helm's path; missing helm skips locally but fails under CI=true, where scripts/test installs it."""
    try:
        return helm_binary()
    except HelmMissing as exc:
        if in_ci():
            pytest.fail(f"{exc} (CI=true: the chart tests must run)")
        pytest.skip(str(exc))
