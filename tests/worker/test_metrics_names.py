"""Workers export vLLM's metric names, types and labels, so tools built for vLLM read them.

The Gateway API Inference Extension's model-server protocol
(gateway-api-inference-extension docs/proposals/003-model-server-protocol, v1.6.0) requires, from
every model server its endpoint picker scrapes: TotalQueuedRequests and TotalRunningRequests
(gauges, `vllm:num_requests_waiting` / `vllm:num_requests_running`), KVCacheUtilization (gauge,
`vllm:kv_cache_usage_perc`), and optionally BlockSize / NumGPUBlocks as labels of
`vllm:cache_config_info`. The rest of the list is what vLLM's own Grafana dashboard and
benchmark collectors read (vllm/v1/metrics/loggers.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.server.app import ServerConfig, WorkerServer
from disaggserve_worker.server.worker_metrics import VLLM_METRICS, WorkerMetrics

MODEL = "tiny-served-name"

# The model-server protocol: metric -> (type, labels it must carry beyond model_name).
GIE_REQUIRED = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
}
GIE_OPTIONAL_INFO = ("vllm:cache_config_info", {"block_size", "num_gpu_blocks"})

# As vLLM exports them (family name without the _total suffix the exposition format adds).
VLLM_REFERENCE = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


def _server(tiny: LoadedModel, role: str, host: str, kv_tokens: int = 1024, admission_s: float = 5.0,
            ) -> WorkerServer:
    holder: list[WorkerMetrics] = []
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role=role, kv_cache_tokens=kv_tokens, max_model_len=512, block_size=16),
                    observer=lambda *a: holder[0].observe_iteration(*a))
    metrics = WorkerMetrics(role, engine.load, None, None, model_name=MODEL, max_model_len=512)
    holder.append(metrics)
    return WorkerServer(engine, ServerConfig(role=role, host=host, port=0, kv_port=0, model_name=MODEL,
                                             admission_timeout_s=admission_s), metrics)


@pytest.fixture
async def workers(tiny: LoadedModel) -> AsyncIterator[dict[str, Any]]:
    servers = {"prefill": _server(tiny, "prefill", "127.0.0.91"),
               "decode": _server(tiny, "decode", "127.0.0.92"),
               "colocated": _server(tiny, "colocated", "127.0.0.93")}
    started: list[WorkerServer] = []
    try:
        for server in servers.values():
            await server.start()
            started.append(server)
        async with aiohttp.ClientSession() as session:
            urls = {role: f"http://{s.config.host}:{s.port}" for role, s in servers.items()}
            yield {"servers": servers, "urls": urls, "session": session}
    finally:
        for server in started:
            await server.stop()


async def _families(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/metrics") as resp:
        assert resp.status == 200
        return {f.name: f for f in text_string_to_metric_families(await resp.text())}


def _value(families: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    name = sample or family
    values = [s.value for s in families[family].samples
              if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(values) == 1, f"{name}{labels}: {values}"
    return values[0]


async def _generate(session: aiohttp.ClientSession, url: str, prompt: list[int], n: int) -> list[dict[str, Any]]:
    body = {"request_id": "g", "prompt_token_ids": prompt,
            "sampling": {"temperature": 0, "max_tokens": n, "ignore_eos": True}}
    async with session.post(url + "/internal/generate", json=body) as resp:
        assert resp.status == 200
        return [json.loads(line) async for line in resp.content if line.strip()]


async def test_every_gie_protocol_metric_is_exported_with_type_and_labels(workers: dict[str, Any]) -> None:
    session = workers["session"]
    for role, url in workers["urls"].items():
        families = await _families(session, url)
        for name, kind in GIE_REQUIRED.items():
            assert name in families, f"{role} worker lacks {name}"
            assert families[name].type == kind, f"{name} is a {families[name].type}, the protocol needs {kind}"
            [sample] = families[name].samples
            assert sample.labels == {"model_name": MODEL, "engine": "0"}, sample.labels
        info, needed = GIE_OPTIONAL_INFO
        [sample] = families[info].samples
        assert needed <= set(sample.labels) and sample.value == 1.0
        assert int(sample.labels["block_size"]) == 16
        assert int(sample.labels["num_gpu_blocks"]) == 1024 // 16


async def test_names_types_and_labels_match_vllm(workers: dict[str, Any]) -> None:
    families = await _families(workers["session"], workers["urls"]["colocated"])
    assert set(VLLM_REFERENCE) <= set(VLLM_METRICS)
    for name, kind in VLLM_METRICS.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert sample.labels.get("engine") == "0", (name, sample.labels)
            if name != "vllm:cache_config_info":
                assert sample.labels.get("model_name") == MODEL, (name, sample.labels)
    for name, kind in VLLM_REFERENCE.items():
        assert VLLM_METRICS[name] == kind
    # Ours stay ours: nothing of the worker's own is exported under a vllm: name vLLM lacks.
    ours = [n for n in families if n.startswith("vllm:") and n not in VLLM_METRICS]
    assert ours == []


async def test_colocated_worker_counts_and_times_what_it_served(workers: dict[str, Any], tiny: LoadedModel) -> None:
    session, url = workers["session"], workers["urls"]["colocated"]
    prompt = tiny.tokenizer.encode("metrics name the same things").ids
    events = await _generate(session, url, prompt, 6)
    assert len(events) == 6
    f = await _families(session, url)
    labels = {"model_name": MODEL, "engine": "0"}
    assert _value(f, "vllm:prompt_tokens", "vllm:prompt_tokens_total", **labels) == len(prompt)
    assert _value(f, "vllm:generation_tokens", "vllm:generation_tokens_total", **labels) == 6
    assert _value(f, "vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    assert _value(f, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
    assert _value(f, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == 5
    assert _value(f, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 1
    assert _value(f, "vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == 6
    # The engine thread drops the finished sequence just after its last event went out.
    for _ in range(200):
        f = await _families(session, url)
        if _value(f, "vllm:num_requests_running") == 0:
            break
        await asyncio.sleep(0.01)
    assert _value(f, "vllm:num_requests_running") == 0
    assert _value(f, "vllm:kv_cache_usage_perc") == 0.0, "a finished request frees its cache"


async def test_disaggregated_pair_splits_the_counts_without_double_counting(
        workers: dict[str, Any], tiny: LoadedModel) -> None:
    session, urls = workers["session"], workers["urls"]
    prompt = tiny.tokenizer.encode("prefill here, decode there").ids
    body = {"request_id": "pd", "prompt_token_ids": prompt,
            "sampling": {"temperature": 0, "max_tokens": 5, "ignore_eos": True}}
    async with session.post(urls["prefill"] + "/internal/prefill", json=body) as resp:
        first = await resp.json()
    # While the cache waits for its pull, the prefill worker's KV cache is in use.
    f = await _families(session, urls["prefill"])
    assert _value(f, "vllm:kv_cache_usage_perc") > 0.0
    decode_body = {**body, "first_token_id": first["first_token_id"], "kv": first["kv"]}
    async with session.post(urls["decode"] + "/internal/decode", json=decode_body) as resp:
        rest = [json.loads(line) async for line in resp.content if line.strip()]
    assert len(rest) == 4
    pf, df = await _families(session, urls["prefill"]), await _families(session, urls["decode"])
    gen = "vllm:generation_tokens_total"
    assert _value(pf, "vllm:generation_tokens", gen) + _value(df, "vllm:generation_tokens", gen) == 5
    assert _value(pf, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == len(prompt)
    assert _value(df, "vllm:prompt_tokens", "vllm:prompt_tokens_total") == 0, "decode pulls, never prefills"
    assert _value(pf, "vllm:kv_cache_usage_perc") == 0.0, "the pulled cache is released"
    assert _value(df, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1


def test_gauges_read_the_engine_when_scraped() -> None:
    load = {"running": 3, "queued_requests": 2, "free_kv_tokens": 256, "queued_tokens": 0, "held_caches": 0}
    metrics = WorkerMetrics("decode", lambda: load, None, None, model_name=MODEL)
    metrics.bind(kv_capacity_tokens=1024, block_size=16, extra_waiting=lambda: 4)
    from prometheus_client import generate_latest

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert _value(families, "vllm:num_requests_running") == 3
    assert _value(families, "vllm:num_requests_waiting") == 6, "engine queue + requests waiting for KV room"
    assert _value(families, "vllm:kv_cache_usage_perc") == pytest.approx(0.75)
    load["free_kv_tokens"] = 1024
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert _value(families, "vllm:kv_cache_usage_perc") == 0.0
