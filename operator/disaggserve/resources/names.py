"""Names and labels of child objects, in one place so builders, controller and router agree."""

from __future__ import annotations

import re

from disaggserve.api.constants import MAX_NAME_LENGTH, NAME_PATTERN
from disaggserve.api.plan import Role
from disaggserve.contract import (
    APP_NAME,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_UNIT,
    MANAGED_BY,
)

__all__ = ["MAX_NAME_LENGTH", "name_problem"]


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a DisaggServe's children, or None (the CRD's CEL rule says the same).

    StatefulSet pods carry a controller-revision-hash label of `<sts-name>-<10 chars>`, which must
    fit a 63-character label value (`-u999-prefill` is the longest suffix we add), and Service
    names are DNS-1035 labels (a letter first, no dots).
    """
    if len(name) > MAX_NAME_LENGTH:
        return (
            f"metadata.name {name!r} is {len(name)} characters; at most {MAX_NAME_LENGTH} fit the "
            "names of the pods it creates. Choose a shorter name."
        )
    if not re.match(NAME_PATTERN, name):
        return (
            f"metadata.name {name!r} must start with a lower-case letter and hold only lower-case letters, "
            "digits and '-' (not at the end): it names Services, which Kubernetes requires to be DNS-1035 labels"
        )
    return None


def instance_labels(name: str) -> dict[str, str]:
    """Labels on every child of one resource; the selector for cleanup and discovery."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name, LABEL_MANAGED_BY: MANAGED_BY}


def instance_selector(name: str) -> str:
    return f"{LABEL_INSTANCE}={name},{LABEL_MANAGED_BY}={MANAGED_BY}"


def component_labels(name: str, component: str, unit: int | None = None) -> dict[str, str]:
    labels = {**instance_labels(name), LABEL_COMPONENT: component}
    if unit is not None:
        labels[LABEL_UNIT] = str(unit)
    return labels


def pod_selector(name: str, component: str, unit: int | None = None) -> dict[str, str]:
    """The immutable StatefulSet/Deployment selector: instance + component (+ unit)."""
    selector = {LABEL_INSTANCE: name, LABEL_COMPONENT: component}
    if unit is not None:
        selector[LABEL_UNIT] = str(unit)
    return selector


def statefulset_name(name: str, phase: Role, unit: int | None = None) -> str:
    return f"{name}-{phase}" if unit is None else f"{name}-u{unit}-{phase}"


def service_name(name: str, phase: Role) -> str:
    return f"{name}-{phase}"


def router_name(name: str) -> str:
    return f"{name}-router"


def plan_configmap_name(name: str) -> str:
    return f"{name}-plan"
