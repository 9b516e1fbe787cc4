"""The real kopf operator against the local API: create, update, readiness, drift, delete."""

from __future__ import annotations

import httpx

from helpers import GROUP, condition, create, delete, example, patch_spec, wait_for

NS = "default"
STS_PATH = "/apis/apps/v1/namespaces/default/statefulsets"
DEPLOY_PATH = "/apis/apps/v1/namespaces/default/deployments"
MERGE = {"Content-Type": "application/merge-patch+json"}


def cr(api, name="tiny"):
    return api.get(GROUP, "disaggserves", NS, name)


def children(api, name="tiny"):
    out = {}
    for group, plural in [
        ("", "configmaps"),
        ("", "services"),
        ("", "serviceaccounts"),
        ("apps", "statefulsets"),
        ("apps", "deployments"),
        ("policy", "poddisruptionbudgets"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("", "secrets"),
        ("networking.k8s.io", "networkpolicies"),
    ]:
        for obj in api.list(group, plural, NS, f"app.kubernetes.io/instance={name}"):
            out[(obj["kind"], obj["metadata"]["name"])] = obj
    return out


def events(api, reason: str | None = None) -> list[dict]:
    return [e for e in api.list("", "events", NS) if reason is None or e.get("reason") == reason]


async def set_ready(api, name: str, ready: int, kind_path: str = STS_PATH) -> None:
    async with httpx.AsyncClient(base_url=api.url) as client:
        r = await client.patch(f"{kind_path}/{name}/status", json={"status": {"readyReplicas": ready}}, headers=MERGE)
        assert r.status_code == 200, r.text


async def test_create_builds_children_with_owner_references_and_status(apiserver, operator):
    resp = await create(apiserver.url, example())
    assert resp.status_code == 201, resp.text
    uid = resp.json()["metadata"]["uid"]
    await wait_for(lambda: len(children(apiserver)) == 14, message="all 14 children")
    for obj in children(apiserver).values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
        assert obj["metadata"]["managedFields"][0]["manager"] == "disaggserve"
    status = await wait_for(lambda: (cr(apiserver).get("status") or {}).get("plan") and cr(apiserver)["status"])
    assert status["observedGeneration"] == 1
    assert status["plan"]["source"] == "manual"
    assert status["replicas"]["prefill"] == {"desired": 1, "ready": 0, "display": "0/1"}
    assert status["endpoint"] == "http://tiny-router.default.svc:8000/v1"
    assert condition(cr(apiserver), "Planned")["status"] == "True"
    assert condition(cr(apiserver), "Ready")["status"] == "False"
    await wait_for(lambda: len(events(apiserver, "Created")) == 14, message="a Created event per child")


async def test_readiness_follows_the_workloads(apiserver, operator):
    await create(apiserver.url, example())
    await wait_for(lambda: len(children(apiserver)) == 14)
    await set_ready(apiserver, "tiny-prefill", 1)
    await set_ready(apiserver, "tiny-decode", 1)
    await set_ready(apiserver, "tiny-router", 1, DEPLOY_PATH)
    await wait_for(lambda: (condition(cr(apiserver), "Ready") or {}).get("status") == "True", message="Ready")
    assert cr(apiserver)["status"]["phase"] == "Ready"
    assert cr(apiserver)["status"]["replicas"]["decode"]["display"] == "1/1"
    await set_ready(apiserver, "tiny-decode", 0)
    await wait_for(lambda: cr(apiserver)["status"]["phase"] == "Degraded", message="Degraded")
    assert condition(cr(apiserver), "Degraded")["status"] == "True"
    assert "decode 0/1" in condition(cr(apiserver), "Ready")["message"]


async def test_spec_change_patches_children_in_place(apiserver, operator):
    await create(apiserver.url, example())
    await wait_for(lambda: len(children(apiserver)) == 14)
    before = children(apiserver)
    r = await patch_spec(apiserver.url, "tiny", {"parallelism": {"decode": {"replicas": 3}}, "slo": {"tpotMs": 80}})
    assert r.status_code == 200, r.text
    sts = lambda: apiserver.get("apps", "statefulsets", NS, "tiny-decode")  # noqa: E731
    await wait_for(lambda: sts()["spec"]["replicas"] == 3, message="decode scaled to 3")
    after = children(apiserver)
    assert {k: v["metadata"]["uid"] for k, v in after.items()} == {k: v["metadata"]["uid"] for k, v in before.items()}
    args = sts()["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--tpot-slo-ms" not in args  # SLOs are judged by the router and the autoscaler, not workers
    await wait_for(lambda: cr(apiserver)["status"].get("observedGeneration") == 2)
    assert cr(apiserver)["status"]["replicas"]["decode"]["desired"] == 3
    await wait_for(lambda: any("tiny-decode" in e["message"] for e in events(apiserver, "Updated")))
    # The worker token is made once: a reconcile reads it back instead of rotating it.
    token = lambda: apiserver.get("", "secrets", NS, "tiny-worker-token")["data"]["token"]  # noqa: E731
    assert token() == before[("Secret", "tiny-worker-token")]["data"]["token"]
    assert not any("tiny-worker-token" in e["message"] for e in events(apiserver, "Updated"))


async def test_placement_change_replaces_workloads_and_removes_the_old_ones(apiserver, operator):
    body = example()
    body["spec"]["parallelism"]["prefill"]["replicas"] = 2
    body["spec"]["parallelism"]["decode"]["replicas"] = 2
    await create(apiserver.url, body)
    await wait_for(lambda: ("StatefulSet", "tiny-prefill") in children(apiserver))
    await patch_spec(apiserver.url, "tiny", {"placement": "low-affinity"})
    want = {("StatefulSet", f"tiny-u{u}-{p}") for u in (0, 1) for p in ("prefill", "decode")}
    await wait_for(
        lambda: {k for k in children(apiserver) if k[0] == "StatefulSet"} == want, message="unit StatefulSets only"
    )
    await wait_for(lambda: events(apiserver, "Deleted"), message="Deleted events")


async def test_drift_is_repaired(apiserver, operator):
    await create(apiserver.url, example())
    await wait_for(lambda: len(children(apiserver)) == 14)
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        await client.patch(f"{STS_PATH}/tiny-prefill", json={"spec": {"replicas": 7}}, headers=MERGE)
        await client.delete(f"{STS_PATH}/tiny-decode")
    await wait_for(lambda: apiserver.get("apps", "statefulsets", NS, "tiny-decode"), message="decode recreated")
    await wait_for(
        lambda: apiserver.get("apps", "statefulsets", NS, "tiny-prefill")["spec"]["replicas"] == 1,
        message="prefill replicas restored",
    )


async def test_delete_removes_every_child(apiserver, operator):
    await create(apiserver.url, example())
    await wait_for(lambda: len(children(apiserver)) == 14)
    resp = await delete(apiserver.url, "tiny")
    assert resp.status_code in (200, 202)
    await wait_for(lambda: cr(apiserver) is None, message="resource gone (finalizer released)")
    await wait_for(lambda: children(apiserver) == {}, message="children garbage-collected")


async def test_gpu_tensor_parallel_is_deployed_with_tensor_x_pipeline_gpus(apiserver, operator):
    body = example(name="tp-gpu", file="opt-13b-low-affinity.yaml")
    body["spec"]["parallelism"]["decode"].update(tensor=2, pipeline=2)
    assert (await create(apiserver.url, body)).status_code == 201
    decode = await wait_for(
        lambda: apiserver.get("apps", "statefulsets", NS, "tp-gpu-u0-decode"), message="decode created"
    )
    container = decode["spec"]["template"]["spec"]["containers"][0]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "4"
    args = container["args"]
    assert args[args.index("--tensor-parallel") + 1] == "2"
    assert args[args.index("--pipeline-parallel") + 1] == "2"
