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
