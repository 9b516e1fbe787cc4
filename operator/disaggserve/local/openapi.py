"""The OpenAPI v3 documents of the local API, as kube-apiserver serves them at `/openapi/v3`.

kubectl (1.27+) reads them before `apply`/`create` with validation on (the default): it looks
for a PATCH operation of the object's group/version/kind that takes the `fieldValidation`
query parameter, and when it finds one it leaves validation to the server (which the local
API does for custom resources against the CRD schema, CEL rules included). Without these
documents kubectl falls back to `/openapi/v2` (protobuf only) and refuses to apply anything:
"failed to download openapi".

kubectl fetches the index (`/openapi/v3`) and each group-version document as JSON, so JSON is
all we serve. Custom resources carry their CRD's `openAPIV3Schema` (so `kubectl explain`
works); built-in kinds get an open object schema, because this emulator does not validate
them (see the module docstring of `apiserver.py`).

Strategic merge patch is deliberately not advertised: the local API applies any patch as a
JSON merge patch, and kubectl then computes its client-side apply patch without it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml")
_QUERY = ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")
_OBJECT: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


@dataclass(frozen=True)
class Served:
    """One served resource: what discovery knows plus the schema, when there is one."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: frozenset[str]
    schema: Mapping[str, Any] | None = None

    @property
    def group_version_path(self) -> str:
        return f"apis/{self.group}/{self.version}" if self.group else f"api/{self.version}"


def _schema_name(r: Served) -> str:
    group = ".".join(reversed(r.group.split("."))) if r.group else "io.k8s.api.core"
    return f"{group}.{r.version}.{r.kind}"


def _gvk(r: Served) -> dict[str, str]:
    return {"group": r.group, "version": r.version, "kind": r.kind}


def _ref(r: Served) -> dict[str, Any]:
    return {"schema": {"$ref": f"#/components/schemas/{_schema_name(r)}"}}


def _operation(r: Served, action: str, *, body: bool = False, subresource: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{action}{r.kind}{subresource.capitalize()}",
        "parameters": [{"name": q, "in": "query", "schema": {"type": "string"}} for q in _QUERY]
        if action in ("patch", "put", "post")
        else [],
        "responses": {"200": {"description": "OK", "content": {"application/json": _ref(r)}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(r),
    }
    if body:
        types = PATCH_TYPES if action == "patch" else ("application/json", "application/yaml")
        op["requestBody"] = {"content": {t: _ref(r) for t in types}, "required": True}
    return op


def group_version_document(served: Iterable[Served], server_version: str) -> dict[str, Any]:
    """The document of one group-version: its paths (with GVK extensions) and schemas."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for r in served:
        prefix = f"/{r.group_version_path}" + ("/namespaces/{namespace}" if r.namespaced else "")
        collection = f"{prefix}/{r.plural}"
        item = collection + "/{name}"
        paths[collection] = {
            "get": _operation(r, "list"),
            "post": _operation(r, "post", body=True),
            "delete": _operation(r, "deletecollection"),
        }
        paths[item] = {
            "get": _operation(r, "get"),
            "put": _operation(r, "put", body=True),
            "patch": _operation(r, "patch", body=True),
            "delete": _operation(r, "delete"),
        }
        if "status" in r.subresources:
            paths[item + "/status"] = {
                "get": _operation(r, "get", subresource="status"),
                "put": _operation(r, "put", body=True, subresource="status"),
                "patch": _operation(r, "patch", body=True, subresource="status"),
            }
        schema = dict(r.schema) if r.schema else dict(_OBJECT)
        schema["x-kubernetes-group-version-kind"] = [_gvk(r)]
        schemas[_schema_name(r)] = schema
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": server_version},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def documents(served: Iterable[Served], server_version: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The `/openapi/v3` index and every group-version document, keyed by its path (`apis/g/v`).

    The index points at each document with a content hash, as kube-apiserver does, so that
    kubectl's disk cache is invalidated when a CRD changes a document.
    """
    by_path: dict[str, list[Served]] = {}
    for r in served:
        by_path.setdefault(r.group_version_path, []).append(r)
    docs = {path: group_version_document(rs, server_version) for path, rs in sorted(by_path.items())}
    index = {
        "paths": {
            path: {
                "serverRelativeURL": f"/openapi/v3/{path}?hash="
                + hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()
            }
            for path, doc in docs.items()
        }
    }
    return index, docs
