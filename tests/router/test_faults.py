"""Worker faults under a live request: a decode worker killed mid-stream, a prefill worker that is
gone, and the router's own shutdown. The client always gets the whole answer or a clear retryable
error; never a hang, never a silently shortened answer."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from router_harness import (
    SERVED,
    RunningRouter,
    WorkerProcess,
    random_block,
    router_config,
    start_router,
    start_workers,
    stop_all,
)

pytestmark = pytest.mark.slow
LONG = {"ignore_eos": True}
PROMPT = "Kubernetes runs containers in pods"
MAX_TOKENS = 160


@pytest.fixture
def fresh_workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Workers these tests may kill: one prefill, two decode, in a block of their own."""
    block = random_block()
    workers = start_workers([("prefill", f"{block}.1"), ("decode", f"{block}.2"), ("decode", f"{block}.3")],
                            tmp_path)
    yield workers
    stop_all(workers, graceful=False)


@pytest.fixture
async def router(fresh_workers: list[WorkerProcess]) -> AsyncIterator[RunningRouter]:
    running = await start_router(router_config(fresh_workers, queue_timeout_s=0.5))
    yield running
    await running.runner.cleanup()


def api(router: RunningRouter) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.base_url, api_key="x", max_retries=0, timeout=60)


def decode_serving(router: RunningRouter, workers: list[WorkerProcess]) -> WorkerProcess:
    busy = [w for w in router.router.pool.of_role("decode") if w.inflight_requests > 0]
    assert len(busy) == 1, "exactly one decode worker should be streaming the request"
    return next(p for p in workers if p.url == busy[0].url)


async def test_decode_killed_mid_stream_resumes_with_same_text(router: RunningRouter,
                                                               fresh_workers: list[WorkerProcess]) -> None:
    reference = await api(router).completions.create(model=SERVED, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                     temperature=0, extra_body=LONG)
    stream = await api(router).completions.create(model=SERVED, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=LONG)
    pieces: list[str] = []
    finish: list[str | None] = []
    usage = None
    killed: WorkerProcess | None = None
    async with asyncio.timeout(60):
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                finish.append(chunk.choices[0].finish_reason)
            if len(pieces) == 5 and killed is None:
                killed = decode_serving(router, fresh_workers)
                killed.kill()
    assert killed is not None and killed.proc.returncode is not None
    assert "".join(pieces) == reference.choices[0].text  # greedy: the resumed stream continues exactly
    assert finish[-1] == "length" and usage is not None and usage.completion_tokens == MAX_TOKENS
    metrics = router.router.metrics.render().decode()
    assert "disaggserve_router_resumed_total 1.0" in metrics
    assert 'disaggserve_router_retries_total{reason="stream_broken"} 1.0' in metrics


async def test_last_decode_killed_gives_a_retryable_error(router: RunningRouter,
                                                          fresh_workers: list[WorkerProcess]) -> None:
    decodes = [w for w in fresh_workers if w.role == "decode"]
    decodes[0].kill()
    router.router.pool.workers[decodes[0].url].mark_failed()  # as the next poll would
    stream = await api(router).completions.create(model=SERVED, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True, extra_body=LONG)
    received = 0
    with pytest.raises(openai.APIError) as info:
        async with asyncio.timeout(60):
            async for _chunk in stream:
                received += 1
                if received == 3:
                    decodes[1].kill()
    assert "can be retried" in str(info.value)
    assert received < MAX_TOKENS  # the error arrived instead of a quietly short answer
    # With no decode worker left, a new request is refused at once, not accepted and dropped.
    with pytest.raises(openai.APIStatusError) as refused:
        await api(router).completions.create(model=SERVED, prompt=PROMPT, max_tokens=4)
    assert refused.value.status_code == 503


async def test_dead_prefill_is_retried_on_another(disagg_workers: list[WorkerProcess],
                                                  tmp_path: Path) -> None:
    block = random_block()
    extra = start_workers([("prefill", f"{block}.1")], tmp_path)
    try:
        running = await start_router(router_config(disagg_workers + extra, poll_interval_s=60))
        try:
            extra[0].kill()  # the router has not noticed: its first pick may be the dead one
            for _ in range(3):
                done = await api(running).completions.create(model=SERVED, prompt=PROMPT, max_tokens=4,
                                                             extra_body=LONG)
                assert done.usage is not None and done.usage.completion_tokens == 4
        finally:
            await running.runner.cleanup()
    finally:
        stop_all(extra)


async def test_draining_workers_cost_no_attempt_and_are_passed_by(disagg_workers: list[WorkerProcess],
                                                                    tmp_path: Path) -> None:
    """During a scale-down several prefill workers drain at once; with nothing in flight they look
    the least loaded until the next load poll. Their refusals must not use up a request's attempts
    (CI saw three of them exhaust three) while a serving worker stands beside them."""
    block = random_block()
    draining = start_workers([("prefill", f"{block}.1"), ("prefill", f"{block}.2")], tmp_path)
    try:
        # Listed first, so an unaware pick (all scores equal) takes a draining one; one attempt only.
        running = await start_router(router_config(draining + disagg_workers, poll_interval_s=60,
                                                   max_attempts=1))
        try:
            async with aiohttp.ClientSession() as http:
                for worker in draining:
                    async with http.post(worker.url + "/internal/drain") as resp:
                        assert resp.status == 200
            for _ in range(3):
                done = await api(running).completions.create(model=SERVED, prompt=PROMPT, max_tokens=4,
                                                             extra_body=LONG)
                assert done.usage is not None and done.usage.completion_tokens == 4
            pool = running.router.pool
            assert all(pool.workers[w.url].draining for w in draining)  # learned from the refusals
            metrics = running.router.metrics.render().decode()
            refused = re.search(r'disaggserve_router_retries_total\{reason="worker_busy"\} (\d+)', metrics)
            assert refused is not None and 1 <= float(refused.group(1)) <= 2, metrics
        finally:
            await running.runner.cleanup()
    finally:
        stop_all(draining)


async def test_drain_serves_new_requests_closing_connections_then_refuses_with_retry_after(
        disagg_workers: list[WorkerProcess]) -> None:
    """A kept-alive client reaches a terminating router until it reconnects: during the accept
    window it is served and told to close; after it, refused with a time to retry."""
    running = await start_router(router_config(disagg_workers, drain_accept_s=1.5))
    try:
        drained = asyncio.create_task(running.router.drain())
        body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 3}
        async with aiohttp.ClientSession() as http:
            async with http.get(running.url + "/readyz") as resp:
                assert resp.status == 503 and (await resp.json())["draining"] is True
            async with http.post(running.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers.get("Connection", "").lower() == "close"
                assert (await resp.json())["usage"]["completion_tokens"] == 3
            await asyncio.sleep(1.6)
            async with http.post(running.url + "/v1/completions", json=body) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
                assert resp.headers["Retry-After"] == "1"
        await asyncio.wait_for(drained, 10)
    finally:
        await running.runner.cleanup()


async def test_drain_finishes_in_flight_and_refuses_new(disagg_workers: list[WorkerProcess]) -> None:
    router = await start_router(router_config(disagg_workers, drain_accept_s=0))
    try:
        stream = await api(router).completions.create(model=SERVED, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=True, extra_body=LONG)
        first = await anext(aiter(stream))
        drained = asyncio.create_task(router.router.drain())
        async with aiohttp.ClientSession() as http:
            async with http.get(router.url + "/readyz") as resp:
                assert resp.status == 503 and (await resp.json())["draining"] is True
            async with http.post(router.url + "/v1/completions", json={"model": SERVED, "prompt": "x"}) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
        assert not drained.done()
        rest = [c async for c in stream]
        assert sum(len(c.choices) for c in [first, *rest]) >= 2
        assert rest[-1].choices[0].finish_reason == "length"
        await asyncio.wait_for(drained, 10)
    finally:
        await router.runner.cleanup()


async def test_client_gone_mid_stream_stops_the_worker(disagg_router: RunningRouter,
                                                       disagg_workers: list[WorkerProcess]) -> None:
    decode = next(w for w in disagg_workers if w.role == "decode")
    async with aiohttp.ClientSession() as http:
        resp = await http.post(disagg_router.url + "/v1/completions", json={
            "model": SERVED, "prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True})
        assert resp.status == 200
        await resp.content.readline()
        resp.close()  # the client hangs up
        async with asyncio.timeout(10):
            while True:
                async with http.get(decode.url + "/internal/load") as load:
                    if (await load.json())["running"] == 0:
                        break
                await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        while disagg_router.router.inflight:
            await asyncio.sleep(0.05)
    metrics = disagg_router.router.metrics.render().decode()
    assert 'disaggserve_requests_total{status="cancelled"} 1.0' in metrics


async def test_a_request_given_up_after_its_prefill_frees_the_held_cache(tmp_path: Path) -> None:
    """The decode worker refuses the request (it cannot hold prompt + max_tokens), so nobody will
    pull the prefill worker's cache: the router releases it at once instead of leaving it held
    (KV memory, and a draining prefill worker waiting) until its 60 s TTL."""
    block = random_block()
    workers = start_workers([("prefill", f"{block}.1"), ("decode", f"{block}.2")], tmp_path,
                            extra_args={f"{block}.2": ["--kv-cache-tokens", "64"]})
    prefill = workers[0]
    try:
        running = await start_router(router_config(workers))
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(running.url + "/v1/completions", json={
                        "model": SERVED, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True}) as resp:
                    assert resp.status != 200, await resp.text()
                held = None
                async with asyncio.timeout(5):
                    while held != 0:
                        async with http.get(prefill.url + "/internal/load") as load:
                            held = (await load.json())["held_caches"]
                        await asyncio.sleep(0.05)
        finally:
            await running.runner.cleanup()
    finally:
        stop_all(workers, graceful=False)


async def test_a_write_to_a_client_that_hung_up_is_a_cancellation_not_a_server_error(
        disagg_router: RunningRouter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """When the client's connection is already closing, writing the next chunk raises
    ConnectionResetError (a guidellm sweep's end hits this): the request counts as cancelled and
    nothing is logged as an error with a traceback."""
    from aiohttp import web

    write = web.StreamResponse.write
    writes = 0

    async def failing_write(self: web.StreamResponse, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes > 2:  # the client is gone: its connection closes, as a real hang-up does
            assert self._req is not None and self._req.transport is not None
            self._req.transport.close()
            raise ConnectionResetError("Cannot write to closing transport")
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", failing_write)
    def cancelled() -> float:
        text = disagg_router.router.metrics.render().decode()
        found = re.search(r'disaggserve_requests_total\{status="cancelled"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    before = cancelled()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.post(disagg_router.url + "/v1/completions", json={
                    "model": SERVED, "prompt": PROMPT, "max_tokens": 50, "stream": True, "ignore_eos": True},
                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
                await resp.read()
    async with asyncio.timeout(5):
        while disagg_router.router.inflight:
            await asyncio.sleep(0.05)
    assert writes > 2
    assert cancelled() == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
