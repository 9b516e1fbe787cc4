"""Costs outside the model (per request, per token, per process) and the measured KV link
change what the simulator predicts the way they change the real system."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import coeffs, entry, synthetic_profile
from disaggserve.planner.profile import phase_latency
from disaggserve.planner.simulator import DecodeSetup, simulate_colocated, simulate_disaggregated
from disaggserve.planner.workload import RequestSample

INP, OUT = 100, 11


def profile(**overheads):
    return synthetic_profile(
        [entry(1, coeffs(10, 0.0), coeffs(5, 0.0))],
        overheads=overheads,
    )


def sample(n: int = 50) -> RequestSample:
    return RequestSample(np.arange(n, dtype=float), np.full(n, INP, dtype=np.int64), np.full(n, OUT, dtype=np.int64))


def run(prof, rate: float = 0.1, link_gbps: float = float("inf")):
    lat = phase_latency(prof, 1, 1)
    link = prof.overheads.kv_link
    setup = DecodeSetup(
        lat,
        1,
        10**9,
        kv_bytes_per_token=1000,
        link_gbps=min(link_gbps, link.gbps) if link else link_gbps,
        link_latency_ms=link.latency_ms if link else 0.0,
    )
    return simulate_disaggregated(sample(), rate, lat, 1, setup)


def test_no_overheads_is_the_forward_passes_alone():
    r = run(profile())
    assert np.allclose(r.ttft_ms, 10) and np.allclose(r.tpot_ms, 5)


def test_per_request_and_per_token_costs_add_where_they_are_spent():
    r = run(
        profile(
            router={"per_request_ms": 2, "per_token_ms": 0.5},
            prefill={"per_request_ms": 3},
            decode={"per_request_ms": 10, "per_token_ms": 1},
        )
    )
    # TTFT: router hop + prefill forward + prefill process's own work
    assert np.allclose(r.ttft_ms, 2 + 10 + 3)
    # TPOT: step + per-token decode work + router streaming, and the join cost spread over 10 steps
    assert np.allclose(r.tpot_ms, 5 + 1 + 0.5 + 10 / (OUT - 1))


def test_a_per_iteration_cost_is_paid_once_per_step_whatever_the_batch():
    per_step = phase_latency(profile(decode={"per_step_ms": 2}), 1, 1)
    per_token = phase_latency(profile(decode={"per_token_ms": 2}), 1, 1)
    # alone (batch 1) the two are the same cost...
    assert per_step.decode_step_ms(1, 0) == per_token.decode_step_ms(1, 0) == 5 + 2
    # ...in a batch of 8 an iteration's own work is paid once, a per-token cost eight times
    assert per_step.decode_step_ms(8, 0) == 5 + 2
    assert per_token.decode_step_ms(8, 0) == 5 + 2 * 8
    busy = dict(rate=150)  # requests overlap: batches form
    assert np.median(run(profile(decode={"per_step_ms": 2}), **busy).tpot_ms) < np.median(
        run(profile(decode={"per_token_ms": 2}), **busy).tpot_ms)


def test_prefill_per_request_cost_lowers_capacity():
    # a request every 11 ms: a 10 ms prefill keeps up, 10 + 5 ms of CPU per request does not
    fast = run(profile(), rate=90)
    slow = run(profile(prefill={"per_request_ms": 5}), rate=90)
    assert np.median(slow.ttft_ms) > np.median(fast.ttft_ms) + 5


def test_measured_kv_link_caps_the_topology_and_adds_latency():
    r = run(profile(kv_link={"gbps": 0.008, "latency_ms": 4}), link_gbps=2400)
    # 100 tokens x 1000 B at 1 MB/s = 100 ms, + 4 ms latency, spread over 10 decode steps
    assert np.allclose(r.tpot_ms, 5 + 104 / (OUT - 1))


def test_colocated_pays_its_own_costs():
    prof = profile(router={"per_request_ms": 2}, colocated={"per_request_ms": 3, "per_token_ms": 1})
    lat = phase_latency(prof, 1, 1, colocated=True)
    r = simulate_colocated(sample(), 0.1, lat, 10**9)
    assert np.allclose(r.ttft_ms, 2 + 10 + 3)
    assert np.allclose(r.tpot_ms, 5 + 1)


def test_unknown_overhead_keys_are_refused():
    from disaggserve.planner.profile import ProfileError, parse_profile

    doc = profile().model_dump(mode="json")
    doc["overheads"] = {"prefill": {"per_request": 3}}
    with pytest.raises(ProfileError, match=r"overheads\.prefill\.per_request"):
        parse_profile(doc)


def test_a_measured_prefill_stall_spreads_ttft_but_not_tpot():
    plain, stalled = run(profile()), run(profile(prefill_stall_ms=8.0))
    assert np.allclose(plain.ttft_ms, 10)
    assert stalled.ttft_ms.min() >= 10 and stalled.ttft_p(90) > stalled.ttft_p(50) + 8
    assert np.allclose(stalled.tpot_ms, plain.tpot_ms)


def test_shared_cores_slow_the_workers_by_the_router_and_client_cpu_the_rate_brings():
    """Two shared cores; router 2 ms + 0.1 ms/token and client 1 ms + 0.1 ms/token of CPU per request
    (10 tokens: 5 ms a request). At 100 req/s they take 0.5 cores, a quarter of each: the workers'
    times stretch by 1 + 0.5 / 2. A cluster's router has CPUs of its own: nothing shared, no change."""
    shared = profile(router={"per_request_ms": 2, "per_token_ms": 0.1},
                     client={"per_request_ms": 1, "per_token_ms": 0.1}, prefill={"per_request_ms": 4}, shared_cores=2)
    lat = phase_latency(shared, 1, 1)
    assert (lat.shared_request_ms, lat.shared_token_ms, lat.shared_cores) == (3, 0.2, 2)
    busy = lat.sharing(100, 10)
    assert busy.prefill.a == pytest.approx(10 * 1.25) and busy.decode_small.a == pytest.approx(5 * 1.25)
    assert busy.prefill_request_ms == pytest.approx(4 * 1.25)
    assert busy.router_request_ms == lat.router_request_ms  # the router's own latency is not the workers'
    assert busy.sharing(100, 10) == busy  # applied once
    assert lat.sharing(0, 10) == lat
    alone = phase_latency(profile(router={"per_request_ms": 2, "per_token_ms": 0.1}), 1, 1)
    assert alone.sharing(100, 10) == alone
    # the simulator applies it at the rate it simulates: an unloaded TTFT barely moves, a busy one does
    slow, fast = run(shared, rate=0.1), run(profile(router={"per_request_ms": 2, "per_token_ms": 0.1},
                                                    client={"per_request_ms": 1, "per_token_ms": 0.1},
                                                    prefill={"per_request_ms": 4}), rate=0.1)
    assert np.allclose(slow.ttft_ms, fast.ttft_ms, rtol=1e-3)
    # 50 req/s of OUT-token requests: 50 x (3 + 0.2 OUT) ms of CPU a second over 2 cores stretches
    # the 10 + 4 ms prefill (the router's 2 ms hop comes before it)
    stretch = 1 + 50 * (3 + 0.2 * OUT) / 1000 / 2
    assert np.allclose(run(shared, rate=50).ttft_ms, 2 + 14 * stretch)
