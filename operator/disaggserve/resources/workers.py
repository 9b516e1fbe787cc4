"""Worker StatefulSets (prefill and decode, or colocated) and their headless Services."""

from __future__ import annotations

import copy
from typing import Any

from disaggserve.api.plan import Plan, Role
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import ENV_UNIT, LABEL_INSTANCE, LABEL_UNIT
from disaggserve.resources.engines import renderer_for
from disaggserve.resources.names import component_labels, pod_selector, service_name, statefulset_name
from disaggserve.resources.pods import (
    container_security_context,
    identity_env,
    pod_security_context,
    scheduling,
    volumes,
)
from disaggserve.resources.security import token_env

HOSTNAME = "kubernetes.io/hostname"
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
    engine = renderer_for(spec).worker(spec, plan, name, namespace, phase, unit)
    vols += engine.volumes
    mounts += engine.mounts
    container = {
        "name": "worker",
        "image": engine.image,
        "imagePullPolicy": engine.pull_policy,
        "command": engine.command,
        "args": engine.args,
        "ports": engine.ports,
        "env": env + engine.env,
        "resources": _resources(spec, phase_plan.gpus_per_instance),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        **engine.probes,
    }
    template_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": engine.grace_seconds,
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
                        "prometheus.io/port": str(engine.metrics_port),
                        "prometheus.io/path": engine.metrics_path,
                    },
                },
                "spec": template_spec,
            },
        },
    }


def build_headless_service(name: str, namespace: str, phase: Role, spec: DisaggServeSpec) -> dict[str, Any]:
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
            "ports": renderer_for(spec).service_ports(spec),
        },
    }


def worker_objects(spec: DisaggServeSpec, plan: Plan, name: str, namespace: str) -> list[dict[str, Any]]:
    units: list[int | None] = list(range(plan.units)) if plan.placement == "low-affinity" else [None]
    objects: list[dict[str, Any]] = []
    # A colocated plan deploys one role doing both phases; the router (discovering pods by their
    # component label) then serves in its colocated mode.
    for phase in plan.roles:
        objects.append(build_headless_service(name, namespace, phase, spec))
        objects += [build_statefulset(spec, plan, name, namespace, phase, unit) for unit in units]
    return objects
