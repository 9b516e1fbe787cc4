"""Invalid resources: refused by the schema (as a real API server would) or by the operator
with a Ready=False condition and a Warning Event; in both cases nothing is created."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from helpers import GROUP, condition, create, example, wait_for


def _set(body: dict, path: str, value: Any) -> dict:
    """Set (or with _DELETE remove) one field under spec; `a.b=1;c=2` paths set several fields."""
    body = copy.deepcopy(body)
    if ";" in path:
        for part, part_value in zip(path.split(";"), value, strict=True):
            body = _set(body, part, part_value)
        return body
    node = body["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return body


_DELETE = object()

# (case id, field path under spec, value, text the error must contain)
SCHEMA_CASES = [
    ("ttft-not-a-number", "slo.ttftMs", "fast", "spec.slo.ttftMs"),
    ("ttft-negative", "slo.ttftMs", -5, "spec.slo.ttftMs"),
    ("attainment-above-one", "slo.attainment", 1.5, "slo.attainment must be in (0, 1]"),
    ("attainment-zero", "slo.attainment", 0, "slo.attainment must be in (0, 1]"),
    ("missing-slo", "slo", _DELETE, "slo"),
    ("unknown-top-level-field", "replicas", 3, "spec.replicas"),
    ("unknown-nested-field", "model.source.url", "http://x", "spec.model.source.url"),
    ("two-model-sources", "model.source.path", "/models/x", "set exactly one of builtin, path or hf"),
    ("unknown-builtin-model", "model.source.builtin", "gpt-5", "spec.model.source.builtin"),
    ("pvc-without-path", "model.source.pvc", "models", "pvc is the volume that holds `path`"),
    ("model-name-with-spaces", "model.name", "my model", "spec.model.name"),
    ("gpu-product-from-nvidia-smi", "hardware", {"device": "gpu", "gpuProduct": "NVIDIA A100 80GB"}, "gpuProduct"),
    ("gpu-without-product", "hardware", {"device": "gpu"}, "hardware.gpuProduct is required"),
    ("unknown-device", "hardware.device", "tpu", "spec.hardware.device"),
    ("tensor-not-power-of-two", "parallelism.prefill.tensor", 3, "power of two"),
    ("tensor-too-large", "parallelism.decode.tensor", 16, "spec.parallelism.decode.tensor"),
    ("pipeline-zero", "parallelism.prefill.pipeline", 0, "spec.parallelism.prefill.pipeline"),
    ("tensor-parallel-on-a-cpu-worker", "parallelism.prefill.tensor", 2, "a CPU worker"),
    ("pipeline-parallel-on-a-cpu-worker", "parallelism.decode.pipeline", 2, "a CPU worker"),
    (
        "instance-larger-than-a-node",
        "hardware;parallelism.prefill.tensor",
        [{"device": "gpu", "gpuProduct": "NVIDIA-H100-80GB-HBM3", "gpusPerNode": 2}, 4],
        "must fit on one node",
    ),
    (
        "min-above-max-replicas",
        "autoscaling",
        {"minReplicas": {"prefill": 4, "decode": 1}, "maxReplicas": {"prefill": 2, "decode": 2}},
        "minReplicas.prefill must not exceed",
    ),
    ("zero-request-rate", "workload.requestRate", 0, "spec.workload.requestRate"),
    # Passed the old schema and froze the planner (issue 11 item 1); the minimum is now 1e-3.
    ("vanishing-request-rate", "workload.requestRate", 1e-300, "spec.workload.requestRate"),
    ("request-rate-above-maximum", "workload.requestRate", 1e6, "spec.workload.requestRate"),
    ("node-selector-value-with-space", "hardware.nodeSelector", {"pool": "gpu pool"}, "nodeSelector"),
    ("node-selector-value-too-long", "hardware.nodeSelector", {"pool": "x" * 64}, "nodeSelector"),
    ("toleration-value-invalid", "hardware.tolerations", [{"key": "k", "value": "a/b"}], "tolerations"),
    (
        "toleration-exists-with-value",
        "hardware.tolerations",
        [{"key": "k", "operator": "Exists", "value": "v"}],
        "operator Exists matches any value",
    ),
    ("toleration-key-invalid", "hardware.tolerations", [{"key": "-k", "operator": "Exists"}], "tolerations"),
    ("replicas-above-maximum", "parallelism.decode.replicas", 1001, "spec.parallelism.decode.replicas"),
    ("fractional-tokens", "workload.inputTokens", 1.5, "spec.workload.inputTokens"),
    ("draft-proposer-without-model", "speculation", {"mode": "adaptive", "proposer": "draft"}, "draftModel"),
    ("ngram-min-above-max", "speculation", {"ngramMin": 4, "ngramMax": 2}, "ngramMin must not exceed"),
    ("unknown-placement", "placement", "anywhere", "spec.placement"),
    ("bad-pull-policy", "image.pullPolicy", "Sometimes", "spec.image.pullPolicy"),
    ("zero-routers", "router.replicas", 0, "spec.router.replicas"),
    ("bad-prometheus-url", "autoscaling.metrics.prometheusUrl", "prometheus:9090", "prometheusUrl"),
]


@pytest.mark.parametrize(("path", "value", "expect"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES])
async def test_schema_refuses(apiserver, path, value, expect):
    body = _set(example(name="bad"), path, value)
    resp = await create(apiserver.url, body)
    assert resp.status_code == 422, resp.text
    status = resp.json()
    assert status["reason"] == "Invalid"
    assert expect in status["message"], status["message"]
    assert apiserver.get(GROUP, "disaggserves", "default", "bad") is None


@pytest.mark.parametrize(
    "name",
    ["a-name-that-is-far-too-long-for-its-pod-names", "1abc", "a.b", "Upper", "ends-with-dash-"],
)
async def test_schema_refuses_names_its_children_could_not_carry(apiserver, name):
    resp = await create(apiserver.url, example(name=name))
    assert resp.status_code == 422, resp.text
    assert "metadata.name" in resp.json()["message"], resp.json()["message"]


# Accepted by the schema, refused by the operator: (case id, body builder, condition reason)
def _bad_node_selector_key() -> dict:
    return _set(example(name="bad-selector-key"), "hardware.nodeSelector", {"-not/a key": "v"})


def _missing_profile() -> dict:
    return _set(example(name="no-profile"), "profile", {"configMapRef": {"name": "absent"}})


OPERATOR_CASES = [
    ("node-selector-key-invalid", _bad_node_selector_key, "InvalidSpec"),
    ("profile-configmap-missing", _missing_profile, "ProfileMissing"),
]


async def test_operator_refuses_with_condition_and_event_and_creates_nothing(apiserver, operator):
    for _, build, _ in OPERATOR_CASES:
        body = build()
        resp = await create(apiserver.url, body)
        assert resp.status_code == 201, resp.text
    for _, path, value, _ in SCHEMA_CASES:
        assert (await create(apiserver.url, _set(example(name="bad"), path, value))).status_code == 422
    for _, build, reason in OPERATOR_CASES:
        name = build()["metadata"]["name"]
        obj = lambda n=name: apiserver.get(GROUP, "disaggserves", "default", n)  # noqa: E731
        ready = await wait_for(lambda o=obj: condition(o(), "Ready"), message=f"{name} condition")
        assert ready["status"] == "False" and ready["reason"] == reason, ready
        assert obj()["status"]["phase"] == "Failed"
        assert ready["message"]
        await wait_for(
            lambda n=name, r=reason: [
                e
                for e in apiserver.list("", "events", "default")
                if e["involvedObject"]["name"] == n and e["reason"] == r and e["type"] == "Warning"
            ],
            message=f"{name} Warning event",
        )
    await asyncio.sleep(0.5)  # give a wrongly-behaving operator the chance to create something
    for group, plural in [("apps", "statefulsets"), ("apps", "deployments"), ("", "services"), ("", "configmaps")]:
        assert apiserver.list(group, plural, "default") == []


async def test_fixing_the_spec_recovers(apiserver, operator):
    await create(apiserver.url, _missing_profile())
    obj = lambda: apiserver.get(GROUP, "disaggserves", "default", "no-profile")  # noqa: E731
    await wait_for(lambda: (condition(obj(), "Ready") or {}).get("reason") == "ProfileMissing")
    from helpers import patch_spec

    await patch_spec(apiserver.url, "no-profile", {"profile": None})
    await wait_for(lambda: apiserver.get("apps", "statefulsets", "default", "no-profile-decode"), message="created")
    await wait_for(lambda: condition(obj(), "Planned")["status"] == "True")
