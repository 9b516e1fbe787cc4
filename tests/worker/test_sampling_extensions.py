"""vLLM's sampling extensions on the built-in engine: each changes what is sampled as vLLM's does."""

from __future__ import annotations

import asyncio

import pytest
import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SampleContext, SamplingParams, sample_rows, shape_logits
from disaggserve_worker.engine.types import RequestError, RequestStream, TokenEvent
from disaggserve_worker.model.loader import LoadedModel

ROW = torch.tensor([2.0, 1.0, -1.0, 0.5, 3.0])


def _ctx(prompt: list[int] = (), out: list[int] = (), eos: set[int] = frozenset()) -> SampleContext:
    return SampleContext(list(prompt), list(out), frozenset(eos))


def test_logit_bias_and_allowed_ids_decide_greedy_choice() -> None:
    greedy = dict(temperature=0.0)
    assert torch.argmax(shape_logits(ROW, SamplingParams(**greedy, logit_bias={2: 100.0}), _ctx())) == 2
    allowed = shape_logits(ROW, SamplingParams(**greedy, allowed_token_ids=[1, 3]), _ctx())
    assert torch.isinf(allowed[[0, 2, 4]]).all() and torch.argmax(allowed) == 1


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0])
    early = shape_logits(ROW, params, _ctx(out=[1], eos={4}))
    assert torch.isinf(early[[0, 4]]).all() and torch.argmax(early) == 1
    late = shape_logits(ROW, params, _ctx(out=[1, 1], eos={4}))
    assert torch.equal(late, ROW)
    kept = shape_logits(ROW, SamplingParams(min_tokens=5, ignore_eos=True), _ctx(eos={4}))
    assert kept[4] == ROW[4], "with ignore_eos the EOS id is not a stop to hold back"


def test_penalties_follow_vllm_formulas() -> None:
    rep = shape_logits(ROW, SamplingParams(repetition_penalty=2.0), _ctx(prompt=[0], out=[2]))
    assert rep[0] == 1.0 and rep[2] == -2.0 and rep[4] == 3.0, "positive / 2, negative * 2, unseen alone"
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    pen = shape_logits(ROW, params, _ctx(prompt=[1], out=[4, 4, 3]))
    assert pen[4] == pytest.approx(3.0 - 0.5 - 2 * 0.25)
    assert pen[3] == pytest.approx(0.5 - 0.5 - 0.25)
    assert pen[1] == 1.0, "presence/frequency count the output only, not the prompt"


def test_logprobs_are_the_raw_model_distribution() -> None:
    logits = ROW.unsqueeze(0)
    out: list = []
    params = SamplingParams(temperature=0.0, logprobs=2, logit_bias={2: 100.0})
    [token] = sample_rows(logits, [params], [params.generator()], [_ctx()], out)
    assert token == 2
    expected = torch.log_softmax(ROW, -1)
    assert out[0]["logprob"] == pytest.approx(float(expected[2]))
    assert [i for i, _ in out[0]["top"]] == [4, 0]
    assert out[0]["top"][0][1] == pytest.approx(float(expected[4]))


async def _run(tiny: LoadedModel, params: SamplingParams, eos: list[int], speculator=None) -> list[TokenEvent]:
    engine = Engine(tiny.model, tiny.tokenizer, eos, EngineConfig(role="colocated", kv_cache_tokens=512))
    engine.start()
    try:
        stream = RequestStream("x", asyncio.get_running_loop())
        engine.submit("x", tiny.tokenizer.encode("the quick brown fox").ids, params, stream)
        return [e async for e in stream]
    finally:
        engine.stop()


async def test_engine_applies_min_tokens_and_returns_logprobs(tiny: LoadedModel) -> None:
    first = (await _run(tiny, SamplingParams(temperature=0, max_tokens=1), []))[0].token_id
    # Make the greedy first token an EOS: it ends at once, unless min_tokens holds it back.
    ended = await _run(tiny, SamplingParams(temperature=0, max_tokens=6), [first])
    assert [e.finish_reason for e in ended] == ["stop"]
    held = await _run(tiny, SamplingParams(temperature=0, max_tokens=6, min_tokens=4, logprobs=3), [first])
    assert len(held) >= 4 and held[0].token_id != first
    assert all(e.logprobs is not None and len(e.logprobs["top"]) == 3 for e in held)
    assert held[0].logprobs["top"][0][0] == first, "logprobs show the raw model's favourite, masked or not"


def test_speculating_worker_refuses_what_it_cannot_apply(tiny: LoadedModel) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="colocated", kv_cache_tokens=512))
    engine.speculator = object()  # only its presence matters to the check
    with pytest.raises(RequestError, match="speculatively"):
        engine.check_request([1, 2], SamplingParams(logprobs=1))
    engine.check_request([1, 2], SamplingParams(temperature=0.5, top_k=5))
