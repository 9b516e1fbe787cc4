"""`DisaggServe.status`: what the operator observed and decided."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from disaggserve.api.base import ApiModel
from disaggserve.api.plan import Plan

ConditionType = Literal["Ready", "Planned", "Degraded", "MetricsAvailable", "ScalingLimited"]


class Condition(ApiModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PhaseReplicas(ApiModel):
    desired: int = 0
    ready: int = 0
    display: str = Field("0/0", description="ready/desired, for `kubectl get`.")


class ReplicaStatus(ApiModel):
    prefill: PhaseReplicas = Field(default_factory=PhaseReplicas)
    decode: PhaseReplicas = Field(default_factory=PhaseReplicas)
    colocated: PhaseReplicas | None = Field(None, description="Set when the plan is colocated.")

    @property
    def roles(self) -> tuple[str, ...]:
        return ("colocated",) if self.colocated is not None else ("prefill", "decode")


class SloStatus(ApiModel):
    ttft_p90_ms: float | None = None
    tpot_p90_ms: float | None = None
    attainment: float | None = None
    window_seconds: int | None = None


class DisaggServeStatus(ApiModel):
    observed_generation: int | None = None
    phase: Literal["Pending", "Deploying", "Ready", "Degraded", "Failed"] = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    plan: Plan | None = None
    replicas: ReplicaStatus = Field(default_factory=ReplicaStatus)
    slo: SloStatus | None = None
    endpoint: str | None = None
    draining: dict[str, str] | None = Field(
        None, description="StatefulSets whose scale-down waits for their leaving pods to drain, and since when."
    )
