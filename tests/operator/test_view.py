"""The controller's view of the cluster (controller/view.py): kopf index entries, reads that cost
no LIST once the operator's indexes are given, and reads that see the operator's own writes
before the index does (so a reconcile right after another neither reports children twice nor
works from workloads older than the ones it wrote)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import httpx

from disaggserve.api.constants import API_VERSION, KIND
from disaggserve.controller import view as view_module
from disaggserve.controller.handlers import INDEXED_CHILD_KINDS
from disaggserve.controller.kube import KINDS, Kube
from disaggserve.controller.planning import PlanService
from disaggserve.controller.reconcile import OWNED_KINDS, reconcile, refresh_status
from disaggserve.controller.view import (
    ALL_NODES,
    ClusterView,
    index_child,
    index_node,
    index_pod,
)
from helpers import create, example, wait_for

NS, NAME, UID = "default", "tiny", "u-1"
LABELS = {"app.kubernetes.io/instance": NAME, "app.kubernetes.io/managed-by": "disaggserve"}


def statefulset(rv: str, replicas: int, uid: str = UID) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": "tiny-decode",
            "namespace": NS,
            "uid": "s",
            "resourceVersion": rv,
            "labels": {**LABELS, "app.kubernetes.io/component": "decode"},
            "ownerReferences": [{"uid": uid, "kind": "DisaggServe", "name": NAME}],
            "managedFields": [{"manager": "disaggserve"}],
        },
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "worker"}]}}},
        "status": {"readyReplicas": 1, "currentRevision": "abc"},
    }


class NoLists:
    """A Kube stand-in for reads that must come from the indexes."""

    async def list(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise AssertionError(f"LIST {args}")

    async def list_shared(self, *args: Any) -> list[dict[str, Any]]:
        raise AssertionError(f"LIST {args}")


def indexed(children: list[dict[str, Any]], pods: list[dict[str, Any]] = (), nodes: list[dict[str, Any]] = ()):
    """Indexes as kopf builds them from watch events: key -> the values of the objects with that key."""
    idx: dict[str, dict[Any, list]] = {
        "children": defaultdict(list),
        "pods": defaultdict(list),
        "nodes": defaultdict(list),
    }
    for which, fn, objs in (
        ("children", index_child, children),
        ("pods", index_pod, pods),
        ("nodes", index_node, nodes),
    ):
        for obj in objs:
            for key, value in fn(obj).items():
                idx[which][key].append(value)
    return idx


def view_of(idx: dict[str, Any], kube: Any = None, kinds: Any = OWNED_KINDS) -> ClusterView:
    return ClusterView(
        kube or NoLists(), children=idx["children"], pods=idx["pods"], nodes=idx["nodes"], indexed_kinds=kinds
    )


# What the operator reads from indexes, as the audit log names it; the other owned kinds a reconcile lists.
INDEXED_RESOURCES = {"statefulsets", "deployments", "pods", "nodes"}
assert {KINDS[k][0] for k in INDEXED_CHILD_KINDS} | {"pods", "nodes"} == INDEXED_RESOURCES
LISTED_PER_RECONCILE = len(OWNED_KINDS) - len(INDEXED_CHILD_KINDS)


def test_index_entries_are_keyed_by_instance_and_keep_only_what_the_controller_reads() -> None:
    sts = statefulset("7", 3)
    [(key, entry)] = index_child(sts).items()
    assert key == (NS, NAME)
    assert entry["metadata"] == {
        "name": "tiny-decode",
        "resourceVersion": "7",
        "ownerReferences": [{"uid": UID}],
        "labels": {"app.kubernetes.io/component": "decode"},
    }
    assert entry["spec"] == {"replicas": 3} and entry["status"] == {"readyReplicas": 1}
    assert "managedFields" not in entry["metadata"]
    assert index_child({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": NS}}) == {}

    pod = {
        "metadata": {"name": "tiny-decode-0", "namespace": NS, "labels": LABELS},
        "spec": {"containers": [{"name": "worker"}]},
        "status": {"podIP": "10.0.0.9", "containerStatuses": [{"restartCount": 2}], "hostIP": "10.1.0.1"},
    }
    [(key, entry)] = index_pod(pod).items()
    assert key == (NS, NAME)
    assert entry["status"] == {"podIP": "10.0.0.9", "containerStatuses": [{"restartCount": 2}]}
    assert "spec" not in entry

    node = {
        "metadata": {"name": "n1", "labels": {"nvidia.com/gpu.product": "H100"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}, "images": [{"names": ["big"]}]},
    }
    assert index_node(node) == {
        ALL_NODES: {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": node["metadata"],
            "spec": {},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}},
        }
    }


async def test_indexed_reads_filter_by_kind_owner_and_labels_without_listing() -> None:
    ours, theirs = statefulset("1", 2), statefulset("1", 2, uid="someone-else")
    theirs["metadata"]["name"] = "tiny-old"
    router_pod = {
        "metadata": {"name": "r", "namespace": NS, "labels": {**LABELS, "app.kubernetes.io/component": "router"}}
    }
    worker_pod = {
        "metadata": {"name": "w", "namespace": NS, "labels": {**LABELS, "app.kubernetes.io/component": "decode"}}
    }
    node_b, node_a = {"metadata": {"name": "b"}}, {"metadata": {"name": "a"}}
    view = view_of(indexed([ours, theirs], [router_pod, worker_pod], [node_b, node_a]))
    found = await view.children(NS, NAME, UID, OWNED_KINDS)
    assert list(found) == [("apps/v1", "StatefulSet", "tiny-decode")]
    assert await view.children(NS, NAME, UID, [("apps/v1", "Deployment")]) == {}
    assert await view.children(NS, "other", UID, OWNED_KINDS) == {}
    assert [p["metadata"]["name"] for p in await view.pods(NS, NAME, {"app.kubernetes.io/component": "router"})] == [
        "r"
    ]
    assert len(await view.pods(NS, NAME)) == 2
    assert [n["metadata"]["name"] for n in await view.nodes()] == ["a", "b"]  # stable order: stable plan keys


async def test_own_writes_are_read_until_the_index_shows_a_change_to_them(monkeypatch) -> None:
    key = ("apps/v1", "StatefulSet", "tiny-decode")
    idx = indexed([])
    view = view_of(idx)

    # Created, not indexed yet: it exists as written.
    view.wrote(NS, NAME, None, statefulset("1", 2))
    assert (await view.children(NS, NAME, UID, OWNED_KINDS))[key]["spec"]["replicas"] == 2

    # The index catches up; then the operator scales and the index still shows the version it replaced.
    idx["children"][(NS, NAME)] = [index_child(statefulset("1", 2))[(NS, NAME)]]
    view.wrote(NS, NAME, statefulset("1", 2), statefulset("2", 4))
    assert (await view.children(NS, NAME, UID, OWNED_KINDS))[key]["spec"]["replicas"] == 4

    # A second write before the index saw the first: neither older version is read.
    view.wrote(NS, NAME, statefulset("2", 4), statefulset("3", 5))
    idx["children"][(NS, NAME)] = [index_child(statefulset("2", 4))[(NS, NAME)]]
    assert (await view.children(NS, NAME, UID, OWNED_KINDS))[key]["spec"]["replicas"] == 5

    # The index shows a newer version (the StatefulSet controller wrote its status): the index wins.
    idx["children"][(NS, NAME)] = [index_child(statefulset("9", 5))[(NS, NAME)]]
    assert (await view.children(NS, NAME, UID, OWNED_KINDS))[key]["metadata"]["resourceVersion"] == "9"

    # Deleted by the operator, still indexed: gone.
    view.wrote(NS, NAME, statefulset("9", 5), None)
    assert await view.children(NS, NAME, UID, OWNED_KINDS) == {}

    # What the operator wrote is trusted for a bounded time only; then the index is the truth.
    later = view_module.time.monotonic() + view_module.SETTLE_SECONDS + 1
    monkeypatch.setattr(view_module.time, "monotonic", lambda: later)
    assert list(await view.children(NS, NAME, UID, OWNED_KINDS)) == [key]


async def test_without_indexes_the_view_lists_and_ignores_writes() -> None:
    class Lists:
        calls: list[tuple] = []

        async def list(self, *args: Any) -> list[dict[str, Any]]:
            self.calls.append(args)
            return [statefulset("1", 2)] if args[1] == "StatefulSet" else []

    kube = Lists()
    view = ClusterView(kube)  # type: ignore[arg-type]
    view.wrote(NS, NAME, None, statefulset("5", 7))
    found = await view.children(NS, NAME, UID, [("apps/v1", "StatefulSet"), ("v1", "Service")])
    assert [o["spec"]["replicas"] for o in found.values()] == [2]
    assert [c[:2] for c in kube.calls] == [("apps/v1", "StatefulSet"), ("v1", "Service")]


async def test_reconciles_with_indexes_list_only_unindexed_kinds_and_see_their_own_writes(apiserver) -> None:
    """Against the local API server, with the operator's indexes as kopf fills them: first still
    empty (the watch has not delivered the new children yet), then caught up. A reconcile lists
    only the owned kinds that are not indexed, a status refresh nothing, and no reconcile reports
    a child as created twice or works from workloads older than it wrote."""
    assert (await create(apiserver.url, example(name=NAME))).status_code == 201
    kube, planner = Kube(), PlanService(isolate=False)
    events: list[tuple[str, str]] = []

    def emit(type_: str, reason: str, message: str) -> None:
        events.append((reason, message))

    async def reconcile_once(view: ClusterView) -> dict[str, Any]:
        events.clear()
        owner = await kube.get(API_VERSION, KIND, NS, NAME)
        result = await reconcile(kube, owner, emit, planner, view=view)
        await kube.patch_status(API_VERSION, KIND, NS, NAME, result.status)
        await refresh_status(kube, NS, NAME, emit, owner=await kube.get(API_VERSION, KIND, NS, NAME), view=view)
        return result.status

    try:
        audit_before = len(apiserver.audit)
        stale = view_of(indexed([]), kube, INDEXED_CHILD_KINDS)
        first = await reconcile_once(stale)
        assert len([e for e in events if e[0] == "Created"]) == 14
        again = await reconcile_once(stale)  # the index has still not seen any child
        assert not [e for e in events if e[0] in ("Created", "Deleted")], events
        assert again["replicas"] == first["replicas"]

        children = [
            {"apiVersion": av, "kind": kind, **obj}
            for av, kind in OWNED_KINDS
            for obj in apiserver.list(av.rpartition("/")[0], KINDS[(av, kind)][0], NS)
        ]
        assert len(children) == 13  # all but the token Secret, which is read by name
        caught_up = await reconcile_once(view_of(indexed(children), kube, INDEXED_CHILD_KINDS))
        assert not [e for e in events if e[0] in ("Created", "Deleted")], events
        assert caught_up["replicas"] == first["replicas"]

        calls = apiserver.audit[audit_before:]
        lists = [c.resource for c in calls if c.verb == "list"]
        assert not INDEXED_RESOURCES & set(lists), lists
        assert len(lists) == 3 * LISTED_PER_RECONCILE, lists  # refresh_status listed nothing
        assert [c.verb for c in calls].count("patch") >= 3 * 14  # every child applied each time
    finally:
        await kube.aclose()
        await planner.aclose()


async def test_the_running_operator_lists_only_unindexed_kinds_and_follows_readiness_without_listing(
    apiserver, operator
) -> None:
    """The real operator: once it has started (its watches listed once), creating a resource lists
    only the owned kinds that are not indexed, its workloads turning ready cost no LIST at all, and
    each child is reported created once."""

    def status(name: str) -> dict[str, Any]:
        return (apiserver.get("disaggserve.io", "disaggserves", NS, name) or {}).get("status") or {}

    assert (await create(apiserver.url, example(name="first"))).status_code == 201
    await wait_for(lambda: status("first").get("plan"), message="the first resource planned")
    mark = len(apiserver.audit)
    assert (await create(apiserver.url, example(name=NAME))).status_code == 201
    await wait_for(lambda: status(NAME).get("plan"), message="the second resource planned")
    lists = [a.resource for a in apiserver.audit[mark:] if a.verb == "list"]
    assert not INDEXED_RESOURCES & set(lists), lists
    assert lists and len(lists) % LISTED_PER_RECONCILE == 0, lists  # one reconcile (or a retried one)
    mark = len(apiserver.audit)
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        for plural, name in (
            ("statefulsets", "tiny-prefill"),
            ("statefulsets", "tiny-decode"),
            ("deployments", "tiny-router"),
        ):
            r = await client.patch(
                f"/apis/apps/v1/namespaces/{NS}/{plural}/{name}/status",
                json={"status": {"readyReplicas": 1}},
                headers={"Content-Type": "application/merge-patch+json"},
            )
            assert r.status_code == 200, r.text
    await wait_for(lambda: status(NAME).get("phase") == "Ready", message="Ready from the workloads' status")
    lists = [a for a in apiserver.audit[mark:] if a.verb == "list"]
    assert lists == []

    def created() -> list[str]:
        return [
            e["message"]
            for e in apiserver.list("", "events", NS)
            if e.get("reason") == "Created" and e["involvedObject"]["name"] == NAME
        ]

    await wait_for(lambda: len(created()) >= 14, message="a Created event per child")
    await asyncio.sleep(1)  # events are posted in the background: any duplicate would be there by now
    assert sorted(created()) == sorted(set(created())), created()
