"""Worker StatefulSets (prefill and decode, or colocated) and their headless Services."""

from __future__ import annotations

import copy
from typing import Any

from disaggserve.api.plan import Plan, Role
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import ENV_UNIT, KV_PORT, LABEL_INSTANCE, LABEL_UNIT, WORKER_BINARY, WORKER_PORT, worker_args
from disaggserve.resources.names import component_labels, pod_selector, service_name, statefulset_name
from disaggserve.resources.pods import (
    container_security_context,
    http_probes,
    identity_env,
    pod_security_context,
    scheduling,
    volumes,
)
from disaggserve.resources.security import token_env

HOSTNAME = "kubernetes.io/hostname"
# Decode (and colocated) workers hold streams that are still generating; give them time to finish
# them on scale-down.
GRACE_SECONDS: dict[Role, int] = {"prefill": 60, "decode": 180, "colocated": 180}


def _speculation_args(spec: DisaggServeSpec) -> dict[str, str | int]:
    s = spec.speculation
    if s.mode == "off":
        return {}
    args: dict[str, str | int] = {
        "mode": s.mode,
        "proposer": s.proposer,
        "num-speculative-tokens": s.num_speculative_tokens,
        "ngram-min": s.ngram_min,
        "ngram-max": s.ngram_max,
    }
    if s.proposer == "draft" and s.draft_model:
        args["draft-model"] = s.draft_model.worker_arg()
    return args


def _resources(spec: DisaggServeSpec, gpus: int) -> dict[str, Any]:
    wanted = spec.hardware.worker_resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.hardware.device == "gpu":
        limits["nvidia.com/gpu"] = str(gpus)
        requests["nvidia.com/gpu"] = str(gpus)
        requests["cpu"] = wanted.cpu if wanted and wanted.cpu else str(4 * gpus)
        requests["memory"] = wanted.memory if wanted and wanted.memory else f"{32 * gpus}Gi"
    else:
        requests["cpu"] = wanted.cpu if wanted and wanted.cpu else "1"
        requests["memory"] = wanted.memory if wanted and wanted.memory else "2Gi"
    limits["memory"] = requests["memory"]
    return {"requests": requests, "limits": limits}


def _placement(spec: DisaggServeSpec, plan: Plan, name: str, phase: Role, unit: int | None) -> dict[str, Any]:
    out = scheduling(spec)
    if unit is not None:
        # Low node-affinity: every pod of a unit, prefill and decode, lands on the same node so the
        # KV cache never crosses the slow network. The first pod matches its own term, which the
        # scheduler allows; the rest follow it.
        out.setdefault("affinity", {})["podAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {LABEL_INSTANCE: name, LABEL_UNIT: str(unit)}},
                    "topologyKey": HOSTNAME,
                }
            ]
        }
    else:
        # High node-affinity: spread each phase over nodes (a node failure takes out few instances).
        out["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": HOSTNAME,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": pod_selector(name, phase)},
            }
        ]
    return out


def build_statefulset(
    spec: DisaggServeSpec, plan: Plan, name: str, namespace: str, phase: Role, unit: int | None
) -> dict[str, Any]:
    phase_plan = plan.phase(phase)
    labels = component_labels(name, phase, unit)
    vols, mounts = volumes(spec, shm=True)
    env = [*identity_env(), token_env(name)]
    if unit is not None:
        env.append({"name": ENV_UNIT, "value": str(unit)})
    args = worker_args(
        role=phase,
        model=spec.model.source.worker_arg(),
        model_name=spec.model.name,
        tensor=phase_plan.tensor,
        pipeline=phase_plan.pipeline,
        device="cuda" if spec.hardware.device == "gpu" else "cpu",
        max_model_len=spec.model.max_model_len,
        speculation=_speculation_args(spec) if phase in ("decode", "colocated") else None,
    )
    container = {
        "name": "worker",
        "image": spec.image.reference,
        "imagePullPolicy": spec.image.pull_policy,
        "command": [WORKER_BINARY],
        "args": args,
        "ports": [
            {"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"},
            {"name": "kv", "containerPort": KV_PORT, "protocol": "TCP"},
        ],
        "env": env,
        "resources": _resources(spec, phase_plan.gpus_per_instance),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        **http_probes("http", startup_seconds=1800),
    }
    template_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_SECONDS[phase],
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": vols,
        **_placement(spec, plan, name, phase, unit),
    }
    replicas = plan.per_unit(phase) if unit is not None else phase_plan.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": statefulset_name(name, phase, unit),
            "namespace": namespace,
            "labels": copy.deepcopy(labels),
        },
        "spec": {
            "replicas": replicas,
            "serviceName": service_name(name, phase),
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": pod_selector(name, phase, unit)},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(WORKER_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": template_spec,
            },
        },
    }


def build_headless_service(name: str, namespace: str, phase: Role) -> dict[str, Any]:
    """Stable DNS per worker pod; the router discovers pods, the Service gives them names."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name, phase),
            "namespace": namespace,
            "labels": component_labels(name, phase),
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": pod_selector(name, phase),
            "ports": [
                {"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "kv", "port": KV_PORT, "targetPort": "kv", "protocol": "TCP"},
            ],
        },
    }


def worker_objects(spec: DisaggServeSpec, plan: Plan, name: str, namespace: str) -> list[dict[str, Any]]:
    units: list[int | None] = list(range(plan.units)) if plan.placement == "low-affinity" else [None]
    objects: list[dict[str, Any]] = []
    # A colocated plan deploys one role doing both phases; the router (discovering pods by their
    # component label) then serves in its colocated mode.
    for phase in plan.roles:
        objects.append(build_headless_service(name, namespace, phase))
        objects += [build_statefulset(spec, plan, name, namespace, phase, unit) for unit in units]
    return objects
