"""Direct scrape of the routers' /metrics, windowed in the operator (no Prometheus needed).

The router is where a request is seen from arrival to last token (docs/architecture.md §5), so its
counters and histograms are the SLO ground truth. Each scrape of each router pod is kept for
the window; the observation is the increase between the oldest and newest sample of every pod,
summed over pods, with counter resets (a restarted router) handled as Prometheus does. The decode
workers are scraped the same way for their KV pulls (`KvSample`), which give the live KV link.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from disaggserve.contract import (
    METRIC_GENERATION_TOKENS,
    METRIC_KV_TRANSFER_BYTES,
    METRIC_KV_TRANSFER_SECONDS,
    METRIC_PROMPT_TOKENS,
    METRIC_REQUESTS,
    METRIC_SLO_MET,
    METRIC_TPOT,
    METRIC_TTFT,
    PATH_METRICS,
    ROUTER_PORT,
    WORKER_PORT,
)
from disaggserve.metrics.observed import KvTransfers, MetricsUnavailable, Observed
from disaggserve.metrics.series import (
    NOT_SERVED,
    bucket_increase,
    histogram_quantile,
    increase,
    share_at_or_below,
    sum_buckets,
)


@dataclass
class RouterSample:
    at: float
    requests: dict[str, float] = field(default_factory=dict)
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    slo_met: float = 0.0
    ttft: dict[float, float] = field(default_factory=dict)
    tpot: dict[float, float] = field(default_factory=dict)

    @property
    def served(self) -> float:
        return sum(v for status, v in self.requests.items() if status not in NOT_SERVED)

    @property
    def ok(self) -> float:
        return self.requests.get("ok", 0.0)


def parse_router_metrics(text: str, at: float) -> RouterSample:
    sample = RouterSample(at=at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == METRIC_REQUESTS:
                status = s.labels.get("status", "ok")
                sample.requests[status] = sample.requests.get(status, 0.0) + s.value
            elif s.name == METRIC_PROMPT_TOKENS:
                sample.prompt_tokens += s.value
            elif s.name == METRIC_GENERATION_TOKENS:
                sample.generation_tokens += s.value
            elif s.name == METRIC_SLO_MET:
                sample.slo_met += s.value
            elif s.name in (f"{METRIC_TTFT}_bucket", f"{METRIC_TPOT}_bucket"):
                edge = math.inf if s.labels["le"] in ("+Inf", "Inf") else float(s.labels["le"])
                target = sample.ttft if s.name.startswith(METRIC_TTFT) else sample.tpot
                target[edge] = target.get(edge, 0.0) + s.value
    return sample


@dataclass
class KvSample:
    """A decode worker's KV-pull counters at one scrape (its histograms' counts and sums)."""

    at: float
    transfers: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0


def parse_kv_metrics(text: str, at: float) -> KvSample:
    sample = KvSample(at=at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("role", "decode") != "decode":
                continue  # a prefill worker's sends: the same transfers seen from the other end
            if s.name == f"{METRIC_KV_TRANSFER_SECONDS}_count":
                sample.transfers += s.value
            elif s.name == f"{METRIC_KV_TRANSFER_SECONDS}_sum":
                sample.seconds += s.value
            elif s.name == f"{METRIC_KV_TRANSFER_BYTES}_sum":
                sample.bytes += s.value
    return sample


class _Stamped(Protocol):
    at: float


S = TypeVar("S", bound=_Stamped)


class ScrapeWindow(Generic[S]):
    """Samples per pod (routers' `RouterSample`s, or decode workers' `KvSample`s); `observe` turns a
    router window into an Observed, `kv_transfers` a decode-worker window into KvTransfers."""

    def __init__(self, window_seconds: float, stale_after: float):
        self.window_seconds = window_seconds
        self.stale_after = stale_after
        self.samples: dict[str, collections.deque[S]] = {}

    def add(self, pod: str, sample: S) -> None:
        ring = self.samples.setdefault(pod, collections.deque())
        ring.append(sample)
        while ring and ring[0].at < sample.at - self.window_seconds * 2:
            ring.popleft()

    def forget_missing(self, live_pods: set[str]) -> None:
        for pod in set(self.samples) - live_pods:
            del self.samples[pod]

    def spans(self, now: float) -> list[tuple[S, S]]:
        """(oldest, newest) sample inside the window of every pod scraped at least twice in it."""
        start = now - self.window_seconds
        spans = []
        for ring in self.samples.values():
            inside = [s for s in ring if s.at >= start - 1e-9]
            if len(inside) >= 2:
                spans.append((inside[0], inside[-1]))
        return spans

    def kv_transfers(self: ScrapeWindow[KvSample], now: float) -> KvTransfers | None:
        """The decode workers' KV pulls in the window; None before two scrapes of any worker or
        when none pulled (a colocated plan, an idle system)."""
        spans = self.spans(now)
        transfers = sum(increase(old.transfers, new.transfers) for old, new in spans)
        if not transfers:
            return None
        return KvTransfers(transfers=transfers, bytes=sum(increase(old.bytes, new.bytes) for old, new in spans),
                           seconds=sum(increase(old.seconds, new.seconds) for old, new in spans))

    def observe(self: ScrapeWindow[RouterSample], now: float, slo_ttft_s: float | None = None,
                slo_tpot_s: float | None = None) -> Observed:
        spans = self.spans(now)
        newest = max((ring[-1].at for ring in self.samples.values() if ring), default=None)
        if newest is None or now - newest > self.stale_after:
            raise MetricsUnavailable("no router has been scraped recently")
        if not spans:
            raise MetricsUnavailable(f"fewer than two scrapes of any router in the last {self.window_seconds:.0f}s")
        covered = max(new.at - old.at for old, new in spans)
        served = sum(increase(old.served, new.served) for old, new in spans)
        ok = sum(increase(old.ok, new.ok) for old, new in spans)
        prompt = sum(increase(old.prompt_tokens, new.prompt_tokens) for old, new in spans)
        generated = sum(increase(old.generation_tokens, new.generation_tokens) for old, new in spans)
        met = sum(increase(old.slo_met, new.slo_met) for old, new in spans)
        ttft = sum_buckets([bucket_increase(old.ttft, new.ttft) for old, new in spans])
        tpot = sum_buckets([bucket_increase(old.tpot, new.tpot) for old, new in spans])
        def ms(q: float, buckets: dict[float, float]) -> float | None:
            value = histogram_quantile(q, buckets)
            return value * 1000 if value is not None else None
        return Observed(
            source="scrape",
            window_seconds=covered,
            requests=served,
            request_rate=served / covered if covered > 0 else 0.0,
            mean_input_tokens=prompt / ok if ok else None,
            mean_output_tokens=generated / ok if ok else None,
            ttft_p90_ms=ms(0.9, ttft),
            tpot_p90_ms=ms(0.9, tpot),
            ttft_p50_ms=ms(0.5, ttft),
            tpot_p50_ms=ms(0.5, tpot),
            attainment=met / served if served else None,
            ttft_within_slo=share_at_or_below(slo_ttft_s, ttft) if slo_ttft_s else None,
            tpot_within_slo=share_at_or_below(slo_tpot_s, tpot) if slo_tpot_s else None,
        )


async def scrape_router(http: httpx.AsyncClient, pod_ip: str, port: int = ROUTER_PORT) -> RouterSample:
    response = await http.get(f"http://{pod_ip}:{port}{PATH_METRICS}")
    response.raise_for_status()
    return parse_router_metrics(response.text, time.monotonic())


async def scrape_kv(http: httpx.AsyncClient, pod_ip: str, port: int = WORKER_PORT) -> KvSample:
    response = await http.get(f"http://{pod_ip}:{port}{PATH_METRICS}")
    response.raise_for_status()
    return parse_kv_metrics(response.text, time.monotonic())
