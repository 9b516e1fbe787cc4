"""The router's vLLM adapter against stand-in vLLM servers that speak vLLM's wire format.

The stand-ins answer `/v1/completions` as vLLM 0.32 does (JSON for the prefill request, server-sent
events with `token_ids` for streams, `kv_transfer_params` in and out) and `/metrics` with vLLM's
gauges, and record every request, so the tests check what the router sends: the prefill request of
vLLM's disaggregated flow, the decode request carrying the prefill's `kv_transfer_params`, resume
after a decode server dies, and load read from the gauges. e2e/test_vllm.py runs the same router
against real vLLM servers.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web

from disaggserve_worker.router.cli import build_router
from disaggserve_worker.router.config import RouterConfig
from disaggserve_worker.router.model_info import load_model_info
from disaggserve_worker.router.vllm_flow import parse_load

MODEL, SERVED = "builtin:tiny-llama", "tiny"


def next_token(context: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole context, as greedy decoding does."""
    return (sum(context) * 31 + len(context)) % 400 + 20


@dataclass
class FakeVllm:
    role: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    die_after: int | None = None  # streamed tokens before the connection drops
    running: int = 0
    url: str = ""
    runner: web.AppRunner | None = None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        assert body["model"] == SERVED and body["return_token_ids"] is True
        context = list(body["prompt"])
        params = body.get("kv_transfer_params") or {}
        if params.get("do_remote_decode"):
            first = next_token(context)
            return web.json_response({
                "choices": [{"index": 0, "text": "", "token_ids": [first], "finish_reason": "length"}],
                "kv_transfer_params": {"do_remote_prefill": True, "remote_engine_id": f"engine-{id(self)}",
                                       "remote_block_ids": [[1, 2]], "remote_host": "10.0.0.1", "remote_port": 5600},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.running += 1
        try:
            for i in range(body["max_tokens"]):
                if self.die_after is not None and i == self.die_after:
                    request.transport.close()  # a crash: the stream stops without a finish
                    return response
                token = next_token(context)
                context.append(token)
                finish = "length" if i == body["max_tokens"] - 1 else None
                chunk = {"choices": [{"index": 0, "text": "x", "token_ids": [token], "finish_reason": finish}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(0.005)
            await response.write(b"data: [DONE]\n\n")
        finally:
            self.running -= 1
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{SERVED}"}} {self.running}.0\n'
            f'vllm:num_requests_waiting{{engine="0",model_name="{SERVED}"}} 0.0\n'))

    async def start(self) -> FakeVllm:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self


async def start_router(**endpoints: list[str]):
    config = RouterConfig.model_validate(dict(
        model=MODEL, model_name=SERVED, host="127.0.0.1", port=0, engine="vllm", poll_interval_s=0.1,
        token_timeout_s=5, **endpoints))
    router = build_router(config)
    runner = web.AppRunner(router.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return router, runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


@pytest.fixture
async def fakes():
    started: list[FakeVllm] = []

    async def make(role: str, **kwargs: Any) -> FakeVllm:
        fake = await FakeVllm(role, **kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.runner.cleanup()


def expected_text(prompt: str, n: int) -> str:
    info = load_model_info(MODEL, SERVED)
    context = info.encode(prompt)
    out = []
    for _ in range(n):
        out.append(next_token(context + out))
    return info.decode(out)


async def test_disaggregated_flow_is_vllms_prefill_then_decode_with_kv_transfer_params(fakes):
    prefill, decode = await fakes("prefill"), await fakes("decode")
    _router, runner, base = await start_router(prefill_endpoints=[prefill.url], decode_endpoints=[decode.url])
    try:
        client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        got = await client.completions.create(model=SERVED, prompt="Hello world", max_tokens=12, temperature=0)
        assert got.choices[0].text == expected_text("Hello world", 12)
        assert got.usage.completion_tokens == 12
        (p,), (d,) = prefill.requests, decode.requests
        assert p["max_tokens"] == 1 and p["stream"] is False
        assert p["kv_transfer_params"]["do_remote_decode"] is True
        assert d["kv_transfer_params"]["remote_block_ids"] == [[1, 2]]
        assert d["kv_transfer_params"]["remote_engine_id"] == f"engine-{id(prefill)}"
        assert d["max_tokens"] == 12 and d["stream"] is True and d["prompt"] == p["prompt"]
        stream = await client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True, temperature=0)
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1
    finally:
        await runner.cleanup()


async def test_colocated_sends_to_plain_vllm_without_kv_transfer(fakes):
    plain = await fakes("colocated")
    _router, runner, base = await start_router(colocated_endpoints=[plain.url])
    try:
        client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        got = await client.completions.create(model=SERVED, prompt="abc", max_tokens=5, temperature=0)
        assert got.choices[0].text == expected_text("abc", 5)
        (only,) = plain.requests
        assert "kv_transfer_params" not in only and only["stream"] is True
    finally:
        await runner.cleanup()


async def test_a_decode_server_dying_mid_stream_is_resumed_on_another(fakes):
    prefill = await fakes("prefill")
    # The healthy server reports itself busy, so the first attempt goes to the one that dies.
    dying, healthy = await fakes("decode", die_after=4), await fakes("decode", running=5)
    router, runner, base = await start_router(prefill_endpoints=[prefill.url],
                                              decode_endpoints=[dying.url, healthy.url])
    try:
        for _ in range(50):
            if router.pool.workers[healthy.url].running == 5:
                break
            await asyncio.sleep(0.05)
        client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        got = await client.completions.create(model=SERVED, prompt="resume me", max_tokens=10, temperature=0)
        assert got.choices[0].text == expected_text("resume me", 10)
        (first,), (resumed,) = dying.requests, healthy.requests
        # A new attempt on prompt + the 4 tokens already sent, for the 6 still owed.
        assert len(resumed["prompt"]) == len(first["prompt"]) + 4
        assert resumed["max_tokens"] == 6
        assert len(prefill.requests) == 2
    finally:
        await runner.cleanup()


async def test_load_comes_from_vllm_gauges(fakes):
    prefill, decode = await fakes("prefill"), await fakes("decode")
    decode.running = 3
    router, runner, _base = await start_router(prefill_endpoints=[prefill.url], decode_endpoints=[decode.url])
    try:
        for _ in range(50):
            if router.pool.workers[decode.url].running == 3:
                break
            await asyncio.sleep(0.05)
        worker = router.pool.workers[decode.url]
        assert worker.running == 3 and worker.available and not worker.poll_failing
    finally:
        await runner.cleanup()


def test_parse_load_sums_engines_and_refuses_non_vllm_metrics():
    text = ('vllm:num_requests_running{engine="0"} 2.0\nvllm:num_requests_running{engine="1"} 1.0\n'
            'vllm:num_requests_waiting{engine="0"} 4.0\nvllm:num_requests_running_created 1.7e9\n')
    assert parse_load(text) == {"running": 3, "queued_tokens": 4, "draining": False}
    with pytest.raises(ValueError, match="vllm:num_requests_running"):
        parse_load("disaggserve_requests_total 1\n")


async def test_profile_vllm_measures_a_server_into_the_planners_profile_format(fakes, tmp_path):
    from disaggserve.planner.profile import parse_profile
    from disaggserve_worker.profile.run import Sweep
    from disaggserve_worker.profile.vllm_http import build_profile, measure

    server = await fakes("colocated")
    sweep = Sweep(prefill=[(1, 16), (2, 16), (1, 64), (4, 64), (64, 64)],
                  decode=[(b, c) for b in (1, 2, 4, 8) for c in (16, 32)], repeats=1)
    points = await measure(server.url, SERVED, sweep, vocab=400, max_batched_tokens=2048, decode_tokens=6)
    assert [(p.phase, p.batch, p.length) for p in points if p.phase == "prefill"] == [
        ("prefill", 1, 16), ("prefill", 2, 16), ("prefill", 1, 64), ("prefill", 4, 64)]  # 64x64 over the limit
    decode = [p for p in points if p.phase == "decode"]
    assert len(decode) == 8 and all(p.ms >= 4 for p in decode)  # the stand-in sleeps 5 ms between tokens
    facts = {"layers": 4, "attention_heads": 4, "kv_heads": 2, "hidden_size": 128, "parameters": 10**6,
             "dtype_bytes": 2}
    profile = build_profile(points, model=SERVED, gpu="cpu", dtype="bfloat16", tensor=1, pipeline=1,
                            facts=facts, url=server.url)
    parsed = parse_profile(profile)  # the planner reads it
    assert parsed.entries[0].tensor == 1
