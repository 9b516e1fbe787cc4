"""The autoscaler scales a colocated plan: its colocated instances follow the measured load,
within the colocated bounds, and the prefill/decode counts (0) are left alone."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from disaggserve.api.spec import parse_spec
from disaggserve.controller.autoscaler import Autoscaler
from disaggserve.planner import plan_for
from helpers import OneRouter, router_metrics, step_twice

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama-3-8b-h100.yaml"


def colocated_resource(max_colocated: int) -> dict:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(namespace="default", uid="u")
    body["spec"].pop("speculation", None)
    body["spec"]["autoscaling"] = {
        "enabled": True,
        "intervalSeconds": 5,
        "maxReplicas": {"prefill": 4, "decode": 4, "colocated": max_colocated},
    }
    plan = plan_for(parse_spec(body["spec"]))
    assert plan.placement == "colocated", plan.reason  # the example's traffic fits one colocated GPU
    plan = plan.model_copy(update={"colocated": plan.colocated.model_copy(update={"replicas": 1})})
    body["status"] = {"plan": plan.wire(), "phase": "Ready", "replicas": {"colocated": {"desired": 1, "ready": 1}}}
    return body


async def test_overload_adds_colocated_instances_within_their_bound():
    # 10 000 more requests between two scrapes milliseconds apart: far beyond one instance.
    served = iter([0, 10_000])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=router_metrics(next(served)))

    autoscaler = Autoscaler(OneRouter(), http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    try:
        patch = await step_twice(autoscaler, colocated_resource(max_colocated=3))
    finally:
        await autoscaler.aclose()
    assert patch is not None and "plan" in patch, patch
    plan = patch["plan"]
    assert plan["placement"] == "colocated" and plan["source"] == "autoscaler"
    assert plan["colocated"]["replicas"] == 3  # wanted more: held to maxReplicas.colocated
    assert plan["prefill"]["replicas"] == 0 and plan["decode"]["replicas"] == 0
    assert "1 colocated -> 3 colocated" in plan["reason"]
    limited = next(c for c in patch["conditions"] if c["type"] == "ScalingLimited")
    assert limited["status"] == "True" and "min/max replicas" in limited["message"]
