"""Goodput: the highest request rate at which the target share of requests meets its SLOs.

Found by bisection on the rate (docs/planner-method.md), because attainment is monotone enough in the
rate for a bracket to close, and each probe is one simulation. Probes are memoised by the
caller's cache key so a configuration is never simulated twice at the same rate.
"""

from __future__ import annotations

from collections.abc import Callable

# Relative width at which the bracket is good enough: planning decisions hinge on ratios of
# several tens of percent; 2 % keeps probes to about ten per configuration.
DEFAULT_REL_TOL = 0.02
MAX_EXPANSIONS = 12


def max_rate(
    attainment_at: Callable[[float], float], target: float, guess: float, rel_tol: float = DEFAULT_REL_TOL
) -> float:
    """Largest rate (within `rel_tol`) whose attainment is at least `target`; 0 if even a
    rate far below `guess` misses it. `guess` should be near the capacity (any positive number
    works, a good one saves probes)."""
    if guess <= 0:
        raise ValueError("guess must be a positive rate")
    lo, hi = 0.0, guess
    expansions = 0
    while attainment_at(hi) >= target:
        lo, hi = hi, hi * 2
        expansions += 1
        if expansions > MAX_EXPANSIONS:
            return lo
    if lo == 0.0:
        floor = guess / 64
        if attainment_at(floor) < target:
            return 0.0
        lo = floor
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if attainment_at(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo
