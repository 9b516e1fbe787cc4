"""The node agent's pure parts: which pods a workload wants and where they may run."""

from __future__ import annotations

import os

from disaggserve.api import parse_spec
from disaggserve.local.pods import (
    NodeView,
    cpu_threads,
    desired_pods,
    gpu_request,
    pod_manifest,
    resource_field_value,
    schedule,
)
from disaggserve.planner import plan_for
from disaggserve.resources import Owner, build_children
from helpers import example


def workloads(body: dict) -> dict[str, dict]:
    spec = parse_spec(body["spec"])
    objs = build_children(Owner(body["metadata"]["name"], "ns", "uid-1"), spec, plan_for(spec))
    out = {}
    for o in objs:
        if o["kind"] in ("StatefulSet", "Deployment"):
            o["metadata"]["uid"] = f"uid-{o['metadata']['name']}"
            out[o["metadata"]["name"]] = o
    return out


def gpu_body(placement: str) -> dict:
    body = example("opt", file="opt-13b-low-affinity.yaml")
    body["spec"]["placement"] = placement
    return body


def test_statefulset_and_deployment_pod_names_and_revisions():
    w = workloads(example())
    sts = w["tiny-prefill"]
    sts["spec"]["replicas"] = 3
    names = [p.name for p in desired_pods(sts)]
    assert names == ["tiny-prefill-0", "tiny-prefill-1", "tiny-prefill-2"]
    before = desired_pods(sts)[0].revision
    sts["spec"]["template"]["spec"]["containers"][0]["args"].append("--seed=1")
    assert desired_pods(sts)[0].revision != before
    (router,) = desired_pods(w["tiny-router"])
    assert router.name.startswith("tiny-router-") and router.owner_kind == "Deployment"
    manifest = pod_manifest(desired_pods(sts)[1], "local", "127.42.0.9")
    assert manifest["spec"]["nodeName"] == "local"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-tiny-prefill"
    assert manifest["metadata"]["labels"]["app.kubernetes.io/component"] == "prefill"


def node(name: str, gpus: int = 8, product: str = "NVIDIA-A100-SXM4-80GB") -> NodeView:
    return NodeView(name, {"kubernetes.io/hostname": name, "nvidia.com/gpu.product": product}, gpus)


def test_scheduler_respects_gpu_capacity_and_product():
    w = workloads(gpu_body("high-affinity"))
    prefill = w["opt-prefill"]["spec"]["template"]["spec"]  # 2 GPUs (tensor 2)
    assert gpu_request(prefill) == 2
    nodes = [node("a", gpus=2), node("b", gpus=4, product="NVIDIA-H100-80GB-HBM3")]
    assert schedule(prefill, nodes, []) == "a"
    placed = [("a", {}, prefill)]
    assert schedule(prefill, nodes, placed) is None, "a is full and b has the wrong GPU product"


def test_scheduler_spreads_and_keeps_units_together():
    w = workloads(gpu_body("low-affinity"))
    nodes = [node("a"), node("b")]
    placed: list = []
    where = {}
    for name in ["opt-u0-prefill", "opt-u1-prefill", "opt-u0-decode", "opt-u1-decode"]:
        tmpl = w[name]["spec"]["template"]
        chosen = schedule(tmpl["spec"], nodes, placed)
        placed.append((chosen, tmpl["metadata"]["labels"], tmpl["spec"]))
        where[name] = chosen
    assert where["opt-u0-prefill"] != where["opt-u1-prefill"], "spread when nothing ties pods together"
    assert where["opt-u0-decode"] == where["opt-u0-prefill"]
    assert where["opt-u1-decode"] == where["opt-u1-prefill"]


def test_cpu_threads_follow_the_cpu_request():
    spec = {"containers": [{"resources": {"requests": {"cpu": "1500m"}}}]}
    assert cpu_threads(spec) == 2
    assert cpu_threads({"containers": [{}]}) == 1


def test_resource_field_refs_resolve_as_the_kubelet_does():
    container = {"resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}}}
    assert resource_field_value(container, {"resource": "requests.cpu", "divisor": "1"}) == "2"  # rounded up
    assert resource_field_value(container, {"resource": "requests.cpu", "divisor": "500m"}) == "3"
    assert resource_field_value({}, {"resource": "limits.cpu"}) == str(os.cpu_count() or 1)  # node's cores
    assert resource_field_value(container, {"resource": "requests.memory"}) == ""
