"""A colocated deployment on the local cluster, autoscaled: `placement: colocated` runs workers
that do both phases behind the same router, and under measured overload the autoscaler adds
colocated instances (bounded by `maxReplicas.colocated`) that then serve traffic, with no
request failing other than 429 + Retry-After.

As in test_autoscaling.py, every process shares this machine's cores: extra instances add
queues, not compute, so this checks the loop (decision, bound, new pods serving), not a speed-up."""

from __future__ import annotations

import asyncio
import contextlib
import copy

import httpx
import pytest
import pytest_asyncio

from disaggserve.local.cluster import default_resource
from e2e_tools import measured_capacity, ready_cluster, worker_headers
from loadgen import run_poisson

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(420)]
INTERVAL = 5
INPUT, OUTPUT = 128, 32
MAX_COLOCATED = 2
SUCCESS = "vllm:request_success_total"


def colocated_autoscaled() -> dict:
    r = copy.deepcopy(default_resource())
    r["spec"].pop("parallelism")  # colocated shapes are planned, not given
    r["spec"]["placement"] = "colocated"
    r["spec"]["slo"] = {"ttftMs": 100, "tpotMs": 10, "attainment": 0.9}
    r["spec"]["autoscaling"] = {
        "enabled": True,
        "intervalSeconds": INTERVAL,
        "minReplicas": {"prefill": 1, "decode": 1, "colocated": 1},
        "maxReplicas": {"prefill": 1, "decode": 1, "colocated": MAX_COLOCATED},
        "scaleDownStabilizationSeconds": 600,  # this test checks the way up only
        "metrics": {"windowSeconds": 15},
    }
    return r


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory):
    env = {"DISAGGSERVE_AUTOSCALE_TICK": "1"}
    async with ready_cluster(tmp_path_factory.mktemp("colocated"), colocated_autoscaled(), env) as c:
        yield c


async def served_by_pod(cluster, headers: dict[str, str]) -> dict[str, float]:
    """Requests each colocated pod has finished (its vLLM-named success counter)."""
    served = {}
    async with httpx.AsyncClient(timeout=30, headers=headers) as http:
        for (_, name), pod in list(cluster.agent.pods.items()):
            if not name.startswith("tiny-colocated-"):
                continue
            text = (await http.get(f"http://{pod.ip}:8100/metrics")).text
            served[name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                               if line.startswith(SUCCESS))
    return served


async def test_overload_adds_colocated_instances_that_serve(cluster):
    plan = (await cluster.get("tiny"))["status"]["plan"]
    assert plan["placement"] == "colocated", plan["reason"]
    assert plan["prefill"]["replicas"] == 0 and plan["decode"]["replicas"] == 0
    start = plan["colocated"]["replicas"]
    assert start < MAX_COLOCATED, f"the planner already chose {start} colocated instances: nothing to scale"

    url = (await cluster.endpoint("tiny")).removesuffix("/v1")
    rate = min(150.0, max(5.0, 5 * await measured_capacity(url, INPUT, OUTPUT)))
    # Overload runs until the new instance has served: a pause while it starts (a minute on a
    # slow two-core machine) is a sustained drop in the rate, and the autoscaler rightly scales
    # back in on one without waiting out the stabilization window (autoscaling/policy.py).
    stop = asyncio.Event()
    bursts: list[asyncio.Task] = []

    async def overload() -> None:
        # Back-to-back 4 s bursts, each its own task: arrivals never wait for a burst's retries.
        while not stop.is_set():
            bursts.append(asyncio.create_task(run_poisson(
                url, "tiny-llama", rate=rate, num_requests=int(rate * 4), input_tokens=INPUT,
                output_tokens=OUTPUT, seed=len(bursts))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 4)

    load = asyncio.create_task(overload())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 6 * INTERVAL + 90
        while loop.time() < deadline:
            status = (await cluster.get("tiny"))["status"]
            ready = (status.get("replicas") or {}).get("colocated") or {}
            if status["plan"]["colocated"]["replicas"] == MAX_COLOCATED and ready.get("ready") == MAX_COLOCATED:
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(
                f"no scale-out to {MAX_COLOCATED} ready colocated instances: {status['plan']['reason']}")
        assert status["plan"]["source"] == "autoscaler" and "colocated" in status["plan"]["reason"]
        assert status["plan"]["prefill"]["replicas"] == 0 and status["plan"]["decode"]["replicas"] == 0

        # The new instance takes traffic: both pods finish requests of the continuing load.
        headers = await worker_headers(cluster, "tiny")
        before = await served_by_pod(cluster, headers)
        assert len(before) == MAX_COLOCATED, before
        grew: list[str] = []
        deadline = loop.time() + 60
        while loop.time() < deadline and len(grew) < MAX_COLOCATED:
            await asyncio.sleep(1)
            after = await served_by_pod(cluster, headers)
            grew = [name for name in before if after.get(name, 0) > before[name]]
        assert len(grew) == MAX_COLOCATED, (before, after)
    finally:
        stop.set()
        await load
        heavy = [r for burst in await asyncio.gather(*bursts) for r in burst]
    unclean = [(r.kind, r.status, r.error) for r in heavy if not r.ok and not r.shed]
    assert not unclean, f"failures other than 429 + Retry-After under overload: {unclean[:5]}"
