"""What the autoscaler learns about one DisaggServe from its metrics over a window."""

from __future__ import annotations

from pydantic import BaseModel, Field


class MetricsUnavailable(Exception):
    """No fresh metrics: the caller reports MetricsAvailable=False and must not scale down."""


class KvTransfers(BaseModel):
    """The KV-cache pulls the decode workers made in the window (totals over pods): the link as the
    deployment really uses it, on its real path and at its real sizes."""

    transfers: float = Field(ge=0)
    bytes: float = Field(ge=0)
    seconds: float = Field(ge=0)


class Observed(BaseModel):
    source: str = Field(description="prometheus or scrape")
    window_seconds: float
    requests: float = Field(description="requests finished in the window (not client errors)")
    request_rate: float
    mean_input_tokens: float | None = None
    mean_output_tokens: float | None = None
    ttft_p90_ms: float | None = None
    tpot_p90_ms: float | None = None
    # Medians: what the autoscaler's profile correction compares (planner/replan.py).
    ttft_p50_ms: float | None = None
    tpot_p50_ms: float | None = None
    attainment: float | None = Field(None, description="share of requests that met both SLOs")
    # The router counts requests meeting *both* SLOs exactly (disaggserve_slo_met_total); the
    # per-SLO shares below come from histogram buckets whose edges include the thresholds.
    ttft_within_slo: float | None = None
    tpot_within_slo: float | None = None
    kv: KvTransfers | None = Field(None, description="KV pulls of the decode workers (built-in engine)")
