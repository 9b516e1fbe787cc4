"""Closed-form prefill queueing (DistServe §3.1), for reasoning and for checking the simulator.

One prefill instance, FCFS, no batching, Poisson rate R (per ms here), execution time D:
these are M/D/1 queues whose service time is the first-stage occupancy. They explain why
tensor parallelism (shorter D) wins at low rate and pipeline parallelism (more capacity)
at high rate; the planner itself simulates, because batching and length spread break them.
"""

from __future__ import annotations

import math


def _md1_wait(rate: float, service: float) -> float:
    """Mean queueing delay of M/D/1 (Pollaczek–Khinchine with zero service variance)."""
    rho = rate * service
    if rho >= 1:
        return math.inf
    return rate * service**2 / (2 * (1 - rho))


def avg_ttft_single(rate: float, d: float) -> float:
    """`D + R·D² / (2(1 − R·D))`."""
    return d + _md1_wait(rate, d)


def avg_ttft_pipeline2(rate: float, d: float) -> float:
    """2-way pipeline, stage time D/2: `D + R·D² / (4(2 − R·D))`."""
    return d + _md1_wait(rate, d / 2)


def avg_ttft_tensor(rate: float, d: float, speedup: float) -> float:
    """Tensor parallelism with speedup K: `D/K + R·D² / (2K(K − R·D))`."""
    return d / speedup + _md1_wait(rate, d / speedup)


def avg_ttft_replicas(rate: float, d: float, replicas: int) -> float:
    """N replicas with random splitting: each sees R/N."""
    return avg_ttft_single(rate / replicas, d)
