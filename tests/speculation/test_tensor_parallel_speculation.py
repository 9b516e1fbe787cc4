"""Speculation over a tensor-sharded target: verification runs the sharded forward on the
sharded KV pool, and greedy output is still the unsharded model's, token for token."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from speculation_harness import make_engine, make_speculator, record_steps

from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.model.loader import LoadedModel, load_model
from engine_harness import run_requests

TEXTS = ["Hello world hello world hello world hello", "a",
         "The quick brown fox jumps over the lazy dog and the quick brown fox",
         "Kubernetes runs containers in pods; an operator watches custom resources. Kubernetes runs"]
OUTPUT_LENGTHS = [24, 2, 17, 31, 9]


@pytest.fixture(scope="module")
def tp2() -> LoadedModel:
    loaded = load_model("builtin:tiny-llama", device="cpu")
    loaded.model.place([[torch.device("cpu")] * 2])
    return loaded


def _requests(model: LoadedModel) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(7)
    prompts = [model.tokenizer.encode(t).ids for t in TEXTS]
    prompts.append([rng.randrange(3, 512) for _ in range(40)])
    return [(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for p, n in zip(prompts, OUTPUT_LENGTHS, strict=True)]


@pytest.mark.parametrize(("mode", "proposer"), [("fixed", "ngram"), ("adaptive", "ngram"), ("fixed", "draft")])
async def test_speculation_on_a_sharded_target_equals_the_unsharded_reference(
        tp2: LoadedModel, tiny_draft: LoadedModel, mode: str, proposer: str,
        reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    spec = make_speculator(tp2, tiny_draft, mode, proposer)
    steps = record_steps(spec)
    engine = make_engine(tp2, spec)
    try:
        got = await run_requests(engine, _requests(tp2), stagger_s=0.01 if mode == "adaptive" else 0.0)
    finally:
        engine.stop()
    assert got == [reference_greedy(p, s.max_tokens) for p, s in _requests(tp2)]
    if proposer == "ngram":  # the draft model is random, so only n-gram proposals are sure to land
        accepted = sum(sum(step.accepted) for step in steps)
        assert accepted > 0, "proposals were accepted, so multi-token verification ran sharded"
    assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
