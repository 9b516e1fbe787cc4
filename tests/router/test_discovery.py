"""Kubernetes discovery against the kmock API emulator: the router's pool follows Pods as they
appear, turn ready, change address and go away, and ignores pods of other instances."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock as kmocklib
import openai
import pytest
from router_harness import MODEL, SERVED, WorkerProcess, start_router

from disaggserve_worker.router.config import RouterConfig
from disaggserve_worker.router.discovery import (
    ApiAccess,
    KubernetesDiscovery,
    parse_selector,
    pod_to_worker,
)
from disaggserve_worker.router.pool import WorkerPool

PODS = "/api/v1/namespaces/serving/pods"
SELECTOR = "app.kubernetes.io/instance=demo"


def pod(name: str, role: str, ip: str | None, *, ready: bool, instance: str = "demo", unit: str | None = None,
        port: int | None = 9100) -> dict[str, Any]:
    labels = {"app.kubernetes.io/instance": instance, "app.kubernetes.io/component": role}
    if unit:
        labels["disaggserve.io/unit"] = unit
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    ports = [{"name": "http", "containerPort": port}] if port else []
    meta = {"name": name, "namespace": "serving", "labels": labels}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "worker", "image": "w", "ports": ports}]}, "status": status}


@pytest.fixture
async def k8s_api() -> AsyncIterator[kmocklib.KubernetesEmulator]:
    async with kmocklib.KubernetesEmulator() as emulator, kmocklib.Server(emulator):
        emulator.resources.load_bundled()
        yield emulator


@pytest.fixture
async def discovery(k8s_api: kmocklib.KubernetesEmulator) -> AsyncIterator[KubernetesDiscovery]:
    pool = WorkerPool()
    access = ApiAccess(str(k8s_api.url).rstrip("/"), {"Authorization": "Bearer test"}, False)
    disc = KubernetesDiscovery(pool, "serving", SELECTOR, access, resync_s=2.0, retry_s=0.1)
    task = asyncio.create_task(disc.run())
    await asyncio.wait_for(disc.synced.wait(), 5)
    yield disc
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def urls(pool: WorkerPool) -> dict[str, str]:
    return {w.url: w.role for w in pool.workers.values()}


async def test_pool_follows_pods_lifecycle(k8s_api: kmocklib.KubernetesEmulator,
                                           discovery: KubernetesDiscovery) -> None:
    pool = discovery.pool
    assert urls(pool) == {}
    await k8s_api.post(PODS, json=pod("demo-prefill-0", "prefill", None, ready=False))
    await k8s_api.post(PODS, json=pod("demo-decode-0", "decode", "127.9.0.2", ready=True, unit="u0"))
    await k8s_api.post(PODS, json=pod("other-decode-0", "decode", "127.9.0.9", ready=True, instance="other"))
    await until(lambda: "http://127.9.0.2:9100" in urls(pool))
    assert urls(pool) == {"http://127.9.0.2:9100": "decode"}  # prefill not ready, other instance ignored
    assert pool.workers["http://127.9.0.2:9100"].unit == "u0"

    # The prefill pod gets an IP and turns ready.
    await k8s_api.patch(f"{PODS}/demo-prefill-0", json={"status": {
        "podIP": "127.9.0.1", "conditions": [{"type": "Ready", "status": "True"}]}})
    await until(lambda: "http://127.9.0.1:9100" in urls(pool))
    assert pool.mode == "disaggregated"

    # Readiness lost: no traffic, though the pod still exists.
    await k8s_api.patch(f"{PODS}/demo-decode-0", json={"status": {
        "conditions": [{"type": "Ready", "status": "False"}]}})
    await until(lambda: "http://127.9.0.2:9100" not in urls(pool))

    # A restart with a new IP replaces the old address.
    await k8s_api.patch(f"{PODS}/demo-decode-0", json={"status": {
        "podIP": "127.9.0.3", "conditions": [{"type": "Ready", "status": "True"}]}})
    await until(lambda: "http://127.9.0.3:9100" in urls(pool))
    assert "http://127.9.0.2:9100" not in urls(pool)

    # Deletion removes it.
    await k8s_api.delete(f"{PODS}/demo-prefill-0")
    await until(lambda: "http://127.9.0.1:9100" not in urls(pool))
    assert urls(pool) == {"http://127.9.0.3:9100": "decode"}


async def test_pods_present_before_start_are_listed(k8s_api: kmocklib.KubernetesEmulator) -> None:
    await k8s_api.post(PODS, json=pod("demo-colocated-0", "colocated", "127.9.1.1", ready=True, port=None))
    pool = WorkerPool()
    access = ApiAccess(str(k8s_api.url).rstrip("/"), {}, False)
    disc = KubernetesDiscovery(pool, "serving", SELECTOR, access, resync_s=2.0)
    task = asyncio.create_task(disc.run())
    try:
        await asyncio.wait_for(disc.synced.wait(), 5)
        assert urls(pool) == {"http://127.9.1.1:8100": "colocated"}  # no named port: the contract's
        assert pool.mode == "colocated"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unreachable_api_is_retried_not_fatal() -> None:
    pool = WorkerPool()
    disc = KubernetesDiscovery(pool, "serving", SELECTOR, ApiAccess("http://127.0.0.1:9", {}, False),
                               retry_s=0.05)
    task = asyncio.create_task(disc.run())
    await asyncio.sleep(0.3)
    assert not task.done()  # still retrying, not crashed
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_pod_filters() -> None:
    labels = parse_selector(SELECTOR)
    assert pod_to_worker(pod("a", "prefill", "10.0.0.1", ready=True), labels) is not None
    assert pod_to_worker(pod("a", "router", "10.0.0.1", ready=True), labels) is None
    assert pod_to_worker(pod("a", "prefill", "10.0.0.1", ready=False), labels) is None
    deleting = pod("a", "prefill", "10.0.0.1", ready=True)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_to_worker(deleting, labels) is None
    v6 = pod_to_worker(pod("a", "decode", "fd00::1", ready=True), labels)
    assert v6 is not None and v6.url == "http://[fd00::1]:9100"


@pytest.mark.parametrize("bad", ["", "app in (a,b)", "!app", "app"])
def test_selector_refuses_non_equality(bad: str) -> None:
    with pytest.raises(ValueError, match="selector"):
        parse_selector(bad)


async def test_router_serves_workers_found_through_kubeconfig(
        k8s_api: kmocklib.KubernetesEmulator, disagg_workers: list[WorkerProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path a cluster takes: $KUBECONFIG → list/watch → pool → a served request."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(k8s_api.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "t0k3n"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    config = RouterConfig(model=MODEL, model_name=SERVED, host="127.0.0.1", port=0, discovery="kubernetes",
                          namespace="serving", selector=SELECTOR, queue_timeout_s=10)
    running = await start_router(config)
    try:
        assert running.router.pool.mode is None  # nothing discovered yet
        for i, worker in enumerate(disagg_workers):
            ip, port = worker.url.removeprefix("http://").split(":")
            await k8s_api.post(PODS, json=pod(f"demo-{worker.role}-{i}", worker.role, ip, ready=True,
                                              port=int(port)))
        api = openai.AsyncOpenAI(base_url=running.base_url, api_key="x", max_retries=0)
        done = await api.completions.create(model=SERVED, prompt="Hello", max_tokens=3)
        assert done.usage is not None and done.usage.completion_tokens == 3
        assert running.router.pool.mode == "disaggregated"
        seen = [r for r in k8s_api if r.method == "GET" and str(r.url.path).endswith("/pods")]  # the router's
        assert seen and all(r.headers.get("Authorization") == "Bearer t0k3n" for r in seen)
    finally:
        await running.runner.cleanup()
