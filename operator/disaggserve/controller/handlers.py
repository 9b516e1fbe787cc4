"""kopf handlers: thin wiring of `reconcile` and `refresh_status` to the API server's events.

Errors: a failed API call that can succeed later (409, 429, 5xx, timeouts) is a kopf
TemporaryError, so kopf retries the handler with a short delay; anything the user must fix
is reported in the resource's conditions and an Event, and is not retried until the spec
changes. Deletion needs no handler: children carry ownerReferences and the garbage collector
removes them. kopf still puts its finalizer (`disaggserve.io/finalizer`) on each resource, to
stop the per-resource timers cleanly; with no operator running, `kubectl delete` waits until the
finalizer is removed by hand (docs/install.md, "Uninstall").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf
import prometheus_client

from disaggserve.api.constants import GROUP, PLURAL, VERSION
from disaggserve.contract import LABEL_MANAGED_BY, MANAGED_BY
from disaggserve.controller.autoscaler import Autoscaler
from disaggserve.controller.kube import Kube, KubeError
from disaggserve.controller.reconcile import desired_replicas, reconcile, refresh_status, to_plain
from disaggserve.controller.settings import configure

RETRY_DELAY = 2.0
STATUS_SAFETY_INTERVAL = 30.0
AUTOSCALE_TICK = float(os.environ.get("DISAGGSERVE_AUTOSCALE_TICK", "2"))  # observe this often


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    memo.kube = Kube()
    memo.autoscaler = Autoscaler(memo.kube)
    if port := os.environ.get("DISAGGSERVE_METRICS_PORT"):
        prometheus_client.start_http_server(int(port))  # disaggserve_operator_* metrics


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    if kube is not None:
        await kube.aclose()
    if getattr(memo, "autoscaler", None) is not None:
        await memo.autoscaler.aclose()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: the service account; elsewhere: $KUBECONFIG, read at call time.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _emitter(body: Mapping[str, Any]) -> Any:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)

    return emit


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=RETRY_DELAY)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=RETRY_DELAY)
@kopf.on.update(GROUP, VERSION, PLURAL, backoff=RETRY_DELAY)
async def reconcile_handler(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    try:
        status = await reconcile(memo.kube, body, _emitter(body))
    except KubeError as e:
        if e.retryable:
            raise kopf.TemporaryError(f"API server: {e}", delay=RETRY_DELAY) from e
        raise kopf.PermanentError(f"API server refused a child object: {e}") from e
    patch.status.update(status)
    if status.get("draining"):
        # Look again shortly: the scale-down proceeds once the leaving pods are idle.
        raise kopf.TemporaryError(f"draining before scale-down: {', '.join(status['draining'])}", delay=RETRY_DELAY)


def _owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "DisaggServe" and ref.get("apiVersion", "").startswith(GROUP + "/"):
            return str(ref["name"])
    return None


@kopf.on.event("apps", "v1", "statefulsets", labels={LABEL_MANAGED_BY: MANAGED_BY})
@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def child_changed(
    event: kopf.RawEvent, body: kopf.Body, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    """Keep readiness current, and restore children that someone deleted or rescaled."""
    owner_name = _owner(body)
    if owner_name is None:
        return
    try:
        owner = await memo.kube.get(f"{GROUP}/{VERSION}", "DisaggServe", namespace, owner_name)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        drifted = event.get("type") == "DELETED" or (
            (want := desired_replicas(owner, body)) is not None and body.get("spec", {}).get("replicas") != want
        )
        if drifted:
            logger.info(f"{body['kind']} {body['metadata']['name']} drifted from the plan; re-applying")
            status = await reconcile(memo.kube, owner, _emitter(owner))
            await memo.kube.patch_status(
                f"{GROUP}/{VERSION}",
                "DisaggServe",
                namespace,
                owner_name,
                status,
                resource_version=owner["metadata"]["resourceVersion"],
            )
        else:
            await refresh_status(memo.kube, namespace, owner_name)
    except KubeError as e:
        # Event handlers are not retried by kopf; the next event or the safety timer catches up.
        logger.warning(f"could not update {owner_name} after a change of its {body['kind']}: {e}")


def _autoscaling_enabled(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=AUTOSCALE_TICK, when=_autoscaling_enabled)
async def autoscale(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Observe, re-plan and scale (decisions every spec.autoscaling.intervalSeconds)."""
    try:
        update = await memo.autoscaler.step(body, _emitter(body))
        if update is None:
            return
        if "plan" in update:  # new replica counts: apply them (drain-safe) through the reconcile
            current = to_plain(body)
            current["status"] = {**(current.get("status") or {}), **update}
            update = {**update, **await reconcile(memo.kube, current, _emitter(body))}
        patch.status.update(update)
    except KubeError as e:
        logger.warning(f"autoscaling step failed, retrying next tick: {e}")


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_SAFETY_INTERVAL, initial_delay=STATUS_SAFETY_INTERVAL)
async def status_safety_net(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Recompute readiness even if a workload event was lost (watch reconnects can drop some)."""
    try:
        await refresh_status(memo.kube, namespace, name)
    except KubeError as e:
        logger.warning(f"status refresh failed: {e}")
