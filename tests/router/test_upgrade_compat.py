"""During a rolling upgrade a decode worker of an earlier version refuses the `kv.shm` location a
newer prefill worker adds (its request schema forbids unknown fields): the router sends the same
decode request without it, and the request completes. Other refusals are not retried."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from disaggserve_worker.contract import PATH_DECODE, PATH_PREFILL, PATH_RELEASE
from disaggserve_worker.router.dispatch import Dispatcher, GenerationRequest, UpstreamError
from disaggserve_worker.router.metrics import RouterMetrics
from disaggserve_worker.router.pool import Worker, WorkerPool

SHM = {"segment": "ab" * 16, "lease": 12345, "runs": [[0, 4]]}


async def _run(refusal: str) -> tuple[list[int | None], list[dict]]:
    seen: list[dict] = []

    async def prefill(request: web.Request) -> web.Response:
        return web.json_response({"first_token_id": 5, "finish_reason": None, "text": "",
                                  "kv": {"address": "127.0.0.1:1", "handle": "h-1", "bytes": 64, "shm": SHM}})

    async def decode(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        if "shm" in body["kv"] or refusal != "kv.shm":
            message = f"{refusal}: Extra inputs are not permitted"
            return web.json_response({"error": {"type": "invalid_request", "message": message}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for i, token in enumerate((6, 7)):
            event = {"token_id": token, "text": "", "finish_reason": "length" if i == 1 else None}
            await response.write((json.dumps(event) + "\n").encode())
        return response

    async def release(request: web.Request) -> web.Response:
        return web.json_response({"released": True})

    app = web.Application()
    app.add_routes([web.post(PATH_PREFILL, prefill), web.post(PATH_DECODE, decode), web.post(PATH_RELEASE, release)])
    runner = web.AppRunner(app)
    await runner.setup()
    for _ in range(2):  # one address per role: the pool knows workers by URL
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    prefill_url, decode_url = (f"http://127.0.0.1:{address[1]}" for address in runner.addresses)
    try:
        pool = WorkerPool()
        pool.replace([Worker(prefill_url, "prefill"), Worker(decode_url, "decode")])
        async with aiohttp.ClientSession() as session:
            dispatcher = Dispatcher(pool, session, RouterMetrics(None, None))
            request = GenerationRequest("r", [1, 2, 3, 4], max_tokens=3, temperature=0)
            tokens = [token.token_id async for token in dispatcher.generate(request)]
    finally:
        await runner.cleanup()
    return tokens, seen


async def test_an_older_decode_worker_gets_the_request_without_the_shared_memory_location() -> None:
    tokens, seen = await _run("kv.shm")
    assert tokens == [5, 6, 7]
    assert [("shm" in body["kv"]) for body in seen] == [True, False]
    assert seen[1]["kv"]["handle"] == "h-1"


async def test_other_refusals_are_not_retried() -> None:
    with pytest.raises(UpstreamError):
        await _run("sampling.top_k")
