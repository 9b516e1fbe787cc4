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
from disaggserve.planner.capacity import fit_instances, fit_units
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.facts import MEMORY_UTILIZATION, Facts, builtin_facts, from_spec
from disaggserve.planner.profile import (
    LatencyProfile,
    ProfileError,
    builtin_profiles,
    find_builtin,
    load_profile_input,
)
from disaggserve.planner.search import (
    TENSOR_SIZES,
    HardwareView,
    PhaseChoice,
    Searcher,
    SearchStats,
    Shape,
    UnitChoice,
    shared_goodputs,
)
from disaggserve.planner.simulator import SimResult
from disaggserve.planner.workload import (
    DEFAULT_REQUESTS,
    DEFAULT_SEED,
    MAX_REQUESTS,
    LengthDistribution,
    WorkloadModel,
    sample_requests,
)
from disaggserve.topology import Topology, build_topology, choose_placement, hardware_only

MAX_TOP_UPS = 8  # extra replicas/units the joint check may add before giving up on the target
MAX_SIMULATED_INSTANCES = 8  # see Deployment.scaled
BASELINE_SIMULATED_INSTANCES = 4
# Candidates (best by per-instance goodputs) that are sized as whole deployments before the
# choice: pooling across instances makes deployment goodput differ from the sum of the parts.
# High affinity sizes more: its pairs are cheap to size and their ranking is looser (measured
# in bench/planner.py against the exhaustive reference).
RERANK_TOP = {"high-affinity": 6, "low-affinity": 3}


@dataclass(frozen=True)
class Deployment:
    """Instances as deployed: `units` groups of (n_p prefill, n_d decode) per group."""

    prefill: Shape
    prefill_count: int  # in total
    decode: Shape
    decode_count: int
    units: int
    gbps: float

    @property
    def gpus(self) -> int:
        return self.prefill.gpus * self.prefill_count + self.decode.gpus * self.decode_count

    def scaled(self) -> tuple[Deployment, float]:
        """A deployment of at most MAX_SIMULATED_INSTANCES with the same mix, and the share of
        the traffic it stands for. Large deployments are symmetric copies (units) or nearly so,
        and simulating thousands of instances would make planning a big rate take minutes;
        rounding the mix down keeps the estimate on the safe side."""
        total = self.prefill_count + self.decode_count
        if total <= MAX_SIMULATED_INSTANCES:
            return self, 1.0
        if self.units > 1:
            keep = max(1, MAX_SIMULATED_INSTANCES * self.units // total)
            per_p, per_d = self.prefill_count // self.units, self.decode_count // self.units
            return Deployment(self.prefill, per_p * keep, self.decode, per_d * keep, keep, self.gbps), keep / self.units
        factor = total / MAX_SIMULATED_INSTANCES
        n_p = max(1, int(self.prefill_count / factor))
        n_d = max(1, int(self.decode_count / factor))
        share = min(n_p / self.prefill_count, n_d / self.decode_count)
        return Deployment(self.prefill, n_p, self.decode, n_d, 1, self.gbps), share

    def simulate(self, searcher: Searcher, rate: float) -> SimResult:
        small, share = self.scaled()
        return searcher.simulate_plan(
            rate * share,
            small.prefill,
            small.prefill_count,
            small.decode,
            small.decode_count,
            small.gbps,
            small.units,
        )

    def goodput(self, searcher: Searcher) -> float:
        small, share = self.scaled()
        per_unit_p, per_unit_d = small.prefill_count // small.units, small.decode_count // small.units
        return (
            searcher.unit_goodput(small.prefill, per_unit_p, small.decode, per_unit_d, small.gbps, small.units) / share
        )


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


# ---- inputs ----------------------------------------------------------------------------------


def resolve_profile(spec: DisaggServeSpec, doc: dict[str, Any] | None) -> tuple[LatencyProfile, str]:
    if doc is not None:
        try:
            prof = load_profile_input(doc)
        except ProfileError as e:
            raise PlanningError("ProfileInvalid", str(e)) from None
        return prof, f"given profile ({prof.model} on {prof.gpu})"
    if spec.profile and spec.profile.builtin:
        found = builtin_profiles()
        if spec.profile.builtin not in found:
            raise PlanningError(
                "ProfileMissing",
                f"spec.profile.builtin {spec.profile.builtin!r} is not a "
                f"built-in profile; choose one of {', '.join(sorted(found))}",
            )
        return found[spec.profile.builtin], f"built-in profile {spec.profile.builtin}"
    if spec.profile and spec.profile.config_map_ref:
        raise PlanningError(
            "ProfileMissing",
            f"ConfigMap {spec.profile.config_map_ref.name} was not passed to "
            "the planner; the operator reads it and passes its data as `profile`",
        )
    source = spec.model.source
    product = "cpu" if spec.hardware.device == "cpu" else spec.hardware.gpu_product
    names = [spec.model.name] + ([source.builtin] if source.builtin else [])
    for name in names:
        prof = find_builtin(name, product)
        if prof is not None:
            return prof, f"built-in profile for {prof.model} on {prof.gpu}"
    raise PlanningError(
        "ProfileMissing",
        f"no latency profile for model {spec.model.name!r} on {product}: run `disaggserve-worker profile "
        f"--model {source.worker_arg()} --out profile.json` on one such node, then `kubectl create "
        "configmap <name> --from-file=profile.json` and set spec.profile.configMapRef.name "
        "(or set spec.parallelism to plan by hand)",
    )


def resolve_facts(spec: DisaggServeSpec, profile: LatencyProfile) -> Facts:
    if spec.model.facts is not None:
        return from_spec(spec.model.facts)
    if profile.model_facts is not None:
        return profile.model_facts.to_facts()
    for name in (spec.model.name, profile.model):
        found = builtin_facts(name)
        if found:
            return found
    raise PlanningError(
        "ModelFactsMissing",
        f"the planner does not know the architecture of "
        f"{spec.model.name!r}: set spec.model.facts (layers, attentionHeads, kvHeads, "
        "hiddenSize, parameters, dtypeBytes)",
    )


def workload_model(
    spec: DisaggServeSpec,
    rate: float | None,
    lengths: tuple[LengthDistribution, LengthDistribution] | None = None,
) -> WorkloadModel:
    w = spec.workload
    limit = spec.model.max_model_len
    if lengths is None:
        lengths = (
            LengthDistribution(kind=w.distribution, mean=w.input_tokens, sigma=w.sigma, maximum=limit),
            LengthDistribution(kind=w.distribution, mean=w.output_tokens, sigma=w.sigma, maximum=limit),
        )
    return WorkloadModel(rate=rate if rate is not None else w.request_rate, input=lengths[0], output=lengths[1])


def resolve_topology(
    spec: DisaggServeSpec, nodes: list[dict[str, Any]] | None, used: dict[str, int] | None
) -> Topology:
    # CPU workers take no GPUs: Node GPU labels say nothing about where they fit.
    if nodes is None or spec.hardware.device == "cpu":
        return hardware_only(spec.hardware)
    topo = build_topology(nodes, spec.hardware, used)
    if not topo.nodes:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(topo.excluded.items())[:5]) or "the cluster has no nodes"
        raise PlanningError(
            "NoCapacity",
            f"no node can run this resource's GPU pods ({why}); check "
            "spec.hardware.gpuProduct, nodeSelector and tolerations",
        )
    if topo.free_total == 0:
        raise PlanningError(
            "NoCapacity",
            f"all {sum(n.gpus for n in topo.nodes)} GPUs of the {len(topo.nodes)} eligible node(s) are in use",
        )
    return topo


# ---- impossible requests ---------------------------------------------------------------------


def _explain_no_shape(s: Searcher, topo: Topology) -> PlanningError:
    sizes = s.profile.tensor_sizes()
    usable = [t for t in sizes if t <= topo.gpus_per_node]
    if not usable:
        return PlanningError(
            "ProfileMissing",
            f"the profile has tensor sizes {sizes} but nodes have "
            f"{topo.gpus_per_node} GPUs; profile smaller tensor sizes",
        )
    gib = 1024**3
    per_gpu = topo.gpu_memory_bytes * MEMORY_UTILIZATION / gib
    largest = topo.gpus_per_node
    return PlanningError(
        "ModelTooLarge",
        f"weights of {s.facts.weight_bytes / gib:.0f} GiB plus KV room for a {s.need_tokens}-token request "
        f"({s.need_tokens * s.facts.kv_bytes_per_token / gib:.1f} GiB) do not fit any instance: "
        f"the largest is one node's {largest} GPUs × {per_gpu:.0f} GiB usable = "
        f"{largest * per_gpu:.0f} GiB; use nodes with more or larger GPUs, or a quantised model",
    )


def _explain_unreachable(s: Searcher, gbps: float) -> PlanningError | None:
    q = round(s.slo.attainment * 100)
    shapes = s.shapes()
    if not any(s.prefill_reachable(x) for x in shapes):
        shape, ms = s.fastest_prefill()
        return PlanningError(
            "SLOUnattainable",
            f"TTFT {s.slo.ttft_ms:g} ms is below the fastest prefill of "
            f"this model on this GPU, {ms:.0f} ms at tensor size {shape.tensor} (p{q} of prompt "
            "lengths, no queueing); raise slo.ttftMs or lower slo.attainment",
        )
    if not any(s.decode_reachable(x, gbps) for x in shapes):
        shape, ms = s.fastest_decode(gbps)
        return PlanningError(
            "SLOUnattainable",
            f"TPOT {s.slo.tpot_ms:g} ms is below the fastest decode of this "
            f"model on this GPU, {ms:.0f} ms per token at tensor size {shape.tensor} (p{q}, "
            f"batch 1, KV transfer at {gbps:g} Gbps included); raise slo.tpotMs",
        )
    return None


# ---- the search and sizing -------------------------------------------------------------------


def _joint_check(s: Searcher, dep: Deployment, rate: float) -> tuple[SimResult, float]:
    result = dep.simulate(s, rate)
    return result, result.attainment(s.slo.ttft_ms, s.slo.tpot_ms)


def _meets(s: Searcher, dep: Deployment, rate: float) -> bool:
    return _joint_check(s, dep, rate)[1] >= s.slo.attainment


def _size_high(
    s: Searcher,
    p: PhaseChoice,
    d: PhaseChoice,
    rate: float,
    free: list[int] | None,
    max_gpus: int | None,
    gbps: float,
) -> tuple[Deployment, int]:
    """Replicas for the rate from per-instance goodputs, corrected by the joint check — up where
    requests miss both SLOs, down where pooled instances carry more than the sum of their parts
    — then fitted into free GPUs. Returns (deployment, GPUs the target needs)."""
    dep = Deployment(p.shape, math.ceil(rate / p.goodput), d.shape, math.ceil(rate / d.goodput), 1, gbps)
    for _ in range(MAX_TOP_UPS):
        result, att = _joint_check(s, dep, rate)
        if att >= s.slo.attainment:
            break
        ttft_ok = float((result.ttft_ms <= s.slo.ttft_ms).mean())
        tpot_ok = float((result.tpot_ms <= s.slo.tpot_ms).mean())
        if ttft_ok <= tpot_ok:
            dep = Deployment(p.shape, dep.prefill_count + 1, d.shape, dep.decode_count, 1, gbps)
        else:
            dep = Deployment(p.shape, dep.prefill_count, d.shape, dep.decode_count + 1, 1, gbps)
    else:
        return _fit_high(dep, free, max_gpus), dep.gpus
    for _ in range(MAX_TOP_UPS):
        fewer = [
            Deployment(p.shape, dep.prefill_count - dp, d.shape, dep.decode_count - dd, 1, gbps)
            for dp, dd in ((1, 0), (0, 1))
            if dep.prefill_count - dp >= 1 and dep.decode_count - dd >= 1
        ]
        trimmed = next((x for x in sorted(fewer, key=lambda x: x.gpus) if _meets(s, x, rate)), None)
        if trimmed is None:
            break
        dep = trimmed
    return _fit_high(dep, free, max_gpus), dep.gpus


def _fit_high(dep: Deployment, free: list[int] | None, max_gpus: int | None) -> Deployment:
    got_p, got_d = fit_instances(
        free, [(dep.prefill.gpus, dep.prefill_count), (dep.decode.gpus, dep.decode_count)], max_gpus
    )
    return Deployment(dep.prefill, got_p, dep.decode, got_d, 1, dep.gbps)


def _size_low(
    s: Searcher, u: UnitChoice, rate: float, free: list[int] | None, max_gpus: int | None, gbps: float
) -> tuple[Deployment, int]:
    """Units for the rate from the unit's goodput, corrected by the joint check in both
    directions (least-loaded dispatch pools prefill across units), then fitted."""
    units = math.ceil(rate / u.goodput)

    def dep_of(n: int) -> Deployment:
        return Deployment(u.prefill, u.prefill_count * n, u.decode, u.decode_count * n, n, gbps)

    grew = False
    for _ in range(MAX_TOP_UPS):
        if _meets(s, dep_of(units), rate):
            break
        units += 1
        grew = True
    if not grew:
        for _ in range(MAX_TOP_UPS):
            if units <= 1 or not _meets(s, dep_of(units - 1), rate):
                break
            units -= 1
    needed = units * u.gpus
    return dep_of(fit_units(free, u.gpus, units, max_gpus)), needed


def _pick(s: Searcher, sized: list):
    """Among sized candidates, the deployment that carries the target on the fewest GPUs, then
    with the highest per-GPU goodput (simulated only for the ties); candidates cut short by
    capacity count only if all are."""
    full = [x for x in sized if x[1].gpus >= x[2]] or sized
    fewest = min(x[2] for x in full)
    tied = [x for x in full if x[2] == fewest]
    if len(tied) == 1:
        return tied[0]
    return max(tied, key=lambda x: x[1].goodput(s) / x[1].gpus)


@dataclass
class SearchSetup:
    searcher: Searcher
    topology: Topology
    rate: float
    profile_source: str


def build_search(
    spec: DisaggServeSpec,
    *,
    nodes: list[dict[str, Any]] | None = None,
    profile: dict[str, Any] | None = None,
    rate: float | None = None,
    used_gpus: dict[str, int] | None = None,
    lengths: tuple[LengthDistribution, LengthDistribution] | None = None,
    requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    max_tensor: int | None = None,
    profile_scale: tuple[float, float] | None = None,
) -> SearchSetup:
    """Resolve the inputs (profile, model facts, topology, workload) into a Searcher.

    `profile_scale` multiplies the profile's (prefill, decode) times: the autoscaler's
    correction from measured/predicted latency.
    """
    prof, prof_source = resolve_profile(spec, profile)
    if profile_scale is not None:
        prof = prof.scaled(*profile_scale)
        prof_source += f" x ({profile_scale[0]:.2f} prefill, {profile_scale[1]:.2f} decode) measured"
    facts = resolve_facts(spec, prof)
    topo = resolve_topology(spec, nodes, used_gpus)
    work = workload_model(spec, rate, lengths)
    slo = spec.slo
    hw = HardwareView(topo.gpus_per_node, topo.gpu_memory_bytes, topo.intra_gbps, topo.cross_gbps)
    memo = shared_goodputs((prof.model_dump_json(), facts, work.input, work.output, seed, requests, slo, hw))
    searcher = Searcher(
        prof,
        facts,
        sample_requests(work, MAX_REQUESTS, seed),
        slo,
        hw,
        work.rate,
        min_requests=requests,
        max_tensor=max_tensor or max(TENSOR_SIZES),
        _goodputs=memo,
    )
    return SearchSetup(searcher, topo, work.rate, prof_source)


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
        raise _explain_no_shape(s, topo)
    placement, why = choose_placement(spec.placement, topo.cross_gbps)
    gbps = topo.cross_gbps if placement == "high-affinity" else topo.intra_gbps
    unreachable = _explain_unreachable(s, gbps)
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
            dep, needed = _size_high(s, p, d, target, free, max_gpus, gbps)
            if dep.prefill_count and dep.decode_count:
                sized.append(((p, d), dep, needed))
                if not exhaustive and len(sized) >= RERANK_TOP["high-affinity"]:
                    break
        (chosen_p, chosen_d), dep, needed = _pick(s, sized) if sized else ((None, None), None, 0)
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
            dep, needed = _size_low(s, u, target, free, max_gpus, gbps)
            if dep.units:
                sized.append((u, dep, needed))
                if not exhaustive and len(sized) >= RERANK_TOP["low-affinity"]:
                    break
        chosen_unit, dep, needed = _pick(s, sized) if sized else (None, None, 0)
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
    result, attainment = _joint_check(s, dep, target)
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
    reason = (
        f"planner: {placement} ({why}); {choice_text}; {dep.prefill_count} prefill + {dep.decode_count} "
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
    )
