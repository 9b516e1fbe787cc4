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
from typing import Any

import httpx
import pytest

from chart.chartlib import documents, template
from helpers import create, example, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_rendered_command_runs_the_operator(helm_bin: str, apiserver: Any) -> None:
    objs = documents(template({"watch": {"scope": "cluster"}}))
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    probe = container["livenessProbe"]["httpGet"]
    port = _free_port()
    # The pod listens on 0.0.0.0:<probe port>; here: loopback on a free port, everything else as rendered.
    args = [a.replace(f"0.0.0.0:{container['ports'][0]['containerPort']}", f"127.0.0.1:{port}")
            for a in container["args"]]
    assert any(f"127.0.0.1:{port}{probe['path']}" in a for a in args), args

    peering = next(o for o in objs if o["kind"] == "ClusterKopfPeering")
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        resp = await client.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=peering)
        assert resp.status_code in (200, 201), resp.text

    env = {**os.environ, "DISAGGSERVE_WATCH_BACKOFF": "0.1"}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "disaggserve.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with httpx.AsyncClient() as client:
            async def live() -> bool:
                try:
                    return (await client.get(f"http://127.0.0.1:{port}{probe['path']}")).status_code == 200
                except httpx.TransportError:
                    return False

            for _ in range(300):
                if proc.returncode is not None or await live():
                    break
                await asyncio.sleep(0.1)
            assert proc.returncode is None, "the operator exited: " + (await proc.stdout.read()).decode()[-3000:]
            assert await live(), "no answer on the liveness endpoint within 30 s"

        await wait_for(lambda: (apiserver.get("kopf.dev", "clusterkopfpeerings", None, peering["metadata"]["name"])
                                or {}).get("status"), timeout=20, message="operator registered in the peering")
        resp = await create(apiserver.url, example())
        assert resp.status_code == 201, resp.text
        await wait_for(lambda: apiserver.get("apps", "statefulsets", "default", "tiny-decode"), timeout=20,
                       message="the operator process reconciled the DisaggServe")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
