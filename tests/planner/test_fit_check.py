"""A profile whose fit misses its own measurements where the plan runs is refused, clearly."""

from __future__ import annotations

import pytest

from conftest import coeffs, entry, spec_dict, synthetic_profile
from disaggserve.api.spec import parse_spec
from disaggserve.planner import PlanningError, plan_for
from disaggserve.planner.profile import fit_problems


def measured_knee() -> list[dict]:
    """Decode steps that are flat to batch 4 and rise steeply after (a layout/sampling knee)."""
    rows = []
    for batch in (1, 2, 4, 8, 16, 32):
        for ctx in (128, 512):
            ms = 5.0 + (0.0 if batch <= 4 else 0.5 * (batch - 4))
            rows.append({"phase": "decode", "batch": batch, "length": ctx, "ms": ms})
    for length in (64, 256):
        rows.append({"phase": "prefill", "batch": 1, "length": length, "ms": 10 + 0.1 * length})
    return rows


def profile_doc(decode: dict, threshold: int = 95) -> dict:
    e = entry(1, coeffs(10, 0.1), decode)
    e["decode_batch_threshold"] = threshold
    prof = synthetic_profile([e], measurements=measured_knee())
    return prof.model_dump(mode="json")


def cpu_spec() -> dict:
    return spec_dict(
        model={"name": "synthetic", "source": {"path": "/m"}},
        hardware={"device": "cpu"},
        slo={"ttftMs": 2000, "tpotMs": 200, "attainment": 0.9},
        workload={"requestRate": 1, "inputTokens": 64, "outputTokens": 16},
    )


def test_a_straight_line_through_a_knee_is_rejected_with_where_and_by_how_much():
    straight = profile_doc(coeffs(3.0, 0.0, 0.45))  # a least-squares-ish line: misses both ends
    with pytest.raises(PlanningError) as err:
        plan_for(parse_spec(cpu_spec()), profile=straight)
    assert err.value.reason == "ProfileInvalid"
    text = str(err.value)
    assert "decode at tensor 1, batch 1" in text and "more than 10%" in text and "disaggserve-worker profile" in text


def test_a_fit_split_at_the_knee_is_accepted():
    from disaggserve.planner.profile import parse_profile

    doc = profile_doc(coeffs(5.0, 0.0, 0.0), threshold=8)
    doc["entries"][0]["decode_large"] = coeffs(3.0, 0.0, 0.5)  # 3 + 0.5·B = 5 + 0.5·(B−4)
    prof = parse_profile(doc)
    assert fit_problems(prof, max_decode_batch=256, max_prefill_tokens=2048) == []
    assert plan_for(parse_spec(cpu_spec()), profile=doc).source == "planner"


def test_only_the_batch_sizes_the_plan_uses_are_checked():
    from disaggserve.planner.profile import parse_profile

    doc = profile_doc(coeffs(5.0, 0.0, 0.0))  # right up to batch 4, wrong above
    prof = parse_profile(doc)
    assert fit_problems(prof, max_decode_batch=4, max_prefill_tokens=2048) == []
    assert fit_problems(prof, max_decode_batch=16, max_prefill_tokens=2048)


def test_the_autoscalers_correction_keeps_a_good_fit_good():
    from disaggserve.planner.profile import parse_profile

    doc = profile_doc(coeffs(5.0, 0.0, 0.0), threshold=8)
    doc["entries"][0]["decode_large"] = coeffs(3.0, 0.0, 0.5)
    scaled = parse_profile(doc).scaled(1.5, 2.0)
    assert fit_problems(scaled, max_decode_batch=256, max_prefill_tokens=2048) == []


def test_the_autoscalers_correction_scales_the_costs_outside_the_model_with_their_phase():
    """The correction is a ratio of whole latencies, overheads included: scaling only the forward
    passes would leave a profile whose overheads dominate under-corrected."""
    from disaggserve.planner.profile import parse_profile

    doc = profile_doc(coeffs(5.0, 0.0, 0.0))
    doc["overheads"] = {
        "router": {"per_request_ms": 4.0, "per_token_ms": 0.4},
        "prefill": {"per_request_ms": 3.0},
        "decode": {"per_request_ms": 1.0, "per_token_ms": 0.2, "per_step_ms": 0.5},
        "kv_link": {"gbps": 10.0, "latency_ms": 1.0},
        "prefill_stall_ms": 5.0,
    }
    o = parse_profile(doc).scaled(2.0, 3.0).overheads
    assert o.prefill_stall_ms == 10.0  # it lands in TTFT
    assert (o.router.per_request_ms, o.router.per_token_ms) == (8.0, 0.4 * 3.0)
    assert o.prefill.per_request_ms == 6.0
    assert (o.decode.per_request_ms, o.decode.per_token_ms, o.decode.per_step_ms) == (3.0, 0.2 * 3.0, 1.5)
    assert o.kv_link is not None and (o.kv_link.gbps, o.kv_link.latency_ms) == (10.0, 1.0)  # a link, not a phase
