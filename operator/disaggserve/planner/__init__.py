"""Planning: from spec (+ profile, workload, topology) to a deployable `Plan`. Pure code."""

from disaggserve.planner.hook import PlanningError, plan_for

__all__ = ["PlanningError", "plan_for"]
