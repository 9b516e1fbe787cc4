"""Re-planning replica counts from measurements (the autoscaler's use of the planner).

The shapes (tensor, pipeline, placement, unit composition) stay as deployed: changing them is a
rolling replacement of every worker, which belongs to a spec change, not to a traffic change.
What follows the traffic is how many instances (or units) of those shapes run. The planner sizes
them with the same search and joint simulation as the first plan, for the measured rate and
lengths, with the latency profile corrected by how far live latencies are from its predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.metrics.observed import Observed
from disaggserve.planner.auto import _joint_check, _size_high, _size_low, build_search
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.search import PhaseChoice, Shape, UnitChoice

# A correction outside this range means the profile is for other hardware: don't trust it blindly.
MIN_CORRECTION, MAX_CORRECTION = 0.5, 4.0
MIN_RATE = 0.01  # requests/s: an idle system is planned for a trickle, bounded by min replicas


@dataclass(frozen=True)
class Recommendation:
    prefill: int
    decode: int
    rate: float
    predicted_attainment: float
    correction: tuple[float, float]
    profile_source: str


def _require(goodput: float, what: str, spec: DisaggServeSpec) -> None:
    if goodput <= 0:
        raise PlanningError(
            "SLOUnattainable",
            f"{what} cannot meet the SLOs (TTFT {spec.slo.ttft_ms:g} ms, TPOT {spec.slo.tpot_ms:g} ms) at any "
            "rate with the corrected profile; more replicas of this shape will not help",
        )


def correction(plan: Plan, observed: Observed) -> tuple[float, float]:
    """Measured/predicted p90 ratios for (prefill via TTFT, decode via TPOT), clamped; 1 without data."""

    def ratio(measured: float | None, predicted: float | None) -> float:
        if not measured or not predicted:
            return 1.0
        return min(max(measured / predicted, MIN_CORRECTION), MAX_CORRECTION)

    predicted = plan.predicted
    if predicted is None:
        return 1.0, 1.0
    return ratio(observed.ttft_p90_ms, predicted.ttft_p90_ms), ratio(observed.tpot_p90_ms, predicted.tpot_p90_ms)


def measured_spec(spec: DisaggServeSpec, observed: Observed) -> DisaggServeSpec:
    """The spec with the workload as measured (rate and mean lengths), shapes left to the caller."""
    work = spec.workload.model_copy(
        update={
            "request_rate": max(observed.request_rate, MIN_RATE),
            "input_tokens": max(1, round(observed.mean_input_tokens or spec.workload.input_tokens)),
            "output_tokens": max(1, round(observed.mean_output_tokens or spec.workload.output_tokens)),
        }
    )
    return spec.model_copy(update={"workload": work})


def recommend(
    spec: DisaggServeSpec,
    plan: Plan,
    observed: Observed,
    *,
    nodes: list[dict[str, Any]] | None = None,
    profile: dict[str, Any] | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
) -> Recommendation:
    """Instances of the deployed shapes that carry the measured workload within the SLOs."""
    measured = measured_spec(spec, observed)
    setup = build_search(measured, nodes=nodes, profile=profile, profile_scale=scale)
    s, topo, rate = setup.searcher, setup.topology, setup.rate
    p_shape = Shape(plan.prefill.tensor, plan.prefill.pipeline)
    d_shape = Shape(plan.decode.tensor, plan.decode.pipeline)
    if plan.placement == "high-affinity":
        gbps = topo.cross_gbps
        p = PhaseChoice(p_shape, s.prefill_goodput(p_shape))
        d = PhaseChoice(d_shape, s.decode_goodput(d_shape, gbps))
        _require(p.goodput, f"prefill {p_shape}", spec)
        _require(d.goodput, f"decode {d_shape}", spec)
        dep, _ = _size_high(s, p, d, rate, None, None, gbps)
    else:
        gbps = topo.intra_gbps
        n_p, n_d = plan.per_unit("prefill"), plan.per_unit("decode")
        unit = UnitChoice(p_shape, n_p, d_shape, n_d, s.unit_goodput(p_shape, n_p, d_shape, n_d, gbps))
        _require(unit.goodput, f"unit {unit}", spec)
        dep, _ = _size_low(s, unit, rate, None, None, gbps)
    _, attainment = _joint_check(s, dep, rate)
    return Recommendation(dep.prefill_count, dep.decode_count, rate, attainment, scale, setup.profile_source)
