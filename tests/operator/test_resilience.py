"""Faults: the API server answering 500/409, timing out, the operator restarting mid-reconcile,
and two operator replicas sharing the work through kopf peering. Each converges to the same
children, with no duplicates."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from helpers import GROUP, OperatorRunner, condition, create, example, wait_for

KINDS = [("apps", "statefulsets"), ("apps", "deployments"), ("", "services"), ("", "configmaps")]


def converged(api) -> bool:
    cr = api.get(GROUP, "disaggserves", "default", "tiny")
    stsets = api.list("apps", "statefulsets", "default")
    return bool(
        cr
        and (condition(cr, "Planned") or {}).get("status") == "True"
        and sorted(s["metadata"]["name"] for s in stsets) == ["tiny-decode", "tiny-prefill"]
        and api.get("apps", "deployments", "default", "tiny-router")
    )


def counts(api) -> dict[str, int]:
    return {plural: len(api.list(group, plural, "default")) for group, plural in KINDS}


@pytest.mark.parametrize(
    ("status", "verbs", "resource", "times"),
    [
        (500, {"patch"}, "statefulsets", 4),
        (409, {"patch"}, "configmaps", 3),
        (503, {"list"}, "deployments", 3),
        (500, {"patch"}, "disaggserves", 3),
    ],
    ids=["500-on-apply", "409-on-apply", "503-on-list", "500-on-status"],
)
async def test_api_errors_for_a_while_converge(apiserver, operator, status, verbs, resource, times):
    fault = apiserver.server.inject_fault(status=status, times=times, verbs=verbs, resource=resource)
    await create(apiserver.url, example())
    await wait_for(lambda: converged(apiserver), timeout=30, message="convergence after faults")
    assert fault.times == 0, "the fault was never hit"
    assert counts(apiserver) == {"statefulsets": 2, "deployments": 1, "services": 3, "configmaps": 1}


async def test_api_timeouts_converge(apiserver, operator_runner, monkeypatch):
    # The client timeout must sit well above a loaded machine's ordinary answer times (0.5 s did
    # not: unfaulted calls timed out too), and the injected delay well above the timeout.
    monkeypatch.setenv("DISAGGSERVE_API_TIMEOUT", "2")
    await asyncio.to_thread(operator_runner.start)
    fault = apiserver.server.inject_fault(delay=6, times=2, verbs={"patch"}, resource="statefulsets")
    await create(apiserver.url, example())
    await wait_for(lambda: converged(apiserver), timeout=90, message="convergence after timeouts")
    assert fault.times == 0


async def test_operator_restart_mid_reconcile_converges_without_duplicates(apiserver, operator_runner):
    await asyncio.to_thread(operator_runner.start)
    # Hold the router's apply so the first operator is stopped in the middle of its reconcile.
    stall = apiserver.server.inject_fault(delay=5, times=1, verbs={"patch"}, resource="deployments")
    await create(apiserver.url, example())
    await wait_for(lambda: stall.times == 0, message="reconcile reached the stalled call")
    assert apiserver.get("apps", "deployments", "default", "tiny-router") is None
    await asyncio.to_thread(operator_runner.stop)
    second = OperatorRunner()
    await asyncio.to_thread(second.start)
    try:
        await wait_for(lambda: converged(apiserver), timeout=30, message="convergence after restart")
        await asyncio.sleep(0.5)
        assert counts(apiserver) == {"statefulsets": 2, "deployments": 1, "services": 3, "configmaps": 1}
    finally:
        await asyncio.to_thread(second.stop)


async def test_two_replicas_with_peering(apiserver):
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        r = await client.post(
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            json={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "disaggserve"}},
        )
        assert r.status_code == 201
    leader, standby = OperatorRunner(), OperatorRunner()
    await asyncio.to_thread(leader.start, peering="disaggserve", priority=100)
    await asyncio.to_thread(standby.start, peering="disaggserve", priority=50)
    try:
        peers = lambda: (apiserver.get("kopf.dev", "clusterkopfpeerings", None, "disaggserve") or {}).get("status")  # noqa: E731
        await wait_for(lambda: peers() and len(peers()) == 2, message="both replicas registered as peers")
        await create(apiserver.url, example())
        await wait_for(lambda: converged(apiserver), timeout=30, message="convergence with two replicas")
        assert counts(apiserver)["statefulsets"] == 2
    finally:
        await asyncio.to_thread(standby.stop)
        await asyncio.to_thread(leader.stop)
