"""Roofline (estimated) profiles: any model on a GPU in the table plans before profiling,
close to the measured A100 tables, and the plan says it is an estimate."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import yaml

from conftest import spec_dict
from disaggserve.api.spec import parse_spec
from disaggserve.planner import PlanningError, plan_for
from disaggserve.planner.facts import BUILTIN_FACTS
from disaggserve.planner.gpus import GPU_PRODUCTS, find_gpu
from disaggserve.planner.profile import builtin_profiles, phase_latency
from disaggserve.planner.roofline import (
    CALIBRATION_PROFILES,
    calibration,
    estimated_profile,
    is_estimated,
    measured_samples,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama-3-8b-h100.yaml"


@pytest.mark.parametrize(
    ("label", "product"),
    [
        ("NVIDIA-H100-80GB-HBM3", "H100-SXM-80GB"),
        ("NVIDIA-H100-PCIe", "H100-PCIe-80GB"),
        ("NVIDIA-A100-SXM4-40GB", "A100-SXM4-40GB"),
        ("NVIDIA-A100-80GB-PCIe", "A100-PCIe-80GB"),
        ("NVIDIA-A100-SXM4-80GB", "A100-SXM4-80GB"),
        ("NVIDIA-H200", "H200-141GB"),
        ("NVIDIA-B200", "B200-180GB"),
        ("NVIDIA-L40S", "L40S-48GB"),
        ("NVIDIA-L4", "L4-24GB"),
        ("NVIDIA-A10G", "A10G-24GB"),
        ("AMD-Instinct-MI300X", "MI300X-192GB"),
    ],
)
def test_node_labels_find_their_product(label, product):
    assert find_gpu(label) is GPU_PRODUCTS[product]


def test_unknown_product_is_none():
    assert find_gpu("NVIDIA-GeForce-GT-710") is None and find_gpu(None) is None


def test_estimates_are_close_to_the_measured_a100_profiles():
    errs = {"prefill": [], "decode": []}
    for stem, product in CALIBRATION_PROFILES:
        measured = builtin_profiles()[stem]
        facts = measured.model_facts.to_facts()
        est = estimated_profile(measured.model, facts, product, GPU_PRODUCTS[product], tensor_sizes=(1, 2, 3, 4, 8))
        for e in measured.entries:
            mp, md = measured_samples(measured, e.tensor)
            ep, ed = measured_samples(est, e.tensor)
            errs["prefill"] += [abs(x - y) / y for x, y in zip(ep, mp, strict=True)]
            errs["decode"] += [abs(x[1] - y[1]) / y[1] for x, y in zip(ed, md, strict=True)]
    assert statistics.median(errs["prefill"]) <= 0.15
    assert statistics.median(errs["decode"]) <= 0.15


def test_faster_gpu_is_estimated_faster():
    facts = BUILTIN_FACTS["llama-3-8b"]
    a100 = phase_latency(estimated_profile("m", facts, "a", GPU_PRODUCTS["A100-SXM4-80GB"]), 1, 1)
    h100 = phase_latency(estimated_profile("m", facts, "h", GPU_PRODUCTS["H100-SXM-80GB"]), 1, 1)
    assert h100.decode_step_ms(8, 8 * 512) < a100.decode_step_ms(8, 8 * 512)
    assert h100.prefill_ms(1024, 1024**2) < a100.prefill_ms(1024, 1024**2)
    # calibrated factors are efficiencies: the GPU never beats its data sheet
    cal = calibration()
    assert cal.pf >= 1 and cal.dw >= 1


def test_example_llama3_on_h100_plans_and_is_marked_estimated():
    doc = yaml.safe_load(EXAMPLE.read_text())
    plan = plan_for(parse_spec(doc["spec"]))
    assert plan.source == "planner" and plan.gpus_total >= 1
    assert plan.profile == "estimated" and "ESTIMATED" in plan.reason


def test_measured_profile_plan_is_marked_measured():
    plan = plan_for(parse_spec(spec_dict()))
    assert plan.profile == "measured" and "ESTIMATED" not in plan.reason


def test_gpu_without_a_table_entry_still_asks_for_a_profile():
    spec = parse_spec(
        spec_dict(
            model={"name": "meta-llama/Meta-Llama-3-8B", "source": {"path": "/m"}},
            hardware={"gpuProduct": "NVIDIA-GeForce-GT-710"},
        )
    )
    with pytest.raises(PlanningError) as e:
        plan_for(spec)
    assert e.value.reason == "ProfileMissing" and "H100-SXM-80GB" in str(e.value)


def test_estimated_profile_is_recognised():
    est = estimated_profile("m", BUILTIN_FACTS["llama-3-8b"], "x", GPU_PRODUCTS["L4-24GB"])
    assert is_estimated(est) and not is_estimated(builtin_profiles()["opt-13b-a100"])


def test_status_carries_the_estimated_marking_and_the_crd_allows_it():
    from disaggserve.api.crd import build_crd
    from disaggserve.api.status import DisaggServeStatus

    doc = yaml.safe_load(EXAMPLE.read_text())
    estimated = DisaggServeStatus(plan=plan_for(parse_spec(doc["spec"]))).wire()
    measured = DisaggServeStatus(plan=plan_for(parse_spec(spec_dict()))).wire()
    assert estimated["plan"]["profile"] == "estimated" and measured["plan"]["profile"] == "measured"
    status_schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status_schema["properties"]["plan"]["properties"]["profile"]["enum"] == ["measured", "estimated"]
