"""The autoscaler plans from the resource's own profile (spec.profile.configMapRef), as the first
plan does: before, every recommendation for such a resource was refused ("ConfigMap ... was not
passed to the planner") and the autoscaler scaled on the SLO signals alone."""

from __future__ import annotations

from pathlib import Path

import httpx

from disaggserve.api import parse_spec
from disaggserve.api.plan import Plan
from disaggserve.autoscaling.policy import Counts
from disaggserve.controller.autoscaler import Autoscaler, _Tracked
from disaggserve.controller.kube import KubeError
from disaggserve.controller.planning import PlanService
from disaggserve.metrics import Observed
from disaggserve.metrics.scrape import ScrapeWindow
from helpers import OneRouter, autoscaled_tiny, router_metrics, step_twice

PROFILE = Path(__file__).resolve().parents[2] / "operator" / "disaggserve" / "data" / "profiles" / "tiny-llama-cpu.json"


class ProfileKube(OneRouter):
    """One ready router pod, and the ConfigMap `tiny-profile` (or none, or an API failure)."""

    def __init__(self, answer: str = "found"):
        self.answer = answer
        self.reads: list[tuple[str, str]] = []

    async def get(self, api_version, kind, namespace, name):
        self.reads.append((kind, name))
        if self.answer == "error":
            raise KubeError(500, "Internal Server Error")
        if self.answer == "missing" or name != "tiny-profile":
            return None
        return {"metadata": {"name": name}, "data": {"profile.json": PROFILE.read_text()}}


async def overload(kube: ProfileKube) -> dict:
    """Two ticks with 10 000 requests between the scrapes: far beyond one prefill and one decode."""
    served = iter([0, 10_000])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=router_metrics(next(served)))

    autoscaler = Autoscaler(kube, http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    try:
        patch = await step_twice(autoscaler, autoscaled_tiny("tiny-profile"))
    finally:
        await autoscaler.aclose()
    assert patch is not None and "plan" in patch, patch
    return patch["plan"]


async def test_the_autoscaler_plans_from_the_profile_configmap():
    kube = ProfileKube()
    plan = await overload(kube)
    assert ("ConfigMap", "tiny-profile") in kube.reads
    assert "(planner at " in plan["reason"], plan["reason"]  # a recommendation, not a refusal
    assert "planner:" not in plan["reason"]


async def test_a_missing_or_unreadable_profile_configmap_is_reported_not_raised():
    body = autoscaled_tiny("tiny-profile")
    spec, plan = parse_spec(body["spec"]), Plan.model_validate(body["status"]["plan"])
    observed = Observed(source="scrape", window_seconds=30, requests=60, request_rate=2.0,
                        mean_input_tokens=64, mean_output_tokens=32, attainment=1.0)
    for answer, says in (("missing", "ConfigMap 'tiny-profile' (spec.profile.configMapRef) does not exist"),
                         ("error", "the profile ConfigMap could not be read: 500: Internal Server Error")):
        autoscaler = Autoscaler(ProfileKube(answer), planner=PlanService(isolate=False))
        try:
            decision, text = await autoscaler._decide(spec, "default", plan, {}, observed,
                                                      _Tracked(ScrapeWindow(60, stale_after=90)), now=0.0)
        finally:
            await autoscaler.aclose()
        assert says in text, text
        assert decision.counts == Counts(1, 1)  # no recommendation: nothing changes on its account
