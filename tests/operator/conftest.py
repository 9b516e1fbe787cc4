"""Fixtures for tests that call the operator's kopf handlers directly."""

from __future__ import annotations

from collections.abc import Iterator

import kopf
import pytest
from kopf._core.engines.posting import settings_var


@pytest.fixture
def no_events() -> Iterator[None]:
    """Handlers called outside a running operator: kopf.event would need its posting queue."""
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    token = settings_var.set(settings)
    yield
    settings_var.reset(token)
