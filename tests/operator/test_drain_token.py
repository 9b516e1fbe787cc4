"""Drain-safe scale-down reaches workers that require their DisaggServe's token: the operator sends
it on /internal/drain and /internal/load, so a busy leaving pod holds the scale-down back. (A
refused call reads as "unreachable", which would let the scale-down cut its streams.)"""

from __future__ import annotations

import datetime
import random
from typing import Any

from aiohttp import web

from disaggserve.contract import HEADER_WORKER_TOKEN, WORKER_PORT
from disaggserve.controller.drain import prepare_scale_down

TOKEN = "e" * 64


class FakeKube:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods

    async def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self.pods

    async def delete(self, *args: Any) -> bool:
        raise AssertionError("no pod should be restarted here")


def statefulset(replicas: int) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "tiny-decode"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app.kubernetes.io/instance": "tiny"}},
                     "template": {"spec": {"terminationGracePeriodSeconds": 180}}}}


async def test_scale_down_waits_for_a_busy_worker_that_wants_the_token() -> None:
    ip = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}.9"
    calls: list[tuple[str, str | None]] = []

    async def internal(request: web.Request) -> web.Response:
        given = request.headers.get(HEADER_WORKER_TOKEN)
        calls.append((request.path, given))
        if given != TOKEN:
            return web.json_response({"error": {"code": "invalid_worker_token"}}, status=401)
        return web.json_response({"draining": True, "running": 1, "queued_requests": 0, "held_caches": 0})

    app = web.Application()
    app.router.add_route("*", "/internal/{what}", internal)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, ip, WORKER_PORT).start()
    try:
        pod = {"metadata": {"name": "tiny-decode-1", "labels": {"app.kubernetes.io/instance": "tiny"}},
               "status": {"podIP": ip}}
        kube = FakeKube([pod])
        now = datetime.datetime.now(datetime.UTC)
        existing = {("apps/v1", "StatefulSet", "tiny-decode"): statefulset(2)}

        desired = [statefulset(1)]
        held = await prepare_scale_down(kube, desired, existing, "ns", {}, now, token=TOKEN)  # type: ignore[arg-type]
        assert held.pending == ["tiny-decode"] and desired[0]["spec"]["replicas"] == 2
        assert calls == [("/internal/drain", TOKEN)]

        desired = [statefulset(1)]
        blind = await prepare_scale_down(kube, desired, existing, "ns", {}, now)  # type: ignore[arg-type]
        assert blind.pending == [] and desired[0]["spec"]["replicas"] == 1, "without the token the drain is blind"
    finally:
        await runner.cleanup()
