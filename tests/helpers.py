"""Small helpers for operator tests: the example resource and HTTP calls to the local API."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from disaggserve.contract import METRIC_REQUESTS, METRIC_SLO_MET, METRIC_TPOT, METRIC_TTFT

ROOT = Path(__file__).resolve().parent.parent
CR_PATH = "/apis/disaggserve.io/v1alpha1/namespaces/{ns}/disaggserves"
GROUP = "disaggserve.io"


def example(name: str = "tiny", namespace: str = "default", file: str = "tiny-cpu.yaml") -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "examples" / file).read_text())
    body = copy.deepcopy(body)
    body["metadata"] = {"name": name, "namespace": namespace}
    return body


async def create(url: str, body: dict[str, Any], strict: bool = True) -> httpx.Response:
    ns = body["metadata"].get("namespace", "default")
    params = {"fieldValidation": "Strict"} if strict else None
    async with httpx.AsyncClient(base_url=url) as client:
        return await client.post(CR_PATH.format(ns=ns), json=body, params=params)


async def patch_spec(url: str, name: str, spec_patch: dict[str, Any], namespace: str = "default") -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as client:
        return await client.patch(
            f"{CR_PATH.format(ns=namespace)}/{name}",
            json={"spec": spec_patch},
            headers={"Content-Type": "application/merge-patch+json"},
        )


async def delete(url: str, name: str, namespace: str = "default") -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as client:
        return await client.delete(f"{CR_PATH.format(ns=namespace)}/{name}")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return None


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, message: str = "condition") -> Any:
    """Poll until predicate() is truthy (and return it); the operator works asynchronously."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s")
        await asyncio.sleep(0.05)


class OperatorRunner:
    """Runs the real kopf operator in its own thread and event loop.

    kopf.operator() cancels every task of its loop on exit, pytest-asyncio's included, so it
    cannot share the test's loop (docs/environment.md).
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


class OneRouter:
    """The autoscaler's view of the API: one ready router pod."""

    async def list(self, *args, **kwargs):
        return [
            {
                "metadata": {
                    "name": "tiny-router-0",
                    "labels": {"app.kubernetes.io/instance": "tiny", "app.kubernetes.io/component": "router"},
                },
                "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
            }
        ]


def router_metrics(requests: int) -> str:
    """A router that has seen `requests` requests: TPOT 90 % within 100 ms, 50 % within 50 ms."""
    tpot = {"0.025": 0.1, "0.05": 0.5, "0.1": 0.9, "0.25": 1.0, "+Inf": 1.0}
    lines = [
        f'{METRIC_REQUESTS}{{status="ok"}} {requests}',
        f"{METRIC_SLO_MET} {requests // 2}",
        *(f'{METRIC_TPOT}_bucket{{le="{le}"}} {share * requests}' for le, share in tpot.items()),
        f"{METRIC_TPOT}_count {requests}",
        f"{METRIC_TPOT}_sum {requests * 0.06}",
        *(f'{METRIC_TTFT}_bucket{{le="{le}"}} {requests}' for le in ("0.1", "+Inf")),
        f"{METRIC_TTFT}_count {requests}",
        f"{METRIC_TTFT}_sum {requests * 0.05}",
    ]
    return "\n".join(lines) + "\n"


IDLE_WORKER = {"running": 0, "queued_requests": 0, "queued_tokens": 0, "held_caches": 0}


def worker_kv_metrics(role: str, pulls: list[tuple[int, float]]) -> str:
    """What a real worker of `role` exports after these (bytes, seconds) KV transfers."""
    from prometheus_client import generate_latest

    from disaggserve_worker.server.worker_metrics import WorkerMetrics

    metrics = WorkerMetrics(role, lambda: IDLE_WORKER, None, None)
    for nbytes, seconds in pulls:
        metrics.observe_transfer(nbytes, seconds)
    return generate_latest(metrics.registry).decode()


def autoscaled_tiny(profile_configmap: str | None = None) -> dict[str, Any]:
    """The tiny example, planned (no parallelism), autoscaling up to 3 of each phase, deployed 1 + 1."""
    body = example()
    body["metadata"]["uid"] = "u"
    body["spec"].pop("parallelism")
    if profile_configmap:
        body["spec"]["profile"] = {"configMapRef": {"name": profile_configmap}}
    body["spec"]["autoscaling"] = {"enabled": True, "intervalSeconds": 5, "maxReplicas": {"prefill": 3, "decode": 3}}
    plan = {
        "placement": "high-affinity",
        "prefill": {"tensor": 1, "pipeline": 1, "replicas": 1},
        "decode": {"tensor": 1, "pipeline": 1, "replicas": 1},
        "source": "planner",
    }
    body["status"] = {"plan": plan, "phase": "Ready",
                      "replicas": {"prefill": {"desired": 1, "ready": 1}, "decode": {"desired": 1, "ready": 1}}}
    return body


async def step_twice(autoscaler: Any, body: dict[str, Any]) -> dict[str, Any] | None:
    """Two autoscaler ticks on `body`; the second decides at once (no interval to wait out in a unit
    test). The first cannot: one scrape is not a window."""
    emit = lambda *a: None  # noqa: E731
    first = await autoscaler.step(body, emit)
    assert "MetricsUnavailable" in str(first)
    for tracked in autoscaler.tracked.values():
        tracked.last_decision = 0.0
    return await autoscaler.step(body, emit)
