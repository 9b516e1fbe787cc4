"""Pure pieces of the local node agent: which pods a workload wants, where they may run.

The agent plays the parts of the StatefulSet/Deployment controllers, the scheduler and the
kubelet on one machine; what can be decided without I/O lives here and is unit-tested.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

GPU = "nvidia.com/gpu"
HOSTNAME = "kubernetes.io/hostname"


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class DesiredPod:
    namespace: str
    name: str
    owner_kind: str
    owner_name: str
    owner_uid: str
    ordinal: int
    template: dict[str, Any] = field(hash=False, compare=False)
    revision: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


def desired_pods(workload: dict[str, Any]) -> list[DesiredPod]:
    """Pods a StatefulSet (`<name>-<ordinal>`) or Deployment (`<name>-<revision>-<i>`) asks for."""
    meta, spec = workload["metadata"], workload["spec"]
    template = spec["template"]
    revision = template_hash(template)
    out = []
    for i in range(int(spec.get("replicas", 1))):
        name = f"{meta['name']}-{i}" if workload["kind"] == "StatefulSet" else f"{meta['name']}-{revision[:8]}-{i}"
        out.append(
            DesiredPod(meta["namespace"], name, workload["kind"], meta["name"], meta["uid"], i, template, revision)
        )
    return out


def pod_manifest(pod: DesiredPod, node: str | None, ip: str | None) -> dict[str, Any]:
    tmpl = pod.template
    meta = tmpl.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "labels": {**(meta.get("labels") or {}), "controller-revision-hash": pod.revision},
            "annotations": dict(meta.get("annotations") or {}),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": pod.owner_kind,
                    "name": pod.owner_name,
                    "uid": pod.owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {**tmpl["spec"], **({"nodeName": node} if node else {})},
    }


def gpu_request(pod_spec: dict[str, Any]) -> int:
    total = 0
    for c in pod_spec.get("containers", []):
        limits = (c.get("resources") or {}).get("limits") or {}
        requests = (c.get("resources") or {}).get("requests") or {}
        total += int(limits.get(GPU) or requests.get(GPU) or 0)
    return total


def _node_affinity_ok(pod_spec: dict[str, Any], labels: dict[str, str]) -> bool:
    required = (
        ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
        or {}
    ).get("nodeSelectorTerms")
    if not required:
        return True
    for term in required:  # terms are ORed, expressions inside a term ANDed
        ok = True
        for expr in term.get("matchExpressions", []):
            value, op, values = labels.get(expr["key"]), expr["operator"], expr.get("values", [])
            ok &= {
                "In": value in values,
                "NotIn": value not in values,
                "Exists": value is not None,
                "DoesNotExist": value is None,
            }.get(op, False)
        if ok:
            return True
    return False


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


@dataclass
class NodeView:
    name: str
    labels: dict[str, str]
    gpus: int
    unschedulable: bool = False


def schedule(pod_spec: dict[str, Any], nodes: list[NodeView], placed: list[tuple[str, dict, dict]]) -> str | None:
    """Pick a node, or None when none fits. `placed` are (node, labels, spec) of pods already bound.

    Honours what our pods use: GPU requests against allocatable, nodeSelector, required node
    affinity, required pod affinity on the hostname (low node-affinity units), and spreading
    (fewest pods first) otherwise.
    """
    want_gpus = gpu_request(pod_spec)
    selector = pod_spec.get("nodeSelector") or {}
    affinity_terms = (
        ((pod_spec.get("affinity") or {}).get("podAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
    ) or []
    candidates = []
    for node in nodes:
        if node.unschedulable or any(node.labels.get(k) != v for k, v in selector.items()):
            continue
        if not _node_affinity_ok(pod_spec, node.labels):
            continue
        used = sum(gpu_request(spec) for n, _, spec in placed if n == node.name)
        if want_gpus and used + want_gpus > node.gpus:
            continue
        ok = True
        for term in affinity_terms:
            peers = [n for n, labels, _ in placed if _matches(term.get("labelSelector") or {}, labels)]
            if peers and node.name not in peers:
                ok = False
        if ok:
            candidates.append((sum(1 for n, _, _ in placed if n == node.name), node.name))
    return min(candidates)[1] if candidates else None


def cpu_threads(pod_spec: dict[str, Any]) -> int:
    """Torch threads for a local pod: its CPU request, rounded up (at least 1)."""
    for c in pod_spec.get("containers", []):
        cpu = ((c.get("resources") or {}).get("requests") or {}).get("cpu")
        if cpu:
            return max(1, math.ceil(_cpu_cores(str(cpu))))
    return 1


def resource_field_value(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """An env `resourceFieldRef` as the kubelet resolves it: the container's value over the divisor, rounded up.

    Only CPU references get a value (what rendered pods use: thread counts; others resolve to
    ''); a CPU quantity absent from the container resolves, as on a node, to the node's cores.
    """
    kind, _, name = str(ref.get("resource", "")).partition(".")
    if name != "cpu" or kind not in ("requests", "limits"):
        return ""
    quantity = ((container.get("resources") or {}).get(kind) or {}).get("cpu")
    cores = _cpu_cores(str(quantity)) if quantity else float(os.cpu_count() or 1)
    divisor = _cpu_cores(str(ref.get("divisor", "1")))
    return str(max(1, math.ceil(cores / divisor - 1e-9)))


def _cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def qos_class(pod_spec: dict[str, Any]) -> str:
    """The pod's QoS class, by the kubelet's rule (requests == limits for cpu and memory: Guaranteed)."""
    containers = pod_spec.get("containers", [])
    resources = [c.get("resources") or {} for c in containers]
    if not any((r.get("requests") or r.get("limits")) for r in resources):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k) is not None
        and (r.get("requests") or {}).get(k, (r.get("limits") or {}).get(k)) == (r.get("limits") or {}).get(k)
        for r in resources
        for k in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


def container_status(
    container: dict[str, Any],
    *,
    ready: bool,
    restarts: int,
    pid: int | None,
    started_at: str,
    last_exit: tuple[int, str, str, str | None] | None,
) -> dict[str, Any]:
    """A container's status with every field a kubelet sets (clients such as the official
    `kubernetes` package refuse a status without `image` and `imageID`).

    The local stand-ins: no image is pulled, so `imageID` names the image as configured, and
    the `containerID` is the local process id. `last_exit` is (exit code, started, finished,
    last log line), shown as `lastState.terminated` like a kubelet with FallbackToLogsOnError.
    """
    image = str(container.get("image") or "")
    status: dict[str, Any] = {
        "name": container["name"],
        "image": image,
        "imageID": f"local://{image}" if pid is not None else "",
        "ready": ready,
        "restartCount": restarts,
        "started": pid is not None,
        "lastState": {},
    }
    if pid is not None:
        status["containerID"] = f"local://{pid}"
        status["state"] = {"running": {"startedAt": started_at}}
    elif last_exit is not None:
        status["state"] = {
            "waiting": {"reason": "CrashLoopBackOff", "message": f"back-off restarting {container['name']}"}
        }
    else:
        status["state"] = {"waiting": {"reason": "ContainerCreating"}}
    if last_exit is not None:
        code, started, finished, message = last_exit
        terminated: dict[str, Any] = {
            "exitCode": 128 - code if code < 0 else code,  # killed by signal N: 128 + N, as runtimes report
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started or finished,
            "finishedAt": finished,
        }
        if message:
            terminated["message"] = message
        status["lastState"] = {"terminated": terminated}
    return status
