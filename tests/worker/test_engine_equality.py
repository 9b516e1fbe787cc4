"""Greedy output is the same token for token: reference, colocated, disaggregated over TCP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.model.loader import LoadedModel
from engine_harness import greedy_requests, run_disaggregated, run_requests, start_engine


@pytest.mark.parametrize("budget", [2048, 8])  # 8: prompts are chunked and mixed with decode steps
async def test_colocated_equals_reference(tiny: LoadedModel, budget: int,
                                          reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    engine = start_engine(tiny, budget=budget)
    try:
        got = await run_requests(engine, greedy_requests(tiny), stagger_s=0.01)  # later ones join a running batch
    finally:
        engine.stop()
    expected = [reference_greedy(p, s.max_tokens) for p, s in greedy_requests(tiny)]
    assert got == expected
    assert engine.allocator.free_tokens == engine.allocator.capacity_tokens


async def test_disaggregated_over_tcp_equals_reference(
        tiny: LoadedModel, reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    prefill, decode = start_engine(tiny, "prefill"), start_engine(tiny, "decode")
    try:
        got, pulls = await run_disaggregated(prefill, decode, greedy_requests(tiny), "127.0.0.21")
    finally:
        prefill.stop()
        decode.stop()
    assert [pull.tokens for pull in pulls] == [len(p) for p, _ in greedy_requests(tiny)]
    expected = [reference_greedy(p, s.max_tokens) for p, s in greedy_requests(tiny)]
    assert got == expected
    assert prefill.held_count == 0, "pulled caches are freed on the prefill side"
    assert prefill.allocator.free_tokens == prefill.allocator.capacity_tokens
    assert decode.allocator.free_tokens == decode.allocator.capacity_tokens


async def test_engine_fault_reaches_every_running_client(tiny: LoadedModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    engine = start_engine(tiny, "colocated")
    calls = {"n": 0}
    real = tiny.model.forward_step

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward_step", flaky)
    try:
        stream = RequestStream("f", loop)
        engine.submit("f", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), stream)
        events = [event async for event in stream]
        assert events[-1].error is not None and events[-1].error["type"] == "engine_error"
        assert "illegal memory access" in events[-1].error["message"] and events[-1].error["retryable"]
        assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
        again = RequestStream("g", loop)  # the engine keeps serving after a fault
        engine.submit("g", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), again)
        assert [e.finish_reason async for e in again][-1] == "length"
    finally:
        engine.stop()


async def test_abort_frees_the_cache(tiny: LoadedModel) -> None:
    loop = asyncio.get_running_loop()
    engine = start_engine(tiny, "colocated")
    try:
        stream = RequestStream("a", loop)
        engine.submit("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), stream)
        await stream.queue.get()
        assert engine.allocator.free_tokens < engine.allocator.capacity_tokens
        engine.abort("a")
        for _ in range(100):
            if engine.idle and engine.allocator.free_tokens == engine.allocator.capacity_tokens:
                break
            await asyncio.sleep(0.01)
        assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
    finally:
        engine.stop()


async def test_pipeline_stages_give_the_same_tokens(reference_greedy: Callable[[list[int], int], list[int]]
                                                    ) -> None:
    """Layers split into stages (on CPU both stages share the device; on GPUs each has its own)."""
    from disaggserve_worker.model.loader import load_model

    staged = load_model("builtin:tiny-llama", device="cpu")
    staged.model.place([[torch.device("cpu")]] * 2)
    assert staged.model.layer_devices is not None and len(staged.model.layer_devices) == 4
    engine = start_engine(staged, kv=256)
    try:
        prompt = staged.tokenizer.encode("pipeline stages").ids
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        assert await run_requests(engine, [(prompt, params)]) == [reference_greedy(prompt, 6)]
    finally:
        engine.stop()
    with pytest.raises(ValueError, match="between 1 and the layer count"):
        staged.model.place([[torch.device("cpu")]] * 5)


def _cpu_ticks(stat: Path) -> int | None:
    """utime + stime of one thread (Linux), in clock ticks; None where /proc is absent."""
    if not stat.exists():
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def test_prefill_waits_without_spinning_until_a_pull_frees_memory(tiny: LoadedModel) -> None:
    loop = asyncio.get_running_loop()
    engine = start_engine(tiny, "prefill", kv=32)  # two blocks of 16: one held prompt fills it
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        first = RequestStream("a", loop)
        engine.submit("a", list(range(1, 30)), params, first)
        handle = (await first.queue.get()).kv_handle
        assert handle is not None
        second = RequestStream("b", loop)
        engine.submit("b", list(range(1, 20)), params, second)
        await asyncio.sleep(0.05)
        assert engine._thread is not None
        stat = Path(f"/proc/self/task/{engine._thread.native_id}/stat")
        before = _cpu_ticks(stat)
        await asyncio.sleep(0.5)
        assert second.queue.empty() and engine.load()["queued_requests"] == 1
        if before is not None:
            assert _cpu_ticks(stat) - before < 10, "the engine thread must sleep while nothing fits"
        assert engine.pin_held(handle) is not None
        engine.unpin_held(handle, release=True)  # a decode worker pulled it
        event = await asyncio.wait_for(second.queue.get(), 5)
        assert event.kv_handle is not None
    finally:
        engine.stop()


async def test_a_released_cache_is_freed_now_or_when_its_transfer_ends(tiny: LoadedModel) -> None:
    """`release_held` (the router gave the request up): an idle held cache is freed at once, one
    being sent is freed when its transfer ends, and an unknown handle is no error."""
    loop = asyncio.get_running_loop()
    engine = start_engine(tiny, "prefill")
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        handles = []
        for rid in ("idle", "sending"):
            stream = RequestStream(rid, loop)
            engine.submit(rid, list(range(1, 30)), params, stream)
            handles.append((await stream.queue.get()).kv_handle)
        free = engine.allocator.free_tokens
        assert engine.release_held(handles[0]) and engine.held_count == 1
        assert engine.allocator.free_tokens > free
        assert engine.pin_held(handles[1]) is not None  # a transfer is under way
        assert engine.release_held(handles[1]) and engine.held_count == 1
        engine.unpin_held(handles[1], release=False)  # it failed: nobody will retry a released cache
        assert engine.expire_held() == 1 and engine.held_count == 0
        assert not engine.release_held("unknown")
    finally:
        engine.stop()


async def test_requests_after_stop_fail_fast_and_retryable(tiny: LoadedModel) -> None:
    engine = start_engine(tiny, "colocated")
    engine.stop()
    stream = RequestStream("late", asyncio.get_running_loop())
    engine.submit("late", [1, 2], SamplingParams(max_tokens=2), stream)
    event = await asyncio.wait_for(stream.queue.get(), 2)
    assert event.error == {"type": "shutdown", "message": "worker is shutting down", "retryable": True}


def test_an_engine_starts_once(tiny: LoadedModel) -> None:
    """Two engine threads over one scheduler would prefill a sequence twice and fail every request."""
    engine = start_engine(tiny)
    try:
        with pytest.raises(RuntimeError, match="already started"):
            engine.start()
    finally:
        engine.stop()
