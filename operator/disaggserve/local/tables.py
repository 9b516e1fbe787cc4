"""Server-side printing (`kubectl get`): the `meta.k8s.io/v1` Table a real API server returns.

kubectl asks for `application/json;as=Table`; the columns of a custom resource come from its
CRD's `additionalPrinterColumns` (JSONPath), built-in kinds get the columns people expect.
Only the JSONPath subset printer columns use is understood: `.a.b`, `[N]`, `[?(@.k=="v")]`.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

_TOKEN = re.compile(r'\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*["\']([^"\']*)["\']\)\]')


def jsonpath(obj: Any, expr: str) -> Any:
    """Evaluate a printer-column JSONPath; None when a step is missing."""
    nodes = [obj]
    pos = 0
    expr = expr.strip().removeprefix("{").removesuffix("}")
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"unsupported JSONPath {expr!r} at {expr[pos:]!r}")
        pos = m.end()
        field, index, key, value = m.groups()
        nxt: list[Any] = []
        for node in nodes:
            if field is not None and isinstance(node, dict) and field in node:
                nxt.append(node[field])
            elif index is not None and isinstance(node, list) and int(index) < len(node):
                nxt.append(node[int(index)])
            elif key is not None and isinstance(node, list):
                nxt += [item for item in node if isinstance(item, dict) and str(jsonpath(item, "." + key)) == value]
        nodes = nxt
    return nodes[0] if len(nodes) == 1 else (nodes or None)


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str | None:
    """Format a timestamp as kubectl's relative age ("45s", "5m12s", "3h", "2d"), as the server does."""
    if not timestamp:
        return None
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d" if days < 730 else f"{days // 365}y"


def _pod_columns(pod: dict[str, Any]) -> list[Any]:
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    ready = sum(1 for c in containers if c.get("ready"))
    total = len(pod.get("spec", {}).get("containers", [])) or len(containers)
    return [
        f"{ready}/{total}",
        status.get("phase", "Pending"),
        sum(int(c.get("restartCount", 0)) for c in containers),
        status.get("podIP", "<none>"),
        pod.get("spec", {}).get("nodeName", "<none>"),
    ]


def _workload_columns(obj: dict[str, Any]) -> list[Any]:
    status = obj.get("status") or {}
    return [f"{status.get('readyReplicas', 0)}/{obj.get('spec', {}).get('replicas', 0)}"]


BUILTIN_COLUMNS: dict[str, tuple[list[tuple[str, str]], Any]] = {
    "pods": (
        [("Ready", "string"), ("Status", "string"), ("Restarts", "integer"), ("IP", "string"), ("Node", "string")],
        _pod_columns,
    ),
    "statefulsets": ([("Ready", "string")], _workload_columns),
    "deployments": ([("Ready", "string")], _workload_columns),
}


def table(
    objects: list[dict[str, Any]], plural: str, printer_columns: list[dict[str, Any]] | None, resource_version: str
) -> dict[str, Any]:
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    if printer_columns:
        columns += [
            {
                "name": c["name"],
                "type": c.get("type", "string"),
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in printer_columns
        ]
        extract = lambda o: [jsonpath(o, c["jsonPath"]) for c in printer_columns]  # noqa: E731
    else:
        extra, func = BUILTIN_COLUMNS.get(plural, ([], lambda o: []))
        columns += [{"name": n, "type": t, "format": "", "description": n, "priority": 0} for n, t in extra]
        columns.append({"name": "Age", "type": "date", "format": "", "description": "Age", "priority": 0})
        extract = lambda o: [*func(o), o["metadata"].get("creationTimestamp")]  # noqa: E731
    dates = [i for i, c in enumerate(columns) if c["type"] == "date"]

    def cells(obj: dict[str, Any]) -> list[Any]:
        values = [obj["metadata"]["name"], *extract(obj)]
        for i in dates:
            values[i] = human_age(values[i])
        return values

    rows = [
        {
            "cells": cells(o),
            "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
        }
        for o in objects
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    }
