"""Sampling knobs: seeds reproduce, top-k/top-p restrict the support, stops and limits end."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pydantic import ValidationError

from disaggserve_worker.engine.detokenizer import IncrementalDetokenizer
from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams, filter_logits, sample
from disaggserve_worker.engine.types import RequestStream, TokenEvent
from disaggserve_worker.model.loader import LoadedModel


async def _generate(tiny: LoadedModel, prompt: str, params: SamplingParams, eos: list[int] | None = None
                    ) -> list[TokenEvent]:
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids if eos is None else eos,
                    EngineConfig(role="colocated", kv_cache_tokens=512))
    engine.start()
    try:
        stream = RequestStream("s", asyncio.get_running_loop())
        engine.submit("s", tiny.tokenizer.encode(prompt).ids, params, stream)
        return [event async for event in stream]
    finally:
        engine.stop()


async def test_seed_reproduces_and_differs(tiny: LoadedModel) -> None:
    params = SamplingParams(temperature=1.5, max_tokens=12, seed=7, ignore_eos=True)
    a = [e.token_id for e in await _generate(tiny, "Hello", params)]
    b = [e.token_id for e in await _generate(tiny, "Hello", params)]
    c = [e.token_id for e in await _generate(tiny, "Hello", params.model_copy(update={"seed": 8}))]
    assert a == b
    assert a != c


def test_top_k_and_top_p_restrict_support() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    top_k = SamplingParams(temperature=5.0, top_k=2)
    assert {sample(logits, top_k, generator) for _ in range(300)} == {0, 1}
    probs = torch.softmax(logits, -1)  # top_p just above the first two tokens' mass keeps three
    top_p = SamplingParams(temperature=1.0, top_p=float(probs[:2].sum()) + 0.01)
    assert {sample(logits, top_p, generator) for _ in range(500)} == {0, 1, 2}
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.01)))
    assert kept.tolist() == [True, False, False, False, False, False], "top_p keeps at least the best"
    assert sample(logits, SamplingParams(temperature=0), generator) == 0


async def test_max_tokens_and_length_finish(tiny: LoadedModel) -> None:
    events = await _generate(tiny, "Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(events) == 5
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]


async def test_stop_sequence_cuts_text(tiny: LoadedModel) -> None:
    free = await _generate(tiny, "Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    text = "".join(e.text for e in free)
    stop = text[5:8]
    assert len(stop) == 3 and stop not in text[:5] + stop[:2]
    events = await _generate(tiny, "Hello", SamplingParams(temperature=0, max_tokens=12, stop=[stop],
                                                            ignore_eos=True))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == text[: text.index(stop)]


async def test_stop_token_and_eos(tiny: LoadedModel) -> None:
    free = await _generate(tiny, "Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    third = free[2].token_id
    assert third is not None
    by_id = await _generate(tiny, "Hello",
                            SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[third]))
    assert [e.token_id for e in by_id] == [e.token_id for e in free[:3]]
    assert by_id[-1].finish_reason == "stop"
    by_eos = await _generate(tiny, "Hello", SamplingParams(temperature=0, max_tokens=6), eos=[third])
    assert len(by_eos) == 3 and by_eos[-1].finish_reason == "stop"


def test_detokenizer_holds_back_possible_stop_prefix(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    ids = tokenizer.encode("one two three").ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=["thr"])
    out, stopped = "", False
    for token in ids:
        delta, stopped = detok.add(token)
        out += delta
        if stopped:
            break
    assert stopped and out == "one two "


def test_bad_sampling_is_refused() -> None:
    with pytest.raises(ValidationError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValidationError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValidationError, match="frequency_penalty"):
        SamplingParams.model_validate({"frequency_penalty": 3})
    with pytest.raises(ValidationError, match="best_of"):
        SamplingParams.model_validate({"best_of": 2})  # the internal protocol refuses unknown keys
    assert SamplingParams.model_validate({"stop": "x"}).stop == ["x"]


def test_incremental_text_equals_full_decode_across_the_prefill_decode_split(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    prompt = tokenizer.encode("Prompt: ").ids
    text = "héllo wörld ✓ 日本語 and 🎉 emoji"
    ids = tokenizer.encode(text).ids
    whole = IncrementalDetokenizer(tokenizer, prompt, stop=[])
    streamed = "".join(whole.add(t)[0] for t in ids) + whole.flush()
    assert streamed == text
    for split in range(1, len(ids)):
        prefill = IncrementalDetokenizer(tokenizer, prompt, stop=[])
        for token in ids[:split]:
            prefill.add(token)
        head = prefill.settled()  # what the prefill worker sends with the first token
        decode = IncrementalDetokenizer(tokenizer, prompt, stop=[], initial_ids=ids[:split])
        tail = "".join(decode.add(t)[0] for t in ids[split:]) + decode.flush()
        assert head + tail == text, split
