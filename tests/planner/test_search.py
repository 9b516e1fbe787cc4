"""The placement search: known-best configurations by construction, pruning loses nothing."""

from __future__ import annotations

import math

import pytest

from conftest import coeffs, entry, spec_dict
from disaggserve.api.spec import parse_spec
from disaggserve.planner import plan_for
from disaggserve.planner.profile import builtin_profiles
from disaggserve.planner.search import HardwareView, Searcher, Shape, Slo
from disaggserve.planner.workload import LengthDistribution, WorkloadModel, sample_requests

# One layer (pipeline 1 only). Prefill: tensor 2 is super-linear (4× faster on 2 GPUs),
# tensor 4 barely faster. Decode: every tensor size takes the same step time, so tensor 1 wins
# per GPU. Memory never binds (a tiny model).
CONSTRUCTED = {
    "model": "synthetic",
    "gpu": "TEST-GPU",
    "source": "constructed for tests",
    "stage_overhead_ms": 0.0,
    "model_facts": {
        "layers": 1,
        "attention_heads": 8,
        "kv_heads": 8,
        "hidden_size": 64,
        "parameters": 1000,
        "dtype_bytes": 2,
    },
    "entries": [
        entry(1, coeffs(20, 0.2), coeffs(2, 0, 0.01)),
        entry(2, coeffs(4, 0.06), coeffs(2, 0, 0.01)),
        entry(4, coeffs(10, 0.05), coeffs(2, 0, 0.01)),
    ],
}


def constructed_spec(placement: str, gpus_per_node: int, rate: float = 600) -> dict:
    return spec_dict(
        model={"name": "synthetic", "source": {"path": "/models/synthetic"}},
        slo={"ttftMs": 200, "tpotMs": 50, "attainment": 0.9},
        workload={"requestRate": rate, "inputTokens": 100, "outputTokens": 10},
        hardware={"gpuProduct": "TEST-GPU", "gpusPerNode": gpus_per_node},
        placement=placement,
    )


def test_high_affinity_finds_the_constructed_best():
    plan = plan_for(parse_spec(constructed_spec("high-affinity", 4)), profile=CONSTRUCTED)
    assert (plan.prefill.tensor, plan.decode.tensor) == (2, 1)
    assert plan.placement == "high-affinity"
    assert plan.source == "planner"
    assert plan.predicted.attainment >= 0.9


def test_low_affinity_finds_the_constructed_best_unit():
    # 3 GPUs per node: the best unit is 1 prefill at tensor 2 + 1 decode at tensor 1.
    plan = plan_for(parse_spec(constructed_spec("low-affinity", 3)), profile=CONSTRUCTED)
    assert plan.placement == "low-affinity"
    assert (plan.prefill.tensor, plan.decode.tensor) == (2, 1)
    assert plan.per_unit("prefill") == 1 and plan.per_unit("decode") == 1
    assert plan.units >= 2  # 600 rps needs several units
    assert plan.prefill.tensor * plan.per_unit("prefill") + plan.decode.tensor * plan.per_unit("decode") <= 3


def test_low_rate_prefers_the_smallest_sufficient_configuration():
    """At 1 rps nothing beyond one GPU per phase is needed; per-GPU goodput alone would pick tp2."""
    plan = plan_for(parse_spec(constructed_spec("high-affinity", 4, rate=1)), profile=CONSTRUCTED)
    assert plan.gpus_total == 2


@pytest.fixture(scope="module")
def opt66b_searcher() -> Searcher:
    prof = builtin_profiles()["opt-66b-a100"]
    work = WorkloadModel(
        rate=1,
        input=LengthDistribution(kind="lognormal", mean=512, sigma=0.5),
        output=LengthDistribution(kind="lognormal", mean=128, sigma=0.5),
    )
    return Searcher(
        prof,
        prof.model_facts.to_facts(),
        sample_requests(work, 6000),
        Slo(ttft_ms=2000, tpot_ms=150, attainment=0.9),
        HardwareView(8, 80 * 1024**3, 2400, 200),
        target_rate=40,
    )


def test_pruned_low_affinity_search_matches_exhaustive(opt66b_searcher):
    s = opt66b_searcher
    pruned = s.low_affinity()[0]
    simulated = s.stats.simulated
    full = s.low_affinity(exhaustive=True)
    assert s.stats.simulated > simulated  # the exhaustive pass really did more work
    assert (pruned.prefill, pruned.prefill_count, pruned.decode, pruned.decode_count) == (
        full[0].prefill,
        full[0].prefill_count,
        full[0].decode,
        full[0].decode_count,
    )


def test_pruned_high_affinity_search_matches_exhaustive(opt66b_searcher):
    s = opt66b_searcher
    p, d = s.high_affinity()
    p_all, d_all = s.high_affinity(exhaustive=True)
    assert p[0].shape == p_all[0].shape and d[0].shape == d_all[0].shape


def test_shapes_respect_divisibility_one_node_and_memory(opt66b_searcher):
    shapes = opt66b_searcher.shapes()
    assert Shape(2, 1) in shapes  # 132 GB of weights on 2 × 80 GB leaves KV room
    for s in shapes:
        assert 72 % s.tensor == 0 and 64 % s.pipeline == 0 and s.gpus <= 8
        assert s.tensor in (1, 2, 4, 8)  # tensor 3 is in the profile but not allowed by the spec's rule
    assert Shape(1, 1) not in shapes  # no profile entry for tensor 1 (and it would not fit)


def test_goodput_is_where_attainment_crosses_the_target(opt66b_searcher):
    s = opt66b_searcher
    g = s.prefill_goodput(Shape(4, 1))
    assert g > 0
    from disaggserve.planner.simulator import simulate_prefill

    lat = s.latency(Shape(4, 1))

    def att(rate: float) -> float:
        return simulate_prefill(s.requests_for(rate), rate, lat).after_warmup(0.2).attainment(2000, math.inf)

    assert att(g) >= 0.9
    assert att(g * 1.1) < 0.9
