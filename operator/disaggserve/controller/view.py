"""What exists in the cluster, as the controller reads it: kopf's indexes while the operator runs,
LIST calls otherwise (tests, tools, one-shot paths).

Why indexes: a reconcile used to LIST each owned kind (nine), the pods and the Nodes, and every
child or pod event (a hundred resources starting make thousands) listed the workloads and pods
again to recompute readiness. kopf already watches the workloads and pods; its indexes
(`@kopf.index`, registered in handlers.py with the functions below) keep what the watch streams
say, per (namespace, instance), and the Nodes, so readiness, drains and the autoscaler cost no
API call and a reconcile lists only the owned kinds that are not indexed (handlers.py says why
those are not). Only the fields the controller reads are kept (`slim_*`), so memory grows with
the number of children, not with their size.

Staleness. An index follows the watch stream: right after the operator writes a child, the
index may still hold the version that write replaced, or not have the child yet. So the view
remembers what this operator wrote or deleted (`wrote`) until the index shows a change to that
object: a child reads as the index has it unless the index still shows a version the operator's
own write replaced (or lacks it), in which case it reads as written. A reconcile right after
another therefore sees its own children (no second "Created", obsolete ones pruned, a drain
counts the replicas actually set), and readiness is never computed from a workload older than
the one the last reconcile wrote. Writes cannot collide with a child that exists but is not
indexed yet: children are server-side applied, which creates or patches (no 409). What the
operator wrote is trusted for `SETTLE_SECONDS` at most; a child someone else deletes within
that time reads as present until its deletion event re-applies it (reported as Updated).

A known limit of kopf's indexes: after a watch outage long enough for "410 Gone", kopf lists
again and updates what still exists, but an object deleted during the outage stays in the index
until the operator restarts: a pod then shows at most in a crash-loop message (drains and scrapes
skip what they cannot reach); a StatefulSet deleted meanwhile would still count its ready replicas
until the operator restarts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from disaggserve.contract import LABEL_COMPONENT, LABEL_INSTANCE
from disaggserve.resources.names import instance_selector

ChildKey = tuple[str, str, str]  # (apiVersion, kind, name)
InstanceKey = tuple[str, str]  # (namespace, DisaggServe name)
ALL_NODES = "nodes"  # the one key of the Node index
SETTLE_SECONDS = 30.0

# Index ids: the names kopf gives the indexes as handler kwargs.
CHILDREN_INDEX = "disaggserve_children"
PODS_INDEX = "disaggserve_pods"
NODES_INDEX = "disaggserve_nodes"


class Lister(Protocol):
    """The part of controller.kube.Kube the view needs (tests pass small fakes)."""

    async def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]: ...

    async def list_shared(self, api_version: str, kind: str) -> list[dict[str, Any]]: ...


def _pick(obj: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: _plain(obj[k]) for k in keys if obj.get(k) is not None}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def slim_child(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the controller reads of a child: name, version and owners; of a workload also its
    component label, replicas and ready replicas (readiness, drains)."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            **_pick(meta, "name", "resourceVersion"),
            "ownerReferences": [{"uid": o.get("uid")} for o in meta.get("ownerReferences") or []],
        },
    }
    if body.get("kind") in ("StatefulSet", "Deployment"):
        component = (meta.get("labels") or {}).get(LABEL_COMPONENT)
        out["metadata"]["labels"] = {LABEL_COMPONENT: component} if component else {}
        out["spec"] = _pick(body.get("spec") or {}, "replicas")
        out["status"] = _pick(body.get("status") or {}, "readyReplicas")
    return out


def slim_pod(body: Mapping[str, Any]) -> dict[str, Any]:
    """Name and labels (drain selectors), IP and conditions (drain, router scrape), container states (crash loops)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _pick(meta, "name", "labels"),
        "status": _pick(status, "podIP", "conditions", "containerStatuses"),
    }


def slim_node(body: Mapping[str, Any]) -> dict[str, Any]:
    """What topology/nodes.py and the capacity check read (not images, heartbeats or addresses)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": _pick(meta, "name", "labels", "annotations"),
        "spec": _pick(body.get("spec") or {}, "taints", "unschedulable"),
        "status": _pick(body.get("status") or {}, "allocatable", "capacity"),
    }


def _instance_key(body: Mapping[str, Any]) -> InstanceKey | None:
    meta = body.get("metadata") or {}
    instance = (meta.get("labels") or {}).get(LABEL_INSTANCE)
    return (meta.get("namespace") or "", instance) if instance else None


def index_child(body: Mapping[str, Any]) -> dict[InstanceKey, dict[str, Any]]:
    """The children index's entry for an owned object: keyed by its instance ({} for none)."""
    key = _instance_key(body)
    return {key: slim_child(body)} if key else {}


def index_pod(body: Mapping[str, Any]) -> dict[InstanceKey, dict[str, Any]]:
    key = _instance_key(body)
    return {key: slim_pod(body)} if key else {}


def index_node(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {ALL_NODES: slim_node(body)}


def child_key(obj: Mapping[str, Any]) -> ChildKey:
    return (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


def _rv(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


@dataclass(frozen=True)
class _Written:
    obj: dict[str, Any] | None  # None: deleted by the operator
    replaced: frozenset[str | None]  # versions the index may still show that this write supersedes
    at: float


Index = Mapping[Any, Iterable[dict[str, Any]]]  # kopf.Index: key -> store of values


class ClusterView:
    """Children, pods and Nodes of the cluster; from kopf indexes when given, else by LIST.

    What it returns is read-only: with indexes, the objects are the index's own.
    """

    def __init__(
        self,
        kube: Lister,
        *,
        children: Index | None = None,
        pods: Index | None = None,
        nodes: Index | None = None,
        indexed_kinds: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.kube = kube
        self._children, self._pods, self._nodes = children, pods, nodes
        self._indexed_kinds = frozenset(indexed_kinds)
        self._written: dict[InstanceKey, dict[ChildKey, _Written]] = {}

    @property
    def indexed(self) -> bool:
        return self._children is not None

    async def children(
        self, namespace: str, name: str, uid: str, kinds: Iterable[tuple[str, str]]
    ) -> dict[ChildKey, dict[str, Any]]:
        """The objects of `kinds` labelled with this instance and owned by `uid`, by (apiVersion, kind, name)."""
        kinds = tuple(kinds)
        listed = tuple(k for k in kinds if self._children is None or k not in self._indexed_kinds)
        found: dict[ChildKey, dict[str, Any]] = {}
        if self._children is not None:
            wanted = set(kinds) - set(listed)
            index = {child_key(o): o for o in self._children.get((namespace, name), ())}  # type: ignore[attr-defined]
            mine = self._written.get((namespace, name), {})
            for key, written in self._settled(namespace, name).items():
                seen = index.get(key)
                if seen is None or _rv(seen) in written.replaced:
                    index.pop(key, None)
                    if written.obj is not None:
                        index[key] = written.obj
                elif _rv(seen) == _rv(written.obj):
                    mine.pop(key, None)  # the index shows this very write: nothing left to bridge
            found = {k: o for k, o in index.items() if k[:2] in wanted}
        if listed:
            lists = await asyncio.gather(
                *(self.kube.list(av, kind, namespace, instance_selector(name)) for av, kind in listed)
            )
            found.update({child_key(o): o for items in lists for o in items})
        owned = lambda o: any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])  # noqa: E731
        return {k: o for k, o in found.items() if owned(o)}

    async def pods(self, namespace: str, name: str, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The instance's pods, those carrying all of `labels` if given."""
        if self._pods is not None:
            pods = list(self._pods.get((namespace, name), ()))  # type: ignore[attr-defined]
        else:
            pods = await self.kube.list("v1", "Pod", namespace, instance_selector(name))
        want = dict(labels or {})
        return [p for p in pods if want.items() <= dict(p["metadata"].get("labels") or {}).items()]

    async def nodes(self) -> list[dict[str, Any]]:
        if self._nodes is not None:
            return sorted(self._nodes.get(ALL_NODES, ()), key=lambda n: n["metadata"].get("name", ""))  # type: ignore[attr-defined]
        return await self.kube.list_shared("v1", "Node")

    def wrote(self, namespace: str, name: str, before: Mapping[str, Any] | None, after: dict[str, Any] | None) -> None:
        """Record a write of one child (after None: deleted) so reads see it before the index does."""
        if not self.indexed:
            return
        obj = before if after is None else after
        assert obj is not None
        key = child_key(obj)
        if key[:2] not in self._indexed_kinds:
            return  # listed, so read fresh
        now = time.monotonic()
        self._prune(now)
        mine = self._written.setdefault((namespace, name), {})
        earlier = mine.get(key)
        replaced = frozenset({_rv(before)} | (earlier.replaced | {_rv(earlier.obj)} if earlier else set()))
        mine[key] = _Written(None if after is None else slim_child(after), replaced, now)

    def _settled(self, namespace: str, name: str) -> dict[ChildKey, _Written]:
        now = time.monotonic()
        return {k: w for k, w in self._written.get((namespace, name), {}).items() if now - w.at < SETTLE_SECONDS}

    def _prune(self, now: float) -> None:
        for instance in list(self._written):
            kept = {k: w for k, w in self._written[instance].items() if now - w.at < SETTLE_SECONDS}
            if kept:
                self._written[instance] = kept
            else:
                del self._written[instance]
