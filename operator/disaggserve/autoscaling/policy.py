"""The autoscaler's policy: from a recommendation (the planner's replica counts for the measured
workload) and what is running now, decide what to run next. Pure and clocked by the caller.

Why each rule:
- up fast, down slowly: a missed SLO costs users now; an idle GPU costs money later. Scale-up
  acts on the latest recommendation; scale-down acts on the *highest* recommendation seen
  during the stabilization window (as the HPA does), so a brief lull does not shed capacity.
  A *sustained* drop is not a lull: when the measured rate (if the caller records it with
  `PolicyState.observe_rate`) has stayed below the window's peak by SUSTAINED_DROP for the
  last SUSTAINED_INTERVALS decisions, only the recommendations made since count — the planner's
  prediction for the lower rate is what the next interval needs.
- bounded steps: at most doubling (or +4 instances when small, as the HPA allows) up, at most
  halving down, per decision; large jumps follow
  over a few intervals, each re-checked against fresh metrics.
- no action while a previous change is still rolling out: new replicas are not yet measured.
- missing metrics never shrink anything; bounds (min/max per phase, maxGpus) always hold.
- a measured SLO miss the planner did not predict still adds capacity to the phase that misses
  (TTFT -> prefill, TPOT -> decode; a colocated deployment adds one colocated instance): the
  profile may be off, the users' latency is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from disaggserve.api.plan import PHASES, Plan, Role

MAX_UP_STEP = 4
SUSTAINED_DROP = 1.2  # rate at most peak / 1.2 ...
SUSTAINED_INTERVALS = 2  # ... at this many decisions in a row


@dataclass(frozen=True)
class Counts:
    """Instances per worker role: prefill and decode, or (a colocated plan) colocated only."""

    prefill: int
    decode: int
    colocated: int = 0

    @classmethod
    def of(cls, plan: Plan) -> Counts:
        return cls(plan.prefill.replicas, plan.decode.replicas, plan.colocated.replicas if plan.colocated else 0)

    def get(self, role: Role) -> int:
        return int(getattr(self, role))

    def with_(self, role: Role, value: int) -> Counts:
        return replace(self, **{role: value})

    def __str__(self) -> str:
        if self.colocated and not (self.prefill or self.decode):
            return f"{self.colocated} colocated"
        return f"{self.prefill} prefill / {self.decode} decode"


@dataclass(frozen=True)
class Limits:
    min: Counts
    max: Counts
    gpus_per_instance: Counts
    max_gpus: int | None = None
    roles: tuple[Role, ...] = PHASES  # the roles the deployment runs (Plan.roles)


@dataclass(frozen=True)
class Signals:
    """Measurements for one decision (None: not measured)."""

    metrics_available: bool
    rolling_out: bool
    attainment: float | None = None
    target_attainment: float = 0.9
    ttft_within_slo: float | None = None
    tpot_within_slo: float | None = None


@dataclass
class PolicyState:
    """What the policy remembers between decisions (in the operator's memory)."""

    recommendations: list[tuple[float, Counts]] = field(default_factory=list)
    last_change_at: float | None = None
    rates: list[tuple[float, float]] = field(default_factory=list)  # (time, measured request rate)

    def observe_rate(self, now: float, rate: float, keep_seconds: float = 600.0) -> None:
        self.rates = [(t, r) for t, r in self.rates if t > now - keep_seconds] + [(now, rate)]

    def sustained_drop_since(self, window_start: float) -> float | None:
        """Time from which recommendations still count after a sustained drop in the rate
        (see the module docstring), or None when the rate has not dropped that way."""
        recent = [(t, r) for t, r in self.rates if t > window_start]
        if len(recent) <= SUSTAINED_INTERVALS:
            return None
        peak = max(r for _, r in recent)
        last = recent[-SUSTAINED_INTERVALS:]
        if all(r * SUSTAINED_DROP <= peak for _, r in last):
            return last[0][0]
        return None

    def rate_growth(self) -> float | None:
        """Measured rate now over the one before (per decision interval); None before two."""
        if len(self.rates) < 2 or self.rates[-2][1] <= 0:
            return None
        return self.rates[-1][1] / self.rates[-2][1]

    @classmethod
    def starting_at(cls, current: Counts, now: float) -> PolicyState:
        """State for a resource the policy has not seen yet, e.g. after an operator restart.

        The replicas running now count as a recommendation made now: the recommendations
        behind them were lost with the old process, and without this the first decision
        could scale down without waiting out the stabilization window.
        """
        return cls(recommendations=[(now, current)])


@dataclass(frozen=True)
class Decision:
    counts: Counts
    action: str  # "scale-up", "scale-down", "mixed", "hold"
    reason: str
    limited: str | None = None


def _clamp(counts: Counts, limits: Limits) -> tuple[Counts, str | None]:
    clamped = counts
    for role in limits.roles:
        clamped = clamped.with_(role, min(max(counts.get(role), limits.min.get(role)), limits.max.get(role)))
    note = None
    if clamped != counts:
        note = f"bounded by min/max replicas to {clamped} (wanted {counts})"
    if limits.max_gpus is not None:

        def gpus(c: Counts) -> int:
            return sum(c.get(r) * limits.gpus_per_instance.get(r) for r in limits.roles)

        wanted = gpus(clamped)
        while gpus(clamped) > limits.max_gpus:
            # shed from the role holding the larger share of the GPUs first
            above_min = [r for r in limits.roles if clamped.get(r) > limits.min.get(r)]
            if not above_min:
                break
            role = max(above_min, key=lambda r: clamped.get(r) * limits.gpus_per_instance.get(r))
            clamped = clamped.with_(role, clamped.get(role) - 1)
        if gpus(clamped) < wanted:
            note = f"maxGpus {limits.max_gpus} allows {gpus(clamped)} of the {wanted} GPUs wanted ({counts})"
    return clamped, note


def decide(
    current: Counts,
    recommended: Counts,
    signals: Signals,
    limits: Limits,
    state: PolicyState,
    now: float,
    stabilization_seconds: float,
) -> Decision:
    if not signals.metrics_available:
        return Decision(current, "hold", "metrics unavailable: holding replicas (never scale down blind)")
    if signals.rolling_out:
        return Decision(current, "hold", "a previous change is still rolling out")

    # A measured miss in one phase adds a replica there even if the planner thought it enough.
    target = signals.target_attainment
    wanted = recommended
    notes = []
    if signals.attainment is not None and signals.attainment < target:
        # TTFT is prefill's, TPOT decode's; a colocated instance does both, so either adds one.
        colocated = limits.roles == ("colocated",)
        if signals.ttft_within_slo is not None and signals.ttft_within_slo < target:
            role: Role = "colocated" if colocated else "prefill"
            wanted = wanted.with_(role, max(wanted.get(role), current.get(role) + 1))
            notes.append(f"TTFT met by {signals.ttft_within_slo:.0%} < {target:.0%}")
        if signals.tpot_within_slo is not None and signals.tpot_within_slo < target:
            role = "colocated" if colocated else "decode"
            wanted = wanted.with_(role, max(wanted.get(role), current.get(role) + 1))
            notes.append(f"TPOT met by {signals.tpot_within_slo:.0%} < {target:.0%}")

    state.recommendations = [(t, c) for t, c in state.recommendations if t > now - stabilization_seconds]
    state.recommendations.append((now, wanted))
    since = state.sustained_drop_since(now - stabilization_seconds)
    counted = [(t, c) for t, c in state.recommendations if since is None or t >= since]
    proposed = current
    for role in limits.roles:
        cur, want = current.get(role), wanted.get(role)
        if want > cur:
            value = min(want, max(cur * 2, cur + MAX_UP_STEP))  # up now: double, or +4 when small
        else:
            stable = max(c.get(role) for _, c in counted)  # down only to the highest recent recommendation
            value = max(stable, cur - max(1, math.ceil(cur / 2))) if stable < cur else cur
        proposed = proposed.with_(role, value)
    proposed, limited = _clamp(proposed, limits)
    ups = [r for r in limits.roles if proposed.get(r) > current.get(r)]
    downs = [r for r in limits.roles if proposed.get(r) < current.get(r)]
    action = "hold" if not ups and not downs else ("mixed" if ups and downs else ("scale-up" if ups else "scale-down"))
    attained = "n/a" if signals.attainment is None else f"{signals.attainment:.1%}"
    why = f"measured attainment {attained} (target {target:.0%}); planner recommends {recommended}"
    if notes:
        why += "; " + ", ".join(notes)
    if action != "hold":
        state.last_change_at = now
        reason = f"{action}: {current} -> {proposed}; {why}"
    else:
        reason = f"hold at {current}; {why}"
        if any(wanted.get(r) < current.get(r) for r in limits.roles):
            reason += f" (scale-down waits for {stabilization_seconds:.0f}s of lower recommendations)"
    if since is not None and downs:
        reason += "; the rate has dropped for a sustained period, so older recommendations no longer hold it up"
    return Decision(proposed, action, reason, limited)
