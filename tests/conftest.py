"""Shared fixtures: the local Kubernetes API (kmock-based) and the real kopf operator against it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from disaggserve.api.crd import build_crd
from disaggserve.api.peering import build_peering_crds
from disaggserve.local.apiserver import LocalApiServer, serve_api, write_kubeconfig
from helpers import OperatorRunner

ROOT = Path(__file__).resolve().parent.parent
CRDS = [build_crd(), *build_peering_crds()]


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (CI cancelling a job, `kill`, `scripts/test` forwarding Ctrl-C) stops the run the
    way Ctrl-C does: fixtures tear down, so local clusters drain and stop their processes.
    Whatever still runs when pytest exits is killed by the kernel (local/processes.py)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)


class Api:
    """The emulator plus the URL it serves on and small helpers for tests."""

    def __init__(self, server: LocalApiServer, url: str):
        self.server = server
        self.url = url

    @property
    def audit(self) -> list[Any]:
        return self.server.audit

    def get(self, group: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.server.get(group, plural, namespace, name)

    def list(self, group: str, plural: str, namespace: str | None = None, selector: str | None = None) -> list[dict]:
        return self.server.list(group, plural, namespace, selector)


@pytest.fixture
async def apiserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    async with serve_api(crds=CRDS) as (server, url):
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(url, tmp_path / "kubeconfig")))
        yield Api(server, url)


@pytest.fixture
def operator_runner(apiserver: Api) -> Iterator[OperatorRunner]:
    os.environ.setdefault("DISAGGSERVE_WATCH_BACKOFF", "0.1")
    runner = OperatorRunner()
    yield runner
    runner.stop()


@pytest.fixture
async def operator(operator_runner: OperatorRunner) -> AsyncIterator[OperatorRunner]:
    await asyncio.to_thread(operator_runner.start)
    yield operator_runner
    await asyncio.to_thread(operator_runner.stop)
