"""Closed loop on the local cluster: measured overload -> the operator adds replicas; load
drops -> replicas fall after the stabilization window, draining first, and no request fails.

The overload is relative to this machine: the test first measures what one prefill + one decode
worker finish per second, then offers five times that, so it overloads a slow, busy machine and a
fast one alike (no assertion about how fast the machine is). Under overload the router sheds what
it cannot queue with 429 + Retry-After; the load generator honours Retry-After as the `openai`
client does, and the only failures allowed are such 429s: never a timeout, a reset connection or
an error in the stream.

Every worker process here shares the same two CPU cores, so extra replicas add queues, not
compute: this test checks the loop (decisions, bounds, timing, drain safety), while the
benefit of scaling is measured where capacity is real, in bench/autoscale.py."""

from __future__ import annotations

import asyncio
import copy

import pytest
import pytest_asyncio

from disaggserve.local.cluster import default_resource
from e2e_tools import apply_and_roll_router, measured_capacity, ready_cluster, slo_for_this_machine
from loadgen import run_poisson, summarize

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(420)]
INTERVAL = 5
STABILIZATION = 12
INPUT, OUTPUT = 128, 64
OVERLOAD = 5  # times the measured capacity
HEAVY_SECONDS = 25
QUIET_INPUT, QUIET_OUTPUT = 32, 16


def autoscaled(enabled: bool = True) -> dict:
    r = copy.deepcopy(default_resource())
    r["spec"]["slo"] = {"ttftMs": 100, "tpotMs": 10, "attainment": 0.9}
    r["spec"]["autoscaling"] = {
        "enabled": enabled,
        "intervalSeconds": INTERVAL,
        "minReplicas": {"prefill": 1, "decode": 1},
        "maxReplicas": {"prefill": 3, "decode": 3},
        "scaleDownStabilizationSeconds": STABILIZATION,
        "metrics": {"windowSeconds": 15},
    }
    return r


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory):
    env = {"DISAGGSERVE_AUTOSCALE_TICK": "1"}
    # Off until the test has set the SLO from this machine's latency (measuring it must not scale).
    async with ready_cluster(tmp_path_factory.mktemp("autoscale"), autoscaled(enabled=False), env) as c:
        yield c


async def plan_of(cluster) -> dict:
    return ((await cluster.get("tiny")) or {}).get("status", {}).get("plan", {})


def scaled_down(history: list[tuple[float, int, int, str, str]], after: float, peak: int) -> bool:
    """True when the autoscaler published a scale-down step below the peak after it was reached."""
    return any(t > after and p + d < peak and "scale-down" in reason for t, p, d, _, reason in history)


async def test_overload_scales_up_and_quiet_scales_down_without_failures(cluster):
    url = (await cluster.endpoint("tiny")).removesuffix("/v1")
    # The quiet phase must meet the SLO for a scale-down to be right: set it from this machine's
    # light-traffic latency (a two-core host shared with other jobs missed a fixed 10 ms TPOT
    # for 14 % of light requests, and the autoscaler rightly kept the replicas).
    slo = await slo_for_this_machine(url, QUIET_INPUT, QUIET_OUTPUT)
    resource = autoscaled()
    resource["spec"]["slo"] = {**resource["spec"]["slo"], **slo}
    await apply_and_roll_router(cluster, resource)
    ttft_slo_s, tpot_slo_s = slo["ttftMs"] / 1000, slo["tpotMs"] / 1000
    history: list[tuple[float, int, int, str, str]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def record():
        while True:
            plan = await plan_of(cluster)
            history.append(
                (
                    loop.time() - start,
                    plan["prefill"]["replicas"],
                    plan["decode"]["replicas"],
                    plan.get("source", ""),
                    plan.get("reason", ""),
                )
            )
            await asyncio.sleep(0.5)

    capacity = await measured_capacity(url, INPUT, OUTPUT)
    rate = min(150.0, max(5.0, OVERLOAD * capacity))
    recorder = asyncio.create_task(record())
    try:
        # Overload: five times what one prefill + one decode finish on this machine.
        heavy = await run_poisson(url, "tiny-llama", rate=rate, num_requests=int(rate * HEAVY_SECONDS),
                                  input_tokens=INPUT, output_tokens=OUTPUT)
        scaled_up = [h for h in history if h[1] + h[2] > 2]
        assert scaled_up, f"no scale-up under overload; plans seen: {history[-3:]}"
        assert scaled_up[0][3] == "autoscaler"
        assert scaled_up[0][0] < 6 * INTERVAL + 15, "scale-up within a bounded number of intervals"
        status = (await cluster.get("tiny"))["status"]
        assert any(c["type"] == "MetricsAvailable" and c["status"] == "True" for c in status["conditions"])
        overloaded = summarize(heavy, ttft_slo_s, tpot_slo_s)
        print(f"SLO {slo}; measured {capacity:.1f}/s, offered {rate:.1f}/s: {overloaded}")  # shown with -s
        unclean = [(r.kind, r.status, r.error) for r in heavy if not r.ok and not r.shed]
        assert not unclean, f"failures other than 429 + Retry-After under overload: {unclean[:5]} ({overloaded})"
        assert overloaded["attainment"] < 0.9, f"{rate:.0f}/s did not overload ({capacity:.1f}/s measured)"

        # Quiet: light traffic keeps flowing while the operator scales back down, draining first.
        peak = max(h[1] + h[2] for h in history)
        light = await run_poisson(
            url,
            "tiny-llama",
            rate=2,
            num_requests=int(2 * (STABILIZATION + 6 * INTERVAL)),
            input_tokens=QUIET_INPUT,
            output_tokens=QUIET_OUTPUT,
            seed=1,
        )
        quiet = summarize(light, ttft_slo_s, tpot_slo_s)
        assert quiet["failed"] == 0, quiet["errors"]
        peaked_at = min(h[0] for h in history if h[1] + h[2] == peak)
        for _ in range(60):
            if scaled_down(history, peaked_at, peak):
                break
            await asyncio.sleep(1)
        # The claim is that a scale-down step happened, not that the last plan is one: on a
        # shared two-core machine light traffic can still miss the SLO now and then after the step,
        # and the autoscaler rightly scales back up then.
        assert scaled_down(history, peaked_at, peak), f"no scale-down after the load dropped: {history[-3:]}"
    finally:
        recorder.cancel()
