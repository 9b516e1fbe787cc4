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
from disaggserve.planner.deployment import (
    MAX_TOP_UPS,
    ColocatedDeployment,
    Deployment,
    joint_check,
    pick,
    size_colocated,
    size_high,
    size_low,
)
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.explain import explain_no_shape, explain_unreachable
from disaggserve.planner.inputs import build_search
from disaggserve.planner.search import (
    POOLING_SLACK,
    UNIT_POOLING_SLACK,
    PhaseChoice,
    Searcher,
    SearchStats,
    Shape,
    UnitChoice,
)
from disaggserve.planner.workload import DEFAULT_REQUESTS, DEFAULT_SEED, LengthDistribution
from disaggserve.topology import choose_placement

# Colocated shapes (best per-GPU first) sized as whole deployments before the choice.
COLOCATED_TOP = 3
# Replicas of one colocated engine simulated to stand for many (`plan --plot`'s baseline curve).
BASELINE_SIMULATED_INSTANCES = 4
# Candidates are sized as whole deployments (pooling across instances makes a deployment carry
# more than the sum of its parts) in order of a lower bound on the GPUs they could need — the
# count at their goodput inflated by POOLING_SLACK — until the next bound exceeds the best
# deployment sized so far (branch and bound: nothing skipped could have been smaller), at
# most MAX_SIZED of them (planning time; high-affinity pairs are costlier to size and pool less).
MAX_SIZED = {"high-affinity": 8, "low-affinity": 24}


@dataclass
class Baseline:
    shape: Shape
    instances: int
    goodput_per_gpu: float


@dataclass
class Candidate:
    """One placement's best deployment for the target: what the choice between them compares."""

    placement: str
    deployment: Deployment | ColocatedDeployment
    needed: int  # GPUs the target needs (deployment.gpus may be fewer: capacity)
    choice_text: str
    alternatives: list[str]
    goodput: float = 0.0  # of the deployment as sized, filled in when compared

    @property
    def full(self) -> bool:
        return self.deployment.gpus >= self.needed

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.deployment.gpus if self.deployment.gpus else 0.0


@dataclass
class PlanOutcome:
    """The plan plus what the CLI shows next to it (alternatives, baseline, search cost)."""

    plan: Plan
    deployment: Deployment | ColocatedDeployment
    baseline: Baseline | None
    alternatives: list[str]
    stats: SearchStats
    seconds: float
    searcher: Searcher
    rate: float
    placement_why: str
    profile_source: str = ""
    estimated: bool = False


def _disaggregated(
    s: Searcher,
    placement: str,
    gbps: float,
    target: float,
    free: list[int] | None,
    max_gpus: int | None,
    exhaustive: bool,
) -> Candidate:
    """The best high- or low-affinity deployment for the target (PlanningError if none)."""
    slo = s.slo
    if placement == "high-affinity":
        prefill, decode = s.high_affinity(exhaustive=exhaustive)
        if not prefill or not decode:
            raise PlanningError(
                "SLOUnattainable",
                f"no {'prefill' if not prefill else 'decode'} configuration "
                f"reaches {slo.attainment:.0%} attainment at any rate",
            )

        def bound(pd: tuple[PhaseChoice, PhaseChoice]) -> float:
            return _fewest_gpus(target, pd[0].goodput, pd[0].shape.gpus) + _fewest_gpus(
                target, pd[1].goodput, pd[1].shape.gpus
            )

        pairs = sorted(((p, d) for p in prefill for d in decode), key=bound)
        sized = []
        best = math.inf
        for p, d in pairs:
            if not exhaustive and (bound((p, d)) > best or len(sized) >= MAX_SIZED["high-affinity"]):
                break
            dep, needed = size_high(s, p, d, target, free, max_gpus, gbps)
            if dep.prefill_count and dep.decode_count:
                sized.append(((p, d), dep, needed))
                best = min(best, needed)
        if not sized:
            raise _no_capacity(s, free, max_gpus)
        (chosen_p, chosen_d), dep, needed = pick(s, sized)
        alternatives = [f"prefill {c.shape}: {c.per_gpu:.3g} rps/GPU" for c in prefill[1:3]] + [
            f"decode {c.shape}: {c.per_gpu:.3g} rps/GPU" for c in decode[1:3]
        ]
        choice_text = (
            f"prefill {dep.prefill} ({chosen_p.goodput:.3g} rps each), decode {dep.decode} "
            f"({chosen_d.goodput:.3g} rps each)"
        )
        return Candidate(placement, dep, needed, choice_text, alternatives)
    units = s.low_affinity(exhaustive=exhaustive)
    if not units:
        raise PlanningError(
            "SLOUnattainable",
            f"no prefill+decode unit reaches {slo.attainment:.0%} attainment at any rate",
        )
    sized = []
    best = math.inf

    def unit_bound(u: UnitChoice) -> float:
        return _fewest_gpus(target, u.goodput, u.gpus, UNIT_POOLING_SLACK)

    for u in sorted(units, key=unit_bound):
        if not exhaustive and (unit_bound(u) > best or len(sized) >= MAX_SIZED["low-affinity"]):
            break
        dep, needed = size_low(s, u, target, free, max_gpus, gbps)
        if dep.units:
            sized.append((u, dep, needed))
            best = min(best, needed)
    if not sized:
        raise _no_capacity(s, free, max_gpus)
    chosen_unit, dep, needed = pick(s, sized)
    alternatives = [f"unit {u}: {u.per_gpu:.3g} rps/GPU" for u in units if u is not chosen_unit][:3]
    choice_text = f"unit {chosen_unit} ({chosen_unit.gpus} GPUs, {chosen_unit.goodput:.3g} rps each)"
    return Candidate(placement, dep, needed, choice_text, alternatives)


def _fewest_gpus(target: float, goodput: float, gpus: int, slack: float = POOLING_SLACK) -> float:
    """A lower bound on the GPUs copies of a configuration need for the target, pooling included."""
    return math.ceil(target / (goodput * slack)) * gpus if goodput > 0 else math.inf


def _no_capacity(s: Searcher, free: list[int] | None, max_gpus: int | None) -> PlanningError:
    smallest = min(s.shapes(), key=lambda x: x.gpus).gpus * 2
    limit = f"maxGpus {max_gpus}" if max_gpus is not None else "the cluster"
    free_text = f"free GPUs per node {sorted(free, reverse=True)[:8]}" if free is not None else "no node limit"
    return PlanningError(
        "NoCapacity",
        f"not even one prefill and one decode instance fit ({limit}; {free_text}); the smallest "
        f"configuration needs at least {smallest} GPUs",
    )


def _colocated(s: Searcher, target: float, free: list[int] | None, max_gpus: int | None) -> Candidate | None:
    """The best colocated deployment for the target (None: no colocated shape reaches the SLOs
    or fits). Shapes are tensor-parallel only, as DistServe's vLLM baseline."""
    ranked = s.colocated()
    sized = []
    for choice in ranked[:COLOCATED_TOP]:
        dep, needed = size_colocated(s, choice, target, free, max_gpus)
        if dep.count:
            sized.append((choice, dep, needed))
    if not sized:
        return None
    chosen, dep, needed = pick(s, sized)
    alternatives = [f"colocated {c.shape}: {c.per_gpu:.3g} rps/GPU" for c in ranked if c is not chosen][:3]
    return Candidate("colocated", dep, needed, f"colocated {dep.shape} ({chosen.goodput:.3g} rps each)", alternatives)


def _better(a: Candidate, b: Candidate) -> bool:
    """Is `a` the better deployment? Fewest GPUs for the target, then the higher per-GPU
    goodput; one cut short by capacity loses to one that is not, two cut short compare goodput."""
    if a.full != b.full:
        return a.full
    if not a.full:
        return a.goodput > b.goodput
    return (a.needed, -a.per_gpu) < (b.needed, -b.per_gpu)


def _gpus_text(c: Candidate) -> str:
    return f"{c.needed} GPUs at {c.per_gpu:.3g} rps/GPU"


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
    as a whole deployment (no branch-and-bound stop, MAX_SIZED) before choosing by the same rule —
    the reference the benchmark compares the pruned search with.

    With `placement: auto` the best disaggregated deployment (high or low affinity, by the
    network) and the best colocated one are both sized for the target and the one needing fewer
    GPUs wins (then higher per-GPU goodput): for some models and SLOs disaggregation loses.
    """
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
    free = list(topo.free) if topo.nodes else None
    max_gpus = spec.autoscaling.max_gpus
    disagg: Candidate | None = None
    disagg_error: PlanningError | None = None
    disagg_why = ""
    if spec.placement != "colocated":
        placement_d, disagg_why = choose_placement(spec.placement, topo.cross_gbps)
        gbps = topo.cross_gbps if placement_d == "high-affinity" else topo.intra_gbps
        try:
            unreachable = explain_unreachable(s, gbps)
            if unreachable:
                raise unreachable
            disagg = _disaggregated(s, placement_d, gbps, target, free, max_gpus, exhaustive)
            disagg.goodput = disagg.deployment.goodput(s)
        except PlanningError as e:
            if spec.placement != "auto":
                raise
            disagg_error = e
    coloc: Candidate | None = None
    if spec.placement in ("auto", "colocated") or with_baseline:
        coloc = _colocated(s, target, free, max_gpus)
        if coloc is not None:
            coloc.goodput = coloc.deployment.goodput(s)
    if disagg is None and coloc is None:
        if disagg_error is not None:
            raise disagg_error
        raise PlanningError(
            "SLOUnattainable",
            f"no colocated configuration reaches {slo.attainment:.0%} attainment within TTFT "
            f"{slo.ttft_ms:g} ms and TPOT {slo.tpot_ms:g} ms at any rate (or none fits the free GPUs); "
            "relax the SLOs or use placement auto",
        )
    if spec.placement == "colocated":
        assert coloc is not None
        chosen, why = coloc, "colocated as requested in spec.placement"
    elif disagg is None:
        assert coloc is not None and disagg_error is not None
        chosen, why = coloc, f"auto: colocated, disaggregated is not possible ({disagg_error})"
    elif spec.placement == "auto" and coloc is not None and _better(coloc, disagg):
        chosen = coloc
        why = (
            f"auto: colocated carries {target:g} rps on {_gpus_text(coloc)}, disaggregated "
            f"{disagg.placement} would need {_gpus_text(disagg)}"
        )
    else:
        chosen, why = disagg, disagg_why
    dep = chosen.deployment
    needed = chosen.needed
    result, attainment = joint_check(s, dep, target)
    achievable = chosen.goodput
    scaling = None
    if dep.gpus < needed:
        step = dep.shape.gpus if isinstance(dep, ColocatedDeployment) else min(dep.prefill.gpus, dep.decode.gpus)
        limited_by = "maxGpus" if max_gpus is not None and dep.gpus + step > max_gpus else "freeGpus"
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
    if coloc is not None and (with_baseline or chosen is coloc):
        assert isinstance(coloc.deployment, ColocatedDeployment)
        baseline = Baseline(coloc.deployment.shape, coloc.deployment.count, coloc.per_gpu)
    per_gpu = achievable / dep.gpus
    marking = " (ESTIMATED: roofline profile, no measured one)" if setup.estimated else ""
    if isinstance(dep, ColocatedDeployment):
        other = f"; disaggregated {disagg.placement}: {_gpus_text(disagg)}" if disagg else ""
        reason = (
            f"planner{marking}: colocated ({why}); {chosen.choice_text}; {dep.count} colocated instance(s), "
            f"{dep.gpus} GPUs for {target:g} rps; predicted attainment {attainment:.1%}, goodput "
            f"{achievable:.3g} rps = {per_gpu:.3g} rps/GPU{other}"
        )
        shape = dep.shape
        none = PhasePlan(tensor=shape.tensor, pipeline=shape.pipeline, replicas=0)
        phases = {
            "prefill": none,
            "decode": none,
            "colocated": PhasePlan(tensor=shape.tensor, pipeline=shape.pipeline, replicas=dep.count),
            "units": 1,
        }
    else:
        ratio = (
            f" ({per_gpu / baseline.goodput_per_gpu:.2f}× colocated {baseline.shape} at "
            f"{baseline.goodput_per_gpu:.3g}, {_gpus_text(coloc)})"
            if baseline and coloc and baseline.goodput_per_gpu > 0
            else ""
        )
        reason = (
            f"planner{marking}: {chosen.placement} ({why}); {chosen.choice_text}; {dep.prefill_count} prefill + "
            f"{dep.decode_count} decode instance(s) in {dep.units} unit(s), {dep.gpus} GPUs for {target:g} rps; "
            f"prefill batches up to {s.prefill_budget(dep.prefill)} tokens (L_m of the profile); "
            f"predicted attainment {attainment:.1%}, goodput {achievable:.3g} rps = {per_gpu:.3g} rps/GPU{ratio}"
        )
        phases = {
            "prefill": PhasePlan(tensor=dep.prefill.tensor, pipeline=dep.prefill.pipeline, replicas=dep.prefill_count,
                                 max_batch_tokens=s.prefill_budget(dep.prefill)),
            "decode": PhasePlan(tensor=dep.decode.tensor, pipeline=dep.decode.pipeline, replicas=dep.decode_count),
            "units": dep.units,
        }
    if scaling:
        reason += f"; scaling limited: {scaling.message}"
    elif attainment < slo.attainment:
        reason += (
            f"; below the {slo.attainment:.0%} target after {MAX_TOP_UPS} top-ups: the simulation "
            "is noisy at this size, verify with measured attainment"
        )
    plan = Plan(
        placement=chosen.placement,
        profile="estimated" if setup.estimated else "measured",
        **phases,
        source="planner",
        predicted_goodput_per_gpu=round(per_gpu, 4),
        predicted=Prediction(
            ttft_p90_ms=round(result.ttft_p(), 2),
            tpot_p90_ms=round(result.tpot_p(), 2),
            attainment=round(attainment, 4),
        ),
        baseline_goodput_per_gpu=round(baseline.goodput_per_gpu, 4) if baseline else None,
        disaggregated_goodput_per_gpu=round(disagg.per_gpu, 4) if disagg and chosen is coloc else None,
        scaling_limited=scaling,
        reason=reason,
    )
    return PlanOutcome(
        plan=plan,
        deployment=dep,
        baseline=baseline,
        alternatives=chosen.alternatives,
        stats=s.stats,
        seconds=time.perf_counter() - started,
        searcher=s,
        rate=target,
        placement_why=why,
        profile_source=prof_source,
        estimated=setup.estimated,
    )
