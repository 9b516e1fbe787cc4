"""The event simulator's shortcuts against step-by-step references and hand-computed cases."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque

import numpy as np
import pytest

from conftest import coeffs, entry, synthetic_profile
from disaggserve.planner.profile import PhaseLatency, builtin_profiles, phase_latency
from disaggserve.planner.simulator import (
    INF,
    DecodeSetup,
    Lane,
    _steps_before,
    prefill_stalls,
    simulate_colocated,
    simulate_decode,
    simulate_disaggregated,
)
from disaggserve.planner.workload import LengthDistribution, RequestSample, WorkloadModel, sample_requests


def naive_decode(ready, inp, out, lat: PhaseLatency, capacity: int, max_batch: int = 256) -> np.ndarray:
    """One lane, one decode step at a time (the slow way the simulator must agree with)."""
    order = sorted(range(len(ready)), key=lambda r: ready[r])
    done = np.full(len(ready), INF)
    t, i, used = 0.0, 0, 0
    waiting: deque[int] = deque()
    running: dict[int, list[int]] = {}  # rid -> [remaining steps, ctx]
    while i < len(order) or running or waiting:
        while i < len(order) and ready[order[i]] <= t:
            waiting.append(order[i])
            i += 1
        while waiting and len(running) < max_batch and used + inp[waiting[0]] + out[waiting[0]] <= capacity:
            r = waiting.popleft()
            used += inp[r] + out[r]
            if out[r] - 1 <= 0:
                done[r] = t
                used -= inp[r] + out[r]
            else:
                running[r] = [out[r] - 1, inp[r] + 1]
        if not running:
            if i < len(order):
                t = max(t, ready[order[i]])
                continue
            break
        t += lat.decode_step_ms(len(running), sum(v[1] for v in running.values()))
        for r in list(running):
            running[r][0] -= 1
            running[r][1] += 1
            if running[r][0] == 0:
                done[r] = t
                used -= inp[r] + out[r]
                del running[r]
    return done


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_decode_jumps_match_step_by_step(seed):
    rng = np.random.default_rng(seed)
    n = 300
    ready = np.cumsum(rng.exponential(40.0, n))
    inp = rng.integers(1, 600, n)
    out = rng.integers(1, 120, n)
    lat = phase_latency(builtin_profiles()["opt-13b-a100"], 1, 1)
    capacity = 20_000  # tight enough that memory blocks admission at times
    lane = Lane(lat, capacity)
    done = np.full(n, INF)
    for rid in np.argsort(ready, kind="stable"):
        lane.advance_to(ready[rid], inp, out, np.empty(0), done)
        lane.push(int(rid), float(ready[rid]), int(inp[rid] + out[rid]))
    lane.advance_to(INF, inp, out, np.empty(0), done)
    expected = naive_decode(ready, inp, out, lat, capacity)
    assert np.allclose(done, expected, rtol=1e-9, atol=1e-6)


def test_steps_before_matches_brute_force():
    rnd = random.Random(5)
    for _ in range(2000):
        alpha, beta = rnd.uniform(0.1, 50), rnd.choice([0.0, rnd.uniform(0, 5)])
        horizon = rnd.uniform(1e-3, 5000)
        brute = 0
        while brute * alpha + beta * brute * (brute - 1) / 2 < horizon:
            brute += 1
        assert _steps_before(horizon, alpha, beta) == brute
    assert _steps_before(math.inf, 1.0, 1.0) == math.inf


def _two_requests() -> RequestSample:
    return RequestSample(
        unit_arrivals_s=np.array([0.0, 0.0025]),
        input_tokens=np.array([4, 4]),
        output_tokens=np.array([10, 3]),
    )


def test_colocated_prefill_stalls_running_decodes():
    """Hand-computed: prefills take 10 ms, decode steps 1 ms (vLLM policy: prefill first)."""
    prof = synthetic_profile([entry(1, coeffs(10, 0), coeffs(1, 0))])
    lat = phase_latency(prof, 1, 1)
    res = simulate_colocated(_two_requests(), 1.0, lat, capacity_tokens=1000)
    # r0 prefilled 0→10; r1 (arrived 2.5) prefilled 10→20 while r0 waits; then 1-ms steps.
    assert res.ttft_ms.tolist() == pytest.approx([10.0, 17.5])
    assert res.tpot_ms.tolist() == pytest.approx([(29 - 10) / 9, (22 - 20) / 2])


def test_disaggregated_decode_is_not_stalled_by_prefill():
    prof = synthetic_profile([entry(1, coeffs(10, 0), coeffs(1, 0))])
    lat = phase_latency(prof, 1, 1)
    setup = DecodeSetup(lat, 1, capacity_tokens=1000, kv_bytes_per_token=1, link_gbps=INF)
    res = simulate_disaggregated(_two_requests(), 1.0, lat, 1, setup)
    # r0: prefill 0→10, decodes from 10, one 1-ms step each; r1 prefill 10→20 on the prefill GPU.
    assert res.ttft_ms.tolist() == pytest.approx([10.0, 17.5])
    assert res.tpot_ms[0] == pytest.approx(1.0)


def test_kv_transfer_time_is_bytes_over_bandwidth():
    prof = synthetic_profile([entry(1, coeffs(10, 0), coeffs(1, 0))])
    lat = phase_latency(prof, 1, 1)
    one = RequestSample(np.array([0.0]), np.array([1000]), np.array([2]))
    # 1000 tokens × 1 MB at 8 Gbit/s (1 GB/s) = 1000 ms before the single decode step
    setup = DecodeSetup(lat, 1, capacity_tokens=10_000, kv_bytes_per_token=1_000_000, link_gbps=8)
    res = simulate_disaggregated(one, 1.0, lat, 1, setup)
    assert res.tpot_ms[0] == pytest.approx(1000.0 + 1.0)


def test_request_longer_than_kv_memory_fails_instead_of_blocking():
    prof = synthetic_profile([entry(1, coeffs(10, 0), coeffs(1, 0))])
    lat = phase_latency(prof, 1, 1)
    sample = RequestSample(np.array([0.0, 0.001]), np.array([5000, 10]), np.array([5, 5]))
    res = simulate_decode(sample, 1.0, DecodeSetup(lat, 1, 1000, 1, INF))
    assert res.tpot_ms[0] == INF
    assert res.tpot_ms[1] == pytest.approx(1.0)


def test_more_decode_instances_carry_more_load():
    prof = builtin_profiles()["opt-13b-a100"]
    lat = phase_latency(prof, 1, 1)
    work = WorkloadModel(
        rate=1,
        input=LengthDistribution(kind="lognormal", mean=512),
        output=LengthDistribution(kind="lognormal", mean=128),
    )
    sample = sample_requests(work, 1500, seed=3)
    one = simulate_decode(sample, 30, DecodeSetup(lat, 1, 30_000, 819_200, INF)).attainment(1e9, 60)
    two = simulate_decode(sample, 30, DecodeSetup(lat, 2, 30_000, 819_200, INF)).attainment(1e9, 60)
    assert two > one


def _stalled(lat: PhaseLatency, stall_ms: float) -> PhaseLatency:
    return dataclasses.replace(lat, prefill_stall_ms=stall_ms)


def test_prefill_stall_spreads_unloaded_ttft_like_a_shifted_exponential():
    """Unloaded (one request a minute), TTFT is the 10-ms prefill plus an exponential stall of the
    given mean: p50 ≈ 10 + m·ln 2, p90 ≈ 10 + m·ln 10; without a stall every TTFT is 10 ms."""
    lat = phase_latency(synthetic_profile([entry(1, coeffs(10, 0), coeffs(1, 0))]), 1, 1)
    n = 4000
    sample = RequestSample(np.arange(n) * 60_000.0, np.full(n, 4), np.full(n, 3))
    setup = DecodeSetup(lat, 1, capacity_tokens=1000, kv_bytes_per_token=1, link_gbps=INF)
    plain = simulate_disaggregated(sample, 1.0, lat, 1, setup)
    assert plain.ttft_p(90) == pytest.approx(plain.ttft_p(50)) == pytest.approx(10.0)
    for simulate in (
        lambda lt: simulate_disaggregated(sample, 1.0, lt, 1, dataclasses.replace(setup, lat=lt)),
        lambda lt: simulate_colocated(sample, 1.0, lt, capacity_tokens=1000),
    ):
        res = simulate(_stalled(lat, 20.0))
        assert res.ttft_p(50) == pytest.approx(10 + 20 * math.log(2), rel=0.05)
        assert res.ttft_p(90) == pytest.approx(10 + 20 * math.log(10), rel=0.05)
        assert res.ttft_ms.min() >= 10.0
        assert res.tpot_p(50) == pytest.approx(plain.tpot_p(50))  # unloaded: the stall is before decode


def test_prefill_stall_occupies_the_worker_so_prompts_behind_it_wait():
    """Two prompts 1 ms apart: the second waits for the first's prefill *and* its stall."""
    lat = phase_latency(synthetic_profile([entry(1, coeffs(10, 0), coeffs(1, 0))]), 1, 1)
    pair = RequestSample(np.array([0.0, 1.0]), np.array([4, 4]), np.array([2, 2]))
    setup = DecodeSetup(lat, 1, capacity_tokens=1000, kv_bytes_per_token=1, link_gbps=INF)
    stalled = _stalled(lat, 30.0)
    stall = prefill_stalls(stalled, 2)
    res = simulate_disaggregated(pair, 1000.0, stalled, 1, dataclasses.replace(setup, lat=stalled),
                                 budget_tokens=0)
    first_done = 10 + stall[0]
    assert res.ttft_ms[0] == pytest.approx(first_done)
    assert res.ttft_ms[1] == pytest.approx(first_done + 10 + stall[1] - 1.0)


def test_prefill_stalls_are_the_same_for_every_configuration():
    """Plans must be reproducible and comparisons fair: the same draws every call."""
    lat = _stalled(phase_latency(synthetic_profile([entry(1, coeffs(10, 0), coeffs(1, 0))]), 1, 1), 5.0)
    assert np.array_equal(prefill_stalls(lat, 100), prefill_stalls(lat, 100))
    assert not prefill_stalls(_stalled(lat, 0.0), 100).any()
