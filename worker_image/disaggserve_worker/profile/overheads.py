"""What a request costs outside the model's forward passes, and what the KV link really carries.

Why: a profile that times only forward passes misses the HTTP handling, the router hop, the KV
send/receive and the per-token streaming — on small models and CPUs that is most of a request's
cost (an outside profile of the built-in engine found ~21 ms of CPU per request and ~0.35 ms per
output token outside the forward passes), so a planner that ignores it over-predicts capacity
several times over.

Method: send the same prompt through the running deployment one request at a time, with two
completion lengths, and read each process's CPU time (all its threads, from /proc) before and
after. Subtracting the forward passes the profile predicts for those requests leaves the cost
outside them; two completion lengths separate the per-request part from the per-token part
(`solve_costs`). The KV link is fitted from transfers of two sizes (`fit_link`): the slope is
the bandwidth the workers' own transport reaches, the intercept its per-transfer latency.

The result is the profile's `overheads` section (`disaggserve.planner.profile.Overheads`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


def process_cpu_ms(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far, in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks * 1000.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """CPU a process used over `requests` requests of `tokens` output tokens each, and the part
    of it the forward passes account for (from the profile)."""

    requests: int
    tokens: int
    cpu_ms: float
    forward_ms: float = 0.0

    @property
    def outside_per_request_ms(self) -> float:
        return max(0.0, self.cpu_ms - self.forward_ms) / self.requests


def solve_costs(short: Run, long: Run) -> dict[str, float]:
    """Per-request and per-token cost from two runs that differ in completion length:
    outside(n) = per_request + per_token · n. Clipped at zero (noise can make a slope negative)."""
    if long.tokens == short.tokens:
        raise ValueError("the two runs need different completion lengths")
    per_token = (long.outside_per_request_ms - short.outside_per_request_ms) / (long.tokens - short.tokens)
    per_token = max(0.0, per_token)
    per_request = max(0.0, short.outside_per_request_ms - per_token * short.tokens)
    return {"per_request_ms": round(per_request, 4), "per_token_ms": round(per_token, 4)}


def fit_link(transfers: list[tuple[int, float]]) -> dict[str, float]:
    """{gbps, latency_ms} from (bytes, seconds) transfers of at least two sizes (least squares)."""
    sizes = {b for b, _ in transfers}
    if len(sizes) < 2:
        raise ValueError("fit the KV link from transfers of at least two sizes")
    n = len(transfers)
    mean_b = sum(b for b, _ in transfers) / n
    mean_s = sum(s for _, s in transfers) / n
    cov = sum((b - mean_b) * (s - mean_s) for b, s in transfers)
    var = sum((b - mean_b) ** 2 for b, _ in transfers)
    slope = cov / var  # seconds per byte
    if slope <= 0:  # noise swamped the size effect: bandwidth from the largest transfers alone
        big = max(sizes)
        slope = sum(s for b, s in transfers if b == big) / sum(b for b, _ in transfers if b == big)
        latency = 0.0
    else:
        latency = max(0.0, mean_s - slope * mean_b)
    return {"gbps": round(8 / slope / 1e9, 4), "latency_ms": round(latency * 1000, 4)}


def overheads_section(costs: dict[str, dict[str, float]], link: dict[str, float] | None) -> dict[str, Any]:
    """The profile's `overheads` value from per-process costs (router, prefill, decode, colocated)."""
    section: dict[str, Any] = {role: dict(c) for role, c in costs.items()}
    if link is not None:
        section["kv_link"] = dict(link)
    return section
