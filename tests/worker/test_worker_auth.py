"""Workers trust only holders of their DisaggServe's token, on real loopback sockets.

What an attacker on the pod network tried (issue 11): drain the only decode worker, fill the
prefill worker's KV cache with uncollected prefills, and use `/internal/decode` as a port
scanner. Each must be refused without the token, or with another DisaggServe's token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from disaggserve_worker.auth import HEADER_WORKER_TOKEN, sign
from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.server.app import ServerConfig, WorkerServer
from disaggserve_worker.server.worker_metrics import WorkerMetrics

TOKEN = "a" * 64
OTHER = "b" * 64  # the token of another DisaggServe
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
INTERNAL = [("GET", "/internal/load"), ("POST", "/internal/drain"), ("POST", "/internal/prefill"),
            ("POST", "/internal/decode"), ("POST", "/internal/generate"), ("POST", "/internal/release")]


def _server(tiny: LoadedModel, role: str, host: str, token: str | None, kv_ttl_s: float = 60.0) -> WorkerServer:
    holder: dict[str, Callable[..., None]] = {}
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role=role, kv_cache_tokens=512, max_model_len=256, kv_ttl_seconds=kv_ttl_s),
                    observer=lambda *a: holder["f"](*a))
    metrics = WorkerMetrics(role, engine.load, 0.25, 0.05)
    holder["f"] = metrics.observe_iteration
    return WorkerServer(engine, ServerConfig(role=role, host=host, port=0, kv_port=0, model_name="tiny",
                                             admission_timeout_s=2.0, token=token), metrics)


@pytest.fixture
async def pair(tiny: LoadedModel) -> AsyncIterator[dict[str, Any]]:
    servers = {"prefill": _server(tiny, "prefill", "127.0.0.51", TOKEN, kv_ttl_s=1.0),
               "decode": _server(tiny, "decode", "127.0.0.52", TOKEN)}
    try:
        for server in servers.values():
            await server.start()
        async with aiohttp.ClientSession() as session:
            yield {"servers": servers, "session": session,
                   "urls": {r: f"http://{s.config.host}:{s.port}" for r, s in servers.items()}}
    finally:
        for server in servers.values():
            await server.stop()


def _body(tiny: LoadedModel, request_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "prompt_token_ids": tiny.tokenizer.encode("who may call me").ids,
            "sampling": GREEDY}


async def test_internal_endpoints_refuse_callers_without_this_deployments_token(
        pair: dict[str, Any], tiny: LoadedModel) -> None:
    session, urls = pair["session"], pair["urls"]
    for headers in ({}, {HEADER_WORKER_TOKEN: OTHER}, {HEADER_WORKER_TOKEN: ""}):
        for url in urls.values():
            for method, path in INTERNAL:
                async with session.request(method, url + path, json=_body(tiny, "x"), headers=headers) as resp:
                    assert resp.status == 401, (url, path, headers)
                    error = (await resp.json())["error"]
                    assert error["code"] == "invalid_worker_token" and HEADER_WORKER_TOKEN in error["message"]
                    assert {"message", "type", "param", "code"} <= set(error)
    # Probes and the metrics scraper need no token; nothing above drained or held anything.
    for url in urls.values():
        for path in ("/healthz", "/readyz", "/metrics"):
            async with session.get(url + path) as resp:
                assert resp.status == 200, path
    assert not any(s.draining for s in pair["servers"].values())
    assert pair["servers"]["prefill"].engine.held_count == 0


async def test_decode_pulls_only_from_kv_addresses_a_peer_signed(pair: dict[str, Any], tiny: LoadedModel) -> None:
    session, urls = pair["session"], pair["urls"]
    auth = {HEADER_WORKER_TOKEN: TOKEN}
    connections: list[int] = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    bait = await asyncio.start_server(note, "127.0.0.53", 0)
    bait_address = f"127.0.0.53:{bait.sockets[0].getsockname()[1]}"
    try:
        body = _body(tiny, "signed")
        async with session.post(urls["prefill"] + "/internal/prefill", json=body, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
            first = await resp.json()
        kv = first["kv"]
        assert kv["signature"] == sign(TOKEN, kv["address"], kv["handle"])
        decode = {**body, "first_token_id": first["first_token_id"]}
        forged = [{**kv, "address": bait_address},  # the port-scanner call
                  {**kv, "address": bait_address, "signature": sign(OTHER, bait_address, kv["handle"])},
                  {k: v for k, v in kv.items() if k != "signature"} | {"address": bait_address}]
        for ref in forged:
            async with session.post(urls["decode"] + "/internal/decode", json={**decode, "kv": ref},
                                    headers=auth) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["type"] == "kv_untrusted"
        await asyncio.sleep(0.1)
        assert connections == [], "the decode worker connected to an address no peer vouched for"
        async with session.post(urls["decode"] + "/internal/decode", json={**decode, "kv": kv},
                                headers=auth) as resp:
            assert resp.status == 200
            events = [line async for line in resp.content if line.strip()]
        assert b"finish_reason\": \"length\"" in events[-1]
    finally:
        bait.close()
        await bait.wait_closed()


async def test_uncollected_prefill_caches_are_freed_after_their_ttl(pair: dict[str, Any], tiny: LoadedModel) -> None:
    session, urls = pair["session"], pair["urls"]
    auth = {HEADER_WORKER_TOKEN: TOKEN}
    prefill = pair["servers"]["prefill"]
    free_before = prefill.engine.allocator.free_tokens
    for i in range(5):
        async with session.post(urls["prefill"] + "/internal/prefill", json=_body(tiny, f"u{i}"),
                                headers=auth) as resp:
            assert resp.status == 200
    assert prefill.engine.held_count == 5 and prefill.engine.allocator.free_tokens < free_before
    deadline = time.monotonic() + 30
    while prefill.engine.held_count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert prefill.engine.held_count == 0
    assert prefill.engine.allocator.free_tokens == free_before
