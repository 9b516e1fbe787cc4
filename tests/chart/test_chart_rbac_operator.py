"""The real operator, run against the test API server, needs exactly the RBAC the chart grants.

The scenario drives every path that talks to the API: startup with peering, create (children,
status, events), an update that makes the planner read the nodes, and a delete. The emulator's
audit log then holds each (verb, group, resource, subresource, namespace) the operator asked
for; rbaclib evaluates them against the chart's rendered Roles and ClusterRoles. A call the
chart does not grant fails, and so does a granted resource the operator never touched.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from chart.chartlib import documents, template
from chart.rbaclib import Call, denied, grants_for, unused
from helpers import create, delete, example, patch_spec, wait_for

SA, OPERATOR_NS = "disaggserve", "disaggserve-system"
PEERING = "disaggserve"
WATCHED = "team-a"


class ScopedOperator:
    """The real kopf operator in its own thread and loop, as `disaggserve operator` runs it.

    tests/conftest.py's runner is cluster-wide only; the chart's default is namespaced, so this
    one takes the namespaces the chart would pass as --namespace flags.
    """

    def __init__(self, namespaces: list[str] | None) -> None:
        self.namespaces = namespaces
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import kopf

        import disaggserve.controller  # noqa: F401  (registers the handlers)

        ready = threading.Event()

        def run() -> None:
            try:
                asyncio.run(kopf.operator(
                    clusterwide=self.namespaces is None, namespaces=self.namespaces or [],
                    standalone=False, peering_name=PEERING, stop_flag=self._stop, ready_flag=ready,
                ))
            except BaseException as e:  # re-raised by stop()
                self.error = e

        self._thread = threading.Thread(target=run, name="kopf-rbac", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise AssertionError("the operator did not start")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(20)
        if self.error is not None:
            raise self.error


class OwnCalls:
    """Takes the test's own requests out of the audit log, leaving the operator's."""

    def __init__(self, audit: list[Any]) -> None:
        self.audit = audit
        self.mine: list[int] = []
        # Permissions the operator must hold without calling them: those in the Roles it writes.
        self.escalation: list[Call] = []

    async def do(self, call: Call, request: Any) -> Any:
        start = len(self.audit)
        result = await request
        for index in range(start, len(self.audit)):
            if Call.of(self.audit[index]) == call and index not in self.mine:
                self.mine.append(index)
                return result
        raise AssertionError(f"the audit log lacks the test's own call {call}")

    def operator_calls(self) -> list[Call]:
        return [Call.of(entry) for i, entry in enumerate(self.audit) if i not in self.mine]

    def operator_needs(self) -> list[Call]:
        return self.operator_calls() + self.escalation


def _role_permissions(roles: list[dict[str, Any]]) -> list[Call]:
    """A Role's rules as calls: RBAC refuses to let anyone write a Role granting more than they hold."""
    assert roles, "the operator wrote no Role for the router"
    return [
        Call(verb, group, resource, namespace=role["metadata"]["namespace"])
        for role in roles for rule in role["rules"]
        for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]
    ]


async def _scenario(apiserver: Any, namespace: str, peering_path: str, peering_call: Call) -> OwnCalls:
    own = OwnCalls(apiserver.audit)
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        if apiserver.get("", "namespaces", None, namespace) is None:  # watched namespaces exist before install
            await own.do(Call("create", "", "namespaces"), client.post("/api/v1/namespaces", json={
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}))
        # The chart creates the peering object; kopf refuses to start peered without it.
        await own.do(peering_call, client.post(peering_path, json={
            "apiVersion": "kopf.dev/v1", "kind": peering_call_kind(peering_call),
            "metadata": {"name": PEERING, **({"namespace": namespace} if peering_call.namespace else {})},
        }))
    return own


def peering_call_kind(call: Call) -> str:
    return "ClusterKopfPeering" if call.resource == "clusterkopfpeerings" else "KopfPeering"


async def _drive(apiserver: Any, own: OwnCalls, operator: ScopedOperator, namespace: str) -> None:
    await asyncio.to_thread(operator.start)
    try:
        cr = ("disaggserve.io", "disaggserves", namespace, "tiny")
        resp = await own.do(Call("create", "disaggserve.io", "disaggserves", namespace=namespace),
                            create(apiserver.url, example(namespace=namespace)))
        assert resp.status_code == 201, resp.text
        await wait_for(lambda: apiserver.get("apps", "statefulsets", namespace, "tiny-prefill"), message="children")
        await wait_for(lambda: (apiserver.get(*cr) or {}).get("status", {}).get("plan"), message="status.plan")
        own.escalation += _role_permissions(apiserver.list("rbac.authorization.k8s.io", "roles", namespace))
        # Hand placement to the planner: it reads the cluster's nodes.
        resp = await own.do(Call("patch", "disaggserve.io", "disaggserves", namespace=namespace),
                            patch_spec(apiserver.url, "tiny", {"parallelism": None}, namespace))
        assert resp.status_code == 200, resp.text
        await wait_for(lambda: any(Call.of(a).resource == "nodes" for a in apiserver.audit), message="nodes read")
        resp = await own.do(Call("delete", "disaggserve.io", "disaggserves", namespace=namespace),
                            delete(apiserver.url, "tiny", namespace))
        assert resp.status_code in (200, 202), resp.text  # 202: kopf's finalizer still to release
        await wait_for(lambda: apiserver.get(*cr) is None, message="DisaggServe gone")
        await wait_for(lambda: not apiserver.get("apps", "statefulsets", namespace, "tiny-prefill"),
                       message="children collected")
    finally:
        await asyncio.to_thread(operator.stop)


def _report(calls: list[Call], values: dict[str, Any]) -> tuple[list[Call], set[tuple[str, str]]]:
    grants = grants_for(documents(template(values)), SA, OPERATOR_NS)
    return denied(calls, grants), unused(calls, grants)


@pytest.mark.slow
async def test_namespaced_operator_calls_match_chart_rbac(helm_bin: str, apiserver: Any) -> None:
    """The chart's default scope: a Role per watched namespace and a small ClusterRole."""
    own = await _scenario(apiserver, WATCHED, f"/apis/kopf.dev/v1/namespaces/{WATCHED}/kopfpeerings",
                          Call("create", "kopf.dev", "kopfpeerings", namespace=WATCHED))
    await _drive(apiserver, own, ScopedOperator([WATCHED]), WATCHED)
    missing, extra = _report(own.operator_needs(), {"watch": {"namespaces": [WATCHED]}})
    assert not missing, "the operator made calls the chart does not grant:\n" + "\n".join(map(str, missing))
    assert not extra, f"the chart grants resources the operator never used: {sorted(extra)}"


@pytest.mark.slow
async def test_cluster_operator_calls_match_chart_rbac(helm_bin: str, apiserver: Any) -> None:
    own = await _scenario(apiserver, "default", "/apis/kopf.dev/v1/clusterkopfpeerings",
                          Call("create", "kopf.dev", "clusterkopfpeerings"))
    await _drive(apiserver, own, ScopedOperator(None), "default")
    missing, extra = _report(own.operator_needs(), {"watch": {"scope": "cluster"}})
    assert not missing, "the operator made calls the chart does not grant:\n" + "\n".join(map(str, missing))
    assert not extra, f"the chart grants resources the operator never used: {sorted(extra)}"


def test_own_calls_are_not_blamed_on_the_operator() -> None:
    """Guards the bookkeeping above: only the test's own request leaves the log."""
    audit = [("list", "", "nodes", None, None), ("create", "disaggserve.io", "disaggserves", None, "a")]
    own = OwnCalls(audit)
    own.mine.append(1)
    assert own.operator_calls() == [Call("list", "", "nodes")]
