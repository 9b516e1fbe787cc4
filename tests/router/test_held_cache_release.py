"""A request the router gives up after the prefill worker started on it must not leave that
worker holding the KV cache until its TTL: the router releases it (`/internal/release`). With a
prefill worker that answers late, the cancellation lands during the prefill call every time."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from disaggserve_worker.contract import PATH_PREFILL, PATH_RELEASE
from disaggserve_worker.router.dispatch import Dispatcher
from disaggserve_worker.router.metrics import RouterMetrics
from disaggserve_worker.router.pool import Worker, WorkerPool


async def test_a_request_cancelled_during_its_prefill_releases_the_cache_it_produced() -> None:
    released: list[str] = []
    answered = asyncio.Event()

    async def prefill(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)  # the prefill runs on; the router's request is cancelled meanwhile
        answered.set()
        return web.json_response({"first_token_id": 7, "finish_reason": None,
                                  "kv": {"address": "127.0.0.1:1", "handle": "h-1", "bytes": 64}})

    async def release(request: web.Request) -> web.Response:
        released.append((await request.json())["handle"])
        return web.json_response({"released": True})

    app = web.Application()
    app.add_routes([web.post(PATH_PREFILL, prefill), web.post(PATH_RELEASE, release)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            dispatcher = Dispatcher(WorkerPool(), session, RouterMetrics(None, None))
            worker = Worker(f"http://127.0.0.1:{port}", "prefill")
            call = asyncio.create_task(dispatcher._prefill(worker, {"request_id": "r"}, 10))
            await asyncio.sleep(0.05)
            call.cancel()  # the client left
            await asyncio.gather(call, return_exceptions=True)
            assert call.cancelled() and released == []
            await asyncio.wait_for(answered.wait(), 5)
            async with asyncio.timeout(5):
                while released != ["h-1"]:
                    await asyncio.sleep(0.02)
            assert worker.inflight_requests == 0 and worker.inflight_tokens == 0
    finally:
        await runner.cleanup()
