"""Who may talk to a DisaggServe's workers: its token Secret and its NetworkPolicy.

Worker ports serve the internal protocol (prefill, decode, drain, the KV port): anyone reaching
them could drain the only decode worker or fill a prefill worker's cache. Two layers keep them to
the DisaggServe's own router and peers:

- a Secret `<name>-worker-token` (32 random bytes, hex, under key `token`) created once and
  never rotated by a reconcile (the caller passes the existing token back in), given to the
  router and every worker as `DISAGGSERVE_WORKER_TOKEN`; workers refuse calls without it;
- a NetworkPolicy admitting to the worker ports only pods of the same DisaggServe (its router
  and peers), the operator's namespace (drain and load calls), and namespaces labelled
  `disaggserve.io/metrics-scraper: "true"` (Prometheus; HTTP port only). Kubelet probes come
  from the node and are not subject to it on the common CNIs.

Pure: the token and the operator's namespace come in as arguments.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disaggserve.contract import ENV_WORKER_TOKEN, KV_PORT, LABEL_COMPONENT, LABEL_INSTANCE, WORKER_PORT
from disaggserve.resources.names import instance_labels

TOKEN_KEY = "token"
SCRAPER_LABEL = "disaggserve.io/metrics-scraper"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
WORKER_COMPONENTS = ("prefill", "decode", "colocated")
ENV_OPERATOR_NAMESPACE = "DISAGGSERVE_OPERATOR_NAMESPACE"


def token_secret_name(name: str) -> str:
    return f"{name}-worker-token"


def network_policy_name(name: str) -> str:
    return f"{name}-workers"


def new_token() -> str:
    """32 random bytes, hex: what the Secret holds the first time it is created."""
    return secrets.token_hex(32)


def token_of(secret: Mapping[str, Any] | None) -> str | None:
    """The token an existing Secret holds (None when absent or unreadable: then a new one is made)."""
    raw = ((secret or {}).get("data") or {}).get(TOKEN_KEY)
    if not raw:
        return None
    try:
        token = base64.b64decode(raw, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return token or None


def token_secret(name: str, namespace: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": token_secret_name(name), "namespace": namespace, "labels": instance_labels(name)},
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def token_env(name: str) -> dict[str, Any]:
    """The container env entry that hands the token to a router or worker."""
    return {
        "name": ENV_WORKER_TOKEN,
        "valueFrom": {"secretKeyRef": {"name": token_secret_name(name), "key": TOKEN_KEY}},
    }


@dataclass(frozen=True)
class NetworkAccess:
    """Who besides the DisaggServe's own pods may reach worker ports."""

    operator_namespace: str | None = None  # None: unknown (offline render); only the scraper label then

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> NetworkAccess:
        """The operator's namespace as the chart passes it (downward API)."""
        return cls(environ.get(ENV_OPERATOR_NAMESPACE) or None)


def _port(number: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": number}


def worker_network_policy(name: str, namespace: str, access: NetworkAccess) -> dict[str, Any]:
    peers = {"podSelector": {"matchLabels": {LABEL_INSTANCE: name}}}
    scraper = {"namespaceSelector": {"matchLabels": {SCRAPER_LABEL: "true"}}}
    http_from = [scraper]
    if access.operator_namespace:
        http_from.insert(0, {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: access.operator_namespace}}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": network_policy_name(name), "namespace": namespace, "labels": instance_labels(name)},
        "spec": {
            "podSelector": {
                "matchLabels": {LABEL_INSTANCE: name},
                "matchExpressions": [
                    {"key": LABEL_COMPONENT, "operator": "In", "values": list(WORKER_COMPONENTS)}
                ],
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                # Its router and its peers: the internal HTTP protocol and the KV port.
                {"from": [peers], "ports": [_port(WORKER_PORT), _port(KV_PORT)]},
                # The operator (drain, load) and the metrics scraper: HTTP only.
                {"from": http_from, "ports": [_port(WORKER_PORT)]},
            ],
        },
    }


def security_objects(name: str, namespace: str, token: str, access: NetworkAccess) -> list[dict[str, Any]]:
    return [token_secret(name, namespace, token), worker_network_policy(name, namespace, access)]
