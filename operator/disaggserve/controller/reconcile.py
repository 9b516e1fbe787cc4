"""One reconcile pass: read, call the pure parts, write children, return the status to record.

Kept free of kopf so it can be read as a plain sequence; the handlers wrap it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_camel

from disaggserve.api.constants import API_VERSION, GROUP, KIND
from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec, SpecError, parse_spec
from disaggserve.contract import max_tensor_parallel
from disaggserve.controller.drain import prepare_scale_down
from disaggserve.controller.kube import Kube, KubeError
from disaggserve.controller.planning import (
    REASON_TIMEOUT,
    TIMEOUT_RETRY_SECONDS,
    Pending,
    PlanService,
    node_fingerprint,
    plan_key,
)
from disaggserve.controller.view import ClusterView
from disaggserve.planner import PlanningError
from disaggserve.planner.hook import capacity_problem, manual_plan
from disaggserve.planner.replan import carry_over
from disaggserve.resources import Owner, RenderError, build_children
from disaggserve.resources.router import endpoint
from disaggserve.resources.security import NetworkAccess, token_of, token_secret_name
from disaggserve.status_logic import (
    REASON_CRASH_LOOP,
    checked_patch,
    condition_status,
    crash_loops,
    now,
    readiness,
    replica_status,
    router_ready,
    set_condition,
)

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
    ("networking.k8s.io/v1", "NetworkPolicy"),
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


async def load_profile(kube: Kube, spec: DisaggServeSpec, namespace: str) -> dict[str, Any] | None:
    """The profile document `spec.profile.configMapRef` names (None without one): the first plan
    and every autoscaling decision plan from the same measured profile."""
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


def _refusal_status(conditions: list[dict[str, Any]], generation: int | None, reason: str, message: str) -> dict:
    conditions = set_condition(conditions, "Ready", False, reason, message, generation)
    conditions = set_condition(conditions, "Planned", False, reason, message, generation)
    return _status(observed_generation=generation, phase="Failed", conditions=conditions)


def _stable_plan(plan: Plan, previous: dict[str, Any] | None) -> Plan:
    """Keep updatedAt when the plan did not change, so status only moves when something did."""
    prev = dict(previous or {})
    prev_time = prev.pop("updatedAt", None)
    same = {k: v for k, v in plan.wire().items() if k != "updatedAt"} == prev
    return plan.model_copy(update={"updated_at": prev_time if same and prev_time else now()})


REPLICA_RECORD = f"{GROUP}/autoscaler-plan"  # annotation: the autoscaler's last decision (a Plan)
PLAN_WAIT_SECONDS = 2.0  # a handler waits this long for a plan, then comes back for it
PLANNING_RETRY_SECONDS = 1.0
REASON_PLANNING = "Planning"


@dataclass
class ReconcileResult:
    """The status patch to write, and when to come back (None: only on the next event)."""

    status: dict[str, Any]
    retry_in: float | None = None
    why: str = ""


def replica_record(owner: Mapping[str, Any]) -> dict[str, Any] | None:
    """The autoscaler's last decision as a Plan document: its annotation, else status.plan.

    The annotation is written before the children are changed, so every path that reads it
    (spec updates, child events, the timer, an operator restarted with a restored object) applies
    the same replica counts; status.plan mirrors it for people.
    """
    raw = ((owner.get("metadata") or {}).get("annotations") or {}).get(REPLICA_RECORD)
    if raw:
        try:
            record = json.loads(raw)
            Plan.model_validate(record)
            return dict(record)
        except ValueError:
            pass  # a hand-edited, broken record: fall back to the status
    plan = (owner.get("status") or {}).get("plan")
    return dict(plan) if plan else None


def _plan_inputs_key(spec: DisaggServeSpec, nodes: list[dict[str, Any]] | None, profile: Any, max_tensor: int) -> str:
    view = [node_fingerprint(n) for n in nodes] if nodes is not None else None
    return plan_key("plan_for", spec.wire(), view, profile, max_tensor)


async def _plan(
    kube: Kube, spec: DisaggServeSpec, profile: dict[str, Any] | None, nodes: list[dict[str, Any]], planner: PlanService
) -> Plan | Pending:
    if spec.parallelism is not None:
        return manual_plan(spec, profile)  # no search: inline
    max_tensor = max_tensor_parallel(spec.hardware.device)
    key = _plan_inputs_key(spec, nodes, profile, max_tensor)
    result = await planner.plan(key, spec, nodes=nodes, profile=profile, max_tensor=max_tensor, wait=PLAN_WAIT_SECONDS)
    return result  # type: ignore[no-any-return]


def _status(**fields: Any) -> dict[str, Any]:
    """A status patch from field names, validated by the status model (None: remove the key)."""
    return checked_patch({to_camel(k): v for k, v in fields.items()})


async def reconcile(
    kube: Kube,
    body: Mapping[str, Any],
    emit: EventSink,
    planner: PlanService | None = None,
    view: ClusterView | None = None,
) -> ReconcileResult:
    """Bring the children in line with the spec; return the status patch. Raises KubeError (retry).

    `view`: how existing children, pods and Nodes are read (the operator's indexes); None lists them.
    """
    planner = planner or _default_planner()
    view = view or ClusterView(kube)
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
        profile = await load_profile(kube, spec, namespace)
        nodes = await view.nodes()
        try:
            planned = await _plan(kube, spec, profile, nodes, planner)
        except PlanningError as e:
            if e.reason == REASON_TIMEOUT:
                return _timed_out(conditions, generation, old_status, str(e), emit)
            raise Refused(e.reason, str(e)) from None
        if isinstance(planned, Pending):
            message = (
                f"computing the plan ({planned.elapsed:.0f}s so far, budget {planned.budget:g}s); "
                "children are left as they are until it is ready"
            )
            conditions = set_condition(conditions, "Planned", None, REASON_PLANNING, message, generation)
            if not old_status.get("plan"):
                conditions = set_condition(conditions, "Ready", False, REASON_PLANNING, message, generation)
            return ReconcileResult(
                _status(
                    observed_generation=generation, phase=old_status.get("phase") or "Pending", conditions=conditions
                ),
                retry_in=PLANNING_RETRY_SECONDS,
                why="planning",
            )
        plan = carry_over(planned, replica_record(body), spec)
        if problem := capacity_problem(spec, plan, nodes):
            raise Refused("NoCapacity", problem)
        # The worker token is made once: read it back so a reconcile never rotates it.
        secret = await kube.get("v1", "Secret", namespace, token_secret_name(name))
        try:
            desired = build_children(
                Owner(name, namespace, uid),
                spec,
                plan,
                profile,
                worker_token=token_of(secret),
                access=NetworkAccess.from_environ(os.environ),
            )
        except RenderError as e:
            raise Refused("InvalidSpec", str(e)) from None
    except Refused as e:
        emit("Warning", e.reason, str(e))
        return ReconcileResult(_refusal_status(conditions, generation, e.reason, str(e)))

    existing = await view.children(namespace, name, uid, OWNED_KINDS + (GATEWAY_KINDS if spec.gateway else ()))
    if secret is not None:  # read by name above (the operator may not list Secrets)
        existing[("v1", "Secret", secret["metadata"]["name"])] = secret
    token = token_of(next(o for o in desired if o["kind"] == "Secret"))
    drain = await prepare_scale_down(
        kube,
        desired,
        existing,
        namespace,
        dict(old_status.get("draining") or {}),
        datetime.datetime.now(datetime.UTC),
        token=token,
        view=view,
    )
    for sts in drain.pending:
        emit("Normal", "Draining", f"StatefulSet {sts}: waiting for the pods it loses to finish their requests")
    # Children are independent objects: apply them concurrently (one round trip of latency).
    applied = list(await asyncio.gather(*(kube.apply(obj) for obj in desired)))
    for obj, after in zip(desired, applied, strict=True):
        before = existing.pop((obj["apiVersion"], obj["kind"], obj["metadata"]["name"]), None)
        view.wrote(namespace, name, before, after)
        if before is None:
            emit("Normal", "Created", f"created {obj['kind']} {obj['metadata']['name']}")
        elif before["metadata"].get("resourceVersion") != after["metadata"].get("resourceVersion"):
            emit("Normal", "Updated", f"updated {obj['kind']} {obj['metadata']['name']}")
    obsolete = list(existing)
    deleted = await asyncio.gather(*(kube.delete(av, kind, namespace, child) for av, kind, child in obsolete))
    for key, gone in zip(obsolete, deleted, strict=True):
        view.wrote(namespace, name, existing[key], None)
        _, kind, child = key
        if gone:
            emit("Normal", "Deleted", f"deleted {kind} {child}: no longer part of the plan")

    plan = _stable_plan(plan, old_status.get("plan"))
    conditions = set_condition(
        conditions, "Planned", True, "ManualPlan" if plan.source == "manual" else "Planned", plan.reason, generation
    )
    replicas = replica_status(plan, applied)
    pods = await _pods_if_not_ready(view, namespace, name, replicas)
    conditions, phase = readiness(conditions, replicas, router_ready(applied), generation, crash_loops(pods))
    _report_crash_loops(old_status, conditions, emit)
    return ReconcileResult(
        _status(
            observed_generation=generation,
            phase=phase,
            conditions=conditions,
            plan=plan.wire(),
            replicas=replicas.wire(),
            endpoint=endpoint(name, namespace),
            # A merge patch removes a key set to None: the field disappears once nothing drains.
            draining=drain.since or None,
        ),
        retry_in=RETRY_WHILE_DRAINING if drain.since else None,
        why=f"draining before scale-down: {', '.join(drain.since)}" if drain.since else "",
    )


RETRY_WHILE_DRAINING = 2.0


async def _pods_if_not_ready(view: ClusterView, namespace: str, name: str, replicas: Any) -> list[dict[str, Any]]:
    """The resource's pods, read only while some worker is not ready (what crash loops explain)."""
    if all(getattr(replicas, p).ready >= getattr(replicas, p).desired for p in ("prefill", "decode")):
        return []
    return await view.pods(namespace, name)


def _timed_out(
    conditions: list[dict[str, Any]],
    generation: int | None,
    old_status: dict[str, Any],
    message: str,
    emit: EventSink,
) -> ReconcileResult:
    """Planning ran out of time: say so, keep the previous plan and children, try again later."""
    previous = old_status.get("plan")
    if previous:
        message += "; the previous plan and its workers stay as they are"
    if (next((c for c in conditions if c.get("type") == "Planned"), None) or {}).get("reason") != REASON_TIMEOUT:
        emit("Warning", REASON_TIMEOUT, message)
    conditions = set_condition(conditions, "Planned", False, REASON_TIMEOUT, message, generation)
    conditions = set_condition(conditions, "Ready", False, REASON_TIMEOUT, message, generation)
    return ReconcileResult(
        _status(
            observed_generation=generation,
            phase="Degraded" if previous else "Failed",
            conditions=conditions,
        ),
        retry_in=TIMEOUT_RETRY_SECONDS,
        why="planning timed out",
    )


def _report_crash_loops(old_status: Mapping[str, Any], conditions: list[dict[str, Any]], emit: EventSink) -> None:
    """One Warning Event each time the crash-loop report changes (a new restart, another pod)."""
    ready = next((c for c in conditions if c.get("type") == "Ready"), None) or {}
    if ready.get("reason") != REASON_CRASH_LOOP:
        return
    before = next((c for c in old_status.get("conditions") or [] if c.get("type") == "Ready"), None) or {}
    if before.get("message") != ready.get("message"):
        emit("Warning", REASON_CRASH_LOOP, str(ready.get("message")))


_DEFAULT_PLANNER: PlanService | None = None


def _default_planner() -> PlanService:
    """For callers outside the operator (tests, tools): one shared service, started lazily."""
    global _DEFAULT_PLANNER
    if _DEFAULT_PLANNER is None:
        _DEFAULT_PLANNER = PlanService()
    return _DEFAULT_PLANNER


async def refresh_status(
    kube: Kube,
    namespace: str,
    name: str,
    emit: EventSink | None = None,
    owner: dict[str, Any] | None = None,
    view: ClusterView | None = None,
) -> None:
    """Recompute ready counts and readiness of one resource from its workloads and record them.

    `owner`: the resource as just read (under the caller's lock); None reads it here.
    `view`: how workloads and pods are read (the operator's indexes); None lists them.
    """
    view = view or ClusterView(kube)
    if owner is None:
        owner = await kube.get(API_VERSION, KIND, namespace, name)
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return
    status = owner.get("status") or {}
    if status.get("phase") == "Failed" or not status.get("plan"):
        return
    conditions = list(status.get("conditions") or [])
    if condition_status(conditions, "Planned") == "False":
        return  # the plan is not current (timed out): Ready says why until planning succeeds
    plan = Plan.model_validate(status["plan"])
    workloads = list((await view.children(namespace, name, owner["metadata"]["uid"], WORKLOAD_KINDS)).values())
    replicas = replica_status(plan, workloads)
    pods = await _pods_if_not_ready(view, namespace, name, replicas)
    conditions, phase = readiness(
        conditions, replicas, router_ready(workloads), status.get("observedGeneration"), crash_loops(pods)
    )
    update = _status(phase=phase, conditions=conditions, replicas=replicas.wire())
    if all(status.get(k) == v for k, v in update.items()):
        return
    try:
        await kube.patch_status(
            API_VERSION, KIND, namespace, name, update, resource_version=owner["metadata"]["resourceVersion"]
        )
    except KubeError as e:
        if e.status != 409:  # a newer status was written meanwhile: the next event recomputes
            raise
        return
    if emit is not None:
        _report_crash_loops(status, conditions, emit)


def desired_replicas(owner: Mapping[str, Any], workload: Mapping[str, Any]) -> int | None:
    """The replica count the owner's plan gives this StatefulSet, or None if it is not ours to judge."""
    plan_raw = replica_record(owner) if _autoscaling(owner) else (owner.get("status") or {}).get("plan")
    if not plan_raw or workload.get("kind") != "StatefulSet":
        return None
    plan = Plan.model_validate(plan_raw)
    phase = workload["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    if phase not in ("prefill", "decode"):
        return None
    return plan.per_unit(phase) if plan.placement == "low-affinity" else plan.phase(phase).replicas


def _autoscaling(owner: Mapping[str, Any]) -> bool:
    return bool(((owner.get("spec") or {}).get("autoscaling") or {}).get("enabled"))
