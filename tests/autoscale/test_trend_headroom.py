"""The autoscaler plans ahead of a rising rate (issue 14): each decision feeds the measured rate to
its policy and asks the planner for the rate one interval ahead on the trend, not a fixed margin."""

from __future__ import annotations

import re

import pytest

from disaggserve.api import parse_spec
from disaggserve.api.plan import Plan
from disaggserve.controller.autoscaler import Autoscaler, _Tracked
from disaggserve.controller.planning import PlanService
from disaggserve.metrics import Observed
from disaggserve.metrics.scrape import ScrapeWindow
from disaggserve.planner.replan import headroom
from helpers import example


class _SpyPlanner(PlanService):
    """The real planner, in-process, recording the growth each recommendation was asked with."""

    def __init__(self) -> None:
        super().__init__(isolate=False)
        self.growths: list[float | None] = []

    async def run(self, key, fn, *args, **kwargs):
        self.growths.append(kwargs.get("growth"))
        return await super().run(key, fn, *args, **kwargs)


def _observed(rate: float) -> Observed:
    return Observed(source="scrape", window_seconds=30, requests=rate * 30, request_rate=rate,
                    mean_input_tokens=512, mean_output_tokens=64, attainment=1.0)


@pytest.mark.parametrize("rates", [(2.0, 4.0, 4.0), (4.0, 2.0, 2.0)])
async def test_each_decision_plans_for_the_rate_one_interval_ahead(rates):
    body = example()
    body["spec"]["autoscaling"] = {"enabled": True, "intervalSeconds": 30}
    spec = parse_spec(body["spec"])
    plan = Plan.model_validate({"prefill": {"tensor": 1, "replicas": 1}, "decode": {"tensor": 1, "replicas": 1}})
    planner = _SpyPlanner()
    autoscaler = Autoscaler(kube=None, planner=planner)  # no profile ConfigMap: _decide reads no API
    tracked = _Tracked(ScrapeWindow(60, stale_after=90))
    planned = []
    try:
        for tick, rate in enumerate(rates):
            _, text = await autoscaler._decide(spec, "default", plan, {}, _observed(rate), tracked, now=30.0 * tick)
            planned.append(float(re.search(r"planner at ([\d.e+]+) rps", text).group(1)))
    finally:
        await autoscaler.aclose()
    growths = [None, rates[1] / rates[0], rates[2] / rates[1]]
    assert planner.growths == growths
    for rate, growth, got in zip(rates, growths, planned, strict=True):
        assert got == pytest.approx(rate * headroom(growth), rel=5e-3)  # "3 significant digits" in the text
    if rates[1] > rates[0]:
        assert planned[1] / rates[1] > planned[2] / rates[2]  # more headroom while rising than when flat
