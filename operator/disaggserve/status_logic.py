"""Pure status computation: conditions, phase and replica counts from what the children report."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from disaggserve.api.plan import PHASES, Plan
from disaggserve.api.status import Condition, PhaseReplicas, ReplicaStatus
from disaggserve.contract import LABEL_COMPONENT


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Iterable[dict[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Replace one condition, keeping lastTransitionTime when the status did not change."""
    value = "Unknown" if status is None else ("True" if status else "False")
    out = []
    previous = None
    for cond in conditions:
        if cond.get("type") == type_:
            previous = cond
        else:
            out.append(dict(cond))
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == value else now()
    out.append(
        Condition(
            type=type_,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=since,
            observed_generation=generation,
        ).wire()
    )
    return sorted(out, key=lambda c: c["type"])


def condition_status(conditions: Iterable[dict[str, Any]], type_: str) -> str | None:
    return next((c.get("status") for c in conditions if c.get("type") == type_), None)


def replica_status(plan: Plan | None, workloads: Iterable[dict[str, Any]]) -> ReplicaStatus:
    """Desired from the plan; ready from the StatefulSets' status, summed over units."""
    roles = plan.roles if plan else PHASES
    ready = dict.fromkeys(roles, 0)
    for obj in workloads:
        if obj.get("kind") != "StatefulSet":
            continue
        phase = obj["metadata"].get("labels", {}).get(LABEL_COMPONENT)
        if phase in ready:
            ready[phase] += int((obj.get("status") or {}).get("readyReplicas") or 0)
    desired = {p: (plan.phase(p).replicas if plan else 0) for p in roles}
    return ReplicaStatus(
        **{p: PhaseReplicas(desired=desired[p], ready=ready[p], display=f"{ready[p]}/{desired[p]}") for p in roles}
    )


def router_ready(workloads: Iterable[dict[str, Any]]) -> tuple[int, int]:
    for obj in workloads:
        if obj.get("kind") == "Deployment":
            return int((obj.get("status") or {}).get("readyReplicas") or 0), int(obj["spec"].get("replicas", 0))
    return 0, 0


def readiness(
    conditions: list[dict[str, Any]], replicas: ReplicaStatus, router: tuple[int, int], generation: int | None
) -> tuple[list[dict[str, Any]], str]:
    """Ready / Degraded conditions and the phase, from ready counts."""
    roles = replicas.roles
    parts = [f"{p} {getattr(replicas, p).display}" for p in roles] + [f"router {router[0]}/{router[1]}"]
    summary = ", ".join(parts) + " ready"
    all_ready = all(getattr(replicas, p).ready >= getattr(replicas, p).desired for p in roles) and router[0] >= max(
        1, router[1]
    )
    serving = all(getattr(replicas, p).ready >= 1 for p in roles) and router[0] >= 1
    was_ready = condition_status(conditions, "Ready") == "True"
    if all_ready:
        conditions = set_condition(conditions, "Ready", True, "AllReplicasReady", summary, generation)
        conditions = set_condition(conditions, "Degraded", False, "AllReplicasReady", summary, generation)
        return conditions, "Ready"
    degraded = serving or was_ready
    conditions = set_condition(conditions, "Ready", False, "ReplicasNotReady", summary, generation)
    conditions = set_condition(
        conditions,
        "Degraded",
        degraded,
        "ReplicasNotReady" if degraded else "Deploying",
        summary if degraded else "not serving yet",
        generation,
    )
    return conditions, "Degraded" if degraded else "Deploying"
