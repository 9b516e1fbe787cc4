"""The pure scheduler, and the colocated engine running decode and prompt chunks in one forward."""

from __future__ import annotations

from dataclasses import dataclass

from disaggserve_worker.engine.scheduler import StepPlan, plan_step
from disaggserve_worker.model.loader import LoadedModel
from engine_harness import greedy_requests, record_plans, run_requests, start_engine


@dataclass
class Seq:
    prompt_ids: list[int]
    num_cached: int = 0


def test_decode_first_then_prompt_chunks_within_the_budget() -> None:
    running = [Seq([1] * 5, 5), Seq([1] * 9, 9)]
    a, b, c = Seq([1] * 10), Seq([1] * 7, 3), Seq([1] * 4)
    plan = plan_step(running, [a, b, c], budget=12)
    assert plan.decode == running
    assert plan.prefill == [(a, 10)]  # 12 - 2 decode tokens
    assert plan.tokens == 12
    plan = plan_step(running, [b, a], budget=8)
    assert plan.prefill == [(b, 4), (a, 2)], "FCFS: the rest of b's prompt, then a chunk of a"


def test_prompts_are_not_starved_by_a_full_decode_batch() -> None:
    running = [Seq([1], 1) for _ in range(10)]
    waiting = Seq([1] * 6)
    plan = plan_step(running, [waiting], budget=4)
    assert len(plan.decode) == 10 and plan.prefill == [(waiting, 1)]


def test_empty_plan_is_false() -> None:
    assert not plan_step([], [], 64)
    assert not StepPlan()


async def test_colocated_iterations_mix_decode_and_prefill_in_one_forward(
        tiny: LoadedModel, reference_greedy) -> None:  # type: ignore[no-untyped-def]
    engine = start_engine(tiny, budget=8)
    plans = record_plans(engine)
    try:
        requests = greedy_requests(tiny)
        # All at once, not staggered: with a budget of 8 the later prompts are chunked while the
        # first ones decode, so the mix does not depend on how fast a decode step is (staggered by
        # 20 ms, the first requests had finished before the next arrived once decode got faster).
        got = await run_requests(engine, requests)
    finally:
        engine.stop()
    assert got == [reference_greedy(p, s.max_tokens) for p, s in requests]
    assert any(d and p for d, p in plans), f"no iteration ran decode and prefill together: {plans}"
    assert all(d + p <= 8 for d, p in plans if p), "an iteration with a prompt chunk exceeded the budget"
