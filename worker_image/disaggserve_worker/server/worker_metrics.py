"""Prometheus metrics of one worker process, in vLLM's names where vLLM has the concept.

The engine-level series a dashboard, the autoscaler or a Gateway API Inference Extension endpoint
picker reads (`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
`vllm:time_to_first_token_seconds`, ...) carry vLLM's names, types, labels (`model_name`, `engine`)
and histogram edges, so one query reads the built-in engine and vLLM alike and `sum by (le)` over
both adds up. What vLLM has no word for stays ours (`disaggserve_*`, with a `role` label): the KV
hand-off between prefill and decode, held caches, prefill/decode iteration times, request outcomes
of the internal protocol.

Each server gets its own registry so several workers can live in one test process. Gauges read
the engine when scraped, so they can never go stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from disaggserve_worker import contract
from disaggserve_worker.server.metrics import slo_buckets

# vLLM exports no `*_created` series (it calls this too); a scraper diffing both engines sees the same.
disable_created_metrics()

KV_BYTES_BUCKETS = [float(4**i) for i in range(5, 17)]  # 1 KiB .. 4 GiB

# vLLM's own edges (vllm/v1/metrics/loggers.py), so both engines' histograms aggregate together.
VLLM_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                                50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
VLLM_LABELS = ["model_name", "engine"]
ENGINE_INDEX = "0"  # one engine core per worker process, as vLLM without data parallelism

# vLLM-compatible series every worker exports: name -> Prometheus type (tests and docs read this).
VLLM_METRICS: dict[str, str] = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}


def _1_2_5_buckets(max_value: int) -> list[float]:
    """vLLM's token-count edges: 1, 2, 5, 10, 20, 50, ... up to max_value."""
    edges: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return edges
            edges.append(float(mantissa * scale))
        scale *= 10


class RequestTimer:
    """Times one request on this worker as vLLM does: arrival → first token it emits → each next
    token → finish. On a decode worker the first token it emits is the one after prefill's, so its
    TTFT includes the KV pull, as on a vLLM decode instance."""

    def __init__(self, metrics: WorkerMetrics, prompt_tokens: int) -> None:
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.arrived = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.done = False

    def token(self, count: int = 1) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrived)
        elif self.last is not None:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.tokens += count
        # Counted where tokens leave the worker: a prefill worker's first token counts once there
        # (as on a vLLM prefill instance), a decode worker counts only the tokens it makes.
        self.metrics.generation_tokens.inc(count)

    def finish(self, reason: str) -> None:
        """reason: vLLM's finished_reason (stop, length, abort)."""
        if self.done:
            return
        self.done = True
        now = time.monotonic()
        m = self.metrics
        m.success.labels(model_name=m.model_name, engine=ENGINE_INDEX, finished_reason=reason).inc()
        m.e2e.observe(now - self.arrived)
        m.request_prompt_tokens.observe(self.prompt_tokens)
        m.request_generation_tokens.observe(self.tokens)
        if self.first is not None and self.tokens > 1:
            m.request_tpot.observe((now - self.first) / (self.tokens - 1))


class WorkerMetrics:
    def __init__(self, role: str, load: Callable[[], dict[str, int]], ttft_slo_s: float | None,
                 tpot_slo_s: float | None, *, model_name: str = "model", kv_capacity_tokens: int | None = None,
                 block_size: int = 16, max_model_len: int = 4096) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = {"role": role}
        self.role = role
        self.model_name = model_name
        self._load = load
        self.kv_capacity_tokens = kv_capacity_tokens
        self.block_size = block_size
        self.extra_waiting: Callable[[], int] = lambda: 0
        vllm = {"model_name": model_name, "engine": ENGINE_INDEX}

        def vllm_gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, VLLM_LABELS, registry=r).labels(**vllm).set_function(read)

        vllm_gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                   lambda: self._load()["running"])
        vllm_gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                   lambda: self._load()["queued_requests"] + self.extra_waiting())
        vllm_gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", self._kv_usage)
        self.cache_info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                ["block_size", "num_gpu_blocks", "engine"], registry=r)
        self._publish_cache_info()
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     VLLM_LABELS, registry=r).labels(**vllm)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         VLLM_LABELS, registry=r).labels(**vllm)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*VLLM_LABELS, "finished_reason"], registry=r)
        for reason in ("stop", "length", "abort"):
            self.success.labels(**vllm, finished_reason=reason)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              VLLM_LABELS, buckets=VLLM_TTFT_BUCKETS, registry=r).labels(**vllm)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             VLLM_LABELS, buckets=VLLM_TPOT_BUCKETS, registry=r).labels(**vllm)
        self.request_tpot = Histogram(
            "vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
            VLLM_LABELS, buckets=VLLM_TPOT_BUCKETS, registry=r).labels(**vllm)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             VLLM_LABELS, buckets=VLLM_REQUEST_LATENCY_BUCKETS, registry=r).labels(**vllm)
        token_edges = _1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", VLLM_LABELS,
            buckets=token_edges, registry=r).labels(**vllm)
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", VLLM_LABELS,
            buckets=token_edges, registry=r).labels(**vllm)

        # Ours: what vLLM has no series for.
        def gauge(name: str, doc: str, key: str) -> None:
            Gauge(name, doc, ["role"], registry=r).labels(**labels).set_function(lambda: self._load()[key])

        gauge("disaggserve_queued_tokens", "Prompt tokens not yet prefilled.", "queued_tokens")
        gauge("disaggserve_held_kv_caches", "Prefilled caches waiting for a decode pull.", "held_caches")
        self.kv_bytes = Histogram(contract.METRIC_KV_TRANSFER_BYTES, "Bytes of one KV-cache transfer.",
                                  ["role"], buckets=KV_BYTES_BUCKETS, registry=r).labels(**labels)
        self.kv_seconds = Histogram(contract.METRIC_KV_TRANSFER_SECONDS, "Duration of one KV-cache transfer.",
                                    ["role"], buckets=slo_buckets(), registry=r).labels(**labels)
        # Fixed, SLO-independent edges: an SLO edit must not restart workers to re-bucket (the
        # SLO arguments are accepted and ignored; the router and the autoscaler judge SLOs).
        self.prefill_seconds = Histogram(
            "disaggserve_prefill_iteration_seconds", "One prefill forward pass.", ["role"],
            buckets=slo_buckets(), registry=r).labels(**labels)
        self.decode_seconds = Histogram(
            "disaggserve_decode_iteration_seconds", "One decode step of the running batch.", ["role"],
            buckets=slo_buckets(), registry=r).labels(**labels)
        self.requests = Counter("disaggserve_worker_requests", "Requests by outcome.", ["role", "outcome"],
                                registry=r)

    def bind(self, *, kv_capacity_tokens: int, block_size: int,
             extra_waiting: Callable[[], int] | None = None) -> None:
        """Facts only known once the engine exists (the server calls this)."""
        self.kv_capacity_tokens = kv_capacity_tokens
        self.block_size = block_size
        if extra_waiting is not None:
            self.extra_waiting = extra_waiting
        self._publish_cache_info()

    def _publish_cache_info(self) -> None:
        self.cache_info.clear()
        blocks = -(-self.kv_capacity_tokens // self.block_size) if self.kv_capacity_tokens else 0
        self.cache_info.labels(block_size=str(self.block_size), num_gpu_blocks=str(blocks),
                               engine=ENGINE_INDEX).set(1)

    def _kv_usage(self) -> float:
        capacity = self.kv_capacity_tokens
        if not capacity:
            return 0.0
        free = self._load().get("free_kv_tokens", capacity)
        return min(max(1.0 - free / capacity, 0.0), 1.0)

    def observe_iteration(self, phase: str, seconds: float, tokens: int, sequences: int) -> None:
        """Called from the engine thread (prometheus-client is thread-safe)."""
        if phase == "prefill":
            self.prefill_seconds.observe(seconds)
            self.prompt_tokens.inc(tokens)
        else:
            self.decode_seconds.observe(seconds)

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        self.kv_bytes.observe(nbytes)
        self.kv_seconds.observe(seconds)

    def request(self, outcome: str) -> None:
        self.requests.labels(role=self.role, outcome=outcome).inc()

    def timer(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)
