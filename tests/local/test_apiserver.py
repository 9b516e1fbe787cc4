"""The local API behaves like a real API server where the operator and tests rely on it."""

from __future__ import annotations

import json

import httpx
import pytest

from disaggserve.local.apiserver import serve_api

STS = "/apis/apps/v1/namespaces/default/statefulsets"
CM = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}


def sts(name: str, labels: dict[str, str] | None = None, **meta) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels or {}, **meta},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}}, "serviceName": name, "template": {}},
    }


@pytest.fixture
async def api():
    async with serve_api() as (server, url), httpx.AsyncClient(base_url=url) as client:
        client.server = server  # type: ignore[attr-defined]
        yield client


async def test_create_stamps_metadata_and_refuses_duplicates(api):
    r = await api.post(STS, json=sts("a"))
    assert r.status_code == 201
    meta = r.json()["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1 and meta["resourceVersion"]
    assert meta["namespace"] == "default"
    again = await api.post(STS, json=sts("a"))
    assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"


async def test_status_subresource_is_isolated_and_generation_follows_spec(api):
    await api.post(STS, json=sts("a"))
    r = await api.patch(f"{STS}/a", json={"spec": {"replicas": 3}, "status": {"readyReplicas": 9}}, headers=MERGE)
    body = r.json()
    assert body["spec"]["replicas"] == 3 and "status" not in body and body["metadata"]["generation"] == 2
    r = await api.patch(
        f"{STS}/a/status", json={"spec": {"replicas": 7}, "status": {"readyReplicas": 2}}, headers=MERGE
    )
    body = r.json()
    assert body["status"] == {"readyReplicas": 2} and body["spec"]["replicas"] == 3
    assert body["metadata"]["generation"] == 2


async def test_optimistic_concurrency(api):
    created = (await api.post(STS, json=sts("a"))).json()
    rv = created["metadata"]["resourceVersion"]
    await api.patch(f"{STS}/a", json={"spec": {"replicas": 2}}, headers=MERGE)
    stale = await api.patch(
        f"{STS}/a", json={"metadata": {"resourceVersion": rv}, "spec": {"replicas": 5}}, headers=MERGE
    )
    assert stale.status_code == 409
    failed_test = await api.patch(
        f"{STS}/a",
        json=[{"op": "test", "path": "/metadata/resourceVersion", "value": rv}],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert failed_test.status_code == 422
    put_without_rv = await api.put(f"{STS}/a", json=sts("a"))
    assert put_without_rv.status_code == 422
    put_stale = await api.put(f"{STS}/a", json={**sts("a"), "metadata": {"name": "a", "resourceVersion": rv}})
    assert put_stale.status_code == 409
    assert (await api.get(f"{STS}/a")).json()["spec"]["replicas"] == 2


async def test_label_and_field_selectors(api):
    await api.post(STS, json=sts("a", {"tier": "prefill", "app": "x"}))
    await api.post(STS, json=sts("b", {"tier": "decode", "app": "x"}))
    await api.post(STS, json=sts("c", {"tier": "router"}))

    async def names(selector: str, field: str | None = None) -> list[str]:
        params = {"labelSelector": selector}
        if field:
            params["fieldSelector"] = field
        return [o["metadata"]["name"] for o in (await api.get(STS, params=params)).json()["items"]]

    assert await names("tier=prefill") == ["a"]
    assert await names("tier!=prefill") == ["b", "c"]
    assert await names("tier in (prefill,decode)") == ["a", "b"]
    assert await names("tier notin (prefill,decode)") == ["c"]
    assert await names("app") == ["a", "b"]
    assert await names("!app") == ["c"]
    assert await names("app=x,tier=decode") == ["b"]
    assert await names("", "metadata.name=c") == ["c"]
    bad = await api.get(STS, params={"labelSelector": "a b c"})
    assert bad.status_code == 400


async def test_watch_resumes_from_resource_version(api):
    await api.post(STS, json=sts("a"))
    mark = (await api.get(STS)).json()["metadata"]["resourceVersion"]
    await api.patch(f"{STS}/a", json={"spec": {"replicas": 2}}, headers=MERGE)
    await api.post(STS, json=sts("b"))
    r = await api.get(STS, params={"watch": "true", "resourceVersion": mark, "timeoutSeconds": "1"})
    events = [json.loads(line) for line in r.text.splitlines() if line]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "a"), ("ADDED", "b")]
    fresh = await api.get(STS, params={"watch": "true", "timeoutSeconds": "1"})
    assert [json.loads(x)["type"] for x in fresh.text.splitlines()] == ["ADDED", "ADDED"]


async def test_watch_too_old_resource_version_is_gone(api):
    api.server._history_floor = 10  # as if older events had been compacted
    r = await api.get(STS, params={"watch": "true", "resourceVersion": "3", "timeoutSeconds": "1"})
    event = json.loads(r.text.splitlines()[0])
    assert event["type"] == "ERROR" and event["object"]["code"] == 410


async def test_owner_garbage_collection_and_orphans(api):
    owner = (await api.post(CM, json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o"}})).json()
    ref = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": owner["metadata"]["uid"]}]
    await api.post(STS, json=sts("child", ownerReferences=ref))
    await api.delete(f"{CM}/o")
    assert (await api.get(f"{STS}/child")).status_code == 404

    owner = (await api.post(CM, json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "o2"}})).json()
    ref = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o2", "uid": owner["metadata"]["uid"]}]
    await api.post(STS, json=sts("kept", ownerReferences=ref))
    await api.delete(f"{CM}/o2", params={"propagationPolicy": "Orphan"})
    assert (await api.get(f"{STS}/kept")).status_code == 200


async def test_finalizers_hold_deletion(api):
    await api.post(STS, json=sts("f", finalizers=["x/y"]))
    r = await api.delete(f"{STS}/f")
    assert r.status_code == 202
    held = (await api.get(f"{STS}/f")).json()
    assert held["metadata"]["deletionTimestamp"]
    await api.patch(f"{STS}/f", json={"metadata": {"finalizers": None}}, headers=MERGE)
    assert (await api.get(f"{STS}/f")).status_code == 404


async def test_server_side_apply_creates_then_merges(api):
    headers = {"Content-Type": "application/apply-patch+yaml"}
    params = {"fieldManager": "disaggserve", "force": "true"}
    r = await api.patch(f"{STS}/s", content=json.dumps(sts("s")), headers=headers, params=params)
    assert r.status_code == 201
    assert r.json()["metadata"]["managedFields"][0]["manager"] == "disaggserve"
    body = sts("s")
    body["spec"]["replicas"] = 4
    r = await api.patch(f"{STS}/s", content=json.dumps(body), headers=headers, params=params)
    assert r.status_code == 200 and r.json()["spec"]["replicas"] == 4
    unchanged = await api.patch(f"{STS}/s", content=json.dumps(body), headers=headers, params=params)
    assert unchanged.json()["metadata"]["resourceVersion"] == r.json()["metadata"]["resourceVersion"]


async def test_audit_and_faults(api):
    api.server.inject_fault(status=503, times=2, verbs={"list"}, resource="statefulsets")
    assert (await api.get(STS)).status_code == 503
    assert (await api.get(STS)).status_code == 503
    assert (await api.get(STS)).status_code == 200
    verbs = [(a.verb, a.group, a.resource) for a in api.server.audit]
    assert verbs == [("list", "apps", "statefulsets")] * 3


async def test_unknown_resource_is_404(api):
    r = await api.get("/apis/example.com/v1/namespaces/default/widgets")
    assert r.status_code == 404


async def test_kubectl_tables_use_printer_columns():
    import datetime

    from disaggserve.api.crd import build_crd
    from disaggserve.local.tables import human_age

    async with serve_api(crds=[build_crd()]) as (_, url), httpx.AsyncClient(base_url=url) as client:
        body = {
            "apiVersion": "disaggserve.io/v1alpha1",
            "kind": "DisaggServe",
            "metadata": {"name": "t"},
            "spec": {
                "model": {"name": "m", "source": {"builtin": "tiny-llama"}},
                "slo": {"ttftMs": 100, "tpotMs": 10},
                "workload": {"requestRate": 1, "inputTokens": 1, "outputTokens": 1},
            },
        }
        base = "/apis/disaggserve.io/v1alpha1/namespaces/default/disaggserves"
        await client.post(base, json=body)
        status = {
            "conditions": [{"type": "Ready", "status": "True", "reason": "R"}],
            "replicas": {"prefill": {"display": "1/2"}, "decode": {"display": "3/3"}},
            "slo": {"attainment": 0.93},
        }
        await client.patch(f"{base}/t/status", json={"status": status}, headers=MERGE)
        r = await client.get(base, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
        table = r.json()
        assert table["kind"] == "Table"
        names = [c["name"] for c in table["columnDefinitions"]]
        assert names[:6] == ["Name", "Ready", "Prefill", "Decode", "Attainment", "Age"]
        assert table["rows"][0]["cells"][:5] == ["t", "True", "1/2", "3/3", 0.93]
        assert table["rows"][0]["cells"][5].endswith("s")
        pods = await client.get("/api/v1/namespaces/default/pods", headers={"Accept": "application/json;as=Table"})
        assert [c["name"] for c in pods.json()["columnDefinitions"]] == [
            "Name",
            "Ready",
            "Status",
            "Restarts",
            "IP",
            "Node",
            "Age",
        ]
        core = (await client.get("/api/v1")).json()
        assert core["groupVersion"] == "v1"
    now = datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)
    assert human_age("2026-01-01T23:59:15Z", now) == "45s"
    assert human_age("2026-01-01T23:54:48Z", now) == "5m12s"
    assert human_age("2026-01-01T21:00:00Z", now) == "3h"
    assert human_age("2025-12-30T00:00:00Z", now) == "3d"


async def test_namespaces_are_served_as_a_cluster_scoped_resource(api):
    r = await api.get("/api/v1/namespaces")
    assert r.status_code == 200 and [n["metadata"]["name"] for n in r.json()["items"]] == ["default"]
    created = await api.post(
        "/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}
    )
    assert created.status_code == 201
    assert (await api.get("/api/v1/namespaces/team-a")).json()["metadata"]["name"] == "team-a"
    watch = await api.get("/api/v1/namespaces", params={"watch": "true", "timeoutSeconds": "1"})
    assert [json.loads(x)["object"]["metadata"]["name"] for x in watch.text.splitlines()] == ["default", "team-a"]
