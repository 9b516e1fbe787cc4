"""The disaggregated prefill token budget: DistServe's L_m from the profile, in the simulator and the plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import coeffs, entry, spec_dict, synthetic_profile
from disaggserve.api.plan import Plan
from disaggserve.api.spec import parse_spec
from disaggserve.api.status import DisaggServeStatus
from disaggserve.planner import plan_for
from disaggserve.planner.batching import (
    BUDGET_STEP,
    FIXED_COST_SHARE,
    MAX_PREFILL_BUDGET,
    MIN_PREFILL_BUDGET,
    prefill_token_budget,
    saturation_tokens,
)
from disaggserve.planner.profile import builtin_profiles, phase_latency
from disaggserve.planner.replan import carry_over
from disaggserve.planner.simulator import (
    DEFAULT_PREFILL_TOKEN_BUDGET,
    DecodeSetup,
    simulate_disaggregated,
    simulate_prefill,
)
from disaggserve.planner.workload import RequestSample
from disaggserve.topology import synthetic_nodes

ROOT = Path(__file__).resolve().parents[2]
DECODE = coeffs(5.0, 0.0001, 0.1)


def lat_of(a: float, b: float, c: float = 0.0, *, pipeline: int = 1, stage_overhead_ms: float = 0.0):
    prof = synthetic_profile([entry(1, coeffs(a, b, c), DECODE)], stage_overhead_ms=stage_overhead_ms)
    return phase_latency(prof, 1, pipeline)


def test_l_m_is_where_the_fixed_cost_is_the_named_share_of_a_batch():
    lat = lat_of(10.0, 0.1, 1e-4)
    tokens = saturation_tokens(lat)
    assert tokens == pytest.approx(10.0 * (1 - FIXED_COST_SHARE) / (FIXED_COST_SHARE * 0.1))  # 1900
    # What batching saves is the fixed cost: at L_m it is FIXED_COST_SHARE of a batch of many short prompts
    # (their attention term ~ 0), less of one with long prompts.
    assert lat.prefill.a / lat.prefill_ms(tokens, 0) == pytest.approx(FIXED_COST_SHARE)
    assert lat.prefill.a / lat.prefill_ms(tokens, tokens**2) < FIXED_COST_SHARE
    budget = prefill_token_budget(lat)
    assert budget == 1920 and budget % BUDGET_STEP == 0 and budget >= tokens


def test_pipeline_hand_offs_count_as_fixed_cost():
    plain = prefill_token_budget(lat_of(10.0, 0.1, pipeline=2))
    with_overhead = prefill_token_budget(lat_of(10.0, 0.1, pipeline=2, stage_overhead_ms=2.0))
    assert saturation_tokens(lat_of(10.0, 0.1, pipeline=2, stage_overhead_ms=2.0)) == pytest.approx(14.0 * 190)
    assert with_overhead > plain


@pytest.mark.parametrize(
    "a,b,expected",
    [
        (0.0, 0.1, MIN_PREFILL_BUDGET),  # no fixed cost: batching saves nothing, the floor
        (1e-6, 0.1, MIN_PREFILL_BUDGET),  # a tiny profile's fixed cost
        (0.01, 0.0, MAX_PREFILL_BUDGET),  # no per-token cost: batching would always help, the ceiling
        (5000.0, 0.001, MAX_PREFILL_BUDGET),  # a huge fixed cost
        (0.0, 0.0, MIN_PREFILL_BUDGET),
    ],
)
def test_degenerate_profiles_are_clamped(a, b, expected):
    assert prefill_token_budget(lat_of(a, b)) == expected


def test_a_scaled_or_shared_profile_keeps_its_budget():
    """The autoscaler re-plans with a profile scaled by measured/predicted ratios and, on a shared host,
    slowed by the router's CPU: neither may move the budget (it is in the pod template)."""
    prof = synthetic_profile([entry(1, coeffs(7.0, 0.09, 6e-5), DECODE)])
    before = prefill_token_budget(phase_latency(prof, 1, 1))
    assert prefill_token_budget(phase_latency(prof.scaled(2.7, 0.6), 1, 1)) == before
    shared = phase_latency(prof, 1, 1)
    shared = type(shared)(**{**shared.__dict__, "shared_cores": 1, "shared_request_ms": 40.0})
    assert prefill_token_budget(shared.sharing(5.0, 100)) == before


def test_share_must_be_a_fraction():
    with pytest.raises(ValueError):
        saturation_tokens(lat_of(1.0, 0.1), share=0)


def test_stored_profiles():
    """What the shipped profiles give (docs/planner-method.md quotes these)."""
    got = {
        (name, e.tensor): prefill_token_budget(phase_latency(prof, e.tensor, 1))
        for name, prof in builtin_profiles().items()
        for e in prof.entries
    }
    assert got[("small-llama-cpu", 1)] == 768
    assert got[("tiny-llama-cpu", 1)] == 1408
    assert got[("opt-13b-a100", 1)] == 3456
    assert got[("opt-13b-a100", 4)] == 6144
    assert got[("opt-66b-a100", 2)] == 3072
    # More tensor parallelism divides the per-token cost more than the fixed cost: a later knee.
    assert got[("opt-13b-a100", 1)] < got[("opt-13b-a100", 2)] < got[("opt-13b-a100", 4)]


@pytest.mark.parametrize("result", ["planner_vs_measured.json", "planner_vs_measured-p90-correction.json"])
def test_the_worker_measured_fits_put_l_m_where_the_cpu_measurement_did(result):
    """Held against the measurement: on this CPU (small-llama, one core) batching two 512-token prompts
    saved 16 % and two 1024-token ones 0.3 %, so the knee lies in (1024, 2048] total tokens. The prefill
    fits `disaggserve-worker profile` made of the same model (bench/results) give a budget there."""
    doc = json.loads((ROOT / "bench" / "results" / result).read_text())
    prefill = doc["profile_fit"]["prefill"]
    budget = prefill_token_budget(lat_of(prefill["a"], prefill["b"], prefill["c"]))
    assert 1024 <= budget <= 2048


# ---- the simulator ------------------------------------------------------------------------------------


def _burst(n: int, length: int) -> RequestSample:
    """`n` prompts of `length` tokens arriving at once: every batch is as full as its budget allows."""
    return RequestSample(np.zeros(n), np.full(n, length, dtype=np.int64), np.full(n, 8, dtype=np.int64))


def test_disaggregated_prefill_batches_up_to_l_m_by_default():
    lat = lat_of(5.0, 0.1)  # L_m 950 -> 1024: two 512-token prompts per batch, not 2048's four
    assert prefill_token_budget(lat) == 1024
    sample, rate = _burst(8, 512), 1.0
    default = simulate_prefill(sample, rate, lat)
    assert np.array_equal(default.ttft_ms, simulate_prefill(sample, rate, lat, budget_tokens=1024).ttft_ms)
    # The first prompts wait for one other, not three: their TTFT is a batch of two.
    assert default.ttft_ms[0] == pytest.approx(lat.prefill_ms(1024, 2 * 512**2))
    old = simulate_prefill(sample, rate, lat, budget_tokens=DEFAULT_PREFILL_TOKEN_BUDGET)
    assert old.ttft_ms[0] == pytest.approx(lat.prefill_ms(2048, 4 * 512**2))

    setup = DecodeSetup(lat=lat, instances=1, capacity_tokens=10**7, kv_bytes_per_token=1, link_gbps=math.inf)
    whole = simulate_disaggregated(sample, rate, lat, 1, setup)
    assert whole.ttft_ms[0] == pytest.approx(lat.prefill_ms(1024, 2 * 512**2))
    explicit = simulate_disaggregated(sample, rate, lat, 1, setup, budget_tokens=1024)
    assert np.array_equal(whole.ttft_ms, explicit.ttft_ms)


def test_searcher_simulates_each_prefill_shape_at_its_own_l_m():
    from disaggserve.planner.inputs import build_search
    from disaggserve.planner.search import Shape

    setup = build_search(parse_spec(spec_dict()), nodes=synthetic_nodes(2, 8, product="NVIDIA-A100-SXM4-80GB",
                                                                        memory_gib=80))
    s = setup.searcher
    for shape in (Shape(2, 1), Shape(4, 1), Shape(8, 1)):
        assert s.prefill_budget(shape) == prefill_token_budget(s.latency(shape))
    assert s.budget_tokens == DEFAULT_PREFILL_TOKEN_BUDGET  # colocated instances keep vLLM's default


# ---- the plan -----------------------------------------------------------------------------------------


def test_an_automatic_plan_carries_the_prefill_shape_l_m_and_it_round_trips():
    spec = parse_spec(spec_dict(placement="high-affinity"))
    plan = plan_for(spec, nodes=synthetic_nodes(4, 8, product="NVIDIA-A100-SXM4-80GB", memory_gib=80))
    prof = builtin_profiles()["opt-66b-a100"]
    expected = prefill_token_budget(phase_latency(prof, plan.prefill.tensor, plan.prefill.pipeline))
    assert plan.prefill.max_batch_tokens == expected
    assert plan.decode.max_batch_tokens is None  # decode batches sequences, not prompt tokens
    assert f"prefill batches up to {expected} tokens" in plan.reason
    wire = plan.wire()
    assert wire["prefill"]["maxBatchTokens"] == expected and "maxBatchTokens" not in wire["decode"]
    assert Plan.model_validate(wire) == plan
    assert DisaggServeStatus.model_validate({"plan": wire}).plan == plan
    # A plan written before the field existed still reads (no budget: the engine's default).
    old = {**wire, "prefill": {k: v for k, v in wire["prefill"].items() if k != "maxBatchTokens"}}
    assert Plan.model_validate(old).prefill.max_batch_tokens is None


def test_a_colocated_plan_keeps_the_engine_default():
    spec = parse_spec(spec_dict(placement="colocated"))
    plan = plan_for(spec, nodes=synthetic_nodes(4, 8, product="NVIDIA-A100-SXM4-80GB", memory_gib=80))
    assert plan.placement == "colocated" and plan.colocated.max_batch_tokens is None


def test_a_manual_plan_takes_l_m_from_the_profile_when_one_resolves():
    parallelism = {"prefill": {"tensor": 2, "replicas": 2}, "decode": {"tensor": 4, "replicas": 1}}
    plan = plan_for(parse_spec(spec_dict(parallelism=parallelism)), nodes=[])
    assert plan.prefill.max_batch_tokens == 3072  # opt-66b-a100 at tensor 2
    unknown = spec_dict(parallelism=parallelism, model={"name": "mystery", "source": {"path": "/m"}},
                        hardware={"gpuProduct": "NO-SUCH-GPU", "gpuMemoryGiB": 80, "gpusPerNode": 8})
    assert plan_for(parse_spec(unknown), nodes=[]).prefill.max_batch_tokens is None
    wide = {"prefill": {"tensor": 8, "replicas": 1}, "decode": {"tensor": 4, "replicas": 1}}
    assert plan_for(parse_spec(spec_dict(parallelism=wide)), nodes=[]).prefill.max_batch_tokens == 4608


def test_the_autoscaler_carries_the_budget_with_its_counts():
    new = Plan.model_validate({"prefill": {"tensor": 1, "replicas": 1, "maxBatchTokens": 1536},
                               "decode": {"tensor": 1, "replicas": 1}, "source": "planner"})
    previous = {"prefill": {"tensor": 1, "replicas": 4}, "decode": {"tensor": 1, "replicas": 3},
                "source": "autoscaler"}
    spec = parse_spec(spec_dict(autoscaling={"enabled": True, "maxReplicas": {"prefill": 10, "decode": 10}}))
    kept = carry_over(new, previous, spec)
    assert (kept.prefill.replicas, kept.decode.replicas) == (4, 3)
    assert kept.prefill.max_batch_tokens == 1536


def test_the_planner_budget_lies_at_the_measured_knee():
    """bench/prefill_knee.py, small-llama bfloat16 on one core: what batching two prompts saves at each
    length, against the L_m the planner derives from the same run's fit. The budget must sit between
    the largest two-prompt batch that still saved more than the fixed-cost share and the knee."""
    doc = json.loads((ROOT / "bench" / "results" / "prefill_knee-small-llama-bfloat16.json").read_text())
    fit = doc["prefill_fit"]
    budget = prefill_token_budget(lat_of(fit["a"], fit["b"], fit["c"]))
    assert budget == doc["planner_budget_tokens"]  # the stored result matches today's derivation
    knee = doc["measured_knee_tokens"]
    assert knee // 2 < budget <= knee
