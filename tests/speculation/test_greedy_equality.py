"""Greedy output with speculation is the target's own output, token for token.

Concurrent ragged batches: prompts of different lengths, outputs of different lengths (some
so short that k is capped), staggered arrivals (sequences join a speculating batch), and
k differing between requests in the same step.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from speculation_harness import make_engine, make_speculator, record_steps

from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.loader import LoadedModel
from engine_harness import run_disaggregated, run_requests

TEXTS = ["Hello world hello world hello world hello", "a",
         "The quick brown fox jumps over the lazy dog and the quick brown fox",
         "Kubernetes runs containers in pods; an operator watches custom resources. Kubernetes runs"]
OUTPUT_LENGTHS = [24, 2, 17, 31, 9]


def _requests(tiny: LoadedModel) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(7)
    prompts = [tiny.tokenizer.encode(t).ids for t in TEXTS]
    prompts.append([rng.randrange(3, 512) for _ in range(40)])  # non-repetitive
    return [(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, OUTPUT_LENGTHS, strict=True)]


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
@pytest.mark.parametrize("proposer", ["ngram", "draft"])
async def test_colocated_speculation_equals_reference(
        tiny: LoadedModel, tiny_draft: LoadedModel, mode: str, proposer: str,
        reference_greedy: Callable[[list[int], int], list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_speculator(tiny, tiny_draft, mode, proposer)
    steps = record_steps(spec)
    engine = make_engine(tiny, spec)
    verifications: list[BatchLayout] = []
    forward = tiny.model.forward_step

    def spy(ids, layout, pool, all_logits=False):  # type: ignore[no-untyped-def]
        if all_logits:
            verifications.append(layout)
        return forward(ids, layout, pool, all_logits=all_logits)

    monkeypatch.setattr(tiny.model, "forward_step", spy)
    try:
        # Fixed: all arrive together, so caps near each request's end make k differ within steps
        # deterministically; adaptive: staggered, so sequences join a speculating batch.
        got = await run_requests(engine, _requests(tiny), stagger_s=0.01 if mode == "adaptive" else 0.0)
    finally:
        engine.stop()
    expected = [reference_greedy(p, s.max_tokens) for p, s in _requests(tiny)]
    assert got == expected
    assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
    if spec.draft is not None:
        assert spec.draft.tracked == 0, "finished sequences give their draft cache back"
        assert spec.draft.allocator.free_tokens == spec.draft.allocator.capacity_tokens
    if mode == "fixed":
        ks = [step.ks for step in steps]
        assert any(len({k for k in step if k}) > 1 for step in ks), f"no step mixed proposal lengths: {ks}"
        assert any(0 in step and any(step) for step in ks), "no step mixed speculating and plain rows"
        # Such a step attends its plain rows as decode rows (the one-query kernel), apart from the
        # proposing ones: they are laid out first.
        assert any(layout.max_query > 1 and layout.parts is not None for layout in verifications)
        many_query = [(layout.parts[1] if layout.parts else layout).spans[1].tolist()  # type: ignore[union-attr]
                      for layout in verifications if layout.max_query > 1]
        assert all(1 not in rows for rows in many_query), f"plain rows in the many-query path: {many_query}"


async def test_draft_with_target_as_draft_accepts_everything(
        tiny: LoadedModel, reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    """Draft = target: every proposal is accepted, so output and cache rollback bookkeeping are
    exercised at full k (each step emits k + 1 tokens)."""
    spec = make_speculator(tiny, tiny, "fixed", "draft")
    steps = record_steps(spec)
    engine = make_engine(tiny, spec)
    try:
        got = await run_requests(engine, _requests(tiny))
    finally:
        engine.stop()
    assert got == [reference_greedy(p, s.max_tokens) for p, s in _requests(tiny)]
    assert spec.controller.alpha() > 0.9
    assert max(max(step.ks) for step in steps) == 4


async def test_decode_role_over_tcp_with_draft_catches_up_the_prompt(
        tiny: LoadedModel, tiny_draft: LoadedModel,
        reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    """On a decode worker the prompt KV arrives from prefill; the draft has never seen the
    prompt and must prefill it itself in its first catch-up step."""
    prefill = make_engine(tiny, None, role="prefill")
    spec = make_speculator(tiny, tiny, "fixed", "draft")  # target as draft: any catch-up gap shows up
    decode = make_engine(tiny, spec, role="decode")
    requests = [r for r in _requests(tiny) if r[1].max_tokens >= 2]
    try:
        got, _ = await run_disaggregated(prefill, decode, requests, "127.0.0.71")
    finally:
        prefill.stop()
        decode.stop()
    assert got == [reference_greedy(p, s.max_tokens) for p, s in requests]
    assert spec.controller.alpha() > 0.9, "a draft identical to the target must agree after catch-up"
    assert decode.allocator.free_tokens == decode.allocator.capacity_tokens


async def test_a_step_with_no_proposal_is_the_plain_fused_step(
        tiny: LoadedModel, reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    """Where the speculator proposes nothing (here: n-gram lookups on random prompts find nothing
    early on), the running batch decodes in the same forward as the next prompt chunk, as without
    a speculator, instead of a verification forward of its own; those steps are still reported,
    with k = 0, and the tokens stay the target's."""
    from engine_harness import record_plans, start_engine

    spec = make_speculator(tiny, None, "fixed", "ngram")
    steps = record_steps(spec)
    engine = start_engine(tiny, kv=4096, budget=8, max_model_len=1024, speculator=spec)
    plans = record_plans(engine)
    rng = random.Random(3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    requests = [([rng.randrange(3, 512) for _ in range(n)], params) for n in (5, 30, 30)]
    try:
        got = await run_requests(engine, requests)
    finally:
        engine.stop()
    assert got == [reference_greedy(p, s.max_tokens) for p, s in requests]
    assert any(d and p for d, p in plans), f"no fused decode + prompt-chunk forward: {plans}"
    assert any(not any(step.ks) for step in steps), "plain steps are reported too, with k = 0"
