"""Re-planning replica counts from measurements (the autoscaler's use of the planner).

The shapes (tensor, pipeline, placement, unit composition) stay as deployed: changing them is a
rolling replacement of every worker, which belongs to a spec change, not to a traffic change.
What follows the traffic is how many instances (or units) of those shapes run. The planner sizes
them with the same search and joint simulation as the first plan, for the measured rate and
lengths, with the latency profile corrected by how far live latencies are from its predictions,
and with the KV link as the decode workers' own pulls measure it (`live_link`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.metrics.observed import Observed
from disaggserve.planner.deployment import (
    ColocatedDeployment,
    Deployment,
    joint_check,
    size_colocated,
    size_high,
    size_low,
)
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.inputs import SearchSetup, build_search, resolve_profile
from disaggserve.planner.profile import KvLink
from disaggserve.planner.search import PhaseChoice, Shape, UnitChoice

# A correction outside this range means the profile is for other hardware: don't trust it blindly.
MIN_CORRECTION, MAX_CORRECTION = 0.5, 4.0
MIN_RATE = 0.01  # requests/s: an idle system is planned for a trickle, bounded by min replicas
# Plan for more traffic than measured: new replicas take an interval or more to start, and
# traffic that is ramping up keeps growing meanwhile. Without a measured trend, a fixed margin;
# with one (the rate's growth over the last interval), the rate one interval ahead on that
# trend, with a small margin when flat or falling — so a steady load is not over-provisioned
# by a quarter and a steep ramp is not under-provisioned.
GROWTH_HEADROOM = 1.25
MIN_HEADROOM = 1.05
MAX_HEADROOM = 2.0
# Fewer pulls than this in a window say too little about the link: the profile's stays.
MIN_KV_TRANSFERS = 10


def headroom(growth: float | None) -> float:
    """Multiplier on the measured rate to plan for, from its growth per decision interval."""
    if growth is None:
        return GROWTH_HEADROOM
    return min(MAX_HEADROOM, max(MIN_HEADROOM, growth * MIN_HEADROOM))


@dataclass(frozen=True)
class Recommendation:
    prefill: int
    decode: int
    rate: float
    predicted_attainment: float
    correction: tuple[float, float]
    profile_source: str
    colocated: int = 0  # instances, for a colocated plan (prefill and decode are then 0)
    kv_link: KvLink | None = None  # the live link planned with, when the window measured one


def live_link(observed: Observed, prior: KvLink | None) -> KvLink | None:
    """The KV link the decode workers' pulls in the window measured (None with too few of them).

    Why live: a profile's link is one measurement between two pods (or none, and then the data
    sheet's bandwidth, 1000x what the workers' transport reaches on a CPU host); the pulls are the
    real path at the real sizes under the real load. Totals give one point per window, which
    cannot split latency from bandwidth: the profile's per-transfer latency is kept and the rest
    of the mean pull is bandwidth; a mean pull shorter than that latency is bandwidth alone.
    """
    kv = observed.kv
    if kv is None or kv.transfers < MIN_KV_TRANSFERS or kv.bytes <= 0 or kv.seconds <= 0:
        return None
    per_pull_s, per_pull_bytes = kv.seconds / kv.transfers, kv.bytes / kv.transfers
    latency_s = prior.latency_ms / 1000 if prior else 0.0
    if per_pull_s - latency_s < 0.1 * per_pull_s:
        latency_s = 0.0
    return KvLink(gbps=round(per_pull_bytes * 8 / (per_pull_s - latency_s) / 1e9, 6),
                  latency_ms=round(latency_s * 1000, 4))


def carry_over(new: Plan, previous: dict[str, Any] | None, spec: DisaggServeSpec) -> Plan:
    """Keep the autoscaler's replica counts across re-plans of an unchanged shape.

    Every spec change re-plans from the spec's expected workload; while autoscaling, the counts
    the autoscaler chose from measurements stay (within the possibly new bounds) unless the
    shapes themselves changed, which starts over from the planner's counts.
    """
    if not spec.autoscaling.enabled:
        return new
    scaling = spec.autoscaling
    counts = {role: new.phase(role).replicas for role in new.roles}
    units, source, reason = new.units, new.source, new.reason
    if previous and previous.get("source") == "autoscaler":
        old = Plan.model_validate(previous)
        same_shapes = (
            old.placement == new.placement
            and all(
                (old.phase(r).tensor, old.phase(r).pipeline) == (new.phase(r).tensor, new.phase(r).pipeline)
                for r in new.roles
            )
            and (
                new.placement != "low-affinity"
                or (old.per_unit("prefill"), old.per_unit("decode"))
                == (new.per_unit("prefill"), new.per_unit("decode"))
            )
        )
        if same_shapes:
            counts = {role: old.phase(role).replicas for role in new.roles}
            units, source, reason = old.units, old.source, old.reason
    if new.placement == "high-affinity":
        lo, hi = scaling.min_replicas, scaling.max_replicas
        counts = {p: min(max(n, getattr(lo, p)), getattr(hi, p)) for p, n in counts.items()}
    elif new.placement == "colocated":
        counts = {"colocated": min(max(counts["colocated"], scaling.min_colocated), scaling.max_colocated)}
    return new.model_copy(
        update={
            **{role: new.phase(role).model_copy(update={"replicas": n}) for role, n in counts.items()},
            "units": units,
            "source": source,
            "reason": reason,
        }
    )


def _require(goodput: float, what: str, spec: DisaggServeSpec) -> None:
    if goodput <= 0:
        raise PlanningError(
            "SLOUnattainable",
            f"{what} cannot meet the SLOs (TTFT {spec.slo.ttft_ms:g} ms, TPOT {spec.slo.tpot_ms:g} ms) at any "
            "rate with the corrected profile; more replicas of this shape will not help",
        )


def _ratio(measured: float | None, predicted: float | None) -> float:
    if not measured or not predicted:
        return 1.0
    return min(max(measured / predicted, MIN_CORRECTION), MAX_CORRECTION)


def correction(searcher: Any, deployed: Deployment | ColocatedDeployment, observed: Observed) -> tuple[float, float]:
    """Measured/predicted median of (TTFT, TPOT) for the deployment as it runs, at the measured
    rate (p90 where the metrics give no median).

    Predicting the *current* deployment at the *measured* rate separates a wrong profile from
    plain load: an overloaded system is slow in both, and needs replicas, not a slower profile.
    Medians, not p90s: a real p90 carries scheduling and GC stalls that the simulator models only
    where the profile measured them (`overheads.prefill_stall_ms`), so a p90 ratio read that tail
    as slower steps and over-corrected (`bench/planner_vs_measured.py`: colocated predicted 12 points
    below the measured attainment after a p90 correction of x1.78 TTFT from one window).
    """
    predicted = deployed.simulate(searcher, max(observed.request_rate, MIN_RATE))
    if observed.ttft_p50_ms is not None and observed.tpot_p50_ms is not None:
        return (_ratio(observed.ttft_p50_ms, predicted.ttft_p(50)),
                _ratio(observed.tpot_p50_ms, predicted.tpot_p(50)))
    return _ratio(observed.ttft_p90_ms, predicted.ttft_p()), _ratio(observed.tpot_p90_ms, predicted.tpot_p())


def measured_spec(spec: DisaggServeSpec, observed: Observed, growth: float | None = None) -> DisaggServeSpec:
    """The spec with the workload as measured (rate, with headroom for its trend, and mean
    lengths), shapes left to the caller."""
    work = spec.workload.model_copy(
        update={
            "request_rate": max(observed.request_rate * headroom(growth), MIN_RATE),
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
    correct: bool = True,
    growth: float | None = None,
) -> Recommendation:
    """Instances of the deployed shapes that carry the measured workload within the SLOs.

    `growth`: the measured rate's growth per decision interval (`PolicyState.rate_growth`), for
    trend-aware headroom; None plans with the fixed GROWTH_HEADROOM."""
    measured = measured_spec(spec, observed, growth)
    link = live_link(observed, resolve_profile(measured, profile)[0].overheads.kv_link)
    scale = (1.0, 1.0)
    if correct:
        base = build_search(measured, nodes=nodes, profile=profile, kv_link=link)
        scale = correction(base.searcher, deployment_of(plan, base), observed)
    setup = build_search(measured, nodes=nodes, profile=profile, profile_scale=scale, kv_link=link)
    s, topo, rate = setup.searcher, setup.topology, setup.rate
    if plan.placement == "colocated":
        # Colocated instances of the deployed shape, sized as the first plan sizes them.
        shape = Shape(plan.phase("colocated").tensor, plan.phase("colocated").pipeline)
        choice = PhaseChoice(shape, s.colocated_goodput(shape))
        _require(choice.goodput, f"colocated {shape}", spec)
        colocated, _ = size_colocated(s, choice, rate, None, None)
        _, attainment = joint_check(s, colocated, rate)
        return Recommendation(0, 0, rate, attainment, scale, setup.profile_source, colocated=colocated.count,
                              kv_link=link)
    p_shape = Shape(plan.prefill.tensor, plan.prefill.pipeline)
    d_shape = Shape(plan.decode.tensor, plan.decode.pipeline)
    if plan.placement == "high-affinity":
        gbps = topo.cross_gbps
        p = PhaseChoice(p_shape, s.prefill_goodput(p_shape))
        d = PhaseChoice(d_shape, s.decode_goodput(d_shape, gbps))
        _require(p.goodput, f"prefill {p_shape}", spec)
        _require(d.goodput, f"decode {d_shape}", spec)
        dep, _ = size_high(s, p, d, rate, None, None, gbps)
    else:
        gbps = topo.intra_gbps
        n_p, n_d = plan.per_unit("prefill"), plan.per_unit("decode")
        unit = UnitChoice(p_shape, n_p, d_shape, n_d, s.unit_goodput(p_shape, n_p, d_shape, n_d, gbps))
        _require(unit.goodput, f"unit {unit}", spec)
        dep, _ = size_low(s, unit, rate, None, None, gbps)
    _, attainment = joint_check(s, dep, rate)
    return Recommendation(dep.prefill_count, dep.decode_count, rate, attainment, scale, setup.profile_source,
                          kv_link=link)


def deployment_of(plan: Plan, setup: SearchSetup) -> Deployment | ColocatedDeployment:
    """The planner's view of a deployed plan (its instances on the setup's links), to simulate it."""
    if plan.placement == "colocated":
        colocated = plan.phase("colocated")
        return ColocatedDeployment(Shape(colocated.tensor, colocated.pipeline), colocated.replicas)
    gbps = setup.topology.cross_gbps if plan.placement == "high-affinity" else setup.topology.intra_gbps
    return Deployment(
        Shape(plan.prefill.tensor, plan.prefill.pipeline),
        plan.prefill.replicas,
        Shape(plan.decode.tensor, plan.decode.pipeline),
        plan.decode.replicas,
        plan.units,
        gbps,
    )
