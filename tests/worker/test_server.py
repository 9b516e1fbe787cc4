"""The worker HTTP server on real loopback sockets: the internal protocol end to end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.server.app import ServerConfig, WorkerServer
from disaggserve_worker.server.worker_metrics import WorkerMetrics

GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


def _server(tiny: LoadedModel, role: str, host: str, kv_tokens: int = 1024, admission_s: float = 5.0
            ) -> WorkerServer:
    holder: dict[str, Callable[..., None]] = {}
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role=role, kv_cache_tokens=kv_tokens, max_model_len=512),
                    observer=lambda *a: holder["f"](*a))
    metrics = WorkerMetrics(role, engine.load, 0.25, 0.05)
    holder["f"] = metrics.observe_iteration
    return WorkerServer(engine, ServerConfig(role=role, host=host, port=0, kv_port=0, model_name="tiny",
                                             admission_timeout_s=admission_s), metrics)


@pytest.fixture
async def cluster(tiny: LoadedModel) -> AsyncIterator[dict[str, Any]]:
    servers = {"prefill": _server(tiny, "prefill", "127.0.0.41"),
               "decode": _server(tiny, "decode", "127.0.0.42", kv_tokens=64, admission_s=0.3),
               "colocated": _server(tiny, "colocated", "127.0.0.43")}
    for server in servers.values():
        await server.start()
    async with aiohttp.ClientSession() as session:
        urls = {role: f"http://{s.config.host}:{s.port}" for role, s in servers.items()}
        yield {"servers": servers, "urls": urls, "session": session}
    for server in servers.values():
        await server.stop()


async def _ndjson(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    assert response.status == 200, await response.text()
    return [json.loads(line) async for line in response.content if line.strip()]


async def test_disaggregated_http_equals_colocated_and_reference(
        cluster: dict[str, Any], tiny: LoadedModel,
        reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    session, urls = cluster["session"], cluster["urls"]
    prompt = tiny.tokenizer.encode("Disaggregation moves the cache").ids
    body = {"request_id": "a", "prompt_token_ids": prompt, "sampling": GREEDY}
    async with session.post(urls["prefill"] + "/internal/prefill", json=body) as resp:
        assert resp.status == 200
        first = await resp.json()
    assert first["kv"]["bytes"] > 0 and first["finish_reason"] is None
    assert first["prompt_tokens"] == len(prompt)
    decode_body = {**body, "first_token_id": first["first_token_id"], "kv": first["kv"]}
    async with session.post(urls["decode"] + "/internal/decode", json=decode_body) as resp:
        rest = await _ndjson(resp)
    disaggregated = [first["first_token_id"]] + [e["token_id"] for e in rest]
    async with session.post(urls["colocated"] + "/internal/generate", json=body) as resp:
        colocated = await _ndjson(resp)
    assert disaggregated == [e["token_id"] for e in colocated] == reference_greedy(prompt, 8)
    assert first["text"] + "".join(e["text"] for e in rest) == "".join(e["text"] for e in colocated)
    assert rest[-1]["finish_reason"] == colocated[-1]["finish_reason"] == "length"
    async with session.get(urls["decode"] + "/metrics") as resp:
        metrics = await resp.text()
    for name in ("disaggserve_kv_transfer_bytes_count", "disaggserve_decode_iteration_seconds_bucket",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:generation_tokens_total"):
        assert name in metrics
    assert 'le="0.05"' in metrics, "the TPOT SLO is a bucket edge"


async def test_first_token_that_finishes_holds_no_cache(cluster: dict[str, Any], tiny: LoadedModel) -> None:
    body = {"request_id": "one", "prompt_token_ids": [5, 6, 7],
            "sampling": {"temperature": 0, "max_tokens": 1}}
    url = cluster["urls"]["prefill"] + "/internal/prefill"
    async with cluster["session"].post(url, json=body) as resp:
        reply = await resp.json()
    assert reply["finish_reason"] == "length" and reply["kv"] is None
    assert cluster["servers"]["prefill"].engine.held_count == 0


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/internal/prefill", "not json", 400, "not JSON"),
    ("/internal/prefill", {"request_id": "x"}, 400, "prompt_token_ids"),
    ("/internal/prefill", {"request_id": "x", "prompt_token_ids": [1], "sampling": {"top_p": 2}}, 400,
     "sampling.top_p"),
    ("/internal/prefill", {"request_id": "x", "prompt_token_ids": [1], "sampling": {"bogus": 1}}, 400,
     "sampling.bogus"),
    ("/internal/prefill", {"request_id": "x", "prompt_token_ids": [99999]}, 400, "outside the vocabulary"),
    ("/internal/prefill", {"request_id": "x", "prompt_token_ids": [1] * 600}, 400, "model length limit"),
    ("/internal/generate", {"request_id": "x", "prompt_token_ids": [1]}, 409, "prefill worker"),
    ("/internal/decode", {"request_id": "x", "prompt_token_ids": [1]}, 409, "prefill worker"),
])
async def test_bad_input_gets_json_4xx(cluster: dict[str, Any], path: str, body: Any, status: int,
                                       needle: str) -> None:
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    async with cluster["session"].post(cluster["urls"]["prefill"] + path, **kwargs) as resp:
        assert resp.status == status
        error = (await resp.json())["error"]
    assert needle in error["message"] and error["retryable"] is False


async def test_decode_validates_before_streaming(cluster: dict[str, Any]) -> None:
    url = cluster["urls"]["decode"] + "/internal/decode"
    base = {"request_id": "d", "prompt_token_ids": [1, 2], "first_token_id": 3,
            "kv": {"address": "127.0.0.41:1", "handle": "h"}}
    async with cluster["session"].post(url, json={**base, "sampling": {"max_tokens": 1}}) as resp:
        assert resp.status == 400 and "at least 2" in (await resp.json())["error"]["message"]
    async with cluster["session"].post(url, json={**base, "kv": {"address": "nope", "handle": "h"}}) as resp:
        assert resp.status == 400 and "kv.address" in (await resp.json())["error"]["message"]


async def test_decode_reports_unavailable_kv(cluster: dict[str, Any]) -> None:
    prefill = cluster["servers"]["prefill"]
    body = {"request_id": "d", "prompt_token_ids": [1, 2], "first_token_id": 3, "sampling": GREEDY,
            "kv": {"address": prefill.kv_address, "handle": "never-computed"}}
    async with cluster["session"].post(cluster["urls"]["decode"] + "/internal/decode", json=body) as resp:
        events = await _ndjson(resp)
    assert events == [{"error": {"type": "kv_unavailable", "retryable": True,
                                 "message": events[0]["error"]["message"]}}]
    decode = cluster["servers"]["decode"].engine
    assert decode.allocator.free_tokens == decode.allocator.capacity_tokens, "reservation returned"


async def test_decode_admission_waits_then_refuses(cluster: dict[str, Any], tiny: LoadedModel) -> None:
    session, urls = cluster["session"], cluster["urls"]
    decode = cluster["servers"]["decode"].engine
    prompt = tiny.tokenizer.encode("wait for room").ids
    body = {"request_id": "w", "prompt_token_ids": prompt, "sampling": GREEDY}
    blocker = decode.reserve(list(range(40)), SamplingParams(max_tokens=10))  # 50 of 64 slots
    assert blocker is not None

    async def decode_once(rid: str) -> list[dict[str, Any]]:
        async with session.post(urls["prefill"] + "/internal/prefill", json={**body, "request_id": rid}) as r:
            first = await r.json()
        decode_body = {**body, "request_id": rid, "first_token_id": first["first_token_id"],
                       "kv": first["kv"]}
        async with session.post(urls["decode"] + "/internal/decode", json=decode_body) as resp:
            return await _ndjson(resp)

    refused = await decode_once("refused")  # admission timeout is 0.3 s
    assert refused[0]["error"]["type"] == "overloaded" and refused[0]["error"]["retryable"]
    cluster["servers"]["decode"].config.admission_timeout_s = 5.0
    waiting = asyncio.create_task(decode_once("waits"))
    await asyncio.sleep(0.3)
    assert not waiting.done(), "the request waits for room instead of failing"
    decode.cancel_reservation(blocker)
    events = await asyncio.wait_for(waiting, 5)
    assert events[-1]["finish_reason"] == "length" and len(events) == GREEDY["max_tokens"] - 1


async def test_load_drain_and_readiness(cluster: dict[str, Any]) -> None:
    session, url = cluster["session"], cluster["urls"]["prefill"]
    async with session.get(url + "/readyz") as resp:
        assert resp.status == 200
    async with session.get(url + "/healthz") as resp:
        assert resp.status == 200
    async with session.get(url + "/internal/load") as resp:
        load = await resp.json()
    assert load["role"] == "prefill" and load["draining"] is False and load["free_kv_tokens"] == 1024
    assert load["model"] == "tiny"
    assert {"queued_tokens", "running"} <= load.keys()
    async with session.post(url + "/internal/drain") as resp:
        assert resp.status == 200
    async with session.get(url + "/readyz") as resp:
        assert resp.status == 503
    body = {"request_id": "late", "prompt_token_ids": [1, 2]}
    async with session.post(url + "/internal/prefill", json=body) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == {"type": "draining", "retryable": True,
                                                 "message": "worker is draining; send new requests elsewhere"}


async def test_draining_prefill_still_serves_pulls(cluster: dict[str, Any], tiny: LoadedModel) -> None:
    session, urls, servers = cluster["session"], cluster["urls"], cluster["servers"]
    body = {"request_id": "p", "prompt_token_ids": [3, 4, 5, 6], "sampling": GREEDY}
    async with session.post(urls["prefill"] + "/internal/prefill", json=body) as resp:
        first = await resp.json()
    drained = asyncio.create_task(servers["prefill"].drain_and_wait(5))
    await asyncio.sleep(0.1)
    assert not drained.done(), "a held cache keeps the drain waiting"
    decode_body = {**body, "first_token_id": first["first_token_id"], "kv": first["kv"]}
    async with session.post(urls["decode"] + "/internal/decode", json=decode_body) as resp:
        events = await _ndjson(resp)
    assert events[-1]["finish_reason"] == "length"
    assert await asyncio.wait_for(drained, 5) is True
