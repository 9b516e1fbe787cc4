"""Re-planning replica counts for measured traffic with the planner (shapes kept as deployed)."""

from __future__ import annotations

import pytest

from disaggserve.api import parse_spec
from disaggserve.api.plan import PhasePlan, Plan, Prediction
from disaggserve.metrics import Observed
from disaggserve.planner import PlanningError
from disaggserve.planner.replan import measured_spec, recommend
from helpers import example


def tiny_spec():
    body = example()
    del body["spec"]["parallelism"]
    return parse_spec(body["spec"])


def deployed(prefill: int = 1, decode: int = 1, placement: str = "high-affinity", units: int = 1) -> Plan:
    return Plan(
        placement=placement,
        prefill=PhasePlan(tensor=1, pipeline=1, replicas=prefill),
        decode=PhasePlan(tensor=1, pipeline=1, replicas=decode),
        units=units,
        source="planner",
        predicted=Prediction(ttft_p90_ms=40, tpot_p90_ms=10, attainment=0.95),
    )


def observed(rate: float, ttft: float = 40, tpot: float = 10) -> Observed:
    return Observed(source="scrape", window_seconds=60, requests=rate * 60, request_rate=rate,
                    mean_input_tokens=64, mean_output_tokens=32, ttft_p90_ms=ttft, tpot_p90_ms=tpot, attainment=0.9)


def test_more_traffic_needs_more_instances_of_the_same_shapes():
    spec = tiny_spec()
    low = recommend(spec, deployed(), observed(1))
    high = recommend(spec, deployed(), observed(200))
    assert (high.prefill + high.decode) > (low.prefill + low.decode)
    assert high.predicted_attainment >= 0.85


def test_a_slower_than_predicted_system_gets_more_capacity():
    spec = tiny_spec()
    as_predicted = recommend(spec, deployed(), observed(50), correct=False)
    slower = recommend(spec, deployed(), observed(50, ttft=5000, tpot=500))
    assert slower.correction == (4.0, 4.0), "clamped measured/predicted ratios"
    assert slower.prefill + slower.decode > as_predicted.prefill + as_predicted.decode
    assert "measured" in slower.profile_source


def test_corrections_compare_with_the_current_deployment_at_the_measured_rate():
    spec = tiny_spec()
    faster = recommend(spec, deployed(), observed(5, ttft=0.001, tpot=0.0001))
    assert faster.correction == (0.5, 0.5)
    quiet = recommend(spec, deployed(), observed(5, ttft=200, tpot=50)).correction
    busy = recommend(spec, deployed(), observed(200, ttft=200, tpot=50)).correction
    assert busy[0] <= quiet[0] and busy[1] <= quiet[1] and busy != quiet, (
        "the same latencies under more load are less of a surprise: load alone is not a profile error"
    )
    spec = measured_spec(tiny_spec(), observed(0.0))
    assert spec.workload.request_rate > 0 and spec.workload.input_tokens == 64


def test_low_affinity_recommends_whole_units():
    spec = tiny_spec()
    rec = recommend(spec, deployed(2, 2, "low-affinity", units=2), observed(150))
    assert rec.prefill == rec.decode, "one prefill and one decode per unit"


def test_impossible_slos_say_so():
    body = example()
    del body["spec"]["parallelism"]
    body["spec"]["slo"] = {"ttftMs": 0.01, "tpotMs": 0.001}
    with pytest.raises(PlanningError):
        recommend(parse_spec(body["spec"]), deployed(), observed(1))


def test_the_correction_compares_medians_so_a_jittery_tail_is_not_read_as_a_slow_profile():
    spec = tiny_spec()
    as_predicted = recommend(spec, deployed(), observed(5), correct=False)
    base = observed(5, ttft=5000, tpot=500)  # p90s far above any prediction: stalls in the tail
    p90_only = recommend(spec, deployed(), base).correction
    medians = base.model_copy(update={"ttft_p50_ms": 1e-9, "tpot_p50_ms": 1e-9})
    assert p90_only == (4.0, 4.0)
    assert recommend(spec, deployed(), medians).correction == (0.5, 0.5), "the medians decide when present"
    assert as_predicted.correction == (1.0, 1.0)
