"""The chart's container command starts a working operator: `disaggserve` run as a process with
exactly the rendered Deployment's arguments, against the test API server, answers its liveness
probe, joins the peering object the chart creates, and reconciles a DisaggServe.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest

from chart.chartlib import documents, template
from helpers import create, example, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rendered() -> tuple[dict[str, Any], dict[str, Any]]:
    """(operator container, ClusterKopfPeering) of the cluster-scoped render."""
    objs = documents(template({"watch": {"scope": "cluster"}}))
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0], next(
        o for o in objs if o["kind"] == "ClusterKopfPeering")


async def _install_peering(url: str, peering: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=url) as client:
        resp = await client.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=peering)
        assert resp.status_code in (200, 201), resp.text


@asynccontextmanager
async def operator_process(container: dict[str, Any], pod_name: str) -> AsyncIterator[deque[str]]:
    """One operator replica as the pod runs it, once its liveness probe answers; yields the
    last lines of its log (for failure messages)."""
    probe_path = container["livenessProbe"]["httpGet"]["path"]
    pod_port = container["ports"][0]["containerPort"]
    port = _free_port()
    # The pod listens on 0.0.0.0:<probe port>; here: loopback on a free port, everything else as rendered.
    args = [a.replace(f"0.0.0.0:{pod_port}", f"127.0.0.1:{port}") for a in container["args"]]
    url = f"http://127.0.0.1:{port}{probe_path}"
    assert any(url in a for a in args), args
    env = {**os.environ, "DISAGGSERVE_WATCH_BACKOFF": "0.1", "DISAGGSERVE_POD_NAME": pod_name}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.pop("DISAGGSERVE_METRICS_PORT", None)  # two replicas on one host would collide on it
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "disaggserve.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    # Read the log as it comes: an unread pipe fills (64 KiB) and the operator then blocks on
    # its next log line, mid-reconcile — two chatty peered replicas did, intermittently.
    log: deque[str] = deque(maxlen=200)
    reader = asyncio.create_task(_drain(proc, log))
    try:
        async with httpx.AsyncClient() as client:
            async def live() -> bool:
                try:
                    return (await client.get(url)).status_code == 200
                except httpx.TransportError:
                    return False

            for _ in range(300):
                if proc.returncode is not None or await live():
                    break
                await asyncio.sleep(0.1)
            if proc.returncode is not None:
                await asyncio.wait_for(reader, 5)
                raise AssertionError(f"the operator exited: {''.join(log)[-3000:]}")
            assert await live(), "no answer on the liveness endpoint within 30 s"
        yield log
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        reader.cancel()


async def _drain(proc: asyncio.subprocess.Process, log: deque[str]) -> None:
    assert proc.stdout is not None
    async for line in proc.stdout:
        log.append(line.decode(errors="replace"))


@pytest.mark.slow
async def test_rendered_command_runs_the_operator(helm_bin: str, apiserver: Any) -> None:
    container, peering = _rendered()
    await _install_peering(apiserver.url, peering)
    async with operator_process(container, "disaggserve-0"):
        await wait_for(lambda: (apiserver.get("kopf.dev", "clusterkopfpeerings", None, peering["metadata"]["name"])
                                or {}).get("status"), timeout=20, message="operator registered in the peering")
        resp = await create(apiserver.url, example())
        assert resp.status_code == 201, resp.text
        await wait_for(lambda: apiserver.get("apps", "statefulsets", "default", "tiny-decode"), timeout=20,
                       message="the operator process reconciled the DisaggServe")


@pytest.mark.slow
async def test_two_replicas_elect_one_that_works(helm_bin: str, apiserver: Any) -> None:
    """The chart's default: two replicas with identical arguments; one must reconcile."""
    container, peering = _rendered()
    await _install_peering(apiserver.url, peering)
    async with AsyncExitStack() as stack:
        logs = [await stack.enter_async_context(operator_process(container, pod))
                for pod in ("disaggserve-a", "disaggserve-b")]
        resp = await create(apiserver.url, example())
        assert resp.status_code == 201, resp.text
        try:
            # Created while the replicas may still be handing over: in ~1 of 3 runs neither one
            # handled the create event (the one that began was paused); the status safety net
            # (30 s) reconciles such a lost generation, hence 50 s here.
            await wait_for(lambda: apiserver.get("apps", "statefulsets", "default", "tiny-decode"), timeout=50,
                           message="one of two peered replicas reconciled the DisaggServe")
        except AssertionError as e:
            tails = "\n".join(f"--- replica {i}:\n{''.join(log)[-2000:]}" for i, log in enumerate(logs))
            raise AssertionError(f"{e}\n{tails}") from None
