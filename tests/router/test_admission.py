"""The router's admission queue: bounded, timed, FIFO; sheds with 429 + Retry-After (no workers: 503)."""

from __future__ import annotations

import asyncio

import pytest

from disaggserve_worker.router.admission import Admission
from disaggserve_worker.router.errors import APIError
from disaggserve_worker.router.pool import Worker, WorkerPool


def pool(decode: int = 1, prefill: int = 1) -> WorkerPool:
    p = WorkerPool()
    p.replace([Worker(f"http://p{i}:1", "prefill") for i in range(prefill)]
              + [Worker(f"http://d{i}:1", "decode") for i in range(decode)])
    return p


async def test_runs_per_worker_requests_and_queues_the_rest_in_order() -> None:
    gate = Admission(pool(decode=2), per_worker=1, max_queued=10, timeout_s=5)
    await gate.acquire()
    await gate.acquire()
    assert gate.active == 2
    order: list[int] = []

    async def wait(i: int) -> None:
        await gate.acquire()
        order.append(i)

    waiters = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert gate.queued == 3 and order == []
    gate.release()
    await asyncio.sleep(0.01)
    gate.release()
    await asyncio.sleep(0.01)
    assert order == [0, 1] and gate.active == 2
    gate.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]


async def test_full_queue_is_refused_at_once_with_429_and_retry_after() -> None:
    gate = Admission(pool(), per_worker=1, max_queued=1, timeout_s=5)
    await gate.acquire()
    queued = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as refused:
        await gate.acquire()
    assert refused.value.status == 429 and refused.value.code == "overloaded"
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 30
    response = refused.value.response()
    assert response.status == 429 and response.headers["Retry-After"] == refused.value.headers["Retry-After"]
    gate.release()
    await queued


async def test_wait_past_the_timeout_is_429_when_busy_and_503_when_no_worker() -> None:
    busy = Admission(pool(), per_worker=1, max_queued=5, timeout_s=0.1)
    await busy.acquire()
    with pytest.raises(APIError) as shed:
        await busy.acquire()
    assert shed.value.status == 429 and "Retry-After" in shed.value.headers
    assert busy.queued == 0 and busy.active == 1

    empty = WorkerPool()
    none = Admission(empty, per_worker=4, max_queued=5, timeout_s=0.1)
    with pytest.raises(APIError) as gone:
        await none.acquire()
    assert gone.value.status == 503 and gone.value.code == "no_workers" and "Retry-After" in gone.value.headers
    assert "no workers are known" in gone.value.message


async def test_queued_request_starts_when_a_worker_comes_back() -> None:
    p = pool()
    p.workers["http://d0:1"].draining = True  # the only decode worker restarts / drains
    gate = Admission(p, per_worker=2, max_queued=5, timeout_s=5)
    ticker = asyncio.create_task(gate.run(0.01))
    try:
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0.05)
        assert not waiting.done() and gate.queued == 1
        p.workers["http://d0:1"].draining = False
        await asyncio.wait_for(waiting, 1)
        assert gate.active == 1
    finally:
        ticker.cancel()


async def test_a_client_that_leaves_the_queue_frees_its_place() -> None:
    gate = Admission(pool(), per_worker=1, max_queued=5, timeout_s=5)
    await gate.acquire()
    leaving = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0.01)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert gate.queued == 0
    gate.release()
    assert gate.active == 0
    await gate.acquire()
    assert gate.active == 1


async def test_refuses_at_once_when_the_queue_ahead_outlasts_the_timeout() -> None:
    gate = Admission(pool(), per_worker=1, max_queued=100, timeout_s=1)
    for _ in range(10):  # a completion rate of ~1 per second over the window
        await gate.acquire()
        gate.release()
    gate._done = type(gate._done)([t - 9 + i for i, t in enumerate(gate._done)])
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as shed:  # 3 ahead at ~1/s: more than 1 s of waiting
        await gate.acquire()
    assert shed.value.status == 429 and "queued ahead" in shed.value.message
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
