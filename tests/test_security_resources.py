"""The worker token Secret and the workers' NetworkPolicy each DisaggServe gets (issue 11)."""

from __future__ import annotations

import base64

from disaggserve.api import parse_spec
from disaggserve.contract import ENV_WORKER_TOKEN, KV_PORT, WORKER_PORT
from disaggserve.planner import plan_for
from disaggserve.resources import Owner, build_children
from disaggserve.resources.security import NetworkAccess, token_of
from helpers import example

UID = "0b0e4b8e-5d2c-4a39-9d84-1f1d6a2b7c11"


def children(token: str | None = None, access: NetworkAccess | None = None) -> dict[tuple[str, str], dict]:
    spec = parse_spec(example()["spec"])
    objects = build_children(Owner("tiny", "ns", UID), spec, plan_for(spec), worker_token=token, access=access)
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def containers(objs: dict[tuple[str, str], dict]) -> list[dict]:
    return [c for (kind, _), o in objs.items() if kind in ("StatefulSet", "Deployment")
            for c in o["spec"]["template"]["spec"]["containers"]]


def test_token_is_random_once_then_kept_by_every_reconcile() -> None:
    first = token_of(children()[("Secret", "tiny-worker-token")])
    other = token_of(children()[("Secret", "tiny-worker-token")])
    assert first and other and first != other and len(first) == 64
    int(first, 16)  # hex
    again = children(token=first)[("Secret", "tiny-worker-token")]
    assert token_of(again) == first
    assert base64.b64decode(again["data"]["token"]).decode() == first


def test_router_and_every_worker_read_the_token_from_the_secret() -> None:
    objs = children(token="f" * 64)
    found = containers(objs)
    assert len(found) == 3  # prefill, decode, router
    for container in found:
        (entry,) = [e for e in container["env"] if e["name"] == ENV_WORKER_TOKEN]
        assert entry == {"name": ENV_WORKER_TOKEN,
                         "valueFrom": {"secretKeyRef": {"name": "tiny-worker-token", "key": "token"}}}
        assert "f" * 64 not in str(container), "the token itself never appears in a pod spec"


def test_network_policy_admits_only_peers_operator_and_scraper_to_worker_ports() -> None:
    policy = children(access=NetworkAccess("disaggserve-system"))[("NetworkPolicy", "tiny-workers")]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]
    assert selector["matchLabels"] == {"app.kubernetes.io/instance": "tiny"}
    assert selector["matchExpressions"][0]["values"] == ["prefill", "decode", "colocated"]
    peers, outside = spec["ingress"]
    assert peers["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "tiny"}}}]
    assert {p["port"] for p in peers["ports"]} == {WORKER_PORT, KV_PORT}
    # The operator and Prometheus reach the HTTP port only (the KV port stays between peers).
    assert [p["port"] for p in outside["ports"]] == [WORKER_PORT]
    assert outside["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "disaggserve-system"}}},
        {"namespaceSelector": {"matchLabels": {"disaggserve.io/metrics-scraper": "true"}}},
    ]
    # Another DisaggServe in the same namespace is not a peer.
    spec_b = parse_spec(example()["spec"])
    other = build_children(Owner("other", "ns", UID), spec_b, plan_for(spec_b))
    (other_policy,) = [o for o in other if o["kind"] == "NetworkPolicy"]
    assert other_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/instance": "other"}


def test_network_access_reads_the_operator_namespace_the_chart_passes() -> None:
    assert NetworkAccess.from_environ({"DISAGGSERVE_OPERATOR_NAMESPACE": "ops"}) == NetworkAccess("ops")
    assert NetworkAccess.from_environ({}) == NetworkAccess(None)
