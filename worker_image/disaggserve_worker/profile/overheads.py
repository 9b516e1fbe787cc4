"""What a request costs outside the model's forward passes, and what the KV link really carries.

Why: a profile that times only forward passes misses the HTTP handling, the router hop, the KV
send/receive and the per-token streaming — on small models and CPUs that is most of a request's
cost (an outside profile of the built-in engine found ~21 ms of CPU per request and ~0.35 ms per
output token outside the forward passes), so a planner that ignores it over-predicts capacity
several times over.

Method: send the same prompt through the running deployment one request at a time, with two
completion lengths, and read each process's CPU time (all its threads, from /proc) before and
after. Subtracting the forward passes the profile predicts for those requests leaves the cost
outside them; two completion lengths separate the per-request part from the per-token part,
and a run of concurrent requests with counted decode iterations separates the per-iteration
part (`solve_costs`). The KV link is fitted from transfers of two sizes (`fit_link`): the slope is
the bandwidth the workers' own transport reaches, the intercept its per-transfer latency. The
spread of the sequential requests' TTFTs gives the prefill stall (`prefill_stall_ms`).

The result is the profile's `overheads` section (`disaggserve.planner.profile.Overheads`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from disaggserve_worker.profile.fit import fit_relative_nonnegative


def process_cpu_ms(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far, in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks * 1000.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """CPU a process used over `requests` requests of `tokens` output tokens each, and the part
    of it the forward passes account for (from the profile). `steps`: the decode iterations the
    process ran meanwhile (0 where it runs none, or where they were not counted)."""

    requests: int
    tokens: int
    cpu_ms: float
    forward_ms: float = 0.0
    steps: int = 0

    @property
    def outside_ms(self) -> float:
        return max(0.0, self.cpu_ms - self.forward_ms)

    @property
    def outside_per_request_ms(self) -> float:
        return self.outside_ms / self.requests


def solve_costs(*runs: Run) -> dict[str, float]:
    """Per-request and per-token cost from runs that differ in completion length:
    outside = requests·per_request + tokens·per_token (+ steps·per_step). Clipped at zero (noise
    can make a slope negative).

    Sequential requests cannot tell a per-token cost from a per-iteration one: at batch 1 every
    iteration yields one token. A decode engine's loop costs per iteration (scheduling, sampling,
    waking streams) whatever the batch, so charging it per token makes the simulator
    over-count it batch-fold under load (the planner_vs_measured bench predicted 54 % attainment
    where 97 % was measured). A run of concurrent requests with counted iterations separates the
    two; `per_step_ms` is then reported too."""
    if len({r.tokens for r in runs}) < 2:
        raise ValueError("the runs need at least two different completion lengths")
    if len(runs) == 2 and not any(r.steps for r in runs):
        short, long = sorted(runs, key=lambda r: r.tokens)
        per_token = (long.outside_per_request_ms - short.outside_per_request_ms) / (long.tokens - short.tokens)
        per_token = max(0.0, per_token)
        per_request = max(0.0, short.outside_per_request_ms - per_token * short.tokens)
        return {"per_request_ms": round(per_request, 4), "per_token_ms": round(per_token, 4)}
    stepped = any(r.steps for r in runs)
    features = np.array([[r.requests, r.requests * r.tokens, *([r.steps] if stepped else [])] for r in runs],
                        dtype=float)
    outside = np.array([max(r.outside_ms, 1e-6) for r in runs])
    coef = fit_relative_nonnegative(features, outside)
    costs = {"per_request_ms": round(float(coef[0]), 4), "per_token_ms": round(float(coef[1]), 4)}
    if stepped:
        costs["per_step_ms"] = round(float(coef[2]), 4)
    return costs


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


def prefill_stall_ms(unloaded_ttfts_ms: list[float]) -> float:
    """Mean of the exponential stall that spreads unloaded TTFTs (the simulator's
    `prefill_stalls`): a shifted exponential has p90 − p50 = mean · ln 5, and the quantiles keep
    one slow outlier (a GC pause, a neighbour's burst) from setting it alone."""
    if len(unloaded_ttfts_ms) < 5:
        raise ValueError("estimate the prefill stall from at least 5 unloaded TTFTs")
    p50, p90 = np.percentile(unloaded_ttfts_ms, [50, 90])
    return round(max(0.0, float(p90 - p50)) / math.log(5), 4)


def overheads_section(costs: dict[str, dict[str, float]], link: dict[str, float] | None,
                      stall_ms: float = 0.0, shared_cores: int = 0) -> dict[str, Any]:
    """The profile's `overheads` value from per-process costs (router, prefill, decode, colocated,
    client), the KV link, the prefill stall and the cores the workers share with the router and
    the client."""
    section: dict[str, Any] = {role: dict(c) for role, c in costs.items()}
    if link is not None:
        section["kv_link"] = dict(link)
    if stall_ms > 0:
        section["prefill_stall_ms"] = stall_ms
    if shared_cores > 0:
        section["shared_cores"] = shared_cores
    return section
