"""The router's Prometheus metrics: what clients experienced, end to end.

The router is the one place that sees a request from arrival to last token across retries and
resumes, so the SLO metrics the autoscaler reads (TTFT, TPOT, attainment) are measured here. Each
router instance has its own registry so several can live in one process (tests, benchmarks).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..contract import (
    METRIC_E2E,
    METRIC_GENERATION_TOKENS,
    METRIC_PROMPT_TOKENS,
    METRIC_REQUESTS,
    METRIC_ROUTER_INFLIGHT,
    METRIC_ROUTER_QUEUED,
    METRIC_ROUTER_RESUMED,
    METRIC_ROUTER_RETRIES,
    METRIC_ROUTER_WORKERS,
    METRIC_SLO_MET,
    METRIC_TPOT,
    METRIC_TTFT,
)
from ..server.metrics import slo_buckets

# prometheus_client appends `_total` to counters itself; the contract names carry it.
_REQUESTS = METRIC_REQUESTS.removesuffix("_total")
_PROMPT = METRIC_PROMPT_TOKENS.removesuffix("_total")
_GENERATION = METRIC_GENERATION_TOKENS.removesuffix("_total")
_SLO_MET = METRIC_SLO_MET.removesuffix("_total")


REQUEST_OUTCOMES = ("ok", "client_error", "upstream_error", "cancelled", "unauthorized", "rejected",
                    "rejected_draining")


class RouterMetrics:
    def __init__(self, ttft_slo_s: float | None, tpot_slo_s: float | None) -> None:
        self.registry = CollectorRegistry()
        self.ttft_slo_s = ttft_slo_s
        self.tpot_slo_s = tpot_slo_s
        r = self.registry
        self.ttft = Histogram(METRIC_TTFT, "Time to first token seen by clients.",
                              registry=r, buckets=slo_buckets(ttft_slo_s))
        self.tpot = Histogram(METRIC_TPOT, "Mean time per output token after the first, per request.",
                              registry=r, buckets=slo_buckets(tpot_slo_s))
        self.e2e = Histogram(METRIC_E2E, "Request latency from arrival to last token.",
                             registry=r, buckets=slo_buckets(ttft_slo_s))
        self.requests = Counter(_REQUESTS, "Requests by outcome (ok, client_error, upstream_error, "
                                "cancelled, unauthorized, rejected, rejected_draining).", ["status"], registry=r)
        # Every outcome series exists from the start at 0: Prometheus' increase() cannot count the
        # requests that create a series, so a first burst would otherwise read as no traffic.
        for status in REQUEST_OUTCOMES:
            self.requests.labels(status=status)
        self.prompt_tokens = Counter(_PROMPT, "Prompt tokens of served requests.", registry=r)
        self.generation_tokens = Counter(_GENERATION, "Tokens generated for clients.", registry=r)
        self.slo_met = Counter(_SLO_MET, "Requests that met both the TTFT and the TPOT SLO.", registry=r)
        self.inflight = Gauge(METRIC_ROUTER_INFLIGHT, "Requests being served now.",
                              registry=r)
        self.queued = Gauge(METRIC_ROUTER_QUEUED,
                            "Requests waiting for a worker (none available yet).", registry=r)
        self.retries = Counter(METRIC_ROUTER_RETRIES.removesuffix("_total"),
                               "Attempts re-run on another worker, by reason.",
                               ["reason"], registry=r)
        self.resumed = Counter(METRIC_ROUTER_RESUMED.removesuffix("_total"),
                               "Streams resumed on another worker after tokens were already sent.",
                               registry=r)
        self.workers = Gauge(METRIC_ROUTER_WORKERS, "Workers known to the router, by role.",
                             ["role"], registry=r)

    def observe_finished(self, *, ttft_s: float, e2e_s: float, output_tokens: int) -> None:
        """Records a request served to the end; TPOT only exists with two or more tokens."""
        self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        tpot_s = (e2e_s - ttft_s) / (output_tokens - 1) if output_tokens > 1 else None
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        ttft_ok = self.ttft_slo_s is None or ttft_s <= self.ttft_slo_s
        tpot_ok = self.tpot_slo_s is None or tpot_s is None or tpot_s <= self.tpot_slo_s
        if ttft_ok and tpot_ok:
            self.slo_met.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
