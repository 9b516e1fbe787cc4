"""The router sends its DisaggServe's worker token on every worker call, and a router holding the
wrong token gets a clear, non-retryable error instead of a pile of silent retries."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from router_harness import SERVED, WorkerProcess, random_block, router_config, start_router, start_workers, stop_all

from disaggserve_worker.auth import ENV_WORKER_TOKEN, HEADER_WORKER_TOKEN

TOKEN = "c" * 64
BODY = {"model": SERVED, "prompt": "tokens only for friends", "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def guarded_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    block = random_block()
    workers = start_workers([("prefill", f"{block}.1"), ("decode", f"{block}.2")],
                            tmp_path_factory.mktemp("guarded"), token=TOKEN)
    yield workers
    stop_all(workers, graceful=False)


async def test_router_with_the_token_serves_and_one_without_is_refused_clearly(
        guarded_workers: list[WorkerProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    async with aiohttp.ClientSession() as session:
        for worker in guarded_workers:  # the workers really are guarded
            async with session.get(worker.url + "/internal/load") as resp:
                assert resp.status == 401
            async with session.get(worker.url + "/internal/load", headers={HEADER_WORKER_TOKEN: TOKEN}) as resp:
                assert resp.status == 200

        monkeypatch.setenv(ENV_WORKER_TOKEN, TOKEN)
        good = await start_router(router_config(guarded_workers))
        try:
            async with session.post(good.base_url + "/completions", json=BODY) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] == 5
        finally:
            await good.runner.cleanup()

        monkeypatch.setenv(ENV_WORKER_TOKEN, "d" * 64)  # another DisaggServe's token
        wrong = await start_router(router_config(guarded_workers, queue_timeout_s=1))
        try:
            async with asyncio.timeout(30):  # its first load polls are refused (else a dispatch-time 401: 502)
                while not all(w.refused_token for w in wrong.router.pool.workers.values()):
                    await asyncio.sleep(0.05)
            async with session.post(wrong.base_url + "/completions", json=BODY) as resp:
                body = await resp.json()
                assert resp.status == 503 and resp.headers["Retry-After"], body
                assert body["error"]["code"] == "no_workers"
                assert "refused the router's worker token" in body["error"]["message"]
                assert "DISAGGSERVE_WORKER_TOKEN" in body["error"]["message"]
        finally:
            await wrong.runner.cleanup()
