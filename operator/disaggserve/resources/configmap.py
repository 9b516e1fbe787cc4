"""The ConfigMap that records which plan (and profile) the children were rendered from."""

from __future__ import annotations

import json
from typing import Any

from disaggserve.api.plan import Plan
from disaggserve.resources.names import component_labels, plan_configmap_name


def build_plan_configmap(name: str, namespace: str, plan: Plan, profile: dict[str, Any] | None) -> dict[str, Any]:
    data = {"plan.json": json.dumps(plan.wire(), indent=2, sort_keys=True)}
    if profile is not None:
        data["profile.json"] = json.dumps(profile, indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": plan_configmap_name(name),
            "namespace": namespace,
            "labels": component_labels(name, "plan"),
        },
        "data": data,
    }
