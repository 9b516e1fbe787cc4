"""spec.gateway renders an InferencePool that the Gateway API Inference Extension's own v1 CRD
accepts, selecting exactly the pods that answer clients."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from disaggserve.api import parse_spec
from disaggserve.api.crd import build_crd
from disaggserve.planner import plan_for
from disaggserve.resources import Owner, RenderError, build_children
from disaggserve.resources import gateway as gateway_module
from helpers import example

VENDOR = Path(gateway_module.__file__).resolve().parent.parent / "data" / "vendor" / "gateway-api-inference-extension"
CRD = yaml.safe_load((VENDOR / "inference.networking.k8s.io_inferencepools.yaml").read_text())


def _schema() -> dict[str, Any]:
    [version] = [v for v in CRD["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]

    def strip(node: Any) -> Any:  # jsonschema knows no x-kubernetes-* (the CEL rules are checked below)
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    schema = strip(version["schema"]["openAPIV3Schema"])
    schema["additionalProperties"] = False  # what a strict API server (fieldValidation=Strict) refuses
    schema["properties"]["spec"]["additionalProperties"] = False
    return schema


def _cel_rules_of_v1(pool: dict[str, Any]) -> None:
    """The two CEL rules of the v1 schema, written out (jsonschema cannot run CEL)."""
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref, "port is required when kind is 'Service'"
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "port number must be unique"


def _children(gateway: dict[str, Any] | None, name: str = "tiny") -> list[dict[str, Any]]:
    body = example(name)
    if gateway is not None:
        body["spec"]["gateway"] = copy.deepcopy(gateway)
    spec = parse_spec(body["spec"])
    return build_children(Owner(name, "ns", "uid-1"), spec, plan_for(spec))


def _pool(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [pool] = [o for o in objects if o["kind"] == "InferencePool"]
    return pool


def _pods_selected(objects: list[dict[str, Any]], selector: dict[str, str]) -> list[str]:
    chosen = []
    for obj in objects:
        if obj["kind"] in ("StatefulSet", "Deployment"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            if all(labels.get(k) == v for k, v in selector.items()):
                chosen.append(obj["metadata"]["name"])
    return chosen


def test_no_gateway_no_pool() -> None:
    assert not [o for o in _children(None) if o["kind"] == "InferencePool"]


@pytest.mark.parametrize("gateway", [{}, {"picker": "disaggserve", "endpointPicker": {
    "name": "shared-epp", "port": 9100, "failureMode": "FailOpen"}}])
def test_pool_validates_against_the_vendored_v1_crd_and_selects_the_routers(gateway: dict[str, Any]) -> None:
    objects = _children(gateway)
    pool = _pool(objects)
    jsonschema.validate(pool, _schema())
    _cel_rules_of_v1(pool)
    assert pool["apiVersion"] == f"{CRD['spec']['group']}/v1" and pool["kind"] == CRD["spec"]["names"]["kind"]
    assert pool["metadata"]["ownerReferences"][0]["name"] == "tiny", "deleted with its DisaggServe"
    assert _pods_selected(objects, pool["spec"]["selector"]["matchLabels"]) == ["tiny-router"]
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    ref = pool["spec"]["endpointPickerRef"]
    if gateway:
        assert ref == {"kind": "Service", "name": "shared-epp", "port": {"number": 9100}, "failureMode": "FailOpen"}
    else:
        assert ref == {"kind": "Service", "name": "tiny-epp", "port": {"number": 9002}, "failureMode": "FailClose"}


def test_llm_d_picker_selects_the_decode_pods_of_a_vllm_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_module, "engine_kind", lambda spec: "vllm")
    objects = _children({"picker": "llm-d"})
    pool = _pool(objects)
    jsonschema.validate(pool, _schema())
    _cel_rules_of_v1(pool)
    assert _pods_selected(objects, pool["spec"]["selector"]["matchLabels"]) == ["tiny-decode"]
    assert pool["spec"]["targetPorts"] == [{"number": 8100}]


def test_llm_d_picker_on_the_builtin_engine_is_refused_with_the_fix() -> None:
    with pytest.raises(RenderError, match=r"engine\.kind to vllm, or use picker disaggserve"):
        _children({"picker": "llm-d"})


def test_schema_refuses_a_bad_gateway() -> None:
    crd = build_crd()
    gw = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["gateway"]
    assert gw["properties"]["picker"]["enum"] == ["disaggserve", "llm-d"]
    with pytest.raises(ValueError, match="picker"):
        parse_spec({**example()["spec"], "gateway": {"picker": "nginx"}})
    with pytest.raises(ValueError, match="port"):
        parse_spec({**example()["spec"], "gateway": {"endpointPicker": {"name": "epp", "port": 0}}})


def test_a_broken_pool_fails_the_vendored_schema() -> None:
    """The check can fail: a pool without targetPorts or with an unknown field is refused."""
    pool = _pool(_children({}))
    for broken in ({**pool, "spec": {k: v for k, v in pool["spec"].items() if k != "targetPorts"}},
                   {**pool, "spec": {**pool["spec"], "targetPort": 8000}},
                   {**pool, "spec": {**pool["spec"], "targetPorts": [{"number": 70000}]}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, _schema())
