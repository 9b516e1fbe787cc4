"""Deployments as sized for a rate: replicas from per-instance goodputs, checked jointly.

Per-phase searches each aim at the attainment target, but the share of requests meeting *both*
SLOs is lower, and least-loaded dispatch pools instances so a deployment can carry more than
the sum of its parts. So a candidate is simulated as a whole deployment at the target rate and
replicas are added where the joint run says the shortfall is, or removed while it still holds.
The first plan (`auto.py`) and the autoscaler's re-plan (`replan.py`) both size here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from disaggserve.planner.capacity import fit_instances, fit_units
from disaggserve.planner.search import PhaseChoice, Searcher, Shape, UnitChoice
from disaggserve.planner.simulator import SimResult

MAX_TOP_UPS = 8  # extra replicas/units the joint check may add before giving up on the target
MAX_SIMULATED_INSTANCES = 8  # see Deployment.scaled


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


@dataclass(frozen=True)
class ColocatedDeployment:
    """`count` colocated instances (each runs both phases, vLLM style) behind one router."""

    shape: Shape
    count: int

    @property
    def gpus(self) -> int:
        return self.shape.gpus * self.count

    def scaled(self) -> tuple[ColocatedDeployment, float]:
        """At most MAX_SIMULATED_INSTANCES identical instances and the traffic share they carry."""
        if self.count <= MAX_SIMULATED_INSTANCES:
            return self, 1.0
        return ColocatedDeployment(self.shape, MAX_SIMULATED_INSTANCES), MAX_SIMULATED_INSTANCES / self.count

    def simulate(self, searcher: Searcher, rate: float) -> SimResult:
        small, share = self.scaled()
        return searcher.simulate_colocated_plan(rate * share, small.shape, small.count)

    def goodput(self, searcher: Searcher) -> float:
        small, share = self.scaled()
        return searcher.colocated_goodput(small.shape, small.count) / share


def joint_check(s: Searcher, dep: Deployment | ColocatedDeployment, rate: float) -> tuple[SimResult, float]:
    result = dep.simulate(s, rate)
    return result, result.attainment(s.slo.ttft_ms, s.slo.tpot_ms)


def meets(s: Searcher, dep: Deployment | ColocatedDeployment, rate: float) -> bool:
    return joint_check(s, dep, rate)[1] >= s.slo.attainment


def size_high(
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
        result, att = joint_check(s, dep, rate)
        if att >= s.slo.attainment:
            break
        ttft_ok = float((result.ttft_ms <= s.slo.ttft_ms).mean())
        tpot_ok = float((result.tpot_ms <= s.slo.tpot_ms).mean())
        if ttft_ok <= tpot_ok:
            dep = Deployment(p.shape, dep.prefill_count + 1, d.shape, dep.decode_count, 1, gbps)
        else:
            dep = Deployment(p.shape, dep.prefill_count, d.shape, dep.decode_count + 1, 1, gbps)
    else:
        return fit_high(dep, free, max_gpus), dep.gpus
    for _ in range(MAX_TOP_UPS):
        fewer = [
            Deployment(p.shape, dep.prefill_count - dp, d.shape, dep.decode_count - dd, 1, gbps)
            for dp, dd in ((1, 0), (0, 1))
            if dep.prefill_count - dp >= 1 and dep.decode_count - dd >= 1
        ]
        trimmed = next((x for x in sorted(fewer, key=lambda x: x.gpus) if meets(s, x, rate)), None)
        if trimmed is None:
            break
        dep = trimmed
    return fit_high(dep, free, max_gpus), dep.gpus


def fit_high(dep: Deployment, free: list[int] | None, max_gpus: int | None) -> Deployment:
    got_p, got_d = fit_instances(
        free, [(dep.prefill.gpus, dep.prefill_count), (dep.decode.gpus, dep.decode_count)], max_gpus
    )
    return Deployment(dep.prefill, got_p, dep.decode, got_d, 1, dep.gbps)


def size_low(
    s: Searcher, u: UnitChoice, rate: float, free: list[int] | None, max_gpus: int | None, gbps: float
) -> tuple[Deployment, int]:
    """Units for the rate from the unit's goodput, corrected by the joint check in both
    directions (least-loaded dispatch pools prefill across units), then fitted."""
    units = math.ceil(rate / u.goodput)

    def dep_of(n: int) -> Deployment:
        return Deployment(u.prefill, u.prefill_count * n, u.decode, u.decode_count * n, n, gbps)

    grew = False
    for _ in range(MAX_TOP_UPS):
        if meets(s, dep_of(units), rate):
            break
        units += 1
        grew = True
    if not grew:
        for _ in range(MAX_TOP_UPS):
            if units <= 1 or not meets(s, dep_of(units - 1), rate):
                break
            units -= 1
    needed = units * u.gpus
    return dep_of(fit_units(free, u.gpus, units, max_gpus)), needed


def pick(s: Searcher, sized: list):
    """Among sized candidates, the deployment that carries the target on the fewest GPUs, then
    with the highest per-GPU goodput (simulated only for the ties); candidates cut short by
    capacity count only if all are."""
    full = [x for x in sized if x[1].gpus >= x[2]] or sized
    fewest = min(x[2] for x in full)
    tied = [x for x in full if x[2] == fewest]
    if len(tied) == 1:
        return tied[0]
    return max(tied, key=lambda x: x[1].goodput(s) / x[1].gpus)


def size_colocated(
    s: Searcher, choice: PhaseChoice, rate: float, free: list[int] | None, max_gpus: int | None
) -> tuple[ColocatedDeployment, int]:
    """Colocated instances for the rate from one instance's goodput, corrected by simulating
    them together (least-loaded dispatch pools them too), then fitted into free GPUs."""
    count = max(1, math.ceil(rate / choice.goodput))
    grew = False
    for _ in range(MAX_TOP_UPS):
        if meets(s, ColocatedDeployment(choice.shape, count), rate):
            break
        count += 1
        grew = True
    if not grew:
        for _ in range(MAX_TOP_UPS):
            if count <= 1 or not meets(s, ColocatedDeployment(choice.shape, count - 1), rate):
                break
            count -= 1
    (got,) = fit_instances(free, [(choice.shape.gpus, count)], max_gpus)
    return ColocatedDeployment(choice.shape, got), count * choice.shape.gpus
