"""The same observation from Prometheus (PromQL over HTTP), for clusters that run one.

Series carry the labels the chart's PodMonitor sets: `namespace`, `disaggserve` (the
resource's name) and `component` ("router"; "decode" for the KV pulls).
"""

from __future__ import annotations

import math
import time

import httpx
from prometheus_client.utils import floatToGoString

from disaggserve.contract import (
    METRIC_GENERATION_TOKENS,
    METRIC_KV_TRANSFER_BYTES,
    METRIC_KV_TRANSFER_SECONDS,
    METRIC_PROMPT_TOKENS,
    METRIC_REQUESTS,
    METRIC_SLO_MET,
    METRIC_TPOT,
    METRIC_TTFT,
)
from disaggserve.metrics.observed import KvTransfers, MetricsUnavailable, Observed
from disaggserve.metrics.series import NOT_SERVED


class PrometheusSource:
    def __init__(self, url: str, http: httpx.AsyncClient):
        self.url = url.rstrip("/")
        self.http = http

    async def scalar(self, expr: str, at: float | None = None) -> float | None:
        """Value of an instant query that yields one series (sum/max/...), None when empty or NaN.

        `at` pins the evaluation time (Unix seconds); without it Prometheus evaluates at its own now.
        """
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        try:
            response = await self.http.get(f"{self.url}/api/v1/query", params=params)
        except httpx.HTTPError as e:
            raise MetricsUnavailable(f"Prometheus at {self.url} did not answer: {type(e).__name__}") from None
        if response.status_code != 200:
            raise MetricsUnavailable(f"Prometheus answered {response.status_code}: {response.text[:200]}")
        result = response.json().get("data", {}).get("result", [])
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value

    async def observe(
        self,
        namespace: str,
        name: str,
        window_seconds: float,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
    ) -> Observed:
        sel = f'namespace="{namespace}",disaggserve="{name}",component="router"'
        w = f"{max(int(window_seconds), 1)}s"
        not_served = "|".join(sorted(NOT_SERVED))
        # One evaluation time for every query: separate "now"s see different scrapes and
        # extrapolate increase() differently, so ratios of two queries (tokens per request,
        # attainment) drift by up to a scrape interval's share of the window.
        at = time.time()
        up = await self.scalar(f"max(up{{{sel}}})", at)
        if not up:
            raise MetricsUnavailable(f"Prometheus has no live router target for {namespace}/{name}")
        served = await self.scalar(f'sum(increase({METRIC_REQUESTS}{{{sel},status!~"{not_served}"}}[{w}]))', at) or 0.0
        ok = await self.scalar(f'sum(increase({METRIC_REQUESTS}{{{sel},status="ok"}}[{w}]))', at) or 0.0
        prompt = await self.scalar(f"sum(increase({METRIC_PROMPT_TOKENS}{{{sel}}}[{w}]))", at) or 0.0
        generated = await self.scalar(f"sum(increase({METRIC_GENERATION_TOKENS}{{{sel}}}[{w}]))", at) or 0.0
        met = await self.scalar(f"sum(increase({METRIC_SLO_MET}{{{sel}}}[{w}]))", at) or 0.0
        async def quantile(q: float, metric: str) -> float | None:
            value = await self.scalar(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{sel}}}[{w}])))", at)
            return value * 1000 if value is not None else None

        ttft, tpot = await quantile(0.9, METRIC_TTFT), await quantile(0.9, METRIC_TPOT)

        async def share(metric: str, threshold: float | None) -> float | None:
            if not threshold:
                return None
            return await self.scalar(
                f'sum(rate({metric}_bucket{{{sel},le="{floatToGoString(threshold)}"}}[{w}])) / '
                f'sum(rate({metric}_bucket{{{sel},le="+Inf"}}[{w}]))',
                at,
            )

        decode = f'namespace="{namespace}",disaggserve="{name}",component="decode"'
        kv = None
        if transfers := await self.scalar(f"sum(increase({METRIC_KV_TRANSFER_SECONDS}_count{{{decode}}}[{w}]))", at):
            kv = KvTransfers(
                transfers=transfers,
                bytes=await self.scalar(f"sum(increase({METRIC_KV_TRANSFER_BYTES}_sum{{{decode}}}[{w}]))", at) or 0.0,
                seconds=await self.scalar(f"sum(increase({METRIC_KV_TRANSFER_SECONDS}_sum{{{decode}}}[{w}]))", at)
                or 0.0,
            )
        return Observed(
            source="prometheus",
            window_seconds=window_seconds,
            requests=served,
            request_rate=served / window_seconds,
            mean_input_tokens=prompt / ok if ok else None,
            mean_output_tokens=generated / ok if ok else None,
            ttft_p90_ms=ttft,
            tpot_p90_ms=tpot,
            ttft_p50_ms=await quantile(0.5, METRIC_TTFT),
            tpot_p50_ms=await quantile(0.5, METRIC_TPOT),
            attainment=met / served if served else None,
            ttft_within_slo=await share(METRIC_TTFT, slo_ttft_s),
            tpot_within_slo=await share(METRIC_TPOT, slo_tpot_s),
            kv=kv,
        )
