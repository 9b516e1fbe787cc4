"""The autoscaler's PromQL against a real Prometheus server scraping a real router under load,
cross-checked with the operator's own scrape window over the same traffic."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import httpx
import openai
import pytest
import pytest_asyncio

from disaggserve.contract import METRIC_GENERATION_TOKENS
from disaggserve.local.cluster import default_resource
from disaggserve.metrics.promql import PrometheusSource
from disaggserve.metrics.scrape import ScrapeWindow, scrape_kv, scrape_router
from e2e_tools import ready_cluster, require_tool

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]
TTFT_SLO_S, TPOT_SLO_S = 0.5, 0.1  # examples/tiny-cpu.yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory):
    async with ready_cluster(tmp_path_factory.mktemp("cluster"), default_resource()) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def prometheus(cluster, tmp_path_factory):
    binary = require_tool("prometheus")
    router = next(p for k, p in cluster.agent.pods.items() if k[1].startswith("tiny-router-"))
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "- job_name: disaggserve-router\n"
        "  static_configs:\n"
        f"  - targets: ['{router.ip}:8000']\n"
        "    labels: {namespace: default, disaggserve: tiny, component: router}\n"
        + "".join(
            f"  - targets: ['{pod.ip}:8100']\n"
            f"    labels: {{namespace: default, disaggserve: tiny, component: {name.split('-')[1]}, pod: {name}}}\n"
            for (_, name), pod in cluster.agent.pods.items()
            if name.startswith(("tiny-prefill-", "tiny-decode-", "tiny-colocated-"))
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "prometheus.log", "wb"),  # noqa: SIM115
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            # Ready is not enough: targets are first scraped about 5 s later (discovery throttle).
            # Wait for the router's first sample (not just any target's: the workers are scraped too)
            # so the load below starts from a recorded baseline.
            for _ in range(150):
                try:
                    answer = await http.get(f"{url}/api/v1/query", params={"query": "up{component=\"router\"}"})
                    if answer.status_code == 200 and answer.json()["data"]["result"]:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        yield url, router.ip
    finally:
        proc.terminate()
        proc.wait(20)


async def test_promql_and_direct_scrape_agree_on_real_traffic(cluster, prometheus):
    url, router_ip = prometheus
    decode_ip = next(p.ip for k, p in cluster.agent.pods.items() if k[1].startswith("tiny-decode-"))
    window = ScrapeWindow(window_seconds=120, stale_after=60)
    kv_window = ScrapeWindow(window_seconds=120, stale_after=60)
    async with httpx.AsyncClient(timeout=10) as http:
        window.add("router", await scrape_router(http, router_ip))
        kv_window.add("decode", await scrape_kv(http, decode_ip))
        await asyncio.sleep(1.5)  # one more baseline scrape before the load
        client = openai.AsyncOpenAI(base_url=await cluster.endpoint("tiny"), api_key="x", max_retries=0)
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                client.completions.create(model="tiny-llama", prompt="word " * (20 + i), max_tokens=8 + i % 4)
                for i in range(20)
            )
        )
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="tiny-llama", prompt="x", max_tokens=0)
        sent_output = sum(r.usage.completion_tokens for r in results)
        window.add("router", await scrape_router(http, router_ip))
        kv_window.add("decode", await scrape_kv(http, decode_ip))
        # Wait until Prometheus holds a sample with the whole burst (its scrapes lag on a busy
        # machine), plus one more so increase() has a sample after the load on every series.
        source = PrometheusSource(url, http)
        generated_now = f'sum({METRIC_GENERATION_TOKENS}{{disaggserve="tiny",component="router"}})'
        for _ in range(100):
            if await source.scalar(generated_now) == sent_output:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)
        scraped = window.observe(now=time.monotonic(), slo_ttft_s=TTFT_SLO_S, slo_tpot_s=TPOT_SLO_S)
        pulled = kv_window.kv_transfers(now=time.monotonic())
        span = time.monotonic() - started + 5
        promql = await source.observe("default", "tiny", span, TTFT_SLO_S, TPOT_SLO_S)

    assert scraped.requests == 20, "client errors are not served requests"
    assert scraped.mean_output_tokens == pytest.approx(sent_output / 20)
    assert 0 <= scraped.attainment <= 1 and scraped.ttft_p90_ms > 0
    # Prometheus extrapolates increase() to the window's edges: counts are close, ratios exact.
    assert promql.requests == pytest.approx(20, rel=0.35)
    assert promql.mean_output_tokens == pytest.approx(scraped.mean_output_tokens, rel=0.01)
    assert promql.mean_input_tokens == pytest.approx(scraped.mean_input_tokens, rel=0.01)
    assert promql.attainment == pytest.approx(scraped.attainment, abs=0.01)
    assert promql.ttft_within_slo == pytest.approx(scraped.ttft_within_slo, abs=0.01)
    assert promql.ttft_p90_ms == pytest.approx(scraped.ttft_p90_ms, rel=0.05)
    # The decode worker's KV pulls (the autoscaler's live link): one per request, both ways alike.
    assert pulled is not None and pulled.transfers == 20 and pulled.bytes > 0 and pulled.seconds > 0
    # A count only approximately (increase() extrapolates a short burst to the window's edges: with
    # the faster engine the 20 pulls took well under a second and came out as 29.3 once); the
    # per-transfer ratios below are exact.
    assert promql.kv is not None and promql.kv.transfers == pytest.approx(20, rel=0.6)
    assert promql.kv.bytes / promql.kv.transfers == pytest.approx(pulled.bytes / pulled.transfers, rel=0.01)
    assert promql.kv.seconds / promql.kv.transfers == pytest.approx(pulled.seconds / pulled.transfers, rel=0.01)


async def test_missing_targets_are_unavailable_not_zero(cluster, prometheus):
    from disaggserve.metrics import MetricsUnavailable

    url, _ = prometheus
    async with httpx.AsyncClient(timeout=10) as http:
        with pytest.raises(MetricsUnavailable, match="no live router"):
            await PrometheusSource(url, http).observe("default", "other", 60)
        with pytest.raises(MetricsUnavailable, match="did not answer"):
            await PrometheusSource(f"http://127.0.0.1:{free_port()}", http).observe("default", "tiny", 60)


async def test_workers_vllm_series_add_up_to_what_the_router_served(cluster, prometheus):
    """The engine series (vLLM names, scraped from every worker) agree with the router's count."""
    url, _ = prometheus
    client = openai.AsyncOpenAI(base_url=await cluster.endpoint("tiny"), api_key="x", max_retries=0)
    workers = 'namespace="default", disaggserve="tiny", component=~"prefill|decode|colocated"'
    routed_q = 'sum(disaggserve_generation_tokens_total{component="router"})'
    generated_q = f"sum(vllm:generation_tokens_total{{{workers}}})"
    async with httpx.AsyncClient(timeout=10) as http:
        source = PrometheusSource(url, http)
        before = await source.scalar(routed_q) or 0.0
        results = await asyncio.gather(*(client.completions.create(model="tiny-llama", prompt=f"{i} words",
                                                                   max_tokens=5) for i in range(4)))
        sent = sum(r.usage.completion_tokens for r in results)
        # Poll for the scrapes that hold this burst, router and workers each (a fixed wait for "two
        # more scrapes" reads too early when scrapes lag on a busy machine).
        routed = generated = None
        for _ in range(150):
            routed = await source.scalar(routed_q)
            generated = await source.scalar(generated_q)
            if routed is not None and routed >= before + sent and generated is not None and generated >= routed:
                break
            await asyncio.sleep(0.2)
        answer = await http.get(f"{url}/api/v1/query",
                                params={"query": f"vllm:num_requests_waiting{{{workers}}}"})
        waiting = answer.json()["data"]["result"]
        usage = await source.scalar(f"max(vllm:kv_cache_usage_perc{{{workers}}})")
    assert routed and generated == routed, "every token a client got was made by exactly one worker"
    assert waiting and all(r["metric"]["model_name"] == "tiny-llama" for r in waiting)
    assert usage is not None and 0.0 <= usage <= 1.0
