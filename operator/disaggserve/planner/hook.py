"""The one function the controller, the CLI and the autoscaler call to get a plan."""

from __future__ import annotations

from math import gcd
from typing import Any

from disaggserve.api.plan import PhasePlan, Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.planner.auto import plan_automatically
from disaggserve.planner.errors import PlanningError
from disaggserve.topology import TopologyError

__all__ = ["PlanningError", "manual_plan", "plan_for"]


def manual_plan(spec: DisaggServeSpec) -> Plan:
    """The plan a user wrote down in `spec.parallelism` (replicas default to 1)."""
    assert spec.parallelism is not None
    prefill = spec.parallelism.prefill
    decode = spec.parallelism.decode
    p_replicas = 1 if prefill.replicas is None else prefill.replicas
    d_replicas = 1 if decode.replicas is None else decode.replicas
    placement = "low-affinity" if spec.placement == "low-affinity" else "high-affinity"
    units = max(1, gcd(p_replicas, d_replicas)) if placement == "low-affinity" else 1
    unit = "GPU" if spec.hardware.device == "gpu" else "CPU worker"
    return Plan(
        placement=placement,
        prefill=PhasePlan(tensor=prefill.tensor, pipeline=prefill.pipeline, replicas=p_replicas),
        decode=PhasePlan(tensor=decode.tensor, pipeline=decode.pipeline, replicas=d_replicas),
        units=units,
        source="manual",
        reason=f"manual: spec.parallelism ({p_replicas} prefill x {prefill.tensor * prefill.pipeline} {unit}, "
        f"{d_replicas} decode x {decode.tensor * decode.pipeline} {unit}, {placement}, {units} unit(s))",
    )


def plan_for(
    spec: DisaggServeSpec,
    *,
    nodes: list[dict[str, Any]] | None = None,
    profile: dict[str, Any] | None = None,
    rate: float | None = None,
    used_gpus: dict[str, int] | None = None,
    max_tensor: int | None = None,
) -> Plan:
    """Plan a resource. Raises PlanningError with a reason a person can act on.

    `nodes` are Node objects as the API returns them (None: no cluster view, plan on the spec's
    hardware alone), `profile` a latency profile document (None: built-in), `rate` overrides
    `spec.workload.requestRate` (the autoscaler passes the measured rate), `used_gpus` the GPUs
    per node already requested by pods that are not this resource's (free = allocatable − used).
    Without `spec.parallelism` the DistServe planner chooses everything (planner.auto);
    `max_tensor` caps the tensor-parallel size at what the deployed worker runs.
    """
    if spec.parallelism is not None:
        return manual_plan(spec)
    try:
        return plan_automatically(
            spec, nodes=nodes, profile=profile, rate=rate, used_gpus=used_gpus, max_tensor=max_tensor
        ).plan
    except TopologyError as e:
        raise PlanningError("NodeLabelsInvalid", str(e)) from None
