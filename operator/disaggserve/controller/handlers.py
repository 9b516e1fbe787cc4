"""kopf handlers: thin wiring of `reconcile` and `refresh_status` to the API server's events.

Errors: a failed API call that can succeed later (409, 429, 5xx, timeouts) is a kopf
TemporaryError, so kopf retries the handler with a short delay; anything the user must fix
is reported in the resource's conditions and an Event, and is not retried until the spec
changes. Deletion needs no handler: children carry ownerReferences and the garbage collector
removes them.

One writer per resource: the update/create/resume handler, the StatefulSet/Deployment event
handler and the autoscaler timer all reconcile through `_serialized`, which holds one lock per
resource, reads the resource fresh under it and writes the status itself before letting go. The
autoscaler records its decision on the resource (annotation `disaggserve.io/autoscaler-plan`)
before it changes any child, so whichever path runs next applies the same replicas.

Planning never runs on the event loop (controller/planning.py): a handler waits a moment for a
plan and otherwise comes back for it, so neither other resources nor this one's deletion queue
behind a long search. kopf still puts its finalizer (`disaggserve.io/finalizer`) on each resource, to
stop the per-resource timers cleanly; with no operator running, `kubectl delete` waits until the
finalizer is removed by hand (docs/install.md, "Uninstall").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import kopf
import prometheus_client

from disaggserve.api.constants import API_VERSION, GROUP, KIND, PLURAL, VERSION
from disaggserve.contract import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY
from disaggserve.controller.autoscaler import Autoscaler
from disaggserve.controller.kube import Kube, KubeError
from disaggserve.controller.planning import PlanService
from disaggserve.controller.reconcile import (
    REPLICA_RECORD,
    WORKLOAD_KINDS,
    ReconcileResult,
    desired_replicas,
    reconcile,
    refresh_status,
    replica_record,
    to_plain,
)
from disaggserve.controller.settings import configure
from disaggserve.controller.view import (
    CHILDREN_INDEX,
    NODES_INDEX,
    PODS_INDEX,
    ClusterView,
    index_child,
    index_node,
    index_pod,
)
from disaggserve.status_logic import checked_patch

RETRY_DELAY = 2.0
STATUS_SAFETY_INTERVAL = 30.0
# How many reconcile rounds the safety net runs for a lost event (each waits what the reconcile
# asks, e.g. a plan still computing).
LOST_RECONCILE_ATTEMPTS = 30
SLO_OBSERVE_INTERVAL = float(os.environ.get("DISAGGSERVE_SLO_OBSERVE_INTERVAL", "10"))
AUTOSCALE_TICK = float(os.environ.get("DISAGGSERVE_AUTOSCALE_TICK", "2"))  # observe this often

# How the operator makes its planner; tests replace it (e.g. with a deliberately slow one).
planner_factory: Callable[[], PlanService] = PlanService


class Locks:
    """One asyncio.Lock per resource, alive while anyone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    def of(self, namespace: str, name: str) -> asyncio.Lock:
        lock = self._locks.get((namespace, name))
        if lock is None:
            lock = self._locks[(namespace, name)] = asyncio.Lock()
        return lock


# Children kept in an index: the kinds the operator watches anyway (their events drive readiness).
# The other owned kinds (ConfigMaps, Services, ServiceAccounts, RBAC, PDBs, NetworkPolicies) are
# listed by a reconcile instead: kopf filters by label only after receiving an event, so an index
# would make the operator receive and remember every such object in the watched namespaces (every
# namespace's ServiceAccount and root CA ConfigMap, leader-election ConfigMaps updated every few
# seconds). Even with only the operator's own objects (bench/reconcile.py, 100 resources) indexing
# all nine kinds raised its peak memory by 4% over listing; reconciles are rare next to events.
INDEXED_CHILD_KINDS = WORKLOAD_KINDS


def _indexed_kind(resource: kopf.Resource) -> bool:
    api_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
    return (api_version, resource.kind) in INDEXED_CHILD_KINDS


# What exists, kept from kopf's watch streams (controller/view.py): readiness, drains and the
# autoscaler list nothing; a reconcile lists only the kinds above that are not indexed.
# async: kopf runs sync handlers in a thread pool, a hop per watch event for a few dict lookups.
@kopf.index(_indexed_kind, id=CHILDREN_INDEX, labels={LABEL_MANAGED_BY: MANAGED_BY})
async def index_children(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return index_child(body)


@kopf.index("", "v1", "pods", id=PODS_INDEX, labels={LABEL_MANAGED_BY: MANAGED_BY})
async def index_pods(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return index_pod(body)


@kopf.index("", "v1", "nodes", id=NODES_INDEX)
async def index_nodes(body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return index_node(body)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    configure(settings)
    memo.kube = Kube()
    memo.planner = planner_factory()
    # kopf hands the (still empty) indexes to startup handlers; they fill before any resource handler runs.
    memo.view = ClusterView(
        memo.kube,
        children=kwargs[CHILDREN_INDEX],
        pods=kwargs[PODS_INDEX],
        nodes=kwargs[NODES_INDEX],
        indexed_kinds=INDEXED_CHILD_KINDS,
    )
    memo.autoscaler = Autoscaler(memo.kube, planner=memo.planner, view=memo.view)
    memo.locks = Locks()
    if port := os.environ.get("DISAGGSERVE_METRICS_PORT"):
        prometheus_client.start_http_server(int(port))  # disaggserve_operator_* metrics


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    if kube is not None:
        await kube.aclose()
    if getattr(memo, "autoscaler", None) is not None:
        await memo.autoscaler.aclose()
    if getattr(memo, "planner", None) is not None:
        await memo.planner.aclose()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: the service account; elsewhere: $KUBECONFIG, read at call time.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _emitter(body: Mapping[str, Any]) -> Any:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    return emit


async def _serialized(
    memo: kopf.Memo,
    namespace: str,
    name: str,
    work: Callable[[dict[str, Any]], Any],
) -> Any:
    """Run `work(owner)` under the resource's lock with the resource as the API server has it now.

    None when the resource is gone or being deleted (nothing to reconcile).
    """
    async with memo.locks.of(namespace, name):
        owner = await memo.kube.get(API_VERSION, KIND, namespace, name)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return None
        return await work(owner)


async def _reconcile_and_record(memo: kopf.Memo, owner: dict[str, Any], extra: dict | None = None) -> ReconcileResult:
    """Reconcile and write the status now (under the caller's lock), not after the handler returns."""
    result = await reconcile(memo.kube, owner, _emitter(owner), memo.planner, view=memo.get("view"))
    status = {**(extra or {}), **result.status}
    meta = owner["metadata"]
    await memo.kube.patch_status(API_VERSION, KIND, meta["namespace"], meta["name"], checked_patch(status))
    return result


def _retryable(e: KubeError) -> kopf.TemporaryError | kopf.PermanentError:
    if e.retryable:
        return kopf.TemporaryError(f"API server: {e}", delay=RETRY_DELAY)
    return kopf.PermanentError(f"API server refused a child object: {e}")


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=RETRY_DELAY)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=RETRY_DELAY)
@kopf.on.update(GROUP, VERSION, PLURAL, backoff=RETRY_DELAY)
async def reconcile_handler(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    try:
        result = await _serialized(memo, namespace, name, lambda owner: _reconcile_and_record(memo, owner))
    except KubeError as e:
        raise _retryable(e) from e
    if result is not None and result.retry_in is not None:
        # Come back: a plan still computing, a scale-down waiting for its pods to drain, or a
        # timed-out plan to try again. The status already says which.
        raise kopf.TemporaryError(result.why, delay=result.retry_in)


def _owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "DisaggServe" and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return str(ref["name"])
    return None


@kopf.on.event("apps", "v1", "statefulsets", labels={LABEL_MANAGED_BY: MANAGED_BY})
@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY})
@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def child_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """Keep readiness current (crash loops included), and restore children someone deleted or rescaled."""
    owner_name = _owner(body)
    if body.get("kind") == "Pod":
        owner_name = (body.get("metadata", {}).get("labels") or {}).get(LABEL_INSTANCE)
    if owner_name is None:
        return

    def drifted(owner: dict[str, Any], child: Mapping[str, Any] | None) -> bool:
        if child is None:
            return True
        want = desired_replicas(owner, child)
        return want is not None and child.get("spec", {}).get("replicas") != want

    async def work(owner: dict[str, Any]) -> None:
        if body.get("kind") != "Pod" and (event.get("type") == "DELETED" or drifted(owner, body)):
            current = None
            if event.get("type") != "DELETED":  # the event may be older than what the lock holder wrote
                current = await memo.kube.get(body["apiVersion"], body["kind"], namespace, body["metadata"]["name"])
            if drifted(owner, current):
                logger.info(f"{body['kind']} {body['metadata']['name']} drifted from the plan; re-applying")
                await _reconcile_and_record(memo, owner)
                return
        await refresh_status(memo.kube, namespace, owner_name, _emitter(owner), owner=owner, view=memo.get("view"))

    try:
        await _serialized(memo, namespace, owner_name, work)
    except KubeError as e:
        # Event handlers are not retried by kopf; the next event or the safety timer catches up.
        logger.warning(f"could not update {owner_name} after a change of its {body['kind']}: {e}")


def _autoscaling_enabled(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


def _autoscaling_disabled(spec: kopf.Spec, **_: Any) -> bool:
    return not _autoscaling_enabled(spec)


@kopf.timer(GROUP, VERSION, PLURAL, interval=AUTOSCALE_TICK, when=_autoscaling_enabled)
async def autoscale(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Observe, re-plan and scale (decisions every spec.autoscaling.intervalSeconds).

    The observation and the re-plan (seconds, in a planner process) run without the resource's
    lock, so spec updates and child events are not held up by them; the result is written under
    the lock, and a decision is dropped if the spec or the recorded decision changed meanwhile
    (the next tick decides again from what is current).
    """
    try:
        basis = await memo.kube.get(API_VERSION, KIND, namespace, name)
        if basis is None or basis["metadata"].get("deletionTimestamp"):
            return
        update = await memo.autoscaler.step(basis, _emitter(basis))
        if update is None:
            return

        async def work(owner: dict[str, Any]) -> None:
            status = dict(update)
            status["conditions"] = _rebased_conditions(owner, update.get("conditions"))
            if "plan" not in status:
                await memo.kube.patch_status(API_VERSION, KIND, namespace, name, checked_patch(status))
                return
            moved = owner["metadata"].get("generation") != basis["metadata"].get("generation") or (
                replica_record(owner) != replica_record(basis)
            )
            if moved:
                logger.info("the spec or the replica decision changed while the autoscaler decided; deciding again")
                status.pop("plan")
                await memo.kube.patch_status(API_VERSION, KIND, namespace, name, checked_patch(status))
                return
            # New replica counts: record the decision on the resource first, then apply it (drain-safe).
            record = json.dumps(status["plan"], sort_keys=True)
            patched = await memo.kube.patch(
                API_VERSION, KIND, namespace, name, {"metadata": {"annotations": {REPLICA_RECORD: record}}}
            )
            current = to_plain(patched or owner)
            current["status"] = {**(current.get("status") or {}), **status}
            await _reconcile_and_record(memo, current, extra=status)

        await _serialized(memo, namespace, name, work)
    except KubeError as e:
        logger.warning(f"autoscaling step failed, retrying next tick: {e}")


# Conditions the autoscaler and the SLO observer own; the rest belong to the reconcile.
_OBSERVER_CONDITIONS = ("MetricsAvailable", "ScalingLimited")


def _rebased_conditions(owner: Mapping[str, Any], computed: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The resource's current conditions with only the observer's own ones replaced by `computed`
    (which was derived from an older read: the reconcile may have changed Ready meanwhile)."""
    current = [
        c for c in (owner.get("status") or {}).get("conditions") or [] if c.get("type") not in _OBSERVER_CONDITIONS
    ]
    ours = [c for c in computed or [] if c.get("type") in _OBSERVER_CONDITIONS]
    return sorted(current + ours, key=lambda c: str(c.get("type")))


@kopf.timer(GROUP, VERSION, PLURAL, interval=SLO_OBSERVE_INTERVAL, when=_autoscaling_disabled)
async def observe_slo(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Measured SLOs (status.slo, the ATTAINMENT column) also when the autoscaler is off."""

    async def work(owner: dict[str, Any]) -> None:
        update = await memo.autoscaler.observe_only(owner)  # a scrape: short, bounded by its timeout
        if update is not None:
            update["conditions"] = _rebased_conditions(owner, update.get("conditions"))
            await memo.kube.patch_status(API_VERSION, KIND, namespace, name, checked_patch(update))

    try:
        await _serialized(memo, namespace, name, work)
    except KubeError as e:
        logger.warning(f"SLO observation failed, retrying next tick: {e}")


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_SAFETY_INTERVAL, initial_delay=STATUS_SAFETY_INTERVAL)
async def status_safety_net(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Recompute readiness even if a workload event was lost (watch reconnects can drop some), and
    reconcile a spec generation that no reconcile ever finished.

    Every reconcile outcome (planned, planning, failed) records `observedGeneration`, so one that
    lags `metadata.generation` by a whole safety interval means the create/update was never
    handled: a resource created while two peered operator replicas handed over was handled by
    neither in ~1 of 3 runs of a test (kopf's causes are edge-triggered; the replica that began
    was paused). Level-triggered here, with the handler's own retries (a plan still computing)."""

    async def work(owner: dict[str, Any]) -> bool:
        meta, status = owner.get("metadata") or {}, owner.get("status") or {}
        if status.get("observedGeneration") != meta.get("generation"):
            return True
        await refresh_status(memo.kube, namespace, name, _emitter(owner), owner=owner, view=memo.get("view"))
        return False

    try:
        if not await _serialized(memo, namespace, name, work):
            return
        logger.warning("this spec generation was never reconciled (a lost event, e.g. during an operator "
                       "handover): reconciling now")
        for _attempt in range(LOST_RECONCILE_ATTEMPTS):
            result = await _serialized(memo, namespace, name, lambda owner: _reconcile_and_record(memo, owner))
            if result is None or result.retry_in is None:
                return
            await asyncio.sleep(result.retry_in)
    except KubeError as e:
        logger.warning(f"status refresh failed: {e}")
