"""The speculation bench's replay on the engine's CPU clock (`bench/speculation.py: on_cpu_clock`),
and the engine API it drives (`Engine.run_iteration` on an engine never started): the same tokens
as the engine thread, a clock that only the engine's own iterations advance, idle gaps skipped."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from disaggserve_worker.engine.engine import Engine
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.model.loader import LoadedModel
from engine_harness import greedy_requests, start_engine

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench() -> ModuleType:
    """bench/speculation.py under its own name (`speculation` is this test package's name)."""
    if "speculation_bench" not in sys.modules:
        sys.path.insert(0, str(BENCH))  # its `loadgen` import
        spec = importlib.util.spec_from_file_location("speculation_bench", BENCH / "speculation.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["speculation_bench"] = module
        spec.loader.exec_module(module)
    return sys.modules["speculation_bench"]


def never_started(tiny: LoadedModel) -> Engine:
    return start_engine(tiny, budget=8, start=False)  # budget 8: prompts chunked and mixed with decode steps


async def test_run_iteration_gives_the_reference_tokens(
        tiny: LoadedModel, reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    loop = asyncio.get_running_loop()
    engine = never_started(tiny)
    streams = []
    for i, (prompt, params) in enumerate(greedy_requests(tiny)):
        stream = RequestStream(f"r{i}", loop)
        engine.submit(f"r{i}", prompt, params, stream)
        streams.append(stream)
    while engine.has_compute:
        engine.run_iteration()
        await asyncio.sleep(0)
    got = [[event.token_id for event in _drained(stream)] for stream in streams]
    assert got == [reference_greedy(p, s.max_tokens) for p, s in greedy_requests(tiny)]
    assert engine.allocator.free_tokens == engine.allocator.capacity_tokens


def _drained(stream: RequestStream) -> list:  # type: ignore[type-arg]
    events = []
    while not stream.queue.empty():
        events.append(stream.queue.get_nowait())
    assert events and events[-1].finish_reason == "length", events[-1:]
    return events


def test_run_iteration_refuses_a_started_engine(tiny: LoadedModel) -> None:
    engine = start_engine(tiny)
    try:
        assert engine._thread is not threading.current_thread()
        with pytest.raises(RuntimeError, match="never started"):
            engine.run_iteration()
    finally:
        engine.stop()


async def test_the_cpu_clock_advances_only_by_the_engines_iterations(tiny: LoadedModel) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    # All at once: nothing is idle, so the last request finishes exactly when the work is done.
    [(latencies, busy)] = await bench().on_cpu_clock([never_started(tiny)], [(0.0, p) for p in prompts], params)
    assert all(0 < latency <= busy for latency in latencies)
    assert max(latencies) == pytest.approx(busy, abs=1e-9)
    # An hour apart: the clock jumps over the idle gap, and each request is served as if alone.
    apart = [(3600.0 * i, p) for i, p in enumerate(prompts)]
    [(latencies, busy)] = await bench().on_cpu_clock([never_started(tiny)], apart, params)
    assert all(0 < latency < 60 for latency in latencies)
    assert sum(latencies) == pytest.approx(busy, abs=1e-9)


async def test_engines_in_lockstep_each_keep_their_own_clock(
        tiny: LoadedModel, reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    """Two engines driven together: each serves every request with the reference tokens, and
    each one's clock counts its own iterations only (the other's work is not billed to it)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    engines = [never_started(tiny), never_started(tiny)]
    seen: list[list[list[int]]] = [[], []]
    for engine, tokens in zip(engines, seen, strict=True):
        real = engine._emit

        def emit(stream, event, real=real, tokens=tokens):  # type: ignore[no-untyped-def]
            index = int(stream.request_id[1:])
            while len(tokens) <= index:
                tokens.append([])
            tokens[index].append(event.token_id)
            real(stream, event)

        engine._emit = emit  # type: ignore[method-assign]
    timed = await bench().on_cpu_clock(engines, [(0.0, p) for p in prompts], params)
    for latencies, busy in timed:
        assert max(latencies) == pytest.approx(busy, abs=1e-9)  # as if alone: nothing idles
    expected = [reference_greedy(p, 6) for p in prompts]
    assert seen == [expected, expected]


async def test_the_cpu_clock_reports_a_failed_request(tiny: LoadedModel) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = never_started(tiny)

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("forward failed")

    engine.runner.execute = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="request 0 failed"):
        await bench().on_cpu_clock([engine], [(0.0, [5, 6, 7])], params)


def test_a_cell_says_how_busy_speculation_off_kept_the_engine() -> None:
    """`off_utilization`: off's median engine CPU over the arrivals' span (1 or more: past capacity)."""
    def run(cpu: float) -> dict[str, object]:
        return {"mean_s": 0.1, "p90_s": 0.2, "engine_cpu_s": cpu, "acceptance": None, "mean_k": 0.0}

    runs = {"off": [run(3.0), run(4.4), run(4.0)], "fixed": [run(4.5)] * 3, "adaptive": [run(4.1)] * 3}
    row = bench().summarize(runs, 4.0, 30.0, 4.0, [120, 118, 121])  # type: ignore[arg-type]
    assert row["off_utilization"] == pytest.approx(1.0)
