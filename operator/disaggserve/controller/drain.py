"""Drain-safe scale-down: the pods a StatefulSet is about to lose stop taking work first.

Before the operator lowers a StatefulSet's replicas it asks the pods that will go (the highest
ordinals, which a StatefulSet removes first) to drain: they stop admitting (their readiness
turns false, so the router stops choosing them), finish what they hold (a prefill pod also waits
until decode has pulled its KV caches), and only then does the replica count drop. A pod that
cannot be reached has nothing left to protect. A drain that outlasts the pod's termination grace
period proceeds anyway (the worker still drains on SIGTERM). A scale-down that is called off
while its pods were draining leaves them unready for good, so such pods are restarted.
"""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass
from typing import Any

import httpx

from disaggserve.contract import HEADER_WORKER_TOKEN, LABEL_INSTANCE, PATH_DRAIN, WORKER_PORT
from disaggserve.controller.kube import Kube
from disaggserve.controller.view import ClusterView

PATH_LOAD = "/internal/load"


def _ordinal(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["name"].rsplit("-", 1)[-1])


def _busy(load: dict[str, Any]) -> bool:
    return bool(load.get("running") or load.get("queued_requests") or load.get("held_caches"))


@dataclass
class DrainResult:
    pending: list[str]  # StatefulSets whose scale-down waits for draining pods
    since: dict[str, str]  # StatefulSet -> when its drain started (kept in status)


async def _pod_load(http: httpx.AsyncClient, ip: str, *, drain: bool) -> dict[str, Any] | None:
    try:
        if drain:
            response = await http.post(f"http://{ip}:{WORKER_PORT}{PATH_DRAIN}")
        else:
            response = await http.get(f"http://{ip}:{WORKER_PORT}{PATH_LOAD}")
        return dict(response.json()) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def prepare_scale_down(
    kube: Kube,
    desired: list[dict[str, Any]],
    existing: dict[tuple, dict[str, Any]],
    namespace: str,
    previous_since: dict[str, str],
    now: datetime.datetime,
    *,
    token: str | None = None,
    view: ClusterView | None = None,
) -> DrainResult:
    """Drain the pods each shrinking StatefulSet will lose; hold its replicas until they are idle.

    Mutates `desired` StatefulSets whose scale-down must wait (their replicas stay as they are).
    `token`: the DisaggServe's worker token, which the workers want on /internal/* calls.
    `view`: where the pods are read (the operator's indexes); None lists them.
    """
    view = view or ClusterView(kube)
    pending: list[str] = []
    since: dict[str, str] = {}
    headers = {HEADER_WORKER_TOKEN: token} if token else {}
    async with httpx.AsyncClient(timeout=2.0, headers=headers) as http:
        for obj in desired:
            if obj["kind"] != "StatefulSet":
                continue
            name = obj["metadata"]["name"]
            before = existing.get(("apps/v1", "StatefulSet", name))
            want = int(obj["spec"]["replicas"])
            have = int((before or {}).get("spec", {}).get("replicas", 0))
            if before is None or (want >= have and name not in previous_since):
                continue  # not shrinking, and no drain of ours to call off: nothing to look at
            selector = obj["spec"]["selector"]["matchLabels"]
            pods = await view.pods(namespace, selector[LABEL_INSTANCE], selector)
            # Pods that stay but were drained for a scale-down that was called off: restart them.
            for pod in pods:
                ip = (pod.get("status") or {}).get("podIP")
                if (
                    _ordinal(pod) < want
                    and ip
                    and (load := await _pod_load(http, ip, drain=False))
                    and load.get("draining")
                ):
                    await kube.delete("v1", "Pod", namespace, pod["metadata"]["name"])
            if want >= have:
                continue
            started = previous_since.get(name) or now.strftime("%Y-%m-%dT%H:%M:%SZ")
            grace = float(obj["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))
            elapsed = (now - datetime.datetime.fromisoformat(started.replace("Z", "+00:00"))).total_seconds()
            leaving = [p for p in pods if _ordinal(p) >= want and (p.get("status") or {}).get("podIP")]
            loads = await asyncio.gather(*(_pod_load(http, p["status"]["podIP"], drain=True) for p in leaving))
            busy = [p["metadata"]["name"] for p, load in zip(leaving, loads, strict=True) if load and _busy(load)]
            if busy and elapsed < grace:
                obj["spec"]["replicas"] = have
                pending.append(name)
                since[name] = started
    return DrainResult(pending, since)
