"""Shared fixtures: the local Kubernetes API (kmock-based) and the real kopf operator against it."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from disaggserve.api.crd import build_crd
from disaggserve.local.apiserver import LocalApiServer, serve_api, write_kubeconfig

ROOT = Path(__file__).resolve().parent.parent
CRDS = [build_crd(), *yaml.safe_load_all((ROOT / "crds" / "kopf-peering.yaml").read_text())]


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


class OperatorRunner:
    """Runs the real kopf operator in its own thread and event loop.

    kopf.operator() cancels every task of its loop on exit, pytest-asyncio's included, so it
    cannot share the test's loop (ENVIRONMENT.md).
    """

    def __init__(self) -> None:
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, *, peering: str | None = None, priority: int = 0) -> None:
        import kopf

        import disaggserve.controller  # noqa: F401

        stop, ready = threading.Event(), threading.Event()

        def run() -> None:
            try:
                asyncio.run(
                    kopf.operator(
                        clusterwide=True,
                        standalone=peering is None,
                        peering_name=peering,
                        priority=priority,
                        stop_flag=stop,
                        ready_flag=ready,
                    )
                )
            except BaseException as e:  # surfaced by stop()
                self.error = e

        self._stop = stop
        self._thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise AssertionError("the operator did not start")

    def stop(self) -> None:
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join(20)
            self._stop = self._thread = None
        if self.error is not None:
            raise self.error


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
