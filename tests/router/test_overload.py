"""The router under more load than its workers run: the excess waits in a bounded queue or is shed
with 429 + Retry-After; everything admitted completes; nothing times out or is cut."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from router_harness import SERVED, RunningRouter, WorkerProcess, router_config, start_router

pytestmark = pytest.mark.slow
BODY = {"model": SERVED, "prompt": "overload", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
        "stream": True}


async def test_excess_is_queued_or_shed_with_retry_after_and_the_rest_completes(
        disagg_workers: list[WorkerProcess]) -> None:
    running: RunningRouter = await start_router(router_config(
        disagg_workers, max_inflight_per_worker=1, max_queued=2, queue_timeout_s=120))
    try:
        async with aiohttp.ClientSession() as http:
            async def one() -> tuple[int, str | None, bool]:
                async with http.post(running.base_url + "/completions", json=BODY) as resp:
                    if resp.status != 200:
                        body = await resp.json()
                        assert body["error"]["code"] == "overloaded", body
                        return resp.status, resp.headers.get("Retry-After"), False
                    text = await resp.text()
                    return resp.status, None, text.rstrip().endswith("data: [DONE]")

            outcomes = await asyncio.gather(*(one() for _ in range(8)))
        served = [o for o in outcomes if o[0] == 200]
        shed = [o for o in outcomes if o[0] == 429]
        assert len(served) == 3 and all(done for _, _, done in served), outcomes  # 1 running + 2 queued
        assert len(shed) == 5 and all(after and int(after) >= 1 for _, after, _ in shed), outcomes
        metrics = running.router.metrics.render().decode()
        assert 'disaggserve_requests_total{status="shed"} 5.0' in metrics
        assert 'disaggserve_requests_total{status="ok"} 3.0' in metrics
        assert running.router.admission.active == 0 and running.router.admission.queued == 0
    finally:
        await running.runner.cleanup()
