"""The official `openai` client against a router with one real prefill and one real decode worker."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from router_harness import SERVED, RunningRouter

pytestmark = pytest.mark.slow


def client(router: RunningRouter) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.base_url, api_key="unused", max_retries=0, timeout=30)


async def test_completion_stream_and_not_agree(disagg_router: RunningRouter) -> None:
    api = client(disagg_router)
    full = await api.completions.create(model=SERVED, prompt="The quick brown fox", max_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert full.object == "text_completion" and full.model == SERVED
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    assert full.choices[0].text

    chunks = [c async for c in await api.completions.create(
        model=SERVED, prompt="The quick brown fox", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text  # greedy: the same tokens through prefill → KV pull → decode
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


async def test_chat_stream_and_not(disagg_router: RunningRouter) -> None:
    api = client(disagg_router)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    full = await api.chat.completions.create(model=SERVED, messages=messages, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    assert full.usage is not None and full.usage.completion_tokens == 8

    stream = await api.chat.completions.create(model=SERVED, messages=messages, max_tokens=8, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


async def test_stop_sequence_cuts_text_and_reports_stop(disagg_router: RunningRouter) -> None:
    api = client(disagg_router)
    free = await api.completions.create(model=SERVED, prompt="Hello", max_tokens=20, temperature=0,
                                        extra_body={"ignore_eos": True})
    text = free.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"test needs a visible stop string from {text!r}"
    cut = await api.completions.create(model=SERVED, prompt="Hello", max_tokens=20, temperature=0,
                                       stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    streamed = [c async for c in await api.completions.create(
        model=SERVED, prompt="Hello", max_tokens=20, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True})]
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


async def test_models_health_and_metrics(disagg_router: RunningRouter) -> None:
    api = client(disagg_router)
    models = await api.models.list()
    assert [m.id for m in models.data] == [SERVED]
    await api.completions.create(model=SERVED, prompt="Hi", max_tokens=4, temperature=0,
                                 extra_body={"ignore_eos": True})
    async with aiohttp.ClientSession() as http:
        async with http.get(disagg_router.url + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["mode"] == "disaggregated"
        async with http.get(disagg_router.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'disaggserve_requests_total{status="ok"}' in metrics
    assert 'disaggserve_ttft_seconds_bucket{le="2.0"}' in metrics  # the TTFT SLO is a bucket edge
    assert 'disaggserve_tpot_seconds_bucket{le="0.5"}' in metrics
    assert "disaggserve_generation_tokens_total 4.0" in metrics
    assert "disaggserve_slo_met_total 1.0" in metrics
