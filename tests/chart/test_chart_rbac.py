"""The chart's RBAC grants exactly what the operator uses.

`OPERATOR_CALLS` is what the operator's design says it calls (issue 8); the scenario test in
test_chart_rbac_operator.py replaces that claim with the calls the real operator made against
the test API server. Both go through the same evaluation (rbaclib), which reads the rendered
Roles, ClusterRoles and bindings the way the API server's RBAC authorizer does.
"""

from __future__ import annotations

from typing import Any

import pytest
from chartlib import documents, template
from rbaclib import Call, denied, grants_for, unused

SA = "disaggserve"
OPERATOR_NS = "disaggserve-system"
CHILDREN = [("apps", "statefulsets"), ("apps", "deployments"), ("", "services"), ("", "configmaps"),
            ("", "serviceaccounts"), ("policy", "poddisruptionbudgets"), ("rbac.authorization.k8s.io", "rolebindings")]


def operator_calls(namespaces: list[str], *, cluster: bool) -> list[Call]:
    """Every call the operator makes when it manages `namespaces` (None: all, with cluster scope)."""
    calls = [
        Call("list", "", "nodes"), Call("watch", "", "nodes"), Call("get", "", "nodes"),
        Call("list", "", "namespaces"), Call("watch", "", "namespaces"),
        Call("list", "apiextensions.k8s.io", "customresourcedefinitions"),
        Call("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
    ]
    if cluster:
        calls += [Call(v, "kopf.dev", "clusterkopfpeerings") for v in ("get", "list", "watch", "patch")]
    scopes: list[str | None] = [None] if cluster else list(namespaces)
    for ns in scopes:
        if not cluster:
            calls += [Call(v, "kopf.dev", "kopfpeerings", namespace=ns) for v in ("get", "list", "watch", "patch")]
        calls += [Call(v, "disaggserve.io", "disaggserves", namespace=ns) for v in ("get", "list", "watch", "patch")]
        calls += [Call(v, "disaggserve.io", "disaggserves", "status", ns) for v in ("get", "patch")]
        for group, resource in CHILDREN:
            calls += [Call(v, group, resource, namespace=ns)
                      for v in ("get", "list", "watch", "create", "patch", "delete")]
        calls += [Call(v, "", "pods", namespace=ns) for v in ("get", "list", "watch")]
        calls += [Call(v, g, "events", namespace=ns) for g in ("", "events.k8s.io") for v in ("create", "patch")]
    return calls


def _grants(values: dict[str, Any]) -> Any:
    return grants_for(documents(template(values)), SA, OPERATOR_NS)


@pytest.mark.parametrize(
    ("values", "namespaces", "cluster"),
    [
        ({}, [OPERATOR_NS], False),
        ({"watch": {"namespaces": ["team-a", "team-b"]}}, ["team-a", "team-b"], False),
        ({"watch": {"scope": "cluster"}}, [], True),
    ],
    ids=["default", "two-namespaces", "cluster"],
)
def test_rbac_grants_exactly_the_operator_calls(helm_bin: str, values: dict[str, Any], namespaces: list[str],
                                                 cluster: bool) -> None:
    grants = _grants(values)
    calls = operator_calls(namespaces, cluster=cluster)
    assert not denied(calls, grants), "\n".join(map(str, denied(calls, grants)))
    assert not unused(calls, grants), f"granted but never used: {sorted(unused(calls, grants))}"


def test_namespaced_scope_stays_in_its_namespaces(helm_bin: str) -> None:
    grants = _grants({"watch": {"namespaces": ["team-a"]}})
    refused = [
        Call("create", "apps", "statefulsets", namespace="team-b"),       # not a watched namespace
        Call("list", "apps", "statefulsets"),                              # across all namespaces
        Call("get", "", "secrets", namespace="team-a"),                    # never granted
        Call("update", "apps", "statefulsets", namespace="team-a"),        # the operator only patches
        Call("patch", "", "nodes"),                                        # nodes are read-only
        Call("patch", "kopf.dev", "clusterkopfpeerings"),                  # cluster peering is for scope cluster
        Call("delete", "disaggserve.io", "disaggserves", namespace="team-a"),  # never deletes user objects
        Call("create", "rbac.authorization.k8s.io", "roles", namespace="team-a"),
    ]
    assert denied(refused, grants) == refused


def test_router_cluster_role_is_pods_read_only_and_unbound(helm_bin: str) -> None:
    """The chart ships the router's ClusterRole for the operator to bind; it binds it to nobody itself."""
    objs = documents(template())
    (router,) = [o for o in objs if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "disaggserve-router"]
    assert router["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    bindings = [o for o in objs if o["kind"].endswith("Binding")]
    assert all(b["roleRef"]["name"] != "disaggserve-router" for b in bindings)
    # The operator can create the router's RoleBinding without `bind`: it holds the same permissions
    # in every watched namespace (RBAC escalation check).
    grants = _grants({})
    assert not denied([Call(v, "", "pods", namespace=OPERATOR_NS) for v in ("get", "list", "watch")], grants)


def test_call_parsing_accepts_audit_shapes() -> None:
    expected = Call("patch", "disaggserve.io", "disaggserves", "status", "default")
    assert Call.of(("patch", "disaggserve.io", "disaggserves", "status", "default")) == expected
    assert Call.of({"verb": "patch", "group": "disaggserve.io", "resource": "disaggserves",
                    "subresource": "status", "namespace": "default"}) == expected
    assert Call.of(("list", "", "nodes", "", "")) == Call("list", "", "nodes")
