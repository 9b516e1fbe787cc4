"""Compare the API calls the operator makes with what the chart's RBAC grants it.

A real API server authorizes each request as (verb, API group, resource[/subresource],
namespace) against the Roles and ClusterRoles bound to the caller's ServiceAccount. The test
API server records exactly those tuples; this module evaluates them the way RBAC does, so a
call the chart does not grant fails the test instead of failing in a customer's cluster, and a
grant nothing uses fails it too (least privilege).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Call:
    """One authorized request: `namespace` None means cluster-scoped or across all namespaces."""

    verb: str
    group: str
    resource: str
    subresource: str | None = None
    namespace: str | None = None

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def __str__(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {self.group or 'core'}/{self.full_resource} {where}"

    @classmethod
    def of(cls, entry: Any) -> Call:
        """From an audit entry: a Call, a mapping, an object with attributes, or a 5-tuple."""
        if isinstance(entry, Call):
            return entry
        if isinstance(entry, dict):
            get = entry.get
        elif isinstance(entry, tuple | list):
            verb, group, resource, subresource, namespace = entry
            return cls(verb, group or "", resource, subresource or None, namespace or None)
        else:
            def get(key: str, default: Any = None) -> Any:
                return getattr(entry, key, default)
        group = get("group", get("api_group", "")) or ""
        return cls(get("verb"), group, get("resource"), get("subresource") or None, get("namespace") or None)


@dataclass(frozen=True)
class Rule:
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]

    def allows(self, call: Call) -> bool:
        return (
            (call.group in self.groups or "*" in self.groups)
            and (call.full_resource in self.resources or "*" in self.resources)
            and (call.verb in self.verbs or "*" in self.verbs)
        )


@dataclass
class Grants:
    """Rules effective for one ServiceAccount: cluster-wide ones and per-namespace ones."""

    cluster: list[Rule]
    namespaced: dict[str, list[Rule]]

    def allows(self, call: Call) -> bool:
        if any(rule.allows(call) for rule in self.cluster):
            return True
        return call.namespace is not None and any(r.allows(call) for r in self.namespaced.get(call.namespace, []))

    def resources(self) -> set[tuple[str, str]]:
        """(group, resource[/subresource]) pairs granted anywhere."""
        rules = [*self.cluster, *(r for rs in self.namespaced.values() for r in rs)]
        return {(g, res) for rule in rules for g in rule.groups for res in rule.resources}


def _rules(role: dict[str, Any]) -> list[Rule]:
    return [
        Rule(frozenset(r.get("apiGroups", [])), frozenset(r.get("resources", [])), frozenset(r.get("verbs", [])))
        for r in role.get("rules") or []
    ]


def grants_for(objects: Iterable[dict[str, Any]], service_account: str, namespace: str) -> Grants:
    """The RBAC a ServiceAccount gets from rendered objects (bindings resolved to their roles)."""
    objs = list(objects)
    cluster_roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterRole"}
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs if o["kind"] == "Role"}

    def binds_us(binding: dict[str, Any]) -> bool:
        return any(
            s.get("kind") == "ServiceAccount" and s.get("name") == service_account and s.get("namespace") == namespace
            for s in binding.get("subjects") or []
        )

    grants = Grants(cluster=[], namespaced={})
    for binding in objs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding") or not binds_us(binding):
            continue
        ref = binding["roleRef"]
        if ref["kind"] == "ClusterRole":
            role = cluster_roles.get(ref["name"])
        else:
            role = roles.get((binding["metadata"]["namespace"], ref["name"]))
        if role is None:
            raise AssertionError(f"{binding['kind']} {binding['metadata']['name']} refers to missing {ref}")
        if binding["kind"] == "ClusterRoleBinding":
            grants.cluster.extend(_rules(role))
        else:
            grants.namespaced.setdefault(binding["metadata"]["namespace"], []).extend(_rules(role))
    return grants


def denied(calls: Iterable[Any], grants: Grants) -> list[Call]:
    """Calls RBAC would refuse, each once, in first-seen order."""
    seen: dict[Call, None] = {}
    for entry in calls:
        call = Call.of(entry)
        if not grants.allows(call):
            seen.setdefault(call)
    return list(seen)


def unused(calls: Iterable[Any], grants: Grants) -> set[tuple[str, str]]:
    """(group, resource) pairs granted but never called: privilege nobody needs."""
    used = {(c.group, c.full_resource) for c in map(Call.of, calls)}
    return grants.resources() - used
