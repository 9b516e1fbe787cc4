"""Planning is off the event loop, bounded and cached (issues 11 item 1 and 16 item 1).

A slow plan (3 s of pure-Python CPU, as a cold plan of a large model takes) must not hold up
another resource's reconcile or the operator's peering heartbeat; a plan that never finishes
is stopped at its budget and reported (Ready=False, PlanTimeout, an Event), other resources
are served normally and the stuck one can still be deleted.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest

import planning_support
from disaggserve.controller import handlers
from disaggserve.controller.planning import REASON_TIMEOUT, Pending, PlanService
from disaggserve.planner import PlanningError
from helpers import GROUP, OperatorRunner, condition, create, delete, example, wait_for

NS = "default"


def auto(name: str) -> dict:
    """A resource the planner must plan (no spec.parallelism)."""
    body = example(name=name)
    del body["spec"]["parallelism"]
    return body


def cr(api, name):
    return api.get(GROUP, "disaggserves", NS, name)


def sts(api, name):
    return api.get("apps", "statefulsets", NS, f"{name}-decode")


# ---- the service on its own -------------------------------------------------------------------


async def test_a_stuck_plan_is_stopped_at_its_budget_and_the_worker_is_replaced():
    service = PlanService(timeout=1.5)
    try:
        with pytest.raises(PlanningError) as err:
            await service.run("stuck", planning_support.stuck_plan, None)
        assert err.value.reason == REASON_TIMEOUT
        assert "budget" in str(err.value)
        # The timeout is remembered for its inputs: asking again does not start another search.
        computed = service.computed
        with pytest.raises(PlanningError):
            await service.run("stuck", planning_support.stuck_plan, None)
        assert service.computed == computed
        # The killed worker was replaced: the next plan runs.
        assert await service.run("other", planning_support.echo, 42) == 42
    finally:
        await service.aclose()


async def test_a_caller_gets_pending_then_joins_the_same_computation():
    service = PlanService(timeout=30)
    spec = __import__("disaggserve.api.spec", fromlist=["parse_spec"]).parse_spec(auto("x")["spec"])
    try:
        first = await service.run("k", planning_support.slow_plan, spec, max_tensor=1, wait=0.2)
        assert isinstance(first, Pending)
        plan = await service.run("k", planning_support.slow_plan, spec, max_tensor=1, wait=None)
        assert plan.prefill.replicas >= 1
        assert service.computed == 1  # joined, not started twice
        assert await service.run("k", planning_support.slow_plan, spec, max_tensor=1) == plan  # cached
        assert service.computed == 1
    finally:
        await service.aclose()


# ---- the operator -----------------------------------------------------------------------------


@pytest.fixture
def slow_planner(monkeypatch):
    monkeypatch.setattr(handlers, "planner_factory", lambda: PlanService(plan_function=planning_support.slow_plan))


async def test_a_slow_plan_holds_up_neither_other_resources_nor_the_peering_heartbeat(
    apiserver, slow_planner, monkeypatch
):
    monkeypatch.setenv("DISAGGSERVE_PEERING_LIFETIME", "2")  # a heartbeat every second
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        r = await client.post(
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            json={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "disaggserve"}},
        )
        assert r.status_code == 201
    runner = OperatorRunner()
    await asyncio.to_thread(runner.start, peering="disaggserve")
    try:
        peers = lambda: (apiserver.get("kopf.dev", "clusterkopfpeerings", None, "disaggserve") or {}).get("status")  # noqa: E731
        await wait_for(lambda: peers(), message="the operator registered as a peer")
        beats: list[float] = []
        last_seen: list[str] = []

        async def watch_heartbeat() -> None:
            while True:
                seen = next(iter(peers().values()), {}).get("lastseen")
                if seen != (last_seen[-1] if last_seen else None):
                    last_seen.append(seen)
                    beats.append(time.monotonic())
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch_heartbeat())
        planning_since = time.monotonic()  # the plan starts with the first reconcile
        assert (await create(apiserver.url, auto("slow"))).status_code == 201
        await wait_for(
            lambda: (condition(cr(apiserver, "slow"), "Planned") or {}).get("reason") == "Planning",
            message="the slow resource is planning",
        )
        assert (await create(apiserver.url, example(name="fast"))).status_code == 201
        await wait_for(lambda: sts(apiserver, "fast"), message="the other resource's children")
        # The other resource was reconciled while the slow plan was still running.
        assert (condition(cr(apiserver, "slow"), "Planned") or {}).get("reason") == "Planning"
        assert sts(apiserver, "slow") is None
        await wait_for(lambda: sts(apiserver, "slow"), timeout=60, message="the slow resource planned in the end")
        planning_until = time.monotonic()
        watcher.cancel()
        # The heartbeat kept beating while the plan ran (about once a second; a blocked loop
        # would have left a gap of the plan's whole 3 s).
        during = [t for t in beats if planning_since <= t <= planning_until]
        assert len(during) >= 2, (beats, planning_since, planning_until)
        gaps = [b - a for a, b in itertools.pairwise(beats) if b >= planning_since and a <= planning_until]
        assert max(gaps) < planning_support.SLOW_SECONDS - 1.0, gaps
    finally:
        await asyncio.to_thread(runner.stop)


@pytest.fixture
def stuck_planner(monkeypatch):
    monkeypatch.setattr(
        handlers, "planner_factory", lambda: PlanService(timeout=2.0, plan_function=planning_support.stuck_plan)
    )


async def test_a_plan_that_never_finishes_is_reported_and_the_resource_can_be_deleted(
    apiserver, stuck_planner, operator
):
    # The freezing resource of issue 11 is refused by the schema now...
    freezing = auto("freezing")
    freezing["spec"]["workload"]["requestRate"] = 1e-300
    r = await create(apiserver.url, freezing)
    assert r.status_code == 422 and "requestRate" in r.json()["message"], r.text
    # ...and a plan that runs out of time anyway is stopped and reported.
    assert (await create(apiserver.url, auto("stuck"))).status_code == 201
    assert (await create(apiserver.url, example(name="good"))).status_code == 201
    await wait_for(lambda: sts(apiserver, "good"), message="the good resource's children")
    ready = await wait_for(
        lambda: (c := condition(cr(apiserver, "stuck"), "Ready")) and c["reason"] == REASON_TIMEOUT and c,
        timeout=30,
        message="PlanTimeout on the stuck resource",
    )
    assert ready["status"] == "False" and "budget" in ready["message"]
    assert cr(apiserver, "stuck")["status"]["phase"] == "Failed"
    await wait_for(
        lambda: [e for e in apiserver.list("", "events", NS) if e.get("reason") == REASON_TIMEOUT],
        message="a PlanTimeout Warning event",
    )
    assert sts(apiserver, "stuck") is None
    resp = await delete(apiserver.url, "stuck")
    assert resp.status_code in (200, 202)
    await wait_for(lambda: cr(apiserver, "stuck") is None, message="the stuck resource deleted (finalizer released)")
    assert sts(apiserver, "good") is not None


def test_a_bandwidth_annotation_changes_the_node_fingerprint_and_others_do_not():
    """The topology reads link bandwidths from Node annotations too: a cached plan must not
    survive a bandwidth change, and must survive unrelated annotation churn."""
    from disaggserve.controller.planning import node_fingerprint
    from disaggserve.topology.nodes import KEY_CROSS_GBPS

    node = {"metadata": {"name": "n1", "labels": {}, "annotations": {KEY_CROSS_GBPS: "100"}}}
    faster = {"metadata": {"name": "n1", "labels": {}, "annotations": {KEY_CROSS_GBPS: "400"}}}
    churn = {"metadata": {"name": "n1", "labels": {}, "annotations": {KEY_CROSS_GBPS: "100", "x/heartbeat": "7"}}}
    assert node_fingerprint(node) != node_fingerprint(faster)
    assert node_fingerprint(node) == node_fingerprint(churn)
