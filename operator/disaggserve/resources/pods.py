"""Pieces of pod templates shared by worker and router pods: security, volumes, env, probes."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import ENV_NAMESPACE, ENV_POD_IP, ENV_POD_NAME, PATH_HEALTH, PATH_READY

MODEL_VOLUME = "model"


def pod_security_context() -> dict[str, Any]:
    """Restricted pod security: the NVIDIA device plugin needs none of root's powers."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def identity_env() -> list[dict[str, Any]]:
    """Pod identity from the downward API (the local node agent sets the same variables)."""
    return [
        {"name": ENV_POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": ENV_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]


def model_mount_root(path: str) -> str:
    """The PVC is mounted at the first component of the model path (`/models/x` -> `/models`)."""
    parts = PurePosixPath(path).parts
    return "/" + parts[1] if len(parts) > 1 else "/"


def volumes(spec: DisaggServeSpec, *, shm: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): a writable /tmp (the root file system is read-only), shared memory for
    torch, and the model's PersistentVolumeClaim read-only when the model lives on one."""
    vols: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if shm:
        vols.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    source = spec.model.source
    if source.pvc and source.path:
        vols.append({"name": MODEL_VOLUME, "persistentVolumeClaim": {"claimName": source.pvc, "readOnly": True}})
        mounts.append({"name": MODEL_VOLUME, "mountPath": model_mount_root(source.path), "readOnly": True})
    return vols, mounts


def http_probes(port_name: str, *, startup_seconds: int) -> dict[str, Any]:
    """Startup covers model loading (minutes for big checkpoints); readiness gates traffic and
    turns false while draining; liveness restarts a hung process."""
    get = lambda path: {"httpGet": {"path": path, "port": port_name}}  # noqa: E731
    return {
        "startupProbe": {**get(PATH_HEALTH), "periodSeconds": 5, "failureThreshold": max(1, startup_seconds // 5)},
        "readinessProbe": {**get(PATH_READY), "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**get(PATH_HEALTH), "periodSeconds": 10, "failureThreshold": 6},
    }


def scheduling(spec: DisaggServeSpec) -> dict[str, Any]:
    """Node selection common to all GPU pods: GPU product affinity, the user's selector, tolerations."""
    hw = spec.hardware
    out: dict[str, Any] = {}
    if hw.node_selector:
        out["nodeSelector"] = dict(hw.node_selector)
    if hw.tolerations:
        out["tolerations"] = [t.wire() for t in hw.tolerations]
    if hw.device == "gpu" and hw.gpu_product:
        out["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "nvidia.com/gpu.product", "operator": "In", "values": [hw.gpu_product]}
                            ]
                        }
                    ]
                }
            }
        }
    return out
