"""Helpers for end-to-end tests: finding the tools they drive (kubectl, helm, docker)."""

from __future__ import annotations

import os
import shutil
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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


@asynccontextmanager
async def ready_cluster(folder: Path, resource: dict[str, Any], env: dict[str, str] | None = None):
    """A local cluster with `resource` applied and Ready (what `disaggserve up` does)."""
    from disaggserve.local.cluster import LocalCluster

    async with LocalCluster(folder, interval=0.3, operator_env=env) as cluster:
        await cluster.apply(resource)
        await cluster.wait_ready(resource["metadata"]["name"], timeout=180)
        yield cluster


async def worker_headers(cluster: Any, name: str, namespace: str = "default") -> dict[str, str]:
    """Headers a test sends to call a worker's internal endpoints directly: its DisaggServe's
    token, read from the Secret the operator made (as the router and the operator send it)."""
    import base64

    from disaggserve.contract import HEADER_WORKER_TOKEN

    secret = await cluster.kube.get("v1", "Secret", namespace, f"{name}-worker-token")
    if not secret:
        raise AssertionError(f"no worker token Secret for {name}")
    return {HEADER_WORKER_TOKEN: base64.b64decode(secret["data"]["token"]).decode()}


async def measured_capacity(url: str, input_tokens: int, output_tokens: int, concurrency: int = 32,
                            model: str = "tiny-llama") -> float:
    """Requests per second one burst of `concurrency` requests finishes (closed loop, a lower
    bound): overload tests offer a multiple of it, so a slow, busy machine is overloaded as
    surely as a fast one."""
    import asyncio
    import random
    import time

    import aiohttp

    from loadgen import one_request, synthetic_prompt

    rng = random.Random(7)
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(
            one_request(session, url, model, synthetic_prompt(rng, input_tokens), output_tokens, started)
            for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return concurrency / elapsed


async def slo_for_this_machine(url: str, input_tokens: int, output_tokens: int, margin: float = 3.0,
                               floor: dict[str, float] | None = None,
                               model: str = "tiny-llama") -> dict[str, float]:
    """SLOs `margin` times the p90 TTFT and TPOT of light traffic here (at least `floor`): a test
    that needs light traffic to *meet* its SLO (a scale-down) then holds on a slow, shared
    machine as on a fast one, while overload (seconds of queueing) still misses it."""
    from loadgen import run_poisson, summarize

    floor = floor or {"ttftMs": 100, "tpotMs": 10}
    await run_poisson(url, model, rate=2, num_requests=4, input_tokens=input_tokens,
                      output_tokens=output_tokens, seed=11)  # warm-up, not measured
    light = summarize(await run_poisson(url, model, rate=2, num_requests=16, input_tokens=input_tokens,
                                        output_tokens=output_tokens, seed=12), 10, 10)
    assert light["failed"] == 0, light["errors"]
    return {
        "ttftMs": max(floor["ttftMs"], round(margin * light["ttft_ms"]["p90"])),
        "tpotMs": max(floor["tpotMs"], round(margin * light["tpot_ms"]["p90"])),
    }


async def apply_and_roll_router(cluster: Any, resource: dict[str, Any], timeout: float = 120) -> None:
    """Apply `resource` and wait until its router runs the new spec alone (an SLO edit rolls the
    router, which judges SLOs, and no worker)."""
    import asyncio

    name, namespace = resource["metadata"]["name"], resource["metadata"].get("namespace", "default")
    generation = (await cluster.apply(resource))["metadata"]["generation"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    status: dict[str, Any] = {}
    while loop.time() < deadline:
        # First the operator's reconcile of this generation (it patches the router's Deployment),
        # then that Deployment's rollout: checked alone, the old Deployment looks rolled out.
        observed = ((await cluster.get(name, namespace)) or {}).get("status", {}).get("observedGeneration") or 0
        if observed < generation:
            await asyncio.sleep(0.5)
            continue
        deployment = await cluster.kube.get("apps/v1", "Deployment", namespace, f"{name}-router") or {}
        status, wanted = deployment.get("status") or {}, (deployment.get("spec") or {}).get("replicas", 1)
        routers = [p for (ns, pod), p in cluster.agent.pods.items()
                   if ns == namespace and pod.startswith(f"{name}-router-")]
        if (status.get("observedGeneration") == deployment["metadata"].get("generation")
                and status.get("updatedReplicas") == status.get("readyReplicas") == wanted
                and len(routers) == wanted and all(p.ready and not p.terminating for p in routers)):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"the router of {name} did not roll out within {timeout:.0f}s: {status}")
