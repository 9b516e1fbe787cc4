"""PodDisruptionBudgets: voluntary evictions (node drains) take one worker of a phase at a time."""

from __future__ import annotations

from typing import Any

from disaggserve.api.plan import Role
from disaggserve.resources.names import component_labels, pod_selector


def build_pdb(name: str, namespace: str, phase: Role) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{name}-{phase}", "namespace": namespace, "labels": component_labels(name, phase)},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": pod_selector(name, phase)},
            # A pod that never became ready may be evicted: it serves nothing (Kubernetes >= 1.27).
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
