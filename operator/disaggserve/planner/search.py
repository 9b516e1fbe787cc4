"""DistServe's placement search (docs/planner-method.md): which instance shapes, how many, and where.

Project decision (Kubernetes mapping): one instance is one pod, and a pod lives on one node,
so tensor × pipeline ≤ GPUs per node; in low node-affinity a unit is the prefill and decode
instances that share one node (the paper's pp_cross is therefore 1).

Speed: every goodput is memoised per configuration; shapes that miss an SLO even at zero
load are dropped before any simulation; and candidates are visited best-bound-first with a
throughput bound (at most the capacity of their phases, times a pooling slack), so the search
stops as soon as no remaining candidate can beat the best one found.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from disaggserve.api.spec import Slo  # the one SLO type (spec.slo), read by the search
from disaggserve.planner.batching import prefill_token_budget
from disaggserve.planner.facts import Facts
from disaggserve.planner.goodput import max_rate
from disaggserve.planner.profile import LatencyProfile, PhaseLatency, phase_latency
from disaggserve.planner.simulator import (
    DEFAULT_MAX_BATCH,
    DEFAULT_PREFILL_TOKEN_BUDGET,
    DecodeSetup,
    SimResult,
    prefill_stalls,
    simulate_colocated,
    simulate_decode,
    simulate_disaggregated,
    simulate_prefill,
)
from disaggserve.planner.workload import DEFAULT_REQUESTS, RequestSample

# Tensor sizes a spec may name (the CEL rule of spec.parallelism); the planner stays within them.
TENSOR_SIZES = (1, 2, 4, 8)
# Several instances of a phase behind least-loaded dispatch can beat the sum of their single
# goodputs (pooled queues); bounds are inflated by this much so pruning never drops a winner.
POOLING_SLACK = 1.3
# Low-affinity units pool more (prefill queues across units): measured in bench/planner.py on
# OPT-13B, 4 pooled units carried 1.65x their single goodput each; at 1.3 the pruned search
# missed deployments up to 17 % smaller than exhaustive search.
UNIT_POOLING_SLACK = 1.7
# Each simulated run spans this many request lifetimes (TTFT SLO + output × TPOT SLO) of
# arrivals, so that queues reach steady state even at high rates; the first WARMUP share of
# requests is not counted.
WINDOW_LIFETIMES = 2.0
WARMUP = 0.2


# Goodputs do not depend on the target rate, so the operator's re-plans (every spec change,
# every autoscaling step with a new measured rate) reuse them across calls. Keyed by
# everything a goodput does depend on; a few dozen floats per entry.
SHARED_CACHE_ENTRIES = 32
_shared: OrderedDict[tuple, dict[tuple, float]] = OrderedDict()
_shared_lock = threading.Lock()


def shared_goodputs(key: tuple) -> dict[tuple, float]:
    """The goodput memo for one (profile, model, workload, SLO, hardware) setting, LRU-kept."""
    with _shared_lock:
        if key in _shared:
            _shared.move_to_end(key)
            return _shared[key]
        memo: dict[tuple, float] = {}
        _shared[key] = memo
        while len(_shared) > SHARED_CACHE_ENTRIES:
            _shared.popitem(last=False)
        return memo


def clear_shared_goodputs() -> None:
    """Forget every memoised goodput (benchmarks of cold searches)."""
    with _shared_lock:
        _shared.clear()


@dataclass(frozen=True)
class HardwareView:
    gpus_per_node: int
    gpu_memory_bytes: float
    intra_gbps: float
    cross_gbps: float


@dataclass(frozen=True, order=True)
class Shape:
    tensor: int
    pipeline: int

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline

    def __str__(self) -> str:
        return f"tp{self.tensor}·pp{self.pipeline}"


@dataclass(frozen=True)
class PhaseChoice:
    shape: Shape
    goodput: float  # requests/s one instance sustains within its phase's SLO

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.shape.gpus


@dataclass(frozen=True)
class UnitChoice:
    prefill: Shape
    prefill_count: int
    decode: Shape
    decode_count: int
    goodput: float

    @property
    def gpus(self) -> int:
        return self.prefill.gpus * self.prefill_count + self.decode.gpus * self.decode_count

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.gpus

    def __str__(self) -> str:
        return f"{self.prefill_count}×P {self.prefill} + {self.decode_count}×D {self.decode}"


@dataclass
class SearchStats:
    simulated: int = 0  # configurations whose goodput was simulated
    pruned_zero_load: int = 0
    pruned_bound: int = 0
    probes: int = 0  # simulations run, all kinds


@dataclass
class Searcher:
    """All searches over one (profile, model, workload sample, SLO, hardware), sharing caches."""

    profile: LatencyProfile
    facts: Facts
    sample: RequestSample
    slo: Slo
    hardware: HardwareView
    target_rate: float
    # Colocated instances' prompt-chunk budget (vLLM's default; see prefill_budget for why the
    # disaggregated prefill instances' own is not this).
    budget_tokens: int = DEFAULT_PREFILL_TOKEN_BUDGET
    min_requests: int = DEFAULT_REQUESTS
    max_tensor: int = max(TENSOR_SIZES)  # what the deployed worker can run
    stats: SearchStats = field(default_factory=SearchStats)
    _goodputs: dict[tuple, float] = field(default_factory=dict)
    _probes: dict[tuple, SimResult] = field(default_factory=dict)

    # ---- runs and objective ---------------------------------------------------------------
    def requests_for(self, rate: float) -> RequestSample:
        lifetime_s = (self.slo.ttft_ms + float(np.mean(self.sample.output_tokens)) * self.slo.tpot_ms) / 1000
        n = max(self.min_requests, math.ceil(rate * lifetime_s * WINDOW_LIFETIMES))
        return self.sample.head(n)

    def gpus_for(self, goodput: float, gpus: int) -> float:
        """GPUs that copies of a configuration need to carry the target rate (the objective:
        fewest GPUs, then highest per-GPU goodput — at high rates this is DistServe's pure
        per-GPU goodput; at low rates it avoids a big unit where a small one suffices)."""
        return math.ceil(self.target_rate / goodput) * gpus if goodput > 0 else math.inf

    # ---- shapes -------------------------------------------------------------------------
    @property
    def need_tokens(self) -> int:
        """KV room an instance must have: the 99th-percentile request (prompt + completion)."""
        return int(np.percentile(self.sample.input_tokens + self.sample.output_tokens, 99))

    def capacity_tokens(self, shape: Shape) -> int:
        return self.facts.kv_capacity_tokens(shape.tensor, shape.pipeline, self.hardware.gpu_memory_bytes)

    def shapes(self, *, colocated: bool = False) -> list[Shape]:
        """Shapes allowed by the profile, divisibility, one node, and memory."""
        out = []
        for tp in self.profile.tensor_sizes(colocated=colocated):
            if tp not in TENSOR_SIZES or tp > self.hardware.gpus_per_node or tp > self.max_tensor:
                continue
            for pp in range(1, self.hardware.gpus_per_node // tp + 1):
                shape = Shape(tp, pp)
                if self.facts.divisibility_problem(tp, pp):
                    continue
                if self.capacity_tokens(shape) // pp < self.need_tokens:
                    continue
                out.append(shape)
        return out

    def latency(self, shape: Shape, *, colocated: bool = False) -> PhaseLatency:
        lat = phase_latency(self.profile, shape.tensor, shape.pipeline, colocated=colocated)
        if lat is None:
            raise KeyError(f"profile has no tensor size {shape.tensor}")
        return lat

    def prefill_budget(self, shape: Shape) -> int:
        """Prompt tokens one disaggregated prefill iteration of `shape` batches: DistServe's L_m
        from the profile (planner/batching.py), what the plan renders into the prefill pods.

        Colocated instances keep `budget_tokens`: their iterations also carry the running decodes,
        so their budget trades TTFT against the decodes' stall, not device saturation alone, and
        DistServe's baseline is vLLM as configured by default."""
        return prefill_token_budget(self.latency(shape))

    # ---- zero-load checks -----------------------------------------------------------------
    def prefill_zero_load_ms(self, shape: Shape) -> np.ndarray:
        lat = self.latency(shape)
        n = self.sample.input_tokens.astype(float)
        return (
            lat.prefill.a
            + lat.prefill.b * n
            + lat.prefill.c * n * n
            + lat.pipeline * lat.stage_overhead_ms
            + lat.prefill_request_ms
            + lat.router_request_ms
            + prefill_stalls(lat, len(n))
        )

    def decode_zero_load_ms(self, shape: Shape, gbps: float) -> np.ndarray:
        """TPOT of each request alone on the instance: batch 1, mean context, plus its KV transfer."""
        lat = self.latency(shape)
        inp = self.sample.input_tokens.astype(float)
        out = self.sample.output_tokens.astype(float)
        d = lat.decode_small if lat.decode_batch_threshold > 1 else lat.decode_large
        step = (d.a + lat.decode_iteration_ms + d.b * (inp + out / 2) + d.c + lat.decode_token_ms
                + lat.pipeline * lat.stage_overhead_ms)
        setup = self._decode_setup(shape, 1, gbps)
        once = setup.xfer_ms(self.sample.input_tokens) + lat.decode_request_ms
        return step + lat.router_token_ms + once / np.maximum(out - 1, 1)

    def _quantile(self, values: np.ndarray) -> float:
        return float(np.percentile(values, self.slo.attainment * 100))

    def prefill_reachable(self, shape: Shape) -> bool:
        return float(np.mean(self.prefill_zero_load_ms(shape) <= self.slo.ttft_ms)) >= self.slo.attainment

    def decode_reachable(self, shape: Shape, gbps: float) -> bool:
        return float(np.mean(self.decode_zero_load_ms(shape, gbps) <= self.slo.tpot_ms)) >= self.slo.attainment

    def fastest_prefill(self) -> tuple[Shape, float]:
        """The shape with the lowest prefill time at the attainment quantile, and that time."""
        return min(((s, self._quantile(self.prefill_zero_load_ms(s))) for s in self.shapes()), key=lambda x: x[1])

    def fastest_decode(self, gbps: float) -> tuple[Shape, float]:
        return min(
            ((s, self._quantile(self.decode_zero_load_ms(s, gbps))) for s in self.shapes()),
            key=lambda x: x[1],
        )

    # ---- capacity bounds (no SLO): used for bracket guesses and pruning ------------------------
    def prefill_capacity(self, shape: Shape) -> float:
        lat = self.latency(shape)
        mean = float(np.mean(self.sample.input_tokens))
        per_batch = max(1, int(self.prefill_budget(shape) // mean))
        stage = lat.prefill_stage_ms(per_batch * mean, per_batch * mean * mean)
        return 1000.0 * per_batch / stage

    def decode_capacity(self, shape: Shape) -> float:
        lat = self.latency(shape)
        inp = float(np.mean(self.sample.input_tokens))
        out = float(np.mean(self.sample.output_tokens))
        lane_tokens = self.capacity_tokens(shape) // shape.pipeline
        batch = max(1, min(DEFAULT_MAX_BATCH, int(lane_tokens // (inp + out))))
        step = lat.decode_step_ms(batch, batch * (inp + out / 2))
        return shape.pipeline * batch * 1000.0 / (step * max(out - 1, 1))

    # ---- goodputs ---------------------------------------------------------------------------
    def _decode_setup(self, shape: Shape, instances: int, gbps: float) -> DecodeSetup:
        """The measured KV link (profile overheads), when there is one, caps the topology's:
        the transfer runs through the workers' own transport, whatever the wire can do."""
        link = self.profile.overheads.kv_link
        return DecodeSetup(
            lat=self.latency(shape),
            instances=instances,
            capacity_tokens=self.capacity_tokens(shape),
            kv_bytes_per_token=self.facts.kv_bytes_per_token,
            link_gbps=min(gbps, link.gbps) if link else gbps,
            link_latency_ms=link.latency_ms if link else 0.0,
        )

    def _goodput(self, key: tuple, run, guess: float) -> float:
        if key in self._goodputs:
            return self._goodputs[key]
        self.stats.simulated += 1

        def attainment_at(rate: float) -> float:
            probe = (key, round(rate, 9))
            if probe not in self._probes:
                self.stats.probes += 1
                self._probes[probe] = run(rate).after_warmup(WARMUP)
            return self._probes[probe].attainment(self.slo.ttft_ms, self.slo.tpot_ms)

        value = max_rate(attainment_at, self.slo.attainment, guess)
        self._goodputs[key] = value
        return value

    def prefill_goodput(self, shape: Shape) -> float:
        lat = self.latency(shape)
        return self._goodput(
            ("prefill", shape),
            lambda r: simulate_prefill(self.requests_for(r), r, lat, budget_tokens=self.prefill_budget(shape)),
            self.prefill_capacity(shape),
        )

    def decode_goodput(self, shape: Shape, gbps: float) -> float:
        setup = self._decode_setup(shape, 1, gbps)
        return self._goodput(
            ("decode", shape, gbps),
            lambda r: simulate_decode(self.requests_for(r), r, setup),
            self.decode_capacity(shape),
        )

    def unit_goodput(self, p: Shape, n_p: int, d: Shape, n_d: int, gbps: float, units: int = 1) -> float:
        """Goodput of `units` units of n_p prefill and n_d decode instances, simulated together."""
        lat = self.latency(p)
        setup = self._decode_setup(d, n_d * units, gbps)
        guess = units * min(n_p * self.prefill_capacity(p), n_d * self.decode_capacity(d))
        return self._goodput(
            ("unit", p, n_p, d, n_d, gbps, units),
            lambda r: simulate_disaggregated(
                self.requests_for(r),
                r,
                lat,
                n_p * units,
                setup,
                units=units,
                budget_tokens=self.prefill_budget(p),
            ),
            guess,
        )

    def colocated_goodput(self, shape: Shape, instances: int = 1) -> float:
        lat = self.latency(shape, colocated=True)
        cap = self.capacity_tokens(shape)
        guess = instances / (1 / self.prefill_capacity(shape) + 1 / self.decode_capacity(shape))
        return self._goodput(
            ("colocated", shape, instances),
            lambda r: simulate_colocated(
                self.requests_for(r), r, lat, cap, instances, budget_tokens=self.budget_tokens
            ),
            guess,
        )

    def simulate_plan(
        self, rate: float, p: Shape, n_p: int, d: Shape, n_d: int, gbps: float, units: int = 1
    ) -> SimResult:
        self.stats.probes += 1
        return simulate_disaggregated(
            self.requests_for(rate),
            rate,
            self.latency(p),
            n_p,
            self._decode_setup(d, n_d, gbps),
            units=units,
            budget_tokens=self.prefill_budget(p),
        ).after_warmup(WARMUP)

    def simulate_colocated_plan(self, rate: float, shape: Shape, instances: int) -> SimResult:
        self.stats.probes += 1
        return simulate_colocated(
            self.requests_for(rate),
            rate,
            self.latency(shape, colocated=True),
            self.capacity_tokens(shape),
            instances,
            budget_tokens=self.budget_tokens,
        ).after_warmup(WARMUP)

    # ---- the two placement searches ------------------------------------------------------------
    def _ranked_phase(
        self, shapes: list[Shape], reachable, capacity, goodput, *, exhaustive: bool = False
    ) -> list[PhaseChoice]:
        """Reachable shapes ranked by the objective, best first, visited best-bound-first."""
        alive = []
        for s in shapes:
            if reachable(s):
                alive.append(s)
            else:
                self.stats.pruned_zero_load += 1

        def bound(s: Shape) -> tuple[float, float]:
            cap = capacity(s) * POOLING_SLACK
            return self.gpus_for(cap, s.gpus), -cap / s.gpus

        alive.sort(key=bound)
        ranked: list[PhaseChoice] = []
        best = (math.inf, 0.0)
        for s in alive:
            if not exhaustive and bound(s) > best:
                self.stats.pruned_bound += 1
                continue
            choice = PhaseChoice(s, goodput(s))
            ranked.append(choice)
            best = min(best, self._key(choice.goodput, s.gpus))
        ranked = [c for c in ranked if c.goodput > 0]
        ranked.sort(key=lambda c: self._key(c.goodput, c.shape.gpus))
        return ranked

    def _key(self, goodput: float, gpus: int) -> tuple[float, float]:
        return self.gpus_for(goodput, gpus), -goodput / gpus

    def high_affinity(self, *, exhaustive: bool = False) -> tuple[list[PhaseChoice], list[PhaseChoice]]:
        """Each phase on its own, KV cache crossing nodes (cross-node bandwidth)."""
        gbps = self.hardware.cross_gbps
        shapes = self.shapes()
        prefill = self._ranked_phase(
            shapes, self.prefill_reachable, self.prefill_capacity, self.prefill_goodput, exhaustive=exhaustive
        )
        decode = self._ranked_phase(
            shapes,
            lambda s: self.decode_reachable(s, gbps),
            self.decode_capacity,
            lambda s: self.decode_goodput(s, gbps),
            exhaustive=exhaustive,
        )
        return prefill, decode

    def unit_candidates(self) -> list[tuple[Shape, int, Shape, int]]:
        shapes = self.shapes()
        g = self.hardware.gpus_per_node
        out = []
        for p in shapes:
            for d in shapes:
                for n_p in range(1, (g - d.gpus) // p.gpus + 1):
                    for n_d in range(1, (g - n_p * p.gpus) // d.gpus + 1):
                        out.append((p, n_p, d, n_d))
        return out

    def low_affinity(self, *, exhaustive: bool = False) -> list[UnitChoice]:
        """Units of prefill + decode instances on one node, KV cache over the intra-node link."""
        gbps = self.hardware.intra_gbps
        shapes = self.shapes()
        p_ok = {s for s in shapes if self.prefill_reachable(s)}
        d_ok = {s for s in shapes if self.decode_reachable(s, gbps)}
        bounded = []
        for p, n_p, d, n_d in self.unit_candidates():
            if p not in p_ok or d not in d_ok:
                self.stats.pruned_zero_load += 1
                continue
            cap = min(n_p * self.prefill_goodput(p), n_d * self.decode_goodput(d, gbps)) * UNIT_POOLING_SLACK
            gpus = n_p * p.gpus + n_d * d.gpus
            bounded.append(((self.gpus_for(cap, gpus), -cap / gpus), (p, n_p, d, n_d)))
        bounded.sort(key=lambda x: x[0])
        ranked: list[UnitChoice] = []
        best = (math.inf, 0.0)
        for bound, (p, n_p, d, n_d) in bounded:
            if not exhaustive and bound > best:
                self.stats.pruned_bound += 1
                continue
            unit = UnitChoice(p, n_p, d, n_d, self.unit_goodput(p, n_p, d, n_d, gbps))
            ranked.append(unit)
            best = min(best, self._key(unit.goodput, unit.gpus))
        ranked = [u for u in ranked if u.goodput > 0]
        ranked.sort(key=lambda u: self._key(u.goodput, u.gpus))
        return ranked

    def colocated(self) -> list[PhaseChoice]:
        """The baseline: one engine doing both phases, per shape, best first. Tensor parallelism
        only, as in DistServe's vLLM baseline (vLLM then had no pipeline parallelism), so the
        comparison is the paper's."""
        ranked = []
        for s in self.shapes(colocated=True):
            if s.pipeline != 1:
                continue
            if not (self.prefill_reachable(s) and self.decode_reachable(s, math.inf)):
                self.stats.pruned_zero_load += 1
                continue
            ranked.append(PhaseChoice(s, self.colocated_goodput(s)))
        ranked = [c for c in ranked if c.goodput > 0]
        ranked.sort(key=lambda c: (-c.per_gpu, c.shape.gpus))
        return ranked
