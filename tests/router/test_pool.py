"""How the router picks workers: by load, with room for the KV cache, same unit first, never a
failed or draining one."""

from __future__ import annotations

import pytest

from disaggserve_worker.router.pool import NoWorkerAvailable, Worker, WorkerPool


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
