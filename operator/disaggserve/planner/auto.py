"""Automatic planning: spec (+ nodes, profile, measured rate) → a deployable `Plan`.

This is the DistServe loop end to end — resolve the inputs, search the placement mode the
network allows, size replicas for the rate, fit them into the free GPUs, then simulate the
whole deployment once more, because per-phase searches each aim at the attainment target
and the joint share of requests meeting *both* SLOs is lower; replicas are added where the
joint run says the shortfall is until it holds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from disaggserve.api.plan import PhasePlan, Plan, Prediction, ScalingLimit
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.planner.deployment import MAX_TOP_UPS, Deployment, joint_check, pick, size_high, size_low
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.explain import explain_no_shape, explain_unreachable
from disaggserve.planner.inputs import build_search
from disaggserve.planner.search import Searcher, SearchStats, Shape
from disaggserve.planner.workload import DEFAULT_REQUESTS, DEFAULT_SEED, LengthDistribution
from disaggserve.topology import choose_placement

BASELINE_SIMULATED_INSTANCES = 4
# Candidates (best by per-instance goodputs) that are sized as whole deployments before the
# choice: pooling across instances makes deployment goodput differ from the sum of the parts.
# High affinity sizes more: its pairs are cheap to size and their ranking is looser (measured
# in bench/planner.py against the exhaustive reference).
RERANK_TOP = {"high-affinity": 6, "low-affinity": 3}


@dataclass
class Baseline:
    shape: Shape
    instances: int
    goodput_per_gpu: float


@dataclass
class PlanOutcome:
    """The plan plus what the CLI shows next to it (alternatives, baseline, search cost)."""

    plan: Plan
    deployment: Deployment
    baseline: Baseline | None
    alternatives: list[str]
    stats: SearchStats
    seconds: float
    searcher: Searcher
    rate: float
    placement_why: str
    profile_source: str = ""
    estimated: bool = False


def plan_automatically(
    spec: DisaggServeSpec,
    *,
    nodes: list[dict[str, Any]] | None = None,
    profile: dict[str, Any] | None = None,
    rate: float | None = None,
    used_gpus: dict[str, int] | None = None,
    lengths: tuple[LengthDistribution, LengthDistribution] | None = None,
    requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    with_baseline: bool = True,
    exhaustive: bool = False,
    max_tensor: int | None = None,
) -> PlanOutcome:
    """Plan `spec` (see `plan_for`). `exhaustive` turns pruning off and sizes every candidate
    as a whole deployment (not only the best few, RERANK_TOP) before choosing by the same rule —
    the reference the benchmark compares the pruned search with."""
    started = time.perf_counter()
    setup = build_search(
        spec,
        nodes=nodes,
        profile=profile,
        rate=rate,
        used_gpus=used_gpus,
        lengths=lengths,
        requests=requests,
        seed=seed,
        max_tensor=max_tensor,
    )
    s, topo, target, prof_source = setup.searcher, setup.topology, setup.rate, setup.profile_source
    slo = s.slo
    if not s.shapes():
        raise explain_no_shape(s, topo)
    placement, why = choose_placement(spec.placement, topo.cross_gbps)
    gbps = topo.cross_gbps if placement == "high-affinity" else topo.intra_gbps
    unreachable = explain_unreachable(s, gbps)
    if unreachable:
        raise unreachable
    free = list(topo.free) if topo.nodes else None
    max_gpus = spec.autoscaling.max_gpus
    alternatives: list[str] = []
    if placement == "high-affinity":
        prefill, decode = s.high_affinity(exhaustive=exhaustive)
        if not prefill or not decode:
            raise PlanningError(
                "SLOUnattainable",
                f"no {'prefill' if not prefill else 'decode'} configuration "
                f"reaches {slo.attainment:.0%} attainment at any rate",
            )
        pairs = sorted(
            ((p, d) for p in prefill for d in decode),
            key=lambda pd: s.gpus_for(pd[0].goodput, pd[0].shape.gpus) + s.gpus_for(pd[1].goodput, pd[1].shape.gpus),
        )
        sized = []
        for p, d in pairs:
            dep, needed = size_high(s, p, d, target, free, max_gpus, gbps)
            if dep.prefill_count and dep.decode_count:
                sized.append(((p, d), dep, needed))
                if not exhaustive and len(sized) >= RERANK_TOP["high-affinity"]:
                    break
        (chosen_p, chosen_d), dep, needed = pick(s, sized) if sized else ((None, None), None, 0)
        alternatives = [f"prefill {c.shape}: {c.per_gpu:.3g} rps/GPU" for c in prefill[1:3]] + [
            f"decode {c.shape}: {c.per_gpu:.3g} rps/GPU" for c in decode[1:3]
        ]
        choice_text = (
            ""
            if dep is None
            else f"prefill {dep.prefill} ({chosen_p.goodput:.3g} rps each), decode {dep.decode} "
            f"({chosen_d.goodput:.3g} rps each)"
        )
    else:
        units = s.low_affinity(exhaustive=exhaustive)
        if not units:
            raise PlanningError(
                "SLOUnattainable",
                f"no prefill+decode unit reaches {slo.attainment:.0%} attainment at any rate",
            )
        sized = []
        for u in units:
            dep, needed = size_low(s, u, target, free, max_gpus, gbps)
            if dep.units:
                sized.append((u, dep, needed))
                if not exhaustive and len(sized) >= RERANK_TOP["low-affinity"]:
                    break
        chosen_unit, dep, needed = pick(s, sized) if sized else (None, None, 0)
        alternatives = [f"unit {u}: {u.per_gpu:.3g} rps/GPU" for u in units if u is not chosen_unit][:3]
        choice_text = (
            ""
            if chosen_unit is None
            else f"unit {chosen_unit} ({chosen_unit.gpus} GPUs, {chosen_unit.goodput:.3g} rps each)"
        )
    if dep is None:
        smallest = min((x for x in (s.shapes())), key=lambda x: x.gpus).gpus * 2
        limit = f"maxGpus {max_gpus}" if max_gpus is not None else "the cluster"
        free_text = f"free GPUs per node {sorted(topo.free, reverse=True)[:8]}" if topo.nodes else "no node limit"
        raise PlanningError(
            "NoCapacity",
            f"not even one prefill and one decode instance fit ({limit}; {free_text}); the smallest "
            f"configuration needs at least {smallest} GPUs",
        )
    result, attainment = joint_check(s, dep, target)
    achievable = dep.goodput(s)
    scaling = None
    if dep.gpus < needed:
        limited_by = (
            "maxGpus"
            if max_gpus is not None and dep.gpus + min(dep.prefill.gpus, dep.decode.gpus) > max_gpus
            else "freeGpus"
        )
        scaling = ScalingLimit(
            target_rate=target,
            achievable_rate=round(achievable, 3),
            gpus_needed=needed,
            gpus_available=dep.gpus,
            limited_by=limited_by,
            message=f"{target:g} rps needs {needed} GPUs; {dep.gpus} available "
            f"({limited_by}) carry about {achievable:.3g} rps",
        )
    baseline = None
    if with_baseline:
        coloc = s.colocated()
        if coloc:
            best = coloc[0]
            n_c = max(1, math.ceil(target / best.goodput))
            # Replicas of one engine behind least-loaded dispatch: a few stand for many (as in
            # Deployment.scaled), which keeps the baseline cheap at high rates.
            k = min(n_c, BASELINE_SIMULATED_INSTANCES)
            baseline = Baseline(best.shape, n_c, s.colocated_goodput(best.shape, k) / (k * best.shape.gpus))
    per_gpu = achievable / dep.gpus
    ratio = (
        f" ({per_gpu / baseline.goodput_per_gpu:.2f}× colocated {baseline.shape} at {baseline.goodput_per_gpu:.3g})"
        if baseline and baseline.goodput_per_gpu > 0
        else ""
    )
    marking = " (ESTIMATED: roofline profile, no measured one)" if setup.estimated else ""
    reason = (
        f"planner{marking}: {placement} ({why}); {choice_text}; {dep.prefill_count} prefill + {dep.decode_count} "
        f"decode instance(s) in {dep.units} unit(s), {dep.gpus} GPUs for {target:g} rps; predicted "
        f"attainment {attainment:.1%}, goodput {achievable:.3g} rps = {per_gpu:.3g} rps/GPU{ratio}"
    )
    if scaling:
        reason += f"; scaling limited: {scaling.message}"
    elif attainment < slo.attainment:
        reason += (
            f"; below the {slo.attainment:.0%} target after {MAX_TOP_UPS} top-ups: the simulation "
            "is noisy at this size, verify with measured attainment"
        )
    plan = Plan(
        placement=placement,
        profile="estimated" if setup.estimated else "measured",
        prefill=PhasePlan(tensor=dep.prefill.tensor, pipeline=dep.prefill.pipeline, replicas=dep.prefill_count),
        decode=PhasePlan(tensor=dep.decode.tensor, pipeline=dep.decode.pipeline, replicas=dep.decode_count),
        units=dep.units,
        source="planner",
        predicted_goodput_per_gpu=round(per_gpu, 4),
        predicted=Prediction(
            ttft_p90_ms=round(result.ttft_p(), 2),
            tpot_p90_ms=round(result.tpot_p(), 2),
            attainment=round(attainment, 4),
        ),
        baseline_goodput_per_gpu=round(baseline.goodput_per_gpu, 4) if baseline else None,
        scaling_limited=scaling,
        reason=reason,
    )
    return PlanOutcome(
        plan=plan,
        deployment=dep,
        baseline=baseline,
        alternatives=alternatives,
        stats=s.stats,
        seconds=time.perf_counter() - started,
        searcher=s,
        rate=target,
        placement_why=why,
        profile_source=prof_source,
        estimated=setup.estimated,
    )
