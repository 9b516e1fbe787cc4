"""Pure status computation: conditions, phase and replica counts from what the children report."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from disaggserve.api.plan import PHASES, Plan
from disaggserve.api.status import Condition, DisaggServeStatus, PhaseReplicas, ReplicaStatus
from disaggserve.contract import LABEL_COMPONENT

REASON_CRASH_LOOP = "WorkersCrashLooping"
MAX_LOG_LINE = 300  # characters of a container's last message kept in the condition


def checked_patch(patch: dict[str, Any]) -> dict[str, Any]:
    """A status merge patch (wire names) passed through the status model: a field it does not
    know or a value of the wrong shape fails here, not at the API server. None values stay (a
    merge patch removes those keys)."""
    removed = {k: None for k, v in patch.items() if v is None}
    model = DisaggServeStatus.model_validate({k: v for k, v in patch.items() if v is not None})
    return {**model.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json"), **removed}


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


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= MAX_LOG_LINE else line[: MAX_LOG_LINE - 1] + "…"


def crash_loops(pods: Iterable[dict[str, Any]]) -> str | None:
    """A sentence naming the containers that keep exiting, with what they said last, or None.

    A container counts when it has restarted and is not running now (waiting, e.g.
    CrashLoopBackOff), so a pod that restarted once long ago and serves does not. The reason and
    last line come from `lastState.terminated` (the kubelet fills `message` from the container's
    termination log, or its log tail with FallbackToLogsOnError).
    """
    found: list[str] = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            restarts = int(cs.get("restartCount") or 0)
            state = cs.get("state") or {}
            if restarts == 0 or ("running" in state and cs.get("ready")):
                continue
            waiting = (state.get("waiting") or {}).get("reason")
            last = (cs.get("lastState") or {}).get("terminated") or {}
            what = f"pod {pod['metadata']['name']} restarted {restarts} time{'s' if restarts != 1 else ''}"
            details = []
            if waiting:
                details.append(waiting)
            if last.get("exitCode") is not None:
                why = f" ({last['reason']})" if last.get("reason") else ""
                details.append(f"last exit code {last['exitCode']}{why}")
            if line := _last_line(last.get("message")):
                details.append(f"last log line: {line}")
            found.append(what + (": " + ", ".join(details) if details else ""))
    if not found:
        return None
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return "; ".join(found[:3]) + more + "; see `kubectl logs --previous` of the pod"


def readiness(
    conditions: list[dict[str, Any]],
    replicas: ReplicaStatus,
    router: tuple[int, int],
    generation: int | None,
    crashing: str | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Ready / Degraded conditions and the phase, from ready counts (and crash-looping workers)."""
    roles = replicas.roles
    parts = [f"{p} {getattr(replicas, p).display}" for p in roles] + [f"router {router[0]}/{router[1]}"]
    summary = ", ".join(parts) + " ready"
    all_ready = all(getattr(replicas, p).ready >= getattr(replicas, p).desired for p in roles) and router[0] >= max(
        1, router[1]
    )
    serving = all(getattr(replicas, p).ready >= 1 for p in roles) and router[0] >= 1
    # Once it has served, it stays Degraded (not Deploying) until every replica is back.
    was_ready = condition_status(conditions, "Ready") == "True" or condition_status(conditions, "Degraded") == "True"
    if all_ready:
        conditions = set_condition(conditions, "Ready", True, "AllReplicasReady", summary, generation)
        conditions = set_condition(conditions, "Degraded", False, "AllReplicasReady", summary, generation)
        return conditions, "Ready"
    degraded = serving or was_ready
    reason = REASON_CRASH_LOOP if crashing else "ReplicasNotReady"
    if crashing:
        summary = f"{summary}; {crashing}"
    conditions = set_condition(conditions, "Ready", False, reason, summary, generation)
    conditions = set_condition(
        conditions,
        "Degraded",
        degraded,
        reason if degraded else (REASON_CRASH_LOOP if crashing else "Deploying"),
        summary if degraded or crashing else "not serving yet",
        generation,
    )
    return conditions, "Degraded" if degraded else "Deploying"
