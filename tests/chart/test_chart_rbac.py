"""The chart's RBAC grants exactly what the operator uses.

`OPERATOR_CALLS` is what the operator's design says it calls (issue 8); the scenario test in
test_chart_rbac_operator.py replaces that claim with the calls the real operator made against
the test API server. Both go through the same evaluation (rbaclib), which reads the rendered
Roles, ClusterRoles and bindings the way the API server's RBAC authorizer does.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from chart.chartlib import ROOT, documents, template
from chart.rbaclib import Call, denied, grants_for, unused

SA = "disaggserve"
OPERATOR_NS = "disaggserve-system"
CHILDREN = [("apps", "statefulsets"), ("apps", "deployments"), ("", "services"), ("", "configmaps"),
            ("", "serviceaccounts"), ("policy", "poddisruptionbudgets"), ("rbac.authorization.k8s.io", "roles"),
            ("rbac.authorization.k8s.io", "rolebindings"), ("networking.k8s.io", "networkpolicies")]


def operator_calls(namespaces: list[str], *, cluster: bool) -> list[Call]:
    """Every call the operator makes when it manages `namespaces` (None: all, with cluster scope)."""
    calls = [
        Call("list", "", "nodes"), Call("watch", "", "nodes"), Call("get", "", "nodes"),
        Call("list", "apiextensions.k8s.io", "customresourcedefinitions"),
        Call("watch", "apiextensions.k8s.io", "customresourcedefinitions"),
    ]
    if cluster:
        calls += [Call(v, "kopf.dev", "clusterkopfpeerings") for v in ("get", "list", "watch", "patch")]
    else:  # kopf follows the existence of the namespaces it serves
        calls += [Call("list", "", "namespaces"), Call("watch", "", "namespaces")]
    scopes: list[str | None] = [None] if cluster else list(namespaces)
    for ns in scopes:
        if not cluster:
            calls += [Call(v, "kopf.dev", "kopfpeerings", namespace=ns) for v in ("get", "list", "watch", "patch")]
        calls += [Call(v, "disaggserve.io", "disaggserves", namespace=ns) for v in ("get", "list", "watch", "patch")]
        calls += [Call(v, "disaggserve.io", "disaggserves", "status", ns) for v in ("get", "patch")]
        for group, resource in CHILDREN:
            calls += [Call(v, group, resource, namespace=ns)
                      for v in ("get", "list", "watch", "create", "patch", "delete")]
        calls += [Call(v, "", "pods", namespace=ns) for v in ("get", "list", "watch", "delete")]
        calls += [Call(v, "", "secrets", namespace=ns) for v in ("get", "create", "patch")]  # worker token
        calls += [Call(v, "", "events", namespace=ns) for v in ("create", "patch")]
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
        Call("list", "", "secrets", namespace="team-a"),                   # reads its token by name only
        Call("watch", "", "secrets", namespace="team-a"),
        Call("delete", "", "secrets", namespace="team-a"),
        Call("update", "apps", "statefulsets", namespace="team-a"),        # the operator only patches
        Call("patch", "", "nodes"),                                        # nodes are read-only
        Call("patch", "kopf.dev", "clusterkopfpeerings"),                  # cluster peering is for scope cluster
        Call("delete", "disaggserve.io", "disaggserves", namespace="team-a"),  # never deletes user objects
        Call("create", "rbac.authorization.k8s.io", "clusterroles"),  # no cluster-wide RBAC writes
    ]
    assert denied(refused, grants) == refused


def test_operator_may_write_the_router_role_it_renders(helm_bin: str) -> None:
    """RBAC lets a subject create a Role only with permissions it holds itself (escalation check):
    the operator must hold every rule of the router's Role in each namespace it manages."""
    from disaggserve.api import parse_spec
    from disaggserve.planner import plan_for
    from disaggserve.resources import Owner, build_children

    body = documents((ROOT / "examples" / "tiny-cpu.yaml").read_text())[0]
    spec = parse_spec(body["spec"])
    children = build_children(Owner("tiny", "team-a"), spec, plan_for(spec))
    roles = [c for c in children if c["kind"] == "Role"]
    assert roles, "the operator no longer renders a router Role: drop `roles` from the chart's RBAC"
    grants = _grants({"watch": {"namespaces": ["team-a"]}})
    needed = [Call(verb, group, resource, namespace="team-a")
              for role in roles for rule in role["rules"]
              for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]]
    assert not denied(needed, grants), denied(needed, grants)


def test_call_parsing_accepts_audit_shapes() -> None:
    expected = Call("patch", "disaggserve.io", "disaggserves", "status", "default")
    assert Call.of(("patch", "disaggserve.io", "disaggserves", "status", "default")) == expected
    assert Call.of({"verb": "patch", "group": "disaggserve.io", "resource": "disaggserves",
                    "subresource": "status", "namespace": "default"}) == expected
    assert Call.of(("list", "", "nodes", "", "")) == Call("list", "", "nodes")


# Kube client method -> the RBAC verb its request needs (apply is a server-side-apply PATCH).
KUBE_METHOD_VERBS = {"get": "get", "list": "list", "delete": "delete", "patch": "patch",
                     "apply": "patch", "patch_status": "patch", "list_shared": "list"}


def controller_calls(namespace: str) -> list[Call]:
    """Every API call written out in the operator's controller code, found by reading the source.

    The scenario test sees what one run does; this sees rare paths too (a drained pod restarted
    after a called-off scale-down, say), as long as the kind is spelled out at the call.
    """
    from disaggserve.controller import kube as kube_module
    from disaggserve.controller.reconcile import OWNED_KINDS

    calls: list[Call] = []

    def call(verb: str, api_version: str, kind: str, sub: str | None = None) -> Call:
        plural, namespaced = kube_module.KINDS[(api_version, kind)]
        group = api_version.rpartition("/")[0]
        return Call(verb, group, plural, sub, namespace if namespaced else None)

    pattern = re.compile(r"kube\.(\w+)\(\s*\"([^\"]+)\",\s*\"([^\"]+)\"")
    sources = sorted((ROOT / "operator" / "disaggserve" / "controller").glob("*.py"))
    for source in sources:
        for method, api_version, kind in pattern.findall(source.read_text()):
            assert method in KUBE_METHOD_VERBS, f"{source.name}: unknown Kube method {method}"
            sub = "status" if method == "patch_status" else None
            calls.append(call(KUBE_METHOD_VERBS[method], api_version, kind, sub))
    # Children: listed to find what it owns, applied (create or patch) and pruned when obsolete.
    for api_version, kind in OWNED_KINDS:
        calls += [call(v, api_version, kind) for v in ("get", "list", "patch", "delete")]
    assert any(c.resource == "pods" for c in calls), "found no literal calls: has the Kube client changed?"
    return calls


@pytest.mark.parametrize("values", [{"watch": {"namespaces": ["team-a"]}}, {"watch": {"scope": "cluster"}}],
                         ids=["namespaced", "cluster"])
def test_every_call_in_the_controller_source_is_granted(helm_bin: str, values: dict[str, Any]) -> None:
    grants = _grants(values)
    missing = denied(controller_calls("team-a"), grants)
    assert not missing, "the operator's code makes calls the chart does not grant:\n" + "\n".join(map(str, missing))
