"""Prometheus metrics of one worker process (names prefixed `disaggserve_`).

Each server gets its own registry so several workers can live in one test process. Gauges
read the engine when scraped, so they can never go stale.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from disaggserve_worker.server.metrics import slo_buckets

KV_BYTES_BUCKETS = [float(4**i) for i in range(5, 17)]  # 1 KiB .. 4 GiB


class WorkerMetrics:
    def __init__(self, role: str, load: Callable[[], dict[str, int]], ttft_slo_s: float | None,
                 tpot_slo_s: float | None):
        self.registry = CollectorRegistry()
        r = self.registry
        labels = {"role": role}

        def gauge(name: str, doc: str, key: str) -> None:
            Gauge(name, doc, ["role"], registry=r).labels(**labels).set_function(lambda: load()[key])

        gauge("disaggserve_queue_depth", "Requests waiting for admission.", "queued_requests")
        gauge("disaggserve_queued_tokens", "Prompt tokens not yet prefilled.", "queued_tokens")
        gauge("disaggserve_running_sequences", "Sequences being prefilled or decoded.", "running")
        gauge("disaggserve_free_kv_tokens", "Free KV-cache token slots.", "free_kv_tokens")
        gauge("disaggserve_held_kv_caches", "Prefilled caches waiting for a decode pull.", "held_caches")
        self.kv_bytes = Histogram("disaggserve_kv_transfer_bytes", "Bytes of one KV-cache transfer.",
                                  ["role"], buckets=KV_BYTES_BUCKETS, registry=r).labels(**labels)
        self.kv_seconds = Histogram("disaggserve_kv_transfer_seconds", "Duration of one KV-cache transfer.",
                                    ["role"], buckets=slo_buckets(), registry=r).labels(**labels)
        # Fixed, SLO-independent edges: an SLO edit must not restart workers to re-bucket (the
        # SLO arguments are accepted and ignored; the router and the autoscaler judge SLOs).
        self.prefill_seconds = Histogram(
            "disaggserve_prefill_iteration_seconds", "One prefill forward pass.", ["role"],
            buckets=slo_buckets(), registry=r).labels(**labels)
        self.decode_seconds = Histogram(
            "disaggserve_decode_iteration_seconds", "One decode step of the running batch.", ["role"],
            buckets=slo_buckets(), registry=r).labels(**labels)
        self.prompt_tokens = Counter("disaggserve_worker_prompt_tokens", "Prompt tokens prefilled.",
                                     ["role"], registry=r).labels(**labels)
        self.generation_tokens = Counter("disaggserve_worker_generation_tokens", "Tokens decoded.",
                                         ["role"], registry=r).labels(**labels)
        self.requests = Counter("disaggserve_worker_requests", "Requests by outcome.", ["role", "outcome"],
                                registry=r)
        self.role = role

    def observe_iteration(self, phase: str, seconds: float, tokens: int, sequences: int) -> None:
        """Called from the engine thread (prometheus-client is thread-safe)."""
        if phase == "prefill":
            self.prefill_seconds.observe(seconds)
            self.prompt_tokens.inc(tokens)
        else:
            self.decode_seconds.observe(seconds)
            self.generation_tokens.inc(tokens)

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        self.kv_bytes.observe(nbytes)
        self.kv_seconds.observe(seconds)

    def request(self, outcome: str) -> None:
        self.requests.labels(role=self.role, outcome=outcome).inc()
