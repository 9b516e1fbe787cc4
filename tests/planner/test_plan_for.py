"""plan_for as the operator calls it: automatic plans, impossible requests, capacity limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import spec_dict
from disaggserve.api.spec import DisaggServeSpec, parse_spec
from disaggserve.planner import PlanningError, plan_for
from disaggserve.planner.facts import BUILTIN_FACTS, GIB, MEMORY_UTILIZATION, from_spec, with_dtype
from disaggserve.topology import synthetic_nodes

A100 = "NVIDIA-A100-SXM4-80GB"


def nodes(count: int, gpus: int = 8, cross: float | None = None) -> list[dict]:
    return synthetic_nodes(count, gpus, product=A100, memory_gib=80, cross_gbps=cross)


def test_manual_mode_is_unchanged():
    spec = parse_spec(
        spec_dict(
            parallelism={"prefill": {"tensor": 2, "replicas": 2}, "decode": {"tensor": 4, "replicas": 1}}
        )
    )
    plan = plan_for(spec, nodes=[])
    assert plan.source == "manual" and plan.prefill.replicas == 2 and plan.decode.tensor == 4


def test_automatic_plan_reports_reason_prediction_and_goodput():
    plan = plan_for(parse_spec(spec_dict()), nodes=nodes(4))
    assert plan.source == "planner"
    assert plan.placement == "low-affinity"  # no bandwidth label: 25 Gbps default
    assert "25 Gbps" in plan.reason and "rps/GPU" in plan.reason
    assert plan.predicted.attainment >= 0.9
    assert plan.predicted.ttft_p90_ms <= 2000 and plan.predicted.tpot_p90_ms <= 150
    assert plan.predicted_goodput_per_gpu > 0 and plan.baseline_goodput_per_gpu > 0
    assert plan.gpus_total <= 32
    # a unit lives on one node
    assert (
        plan.prefill.gpus_per_instance * plan.per_unit("prefill")
        + plan.decode.gpus_per_instance * plan.per_unit("decode")
        <= 8
    )


def test_fast_network_gives_high_affinity():
    plan = plan_for(parse_spec(spec_dict()), nodes=nodes(4, cross=200))
    assert plan.placement == "high-affinity"
    assert "200 Gbps" in plan.reason


def test_rate_override_grows_the_plan():
    small = plan_for(parse_spec(spec_dict()), nodes=nodes(16))
    large = plan_for(parse_spec(spec_dict()), nodes=nodes(16), rate=40)
    assert large.gpus_total > small.gpus_total


def test_ttft_below_fastest_prefill_says_so_with_numbers():
    spec = parse_spec(spec_dict(slo={"ttftMs": 20}))
    with pytest.raises(PlanningError) as err:
        plan_for(spec, nodes=nodes(4))
    assert err.value.reason == "SLOUnattainable"
    msg = str(err.value)
    assert "TTFT 20 ms is below the fastest prefill" in msg
    assert "at tensor size 8" in msg  # the fastest OPT-66B prefill in the profile


def test_tpot_below_fastest_decode_step():
    with pytest.raises(PlanningError) as err:
        plan_for(parse_spec(spec_dict(slo={"tpotMs": 5})), nodes=nodes(4))
    assert err.value.reason == "SLOUnattainable" and "TPOT 5 ms" in str(err.value)


def test_model_too_large_for_any_instance():
    spec = parse_spec(
        spec_dict(
            model={
                "name": "facebook/opt-66b",
                "source": {"path": "/m"},
                "facts": {
                    "layers": 64,
                    "attentionHeads": 72,
                    "hiddenSize": 9216,
                    "parameters": 600_000_000_000,
                },
            }
        )
    )
    with pytest.raises(PlanningError) as err:
        plan_for(spec, nodes=nodes(4))
    assert err.value.reason == "ModelTooLarge"
    assert "1118 GiB" in str(err.value) and "8 GPUs" in str(err.value)


def test_empty_cluster_and_full_cluster_have_no_capacity():
    with pytest.raises(PlanningError) as err:
        plan_for(parse_spec(spec_dict()), nodes=[])
    assert err.value.reason == "NoCapacity"
    with pytest.raises(PlanningError) as err:
        plan_for(parse_spec(spec_dict()), nodes=nodes(2), used_gpus={"node-0": 8, "node-1": 8})
    assert err.value.reason == "NoCapacity" and "16 GPUs" in str(err.value)


def test_wrong_gpu_product_is_no_capacity_naming_the_product():
    other = synthetic_nodes(2, 8, product="NVIDIA-H100-80GB-HBM3", memory_gib=80)
    with pytest.raises(PlanningError) as err:
        plan_for(parse_spec(spec_dict()), nodes=other)
    assert err.value.reason == "NoCapacity" and "NVIDIA-H100-80GB-HBM3" in str(err.value)


def test_max_gpus_limits_scaling_with_numbers():
    spec = parse_spec(spec_dict(autoscaling={"maxGpus": 8}))
    plan = plan_for(spec, nodes=nodes(16), rate=60)
    limit = plan.scaling_limited
    assert limit is not None and limit.limited_by == "maxGpus"
    assert plan.gpus_total <= 8 < limit.gpus_needed
    assert limit.achievable_rate < 60
    assert plan.predicted.attainment < 0.9


def test_free_gpus_limit_scaling():
    plan = plan_for(parse_spec(spec_dict()), nodes=nodes(1), rate=60)
    assert plan.scaling_limited is not None and plan.scaling_limited.limited_by == "freeGpus"
    assert plan.gpus_total <= 8


def test_unknown_model_without_profile_explains_how_to_profile():
    spec = parse_spec(spec_dict(model={"name": "acme/foo-7b", "source": {"path": "/m"}}))
    with pytest.raises(PlanningError) as err:
        plan_for(spec, nodes=nodes(1))
    assert err.value.reason == "ProfileMissing"
    assert "disaggserve-worker profile" in str(err.value) and "configMapRef" in str(err.value)


def test_profile_from_a_configmap_and_a_broken_one():
    from disaggserve.planner.profile import builtin_profiles

    doc = builtin_profiles()["opt-13b-a100"].model_dump(mode="json")
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "opt13"},
        "data": {"profile.json": json.dumps(doc)},
    }
    spec = parse_spec(
        spec_dict(
            model={"name": "facebook/opt-13b", "source": {"path": "/m"}}, slo={"ttftMs": 400, "tpotMs": 100}
        )
    )
    assert plan_for(spec, nodes=nodes(1), profile=cm).source == "planner"
    cm["data"]["profile.json"] = '{"model": "x", "gpu": "y", "entries": [{"tensor": 1}]}'
    with pytest.raises(PlanningError) as err:
        plan_for(spec, nodes=nodes(1), profile=cm)
    assert err.value.reason == "ProfileInvalid" and "entries.0.prefill" in str(err.value)


def test_builtin_profile_by_name_and_unknown_name():
    spec = parse_spec(spec_dict(profile={"builtin": "nope"}))
    with pytest.raises(PlanningError) as err:
        plan_for(spec, nodes=nodes(1))
    assert err.value.reason == "ProfileMissing" and "opt-66b-a100" in str(err.value)


def test_builtin_cpu_model_plans_from_the_builtin_cpu_profile():
    import yaml

    raw = yaml.safe_load(Path("examples/tiny-cpu.yaml").read_text())["spec"]
    raw.pop("parallelism")
    from disaggserve.planner.auto import plan_automatically

    outcome = plan_automatically(parse_spec(raw), nodes=nodes(1))  # CPU workers: GPU nodes do not limit
    assert outcome.profile_source == "built-in profile for tiny-llama on cpu"
    assert outcome.plan.source == "planner" and outcome.plan.predicted.attainment >= 0.9


def test_too_few_free_gpus_for_one_instance_is_no_capacity():
    with pytest.raises(PlanningError) as err:
        plan_for(parse_spec(spec_dict()), nodes=nodes(2), used_gpus={"node-0": 7, "node-1": 7})
    assert err.value.reason == "NoCapacity" and "[1, 1]" in str(err.value)


def test_replanning_at_a_new_rate_reuses_memoised_goodputs():
    from disaggserve.planner.auto import plan_automatically
    from disaggserve.planner.search import clear_shared_goodputs

    clear_shared_goodputs()
    spec = parse_spec(spec_dict())
    first = plan_automatically(spec, nodes=nodes(4), with_baseline=False)
    again = plan_automatically(spec, nodes=nodes(4), rate=7, with_baseline=False)
    assert again.stats.simulated < first.stats.simulated
    clear_shared_goodputs()
    cold = plan_automatically(spec, nodes=nodes(4), rate=7, with_baseline=False)
    assert cold.plan == again.plan  # memoised and fresh searches agree


def _opt13b_on_a100_40gb(**model: object) -> DisaggServeSpec:
    return parse_spec(spec_dict(
        model={"name": "facebook/opt-13b", "source": {"path": "/m"}, **model},
        hardware={"gpuProduct": "NVIDIA-A100-SXM4-40GB", "gpuMemoryGiB": 40, "gpusPerNode": 8}))


def test_the_chosen_dtype_sets_the_bytes_the_plan_fits_in_memory():
    """The workers get spec.model.dtype, so the plan fits their weights and KV at its width:
    float32 OPT-13B (51 GB of weights) cannot go on the tensor-2 instances bfloat16 fits."""
    facts = BUILTIN_FACTS["opt-13b"]
    usable = 40 * GIB * MEMORY_UTILIZATION
    for dtype, width in (("auto", 2), ("bfloat16", 2), ("float16", 2), ("float32", 4)):
        plan = plan_for(_opt13b_on_a100_40gb(dtype=dtype))
        for phase in (plan.prefill, plan.decode):
            gpus = phase.tensor * phase.pipeline
            assert gpus * usable > facts.parameters * width, (dtype, phase)
    assert plan.decode.tensor * plan.decode.pipeline > plan_for(_opt13b_on_a100_40gb()).decode.tensor


def test_a_dtype_bytes_the_user_wrote_wins_over_the_dtype():
    """A quantized checkpoint's weights are narrower than the dtype it computes in."""
    written = {"layers": 40, "attentionHeads": 40, "hiddenSize": 5120, "parameters": 12_853_000_000}
    spec = _opt13b_on_a100_40gb(dtype="bfloat16", facts={**written, "dtypeBytes": 1})
    assert with_dtype(from_spec(spec.model.facts), spec.model).dtype_bytes == 1
    spec = _opt13b_on_a100_40gb(dtype="float32", facts=written)
    assert with_dtype(from_spec(spec.model.facts), spec.model).dtype_bytes == 4
    spec = _opt13b_on_a100_40gb(facts=written)
    assert with_dtype(from_spec(spec.model.facts), spec.model).dtype_bytes == 2
