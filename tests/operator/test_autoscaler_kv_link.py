"""While autoscaling, the autoscaler scrapes the decode workers' KV pulls and plans with the link
they measure (planner/replan.py `live_link`); decisions name it."""

from __future__ import annotations

import httpx

from disaggserve.controller.autoscaler import Autoscaler
from helpers import autoscaled_tiny, router_metrics, step_twice, worker_kv_metrics


def pod(name: str, component: str, ip: str) -> dict:
    return {
        "metadata": {"name": name,
                     "labels": {"app.kubernetes.io/instance": "tiny", "app.kubernetes.io/component": component}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


class RouterAndDecode:
    async def list(self, *args, **kwargs):
        return [pod("tiny-router-0", "router", "10.0.0.1"), pod("tiny-decode-0", "decode", "10.0.0.2")]

    async def get(self, *args, **kwargs):
        return None


async def test_the_decode_workers_pulls_set_the_link_the_autoscaler_plans_with():
    served = iter([0, 10_000])
    pulls = iter([0, 400])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.2":  # the decode worker: 400 more pulls of 1 MB, 2 ms each
            return httpx.Response(200, text=worker_kv_metrics("decode", [(1_000_000, 0.002)] * next(pulls)))
        return httpx.Response(200, text=router_metrics(next(served)))

    autoscaler = Autoscaler(RouterAndDecode(), http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    try:
        patch = await step_twice(autoscaler, autoscaled_tiny())
    finally:
        await autoscaler.aclose()
    assert patch is not None and "plan" in patch, patch
    assert "KV link 4 Gbit/s measured" in patch["plan"]["reason"], patch["plan"]["reason"]
