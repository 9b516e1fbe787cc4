"""How the router picks workers: by load, with room for the KV cache, same unit first, never a
failed or draining one."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aiohttp import web

from disaggserve_worker.contract import PATH_LOAD
from disaggserve_worker.router.pool import (
    SLOW_POLLS_BEFORE_FAILED,
    LoadPoller,
    NoWorkerAvailable,
    Worker,
    WorkerPool,
)


def make_pool(*workers: Worker) -> WorkerPool:
    pool = WorkerPool()
    pool.replace(workers)
    return pool


def test_prefill_by_queued_tokens_including_own_inflight() -> None:
    a = Worker("http://a:1", "prefill", queued_tokens=900)
    b = Worker("http://b:1", "prefill", queued_tokens=100)
    pool = make_pool(a, b)
    assert pool.pick_prefill() is b
    b.inflight_tokens = 2000  # the router just sent b a long prompt the last poll has not seen
    assert pool.pick_prefill() is a


def test_decode_by_running_and_room() -> None:
    busy = Worker("http://a:1", "decode", running=8, free_kv_tokens=10_000)
    idle_full = Worker("http://b:1", "decode", running=0, free_kv_tokens=100)
    pool = make_pool(busy, idle_full)
    assert pool.pick_decode(context_tokens=500) is busy  # the idle one has no room for 500 tokens
    assert pool.pick_decode(context_tokens=50) is idle_full
    busy.free_kv_tokens = 10
    assert pool.pick_decode(context_tokens=500) is idle_full  # nobody has room: least loaded queues it


def test_decode_prefers_the_prefill_unit() -> None:
    near = Worker("http://a:1", "decode", unit="u1", running=3)
    far = Worker("http://b:1", "decode", unit="u2", running=0)
    pool = make_pool(near, far)
    assert pool.pick_decode(10, unit="u1") is near
    assert pool.pick_decode(10, unit=None) is far
    assert pool.pick_decode(10, unit="u1", exclude={near.url}) is far  # same unit failed: go elsewhere


def test_failed_draining_and_excluded_are_skipped() -> None:
    a, b = Worker("http://a:1", "colocated"), Worker("http://b:1", "colocated", running=5)
    pool = make_pool(a, b)
    a.mark_failed()
    assert pool.pick_colocated() is b
    b.draining = True
    with pytest.raises(NoWorkerAvailable, match="1 draining"):
        pool.pick_colocated()
    assert not pool.ready()


def test_mode_and_readiness() -> None:
    pool = WorkerPool()
    assert pool.mode is None and not pool.ready()
    with pytest.raises(NoWorkerAvailable, match="no prefill worker is known"):
        pool.pick_prefill()
    pool.upsert(Worker("http://p:1", "prefill"))
    assert pool.mode is None  # prefill alone cannot serve
    pool.upsert(Worker("http://d:1", "decode"))
    assert pool.mode == "disaggregated" and pool.ready()
    pool.remove("http://d:1")
    assert not pool.ready()


def test_replace_keeps_state_of_known_workers() -> None:
    pool = make_pool(Worker("http://a:1", "decode"))
    pool.workers["http://a:1"].inflight_requests = 2
    pool.replace([Worker("http://a:1", "decode", unit="u9"), Worker("http://b:1", "decode")])
    assert pool.workers["http://a:1"].inflight_requests == 2
    assert pool.workers["http://a:1"].unit == "u9"
    assert set(pool.workers) == {"http://a:1", "http://b:1"}


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role 'router'"):
        Worker("http://a:1", "router")


async def test_a_slow_load_poll_keeps_the_worker_a_refused_one_does_not() -> None:
    """A busy worker answers its load poll late; taking it out at once sent a whole burst to the
    other decode server (a CI run on a loaded host). A refused connection is a dead worker."""
    delay = {"s": 0.3}

    async def load(_request: web.Request) -> web.Response:
        await asyncio.sleep(delay["s"])
        return web.json_response({"running": 2, "queued_tokens": 0})

    app = web.Application()
    app.router.add_get(PATH_LOAD, load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    busy, dead = Worker(f"http://127.0.0.1:{port}", "decode"), Worker(f"http://127.0.0.1:{dead_port}", "decode")
    pool = make_pool(busy, dead)
    try:
        async with aiohttp.ClientSession() as session:
            poller = LoadPoller(pool, session, interval_s=0.01, timeout_s=0.05)
            for _ in range(SLOW_POLLS_BEFORE_FAILED - 1):
                await poller.poll_once()
                assert busy.available and not busy.poll_failing
            assert not dead.available and dead.poll_failing  # refused: out at once
            await poller.poll_once()  # one timeout too many: a hung worker sits out
            assert not busy.available and busy.poll_failing
            delay["s"] = 0.0
            await poller.poll_once()  # it answers again: back in, with its load
            assert busy.available and not busy.poll_failing and busy.slow_polls == 0 and busy.running == 2
    finally:
        await runner.cleanup()
