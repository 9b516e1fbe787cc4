"""The router: Deployment + Service (the client endpoint) and the identity it discovers pods with."""

from __future__ import annotations

from typing import Any

from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import ROUTER_PORT, WORKER_BINARY, router_args
from disaggserve.resources.names import component_labels, pod_selector, router_name
from disaggserve.resources.pods import (
    container_security_context,
    http_probes,
    identity_env,
    pod_security_context,
    scheduling,
    volumes,
)
from disaggserve.resources.security import token_env

API_KEY_DIR = "/var/run/secrets/disaggserve"
COMPONENT = "router"


def endpoint(name: str, namespace: str) -> str:
    return f"http://{router_name(name)}.{namespace}.svc:{ROUTER_PORT}/v1"


def _identity(name: str, namespace: str) -> list[dict[str, Any]]:
    """A ServiceAccount allowed only to read pods in its namespace (worker discovery)."""
    labels = component_labels(name, COMPONENT)
    meta = {"name": router_name(name), "namespace": namespace, "labels": labels}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta), "automountServiceAccountToken": True},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": dict(meta),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": dict(meta),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router_name(name)},
            "subjects": [{"kind": "ServiceAccount", "name": router_name(name), "namespace": namespace}],
        },
    ]


def router_objects(spec: DisaggServeSpec, name: str, namespace: str) -> list[dict[str, Any]]:
    labels = component_labels(name, COMPONENT)
    vols, mounts = volumes(spec, shm=False)
    api_key_file = None
    if spec.router.api_key_secret_ref:
        ref = spec.router.api_key_secret_ref
        vols.append(
            {"name": "api-key", "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "api-key"}]}}
        )
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
        api_key_file = f"{API_KEY_DIR}/api-key"
    args = router_args(
        model=spec.model.source.worker_arg(),
        model_name=spec.model.name,
        namespace=namespace,
        instance=name,
        ttft_slo_ms=spec.slo.ttft_ms,
        tpot_slo_ms=spec.slo.tpot_ms,
        api_key_file=api_key_file,
        engine=spec.engine.kind,
        token_timeout_s=spec.router.token_timeout_seconds,
        prefill_timeout_s=spec.router.prefill_timeout_seconds,
    )
    container = {
        "name": "router",
        "image": spec.image.reference,
        "imagePullPolicy": spec.image.pull_policy,
        "command": [WORKER_BINARY],
        "args": args,
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "env": [*identity_env(), token_env(name)],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        **http_probes("http", startup_seconds=300),
    }
    sched = scheduling(spec)
    sched.pop("affinity", None)  # the router needs no GPU node
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": pod_selector(name, COMPONENT)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ROUTER_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": router_name(name),
                    "enableServiceLinks": False,
                    # Streams in flight finish before the router exits (it stops taking new work first).
                    "terminationGracePeriodSeconds": 120,
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": vols,
                    **sched,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": pod_selector(name, COMPONENT),
            "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [*_identity(name, namespace), deployment, service]
