"""Discrete-event simulation of prefill, decode and colocated instances (DistServe §4.3).

Why a simulator rather than formulas: decode has no closed form (continuous batching under a
memory limit), and attainment — the share of requests meeting *both* SLOs — depends on the
joint distribution of TTFT and TPOT, which only a request-level simulation gives.

Speed matters (the operator plans on every spec change), so decode does not step token by
token: between two events (an arrival, a join, a completion) the batch is constant and step
times form an arithmetic series (each step adds B tokens of context), so the number of steps
to the next event and the time they take are solved in closed form. A 600-request decode run
costs a few thousand Python operations, not 600 × output-length.

Conventions: times in ms; one *lane* is one micro-batch stream of an instance — a pipeline of
`pp` stages keeps `pp` micro-batches in flight, each taking the full-pipeline step time, so an
instance with pipeline size pp is `pp` lanes sharing its KV memory equally.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from disaggserve.planner.batching import prefill_token_budget
from disaggserve.planner.profile import PhaseLatency
from disaggserve.planner.workload import RequestSample

INF = math.inf
# Prompt tokens a colocated (vLLM-style) iteration may batch (vLLM's max_num_batched_tokens
# default). Disaggregated prefill instances batch up to their shape's L_m instead
# (batching.prefill_token_budget), what the plan renders into their pods. In either, a longer
# prompt still runs, alone; 0 disables batching (one prompt per iteration).
DEFAULT_PREFILL_TOKEN_BUDGET = 2048
# Sequences one decode iteration may hold (vLLM's max_num_seqs default).
DEFAULT_MAX_BATCH = 256
# Prefill stalls are drawn from this seed, the same for every configuration and rate (as the
# workload sample is): plans stay reproducible and comparisons between them fair.
STALL_SEED = 7


def prefill_stalls(lat: PhaseLatency, n: int) -> np.ndarray:
    """Extra time of each request's prefill iteration (ms): exponential with the profile's mean
    `prefill_stall_ms`, zero when the profile has none.

    Why: a real worker's TTFT spreads even unloaded (scheduling, GC, neighbours on shared cores;
    p90/p50 about 1.5 on the CPU bench), and the spread occupies the worker, so it queues the
    prompts behind it. Without it the simulator's tail near the knee is its median, and attainment
    there is over-predicted (bench/planner_vs_measured.py). A batch takes its first prompt's draw.
    """
    if lat.prefill_stall_ms <= 0:
        return np.zeros(n)
    return np.random.default_rng(STALL_SEED).exponential(lat.prefill_stall_ms, n)


@dataclass(frozen=True)
class SimResult:
    """Per-request latencies; a request that could never run has infinite latency (it fails).

    Statistics skip the first `warmup` requests: an empty system flatters them, and an
    overloaded one shows itself in the later requests, whose queues keep growing.
    """

    ttft_ms: np.ndarray
    tpot_ms: np.ndarray
    warmup: int = 0

    def attainment(self, ttft_slo_ms: float, tpot_slo_ms: float) -> float:
        w = self.warmup
        return float(np.mean((self.ttft_ms[w:] <= ttft_slo_ms) & (self.tpot_ms[w:] <= tpot_slo_ms)))

    def ttft_p(self, q: float = 90) -> float:
        return float(np.percentile(self.ttft_ms[self.warmup :], q))

    def tpot_p(self, q: float = 90) -> float:
        return float(np.percentile(self.tpot_ms[self.warmup :], q))

    def after_warmup(self, fraction: float) -> SimResult:
        return SimResult(self.ttft_ms, self.tpot_ms, int(len(self.ttft_ms) * fraction))


class PrefillServer:
    """One prefill instance: FCFS, batching queued prompts up to a token budget.

    A batch occupies the first pipeline stage for T/pp (+hand-off), so the next batch may
    start then; its prompts get their first token when it leaves the last stage, T later.
    """

    __slots__ = ("budget", "free_at", "lat", "queue", "queued_ms", "stall")

    def __init__(self, lat: PhaseLatency, budget_tokens: int, stall: np.ndarray):
        self.lat = lat
        self.budget = budget_tokens
        self.stall = stall
        self.queue: deque[int] = deque()
        self.free_at = 0.0
        self.queued_ms = 0.0

    def load(self, t: float) -> float:
        """Estimated wait before a new prompt could start, in ms (least-loaded dispatch)."""
        return max(self.free_at - t, 0.0) + self.queued_ms

    def push(self, rid: int, length: int) -> None:
        self.queue.append(rid)
        self.queued_ms += self.lat.prefill_stage_ms(length, length * length) + self.lat.prefill_request_ms

    def advance_to(self, t: float, arrival: np.ndarray, length: np.ndarray, first: np.ndarray) -> None:
        """Start every batch whose start time is before `t`."""
        q, lat, budget = self.queue, self.lat, self.budget
        while q:
            start = max(self.free_at, arrival[q[0]])
            if start >= t:
                return
            tokens = 0
            sq = 0
            batch = []
            while q and arrival[q[0]] <= start:
                n = int(length[q[0]])
                if batch and tokens + n > budget:
                    break
                r = q.popleft()
                batch.append(r)
                tokens += n
                sq += n * n
                self.queued_ms -= lat.prefill_stage_ms(n, n * n) + lat.prefill_request_ms
            # The worker's own per-request work (HTTP, KV send) is serial with its forward passes.
            extra = lat.prefill_request_ms * len(batch) + self.stall[batch[0]]
            done = start + lat.prefill_ms(tokens, sq) + extra
            for r in batch:
                first[r] = done
            self.free_at = start + lat.prefill_stage_ms(tokens, sq) + extra
        self.queued_ms = 0.0


def _steps_before(horizon: float, alpha: float, beta: float) -> float:
    """How many steps start before `horizon` when step k starts at k·α + β·k(k−1)/2."""
    if horizon == INF:
        return INF
    if beta <= 0:
        count = max(1, math.ceil(horizon / alpha))
    else:
        half = beta / 2
        lin = alpha - half
        root = (-lin + math.sqrt(lin * lin + 4 * half * horizon)) / (2 * half)
        count = max(1, math.ceil(root))

    def start(k: int) -> float:
        return k * alpha + beta * k * (k - 1) / 2

    while start(count) < horizon:
        count += 1
    while count > 1 and start(count - 1) >= horizon:
        count -= 1
    return count


class Lane:
    """One micro-batch stream of a decode or colocated instance, batching continuously.

    Requests reserve prompt + completion tokens of KV memory when they join (the simulator
    knows completion lengths; a real engine allocates as it goes and preempts instead).
    A colocated lane runs vLLM's policy: a prefill iteration for admissible waiting prompts
    whenever there are any (stalling the decodes), otherwise a decode step.
    """

    __slots__ = (
        "batch",
        "capacity",
        "colocated",
        "counter",
        "lat",
        "max_batch",
        "pending",
        "prefill_budget",
        "reserved",
        "running",
        "seq",
        "stall",
        "sum_ctx",
        "time",
        "used",
        "waiting",
    )

    def __init__(
        self,
        lat: PhaseLatency,
        capacity_tokens: int,
        *,
        colocated: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
        stall: np.ndarray | None = None,
    ):
        self.lat = lat
        self.stall = stall  # colocated lanes: each request's prefill stall (prefill_stalls)
        self.capacity = capacity_tokens
        self.colocated = colocated
        self.max_batch = max_batch
        self.prefill_budget = prefill_budget
        self.time = 0.0
        self.counter = 0  # decode steps run so far
        self.running: list[tuple[int, int]] = []  # (counter value at which it completes, rid)
        self.batch = 0
        self.sum_ctx = 0
        self.used = 0
        self.reserved = 0  # used + tokens of requests pushed but not yet running
        self.pending: list[tuple[float, int, int]] = []  # (ready time, seq, rid)
        self.waiting: deque[int] = deque()
        self.seq = 0

    def load(self) -> float:
        return self.reserved / self.capacity if self.capacity else INF

    def push(self, rid: int, ready: float, need: int) -> None:
        heapq.heappush(self.pending, (ready, self.seq, rid))
        self.seq += 1
        self.reserved += need

    def _join(self, rid: int, inp: np.ndarray, out: np.ndarray, done: np.ndarray) -> None:
        steps = int(out[rid]) - 1
        if steps <= 0:
            done[rid] = self.time
            self.used -= int(inp[rid]) + int(out[rid])
            self.reserved -= int(inp[rid]) + int(out[rid])
            return
        heapq.heappush(self.running, (self.counter + steps, rid))
        self.time += self.lat.decode_request_ms  # receiving the request and its KV cache
        self.batch += 1
        self.sum_ctx += int(inp[rid]) + 1

    def _admit(self, inp: np.ndarray, out: np.ndarray, first: np.ndarray, done: np.ndarray) -> bool:
        """Move ready requests in; for a colocated lane run one prefill iteration. True: time moved."""
        pending, waiting = self.pending, self.waiting
        while pending and pending[0][0] <= self.time:
            waiting.append(heapq.heappop(pending)[2])
        if not self.colocated:
            while waiting and self.batch < self.max_batch:
                rid = waiting[0]
                need = int(inp[rid]) + int(out[rid])
                if self.used + need > self.capacity:
                    break
                waiting.popleft()
                self.used += need
                self._join(rid, inp, out, done)
            return False
        batch: list[int] = []
        tokens = 0
        sq = 0
        while waiting and self.batch + len(batch) < self.max_batch:
            rid = waiting[0]
            n = int(inp[rid])
            need = n + int(out[rid])
            if self.used + need > self.capacity or (batch and tokens + n > self.prefill_budget):
                break
            waiting.popleft()
            self.used += need
            batch.append(rid)
            tokens += n
            sq += n * n
        if not batch:
            return False
        self.time += self.lat.prefill_ms(tokens, sq) + self.lat.prefill_request_ms * len(batch)
        if self.stall is not None:
            self.time += self.stall[batch[0]]
        for rid in batch:
            first[rid] = self.time
            self._join(rid, inp, out, done)
        return True

    def advance_to(self, t: float, inp: np.ndarray, out: np.ndarray, first: np.ndarray, done: np.ndarray) -> None:
        """Run every iteration that starts before `t`."""
        lat = self.lat
        overhead = lat.pipeline * lat.stage_overhead_ms
        while True:
            if self.time >= t:
                return
            if self._admit(inp, out, first, done):
                continue
            if not self.running:
                if self.pending and self.pending[0][0] < t:
                    self.time = max(self.time, self.pending[0][0])
                    continue
                return
            horizon = t
            if self.pending and self.pending[0][0] < horizon:
                horizon = self.pending[0][0]
            b = self.batch
            co = lat.decode_small if b < lat.decode_batch_threshold else lat.decode_large
            alpha = co.a + lat.decode_iteration_ms + co.b * self.sum_ctx + (co.c + lat.decode_token_ms) * b + overhead
            beta = co.b * b
            n = self.running[0][0] - self.counter
            if horizon != INF:
                n = min(n, _steps_before(horizon - self.time, alpha, beta))
            self.time += n * alpha + beta * n * (n - 1) / 2
            self.counter += n
            self.sum_ctx += n * b
            running = self.running
            while running and running[0][0] == self.counter:
                rid = heapq.heappop(running)[1]
                done[rid] = self.time
                need = int(inp[rid]) + int(out[rid])
                self.sum_ctx -= need
                self.used -= need
                self.reserved -= need
                self.batch -= 1


def _lanes_for(
    lat: PhaseLatency,
    capacity_tokens: int,
    *,
    colocated: bool = False,
    prefill_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
    stall: np.ndarray | None = None,
) -> list[Lane]:
    per_lane = capacity_tokens // lat.pipeline
    return [Lane(lat, per_lane, colocated=colocated, prefill_budget=prefill_budget, stall=stall)
            for _ in range(lat.pipeline)]


def _run_prefill(servers: list[PrefillServer], arrival: np.ndarray, inp: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Dispatch prompts least-loaded over `servers`; return the server index of each request."""
    chosen = np.zeros(len(arrival), dtype=np.int64)
    single = len(servers) == 1
    for rid in range(len(arrival)):
        t = arrival[rid]
        if single:
            best = 0
            servers[0].advance_to(t, arrival, inp, first)
        else:
            best, best_load = 0, INF
            for i, s in enumerate(servers):
                s.advance_to(t, arrival, inp, first)
                load = s.load(t)
                if load < best_load:
                    best, best_load = i, load
        servers[best].push(rid, int(inp[rid]))
        chosen[rid] = best
    for s in servers:
        s.advance_to(INF, arrival, inp, first)
    return chosen


def simulate_prefill(
    sample: RequestSample,
    rate: float,
    lat: PhaseLatency,
    instances: int = 1,
    budget_tokens: int | None = None,
) -> SimResult:
    """Prefill instances alone: TTFT per request (TPOT reported as 0). `budget_tokens` None: the
    shape's L_m (batching.prefill_token_budget), as a planned prefill pod batches."""
    if budget_tokens is None:
        budget_tokens = prefill_token_budget(lat)
    lat = lat.sharing(rate, sample.mean_output_tokens)
    arrival = sample.arrivals_ms(rate)
    first = np.full(len(sample), INF)
    at_worker = arrival + lat.router_request_ms
    stall = prefill_stalls(lat, len(sample))
    _run_prefill([PrefillServer(lat, budget_tokens, stall) for _ in range(instances)], at_worker, sample.input_tokens,
                 first)
    return SimResult(ttft_ms=first - arrival, tpot_ms=np.zeros(len(sample)))


def _run_decode(
    groups: list[list[Lane]],
    link_of: dict[int, int],
    group_of: np.ndarray,
    first: np.ndarray,
    inp: np.ndarray,
    out: np.ndarray,
    xfer_ms: np.ndarray,
) -> np.ndarray:
    """Send each request, in first-token order, to the least-loaded lane of its group; the KV
    cache crosses the decode instance's link (one transfer at a time). Returns completion times."""
    done = np.full(len(first), INF)
    dummy_first = np.empty(0)
    link_free: dict[int, float] = {}
    for rid in np.argsort(first, kind="stable"):
        t = first[rid]
        if t == INF:
            continue
        need = int(inp[rid]) + int(out[rid])
        lanes = groups[group_of[rid]]
        best, best_load = None, INF
        for lane in lanes:
            lane.advance_to(t, inp, out, dummy_first, done)
            load = lane.load()
            if need <= lane.capacity and load < best_load:
                best, best_load = lane, load
        if best is None:
            continue  # longer than any lane's KV memory: this request fails
        link = link_of[id(best)]
        start = max(t, link_free.get(link, 0.0))
        ready = start + xfer_ms[rid]
        link_free[link] = ready
        best.push(int(rid), ready, need)
    for lanes in groups:
        for lane in lanes:
            lane.advance_to(INF, inp, out, dummy_first, done)
    return done


def _tpot(first: np.ndarray, done: np.ndarray, out: np.ndarray) -> np.ndarray:
    steps = np.maximum(out - 1, 1)
    with np.errstate(invalid="ignore"):
        tpot = np.where(out > 1, (done - first) / steps, np.where(done < INF, 0.0, INF))
    return np.nan_to_num(tpot, nan=INF, posinf=INF)


@dataclass(frozen=True)
class DecodeSetup:
    """Decode instances of one shape, their KV memory and how the cache reaches them."""

    lat: PhaseLatency
    instances: int
    capacity_tokens: int  # per instance
    kv_bytes_per_token: int
    link_gbps: float
    link_latency_ms: float = 0.0

    def xfer_ms(self, tokens: np.ndarray) -> np.ndarray:
        if self.link_gbps == INF:
            return np.zeros(len(tokens))
        bytes_per_ms = self.link_gbps * 1e9 / 8 / 1000
        return self.link_latency_ms + tokens * self.kv_bytes_per_token / bytes_per_ms


def _build_decode(setup: DecodeSetup, groups_count: int) -> tuple[list[list[Lane]], dict[int, int]]:
    """Decode lanes split into `groups_count` equal groups (placement units); link id per lane."""
    groups: list[list[Lane]] = [[] for _ in range(groups_count)]
    link_of: dict[int, int] = {}
    for inst in range(setup.instances):
        for lane in _lanes_for(setup.lat, setup.capacity_tokens):
            groups[inst * groups_count // setup.instances].append(lane)
            link_of[id(lane)] = inst
    return groups, link_of


def simulate_decode(sample: RequestSample, rate: float, setup: DecodeSetup) -> SimResult:
    """Decode instances alone, fed at the request rate (prompts assumed just prefilled):
    TPOT per request, including the KV transfer; TTFT reported as 0."""
    setup = dataclasses.replace(setup, lat=setup.lat.sharing(rate, sample.mean_output_tokens))
    arrival = sample.arrivals_ms(rate)
    groups, link_of = _build_decode(setup, 1)
    done = _run_decode(
        groups,
        link_of,
        np.zeros(len(sample), dtype=np.int64),
        arrival,
        sample.input_tokens,
        sample.output_tokens,
        setup.xfer_ms(sample.input_tokens),
    )
    tpot = _tpot(arrival, done, sample.output_tokens) + setup.lat.router_token_ms
    return SimResult(ttft_ms=np.zeros(len(sample)), tpot_ms=tpot)


def simulate_disaggregated(
    sample: RequestSample,
    rate: float,
    prefill: PhaseLatency,
    prefill_instances: int,
    decode: DecodeSetup,
    *,
    units: int = 1,
    budget_tokens: int | None = None,
) -> SimResult:
    """The whole system: prefill instances → KV transfer → decode instances.

    With `units` > 1 (low node-affinity), prefill and decode instances are split evenly into
    units and a prompt prefilled in one unit decodes in the same unit. `budget_tokens` None: the
    prefill shape's L_m (batching.prefill_token_budget), as a planned prefill pod batches.
    """
    if prefill_instances % units or decode.instances % units:
        raise ValueError("instances must split evenly into units")
    if budget_tokens is None:
        budget_tokens = prefill_token_budget(prefill)
    prefill = prefill.sharing(rate, sample.mean_output_tokens)
    decode = dataclasses.replace(decode, lat=decode.lat.sharing(rate, sample.mean_output_tokens))
    arrival = sample.arrivals_ms(rate)
    inp, out = sample.input_tokens, sample.output_tokens
    first = np.full(len(sample), INF)
    stall = prefill_stalls(prefill, len(sample))
    servers = [PrefillServer(prefill, budget_tokens, stall) for _ in range(prefill_instances)]
    # The router's own work per request delays its arrival at a worker; per token, the stream.
    chosen = _run_prefill(servers, arrival + prefill.router_request_ms, inp, first)
    group_of = chosen * units // prefill_instances
    groups, link_of = _build_decode(decode, units)
    done = _run_decode(groups, link_of, group_of, first, inp, out, decode.xfer_ms(inp))
    return SimResult(ttft_ms=first - arrival, tpot_ms=_tpot(first, done, out) + prefill.router_token_ms)


def simulate_colocated(
    sample: RequestSample,
    rate: float,
    lat: PhaseLatency,
    capacity_tokens: int,
    instances: int = 1,
    budget_tokens: int = DEFAULT_PREFILL_TOKEN_BUDGET,
) -> SimResult:
    """Colocated (vLLM-style) instances: prefill and decode share iterations on the same GPUs."""
    lat = lat.sharing(rate, sample.mean_output_tokens)
    arrival = sample.arrivals_ms(rate)
    inp, out = sample.input_tokens, sample.output_tokens
    n = len(sample)
    first = np.full(n, INF)
    done = np.full(n, INF)
    stall = prefill_stalls(lat, n)
    lanes = [
        lane
        for _ in range(instances)
        for lane in _lanes_for(lat, capacity_tokens, colocated=True, prefill_budget=budget_tokens, stall=stall)
    ]
    at_worker = arrival + lat.router_request_ms
    for rid in range(n):
        t = at_worker[rid]
        need = int(inp[rid]) + int(out[rid])
        best, best_load = None, INF
        for lane in lanes:
            lane.advance_to(t, inp, out, first, done)
            load = lane.load()
            if need <= lane.capacity and load < best_load:
                best, best_load = lane, load
        if best is not None:
            best.push(rid, t, need)
    for lane in lanes:
        lane.advance_to(INF, inp, out, first, done)
    return SimResult(ttft_ms=first - arrival, tpot_ms=_tpot(first, done, out) + lat.router_token_ms)
