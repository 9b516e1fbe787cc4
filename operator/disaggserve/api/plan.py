"""The `Plan`: how many GPUs each phase gets and how they are parallelised.

One model serves the planner's output, `status.plan` and the ConfigMap the operator writes,
so what a person reads in `kubectl get -o yaml` is exactly what the builders rendered.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from disaggserve.api.base import ApiModel

PHASES = ("prefill", "decode")
Phase = Literal["prefill", "decode"]
# Worker roles a plan may deploy: the two phases, or colocated instances doing both.
Role = Literal["prefill", "decode", "colocated"]


class PhasePlan(ApiModel):
    tensor: int = Field(ge=1, le=8)
    pipeline: int = Field(1, ge=1, le=64)
    replicas: int = Field(ge=0, le=100_000, description="Instances in total (all units together).")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        le=1_048_576,
        description="Prefill: prompt tokens one iteration batches, DistServe's L_m from the latency profile "
        "(batching past the point where the device saturates saves almost nothing and makes every prompt "
        "wait for the whole batch); longer prompts are chunked. Rendered as the built-in worker's "
        "--max-batch-tokens and vLLM's --max-num-batched-tokens. Absent: the engine's default.",
    )

    @property
    def gpus_per_instance(self) -> int:
        return self.tensor * self.pipeline

    @property
    def gpus(self) -> int:
        return self.gpus_per_instance * self.replicas


class Prediction(ApiModel):
    ttft_p90_ms: float | None = None
    tpot_p90_ms: float | None = None
    attainment: float | None = None


class ScalingLimit(ApiModel):
    """Set when the plan is smaller than the target rate needs (maxGpus or free GPUs): the
    operator reports it as the `ScalingLimited` condition with these numbers."""

    target_rate: float = Field(description="Requests per second the plan was asked to carry.")
    achievable_rate: float = Field(description="Predicted goodput of the plan as deployed.")
    gpus_needed: int = Field(ge=0, description="GPUs the target rate would need.")
    gpus_available: int = Field(ge=0, description="GPUs the plan could use (free GPUs, maxGpus).")
    limited_by: Literal["maxGpus", "freeGpus"]
    message: str = ""


class Plan(ApiModel):
    """A deployable plan.

    high-affinity: prefill and decode instances are placed independently (fast links between
    nodes carry the KV cache). low-affinity: `units` placement units, each holding
    `prefill.replicas / units` prefill and `decode.replicas / units` decode instances on one
    node, so the KV cache never leaves the node. colocated: `colocated.replicas` instances that
    each run both phases (no KV transfer) behind the same router; prefill and decode have 0
    replicas. The planner chooses it when disaggregating would need more GPUs for the target
    (DistServe's own finding for some models and SLOs).
    """

    placement: Literal["high-affinity", "low-affinity", "colocated"] = "high-affinity"
    prefill: PhasePlan
    decode: PhasePlan
    colocated: PhasePlan | None = Field(
        None, description="Colocated instances (placement colocated): each runs prefill and decode."
    )
    units: int = Field(1, ge=1, le=100_000)
    source: Literal["manual", "planner", "autoscaler"] = "manual"
    predicted_goodput_per_gpu: float | None = None
    predicted: Prediction | None = None
    baseline_goodput_per_gpu: float | None = Field(
        None, description="Per-GPU goodput the best colocated (vLLM-style) deployment would reach."
    )
    disaggregated_goodput_per_gpu: float | None = Field(
        None, description="Per-GPU goodput the best disaggregated deployment would reach (set on colocated plans)."
    )
    scaling_limited: ScalingLimit | None = None
    profile: Literal["measured", "estimated"] | None = Field(
        None,
        description="Where the planner's latencies came from: a measured profile, or a roofline estimate "
        "from model facts and the GPU's data sheet (no profile for this model and GPU yet; "
        "a measured profile in spec.profile replaces it).",
    )
    reason: str = ""
    updated_at: str | None = None

    @property
    def gpus_total(self) -> int:
        return self.prefill.gpus + self.decode.gpus + (self.colocated.gpus if self.colocated else 0)

    @property
    def roles(self) -> tuple[Role, ...]:
        """The worker roles this plan deploys."""
        return ("colocated",) if self.placement == "colocated" else PHASES

    def phase(self, phase: Role) -> PhasePlan:
        if phase == "colocated":
            if self.colocated is None:
                raise ValueError("plan has no colocated instances")
            return self.colocated
        return self.prefill if phase == "prefill" else self.decode

    def per_unit(self, phase: Phase) -> int:
        """Instances of a phase in each placement unit (low-affinity), or in total."""
        return self.phase(phase).replicas // self.units
