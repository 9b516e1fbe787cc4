"""One reconcile pass: read, call the pure parts, write children, return the status to record.

Kept free of kopf so it can be read as a plain sequence; the handlers wrap it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable, Mapping
from typing import Any

from disaggserve.api.constants import API_VERSION, KIND
from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec, SpecError, parse_spec
from disaggserve.contract import max_tensor_parallel
from disaggserve.controller.drain import prepare_scale_down
from disaggserve.controller.kube import Kube, KubeError
from disaggserve.planner import PlanningError, plan_for
from disaggserve.planner.replan import carry_over
from disaggserve.resources import Owner, RenderError, build_children
from disaggserve.resources.names import instance_selector
from disaggserve.resources.router import endpoint
from disaggserve.status_logic import now, readiness, replica_status, router_ready, set_condition

EventSink = Callable[[str, str, str], None]  # (type: Normal|Warning, reason, message)

OWNED_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
)
WORKLOAD_KINDS: tuple[tuple[str, str], ...] = (("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"))
# Only for resources with spec.gateway: clusters without the inference extension's CRDs have no such list.
GATEWAY_KINDS: tuple[tuple[str, str], ...] = (("inference.networking.k8s.io/v1", "InferencePool"),)


def to_plain(value: Any) -> Any:
    """kopf hands out read-only mapping views; pydantic and json want plain containers."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


class Refused(Exception):
    """The resource cannot be served as written; nothing is created or changed."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


async def _profile(kube: Kube, spec: DisaggServeSpec, namespace: str) -> dict[str, Any] | None:
    ref = spec.profile.config_map_ref if spec.profile else None
    if ref is None:
        return None
    cm = await kube.get("v1", "ConfigMap", namespace, ref.name)
    if cm is None:
        raise Refused("ProfileMissing", f"ConfigMap {ref.name!r} (spec.profile.configMapRef) does not exist")
    raw = (cm.get("data") or {}).get(ref.key)
    if raw is None:
        raise Refused("ProfileMissing", f"ConfigMap {ref.name!r} has no key {ref.key!r}")
    try:
        profile: dict[str, Any] = json.loads(raw)
    except ValueError as e:
        raise Refused("ProfileInvalid", f"ConfigMap {ref.name!r} key {ref.key!r} is not JSON: {e}") from None
    return profile


async def owned_children(kube: Kube, name: str, namespace: str, uid: str, kinds=OWNED_KINDS) -> dict[tuple, dict]:
    lists = await asyncio.gather(*(kube.list(av, kind, namespace, instance_selector(name)) for av, kind in kinds))
    found: dict[tuple, dict] = {}
    for (api_version, kind), items in zip(kinds, lists, strict=True):
        for obj in items:
            owners = obj["metadata"].get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                found[(api_version, kind, obj["metadata"]["name"])] = obj
    return found


def _refusal_status(conditions: list[dict[str, Any]], generation: int | None, reason: str, message: str) -> dict:
    conditions = set_condition(conditions, "Ready", False, reason, message, generation)
    conditions = set_condition(conditions, "Planned", False, reason, message, generation)
    return {"observedGeneration": generation, "phase": "Failed", "conditions": conditions}


def _stable_plan(plan: Plan, previous: dict[str, Any] | None) -> Plan:
    """Keep updatedAt when the plan did not change, so status only moves when something did."""
    prev = dict(previous or {})
    prev_time = prev.pop("updatedAt", None)
    same = {k: v for k, v in plan.wire().items() if k != "updatedAt"} == prev
    return plan.model_copy(update={"updated_at": prev_time if same and prev_time else now()})


async def reconcile(kube: Kube, body: Mapping[str, Any], emit: EventSink) -> dict[str, Any]:
    """Bring the children in line with the spec; return the status patch. Raises KubeError (retry)."""
    body = to_plain(body)
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    generation = meta.get("generation")
    old_status = body.get("status") or {}
    conditions = list(old_status.get("conditions") or [])
    try:
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as e:
            raise Refused("InvalidSpec", str(e)) from None
        profile = await _profile(kube, spec, namespace)
        nodes = await kube.list("v1", "Node") if spec.parallelism is None else None
        try:
            plan = plan_for(
                spec, nodes=nodes, profile=profile, max_tensor=max_tensor_parallel(spec.hardware.device)
            )
        except PlanningError as e:
            raise Refused(e.reason, str(e)) from None
        plan = carry_over(plan, old_status.get("plan"), spec)
        try:
            desired = build_children(Owner(name, namespace, uid), spec, plan, profile)
        except RenderError as e:
            raise Refused("InvalidSpec", str(e)) from None
    except Refused as e:
        emit("Warning", e.reason, str(e))
        return _refusal_status(conditions, generation, e.reason, str(e))

    existing = await owned_children(kube, name, namespace, uid,
                                    kinds=OWNED_KINDS + (GATEWAY_KINDS if spec.gateway else ()))
    drain = await prepare_scale_down(
        kube, desired, existing, namespace, dict(old_status.get("draining") or {}), datetime.datetime.now(datetime.UTC)
    )
    for sts in drain.pending:
        emit("Normal", "Draining", f"StatefulSet {sts}: waiting for the pods it loses to finish their requests")
    # Children are independent objects: apply them concurrently (one round trip of latency).
    applied = list(await asyncio.gather(*(kube.apply(obj) for obj in desired)))
    for obj, after in zip(desired, applied, strict=True):
        before = existing.pop((obj["apiVersion"], obj["kind"], obj["metadata"]["name"]), None)
        if before is None:
            emit("Normal", "Created", f"created {obj['kind']} {obj['metadata']['name']}")
        elif before["metadata"].get("resourceVersion") != after["metadata"].get("resourceVersion"):
            emit("Normal", "Updated", f"updated {obj['kind']} {obj['metadata']['name']}")
    obsolete = list(existing)
    deleted = await asyncio.gather(*(kube.delete(av, kind, namespace, child) for av, kind, child in obsolete))
    for (_, kind, child), gone in zip(obsolete, deleted, strict=True):
        if gone:
            emit("Normal", "Deleted", f"deleted {kind} {child}: no longer part of the plan")

    plan = _stable_plan(plan, old_status.get("plan"))
    conditions = set_condition(
        conditions, "Planned", True, "ManualPlan" if plan.source == "manual" else "Planned", plan.reason, generation
    )
    replicas = replica_status(plan, applied)
    conditions, phase = readiness(conditions, replicas, router_ready(applied), generation)
    return {
        "observedGeneration": generation,
        "phase": phase,
        "conditions": conditions,
        "plan": plan.wire(),
        "replicas": replicas.wire(),
        "endpoint": endpoint(name, namespace),
        # A merge patch removes a key set to None: the field disappears once nothing drains.
        "draining": drain.since or None,
    }


async def refresh_status(kube: Kube, namespace: str, name: str) -> None:
    """Recompute ready counts and readiness of one resource from its workloads and record them."""
    owner = await kube.get(API_VERSION, KIND, namespace, name)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return
    status = owner.get("status") or {}
    if status.get("phase") == "Failed" or not status.get("plan"):
        return
    plan = Plan.model_validate(status["plan"])
    workloads = list(
        (await owned_children(kube, name, namespace, owner["metadata"]["uid"], kinds=WORKLOAD_KINDS)).values()
    )
    replicas = replica_status(plan, workloads)
    conditions, phase = readiness(
        list(status.get("conditions") or []),
        replicas,
        router_ready(workloads),
        status.get("observedGeneration"),
    )
    update = {"phase": phase, "conditions": conditions, "replicas": replicas.wire()}
    if all(status.get(k) == v for k, v in update.items()):
        return
    try:
        await kube.patch_status(
            API_VERSION, KIND, namespace, name, update, resource_version=owner["metadata"]["resourceVersion"]
        )
    except KubeError as e:
        if e.status != 409:  # a newer status was written meanwhile: the next event recomputes
            raise


def desired_replicas(owner: Mapping[str, Any], workload: Mapping[str, Any]) -> int | None:
    """The replica count the owner's plan gives this StatefulSet, or None if it is not ours to judge."""
    plan_raw = (owner.get("status") or {}).get("plan")
    if not plan_raw or workload.get("kind") != "StatefulSet":
        return None
    plan = Plan.model_validate(plan_raw)
    phase = workload["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    if phase not in ("prefill", "decode"):
        return None
    return plan.per_unit(phase) if plan.placement == "low-affinity" else plan.phase(phase).replicas
