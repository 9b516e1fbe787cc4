"""The one function the controller, the CLI and the autoscaler call to get a plan.

It also holds the worker's limits the planner must respect (a CPU worker is one process on one
device: tensor and pipeline 1, the same rule the CRD's CEL enforces on manual plans) and the
capacity check of a plan against the cluster's Nodes, so that nothing the planner returns is
refused later by the worker or can never be scheduled.
"""

from __future__ import annotations

from math import gcd
from typing import Any

from disaggserve.api.plan import PhasePlan, Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.planner.auto import plan_automatically
from disaggserve.planner.batching import prefill_token_budget
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.inputs import resolve_profile
from disaggserve.planner.profile import phase_latency
from disaggserve.topology import TopologyError

__all__ = ["PlanningError", "capacity_problem", "manual_plan", "plan_for"]

RESOURCE_GPU = "nvidia.com/gpu"


def _planning_view(spec: DisaggServeSpec) -> DisaggServeSpec:
    """The spec as the search must see it: on CPU every instance is one device (tp1, pp1).

    `hardware.gpusPerNode` bounds tensor x pipeline in the search; a CPU worker runs neither, so
    it is one. Low node-affinity exists to keep KV caches off slow links between GPU nodes; CPU
    workers have no device to pair on a node, so `auto` plans them high-affinity.
    """
    if spec.hardware.device != "cpu":
        return spec
    update: dict[str, Any] = {"hardware": spec.hardware.model_copy(update={"gpus_per_node": 1})}
    if spec.placement == "auto":
        update["placement"] = "high-affinity"
    return spec.model_copy(update=update)


def check_worker_limits(spec: DisaggServeSpec, plan: Plan, max_tensor: int | None) -> None:
    """Refuse a plan the worker would refuse (exit 2) instead of rendering crash-looping pods."""
    for phase in (plan.prefill, plan.decode):
        if spec.hardware.device == "cpu" and (phase.tensor, phase.pipeline) != (1, 1):
            raise PlanningError(
                "PlanInvalid",
                f"the planner chose tensor {phase.tensor} x pipeline {phase.pipeline} for CPU workers, "
                "which run tensor and pipeline 1 only; set spec.parallelism by hand",
            )
        if max_tensor is not None and phase.tensor > max_tensor:
            raise PlanningError(
                "PlanInvalid", f"the planner chose tensor {phase.tensor}; the worker runs at most {max_tensor}"
            )


def _quantity_int(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def capacity_problem(spec: DisaggServeSpec, plan: Plan, nodes: list[dict[str, Any]] | None) -> str | None:
    """Why the cluster's Nodes can never hold this plan's worker pods, or None.

    Counted over every schedulable Node (free or not, so the answer does not change with other
    tenants' load): GPUs for GPU workers, the pods a Node allows for all workers. Without a view
    of the Nodes (an empty list: no RBAC, or none registered yet) nothing is judged.
    """
    if not nodes:
        return None
    usable = [n for n in nodes if not (n.get("spec") or {}).get("unschedulable")]
    pods = sum(_quantity_int(((n.get("status") or {}).get("allocatable") or {}).get("pods")) for n in usable)
    workers = plan.prefill.replicas + plan.decode.replicas
    if pods and workers > pods:
        return (
            f"the plan runs {workers} worker pods ({plan.prefill.replicas} prefill, {plan.decode.replicas} decode) "
            f"but the {len(usable)} schedulable node(s) allow {pods} pods in all; lower the replicas "
            "(spec.parallelism.*.replicas, spec.autoscaling.maxReplicas) or spec.workload.requestRate"
        )
    if spec.hardware.device == "gpu":
        gpus = sum(_quantity_int(((n.get("status") or {}).get("allocatable") or {}).get(RESOURCE_GPU)) for n in usable)
        if plan.gpus_total > gpus:
            return (
                f"the plan needs {plan.gpus_total} GPUs but the cluster's schedulable nodes have {gpus} "
                f"allocatable {RESOURCE_GPU}; lower the replicas or the tensor/pipeline sizes"
            )
    return None


def manual_prefill_budget(spec: DisaggServeSpec, profile: dict[str, Any] | None) -> int | None:
    """L_m (planner/batching.py) for the prefill shape of a hand-written plan, from the profile the
    planner would use; None (the engine's default budget) when none resolves, or it lacks the shape.

    Why: `spec.parallelism` fixes shapes and counts, not how a prefill pod batches; without this
    its pods would batch past the point where the device saturates, as no planned pod does."""
    assert spec.parallelism is not None
    try:
        prof, _ = resolve_profile(spec, profile)
    except PlanningError:
        return None
    shape = spec.parallelism.prefill
    lat = phase_latency(prof, shape.tensor, shape.pipeline)
    return prefill_token_budget(lat) if lat is not None else None


def manual_plan(spec: DisaggServeSpec, profile: dict[str, Any] | None = None) -> Plan:
    """The plan a user wrote down in `spec.parallelism` (replicas default to 1), its prefill
    budget from `profile` (a profile document; None: the built-in or estimated one) when one resolves."""
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
        prefill=PhasePlan(tensor=prefill.tensor, pipeline=prefill.pipeline, replicas=p_replicas,
                          max_batch_tokens=manual_prefill_budget(spec, profile)),
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
        return manual_plan(spec, profile)
    try:
        plan = plan_automatically(
            _planning_view(spec), nodes=nodes, profile=profile, rate=rate, used_gpus=used_gpus, max_tensor=max_tensor
        ).plan
    except TopologyError as e:
        raise PlanningError("NodeLabelsInvalid", str(e)) from None
    check_worker_limits(spec, plan, max_tensor)
    return plan
