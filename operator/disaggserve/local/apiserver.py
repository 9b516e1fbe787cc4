"""A local Kubernetes API server: kmock 0.8's emulator with the gaps closed that we rely on.

Used by the tests (the operator runs against it exactly as against a cluster) and by
`disaggserve up` (a whole system on one machine). kmock gives the HTTP server, request
parsing, discovery and error rendering; this module replaces its object store because kmock
0.8 lacks, and kopf or our tests need (see docs/environment.md):

- uid / creationTimestamp / generation / resourceVersion stamping, 201 on create;
- optimistic concurrency: a stale resourceVersion answers 409, a failed JSON-patch `test` 422;
- watches that resume from a resourceVersion (410 Gone when it is too old) and never lose an
  event between the snapshot and the subscription;
- label and field selectors on list and watch;
- the `status` subresource isolated from the main resource (and generation bumped only by
  spec changes);
- custom resources validated against the CRD's schema, CEL rules included, with defaulting
  and unknown-field refusal under `fieldValidation=Strict` (what kubectl sends);
- server-side apply (`application/apply-patch+yaml`: create or merge, with field manager);
- PUT, finalizers, owner-reference garbage collection (background cascade, `Orphan` honoured);
- the discovery and `/openapi/v3` documents kubectl needs to apply with validation on, a
  supported server version, and `pods/log` read from the local process logs;
- an audit log of every call (verb, group, resource, subresource, namespace) for the RBAC test,
  and fault injection (status codes, delays) for resilience tests.

It touches kmock's private request attributes; the version is pinned (`kmock==0.8`).
Not emulated: admission webhooks, strategic-merge list semantics (patches merge like JSON
merge patches), managed-fields conflict detection, quotas, scheduling and kubelets (the
node agent of `disaggserve up` plays the kubelet).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import json
import random
import re
import string
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import rendering

from disaggserve.api import safe_yaml
from disaggserve.local import openapi
from disaggserve.local.podlogs import RUN_MARKER, read_log
from disaggserve.local.schema import FieldError, validate
from disaggserve.local.selectors import parse_field_selector, parse_label_selector
from disaggserve.local.tables import table

Key = tuple[str, str, str | None, str]  # group, plural, namespace, name
_NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+))?(?:/(status|finalize))?/?$")
_OPENAPI_PATH = re.compile(r"^/openapi/v3(?:/(.+?))?/?$")
MAX_EVENT_HISTORY = 50_000
# What `/version` reports: the newest minor the docs support and the kubectl we install speaks.
SERVER_VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0+disaggserve-local"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(kmock.KubernetesError):
    """An error answered as a Kubernetes `Status` object."""

    def __init__(self, status: int, reason: str, message: str, causes: list[FieldError] | None = None):
        details = (
            {"causes": [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes]} if causes else {}
        )
        super().__init__(status=status, reason=reason, message=message, details=details)


@dataclass(frozen=True)
class AuditRecord:
    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None


@dataclass
class Fault:
    """Answer matching calls with `status` (or delay them by `delay` seconds), `times` times."""

    status: int | None = None
    delay: float = 0.0
    times: int = 1
    verbs: frozenset[str] | None = None
    resource: str | None = None

    def matches(self, verb: str, resource: str) -> bool:
        return (
            self.times > 0
            and (self.verbs is None or verb in self.verbs)
            and (self.resource is None or self.resource == resource)
        )


@dataclass
class _CustomResource:
    schema: dict[str, Any]
    kind: str
    printer_columns: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Watcher:
    group: str
    plural: str
    namespace: str | None
    name: str | None
    labels: Any
    fields: Any
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    def wants(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and (self.name is None or meta.get("name") == self.name)
            and self.labels(meta.get("labels") or {})
            and self.fields(obj)
        )


class LocalApiServer(kmock.KubernetesEmulator):
    """The emulator. Serve it with `serve_api()`; inspect `objects`, `audit`; inject `faults`."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        for known in list(self.resources.keys()):
            if known.group == "metrics.k8s.io":  # not served here; kubectl would resolve `pods` to it
                del self.resources[known]
        self.store: dict[Key, dict[str, Any]] = {}
        self.audit: list[AuditRecord] = []
        self.faults: list[Fault] = []
        self._rv = 0
        self._history: collections.deque[tuple[int, str, str, str, dict[str, Any]]] = collections.deque(
            maxlen=MAX_EVENT_HISTORY
        )
        self._watchers: list[_Watcher] = []
        self._custom: dict[tuple[str, str], _CustomResource] = {}
        self._history_floor = 0
        # Where `pods/log` reads from: `<log_dir>/<namespace>_<pod>.log` (the node agent writes them).
        self.log_dir: Path | None = None

    # ----------------------------------------------------------------- public helpers

    def inject_fault(
        self,
        *,
        status: int | None = None,
        delay: float = 0.0,
        times: int = 1,
        verbs: set[str] | None = None,
        resource: str | None = None,
    ) -> Fault:
        fault = Fault(status, delay, times, frozenset(verbs) if verbs else None, resource)
        self.faults.append(fault)
        return fault

    def get(self, group: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.store.get((group, plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(
        self, group: str, plural: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        labels = parse_label_selector(label_selector)
        return [
            copy.deepcopy(o)
            for (g, p, ns, _), o in sorted(self.store.items(), key=lambda kv: str(kv[0]))
            if g == group
            and p == plural
            and (namespace is None or ns == namespace)
            and labels(o.get("metadata", {}).get("labels") or {})
        ]

    def install_crd(self, crd: dict[str, Any]) -> None:
        """Serve a custom resource: discovery, schema validation and its status subresource."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            subresources = set((version.get("subresources") or {}).keys())
            self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=subresources,
            )
            if version.get("storage", True):
                self._custom[(spec["group"], names["plural"])] = _CustomResource(
                    version.get("schema", {}).get("openAPIV3Schema", {}),
                    names["kind"],
                    version.get("additionalPrinterColumns", []),
                )

    def add_crd(self, crd: dict[str, Any]) -> dict[str, Any]:
        """Store a CRD object (as `kubectl apply` would) and serve its resource."""
        obj = copy.deepcopy(crd)
        meta = obj.setdefault("metadata", {})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._next_rv(), generation=1)
        obj["status"] = {"conditions": [{"type": "Established", "status": "True"}]}
        self.store[("apiextensions.k8s.io", "customresourcedefinitions", None, meta["name"])] = obj
        self.install_crd(obj)
        self._emit("ADDED", "apiextensions.k8s.io", "customresourcedefinitions", obj)
        return obj

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 parses /api/v1/namespaces[/NAME] as "inside namespace NAME" and fails on the
        # bare list; kopf's namespaced mode lists and watches exactly that. Route it ourselves.
        if (openapi_match := _OPENAPI_PATH.match(raw_request.path)) is not None:
            return self._serve_openapi(openapi_match.group(1))
        match = _NAMESPACES_PATH.match(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)
        body = await raw_request.read()
        try:
            data = await raw_request.json()
        except ValueError:
            data = None
        request = rendering.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies),
            data=data,
            body=body,
            text=body.decode(errors="replace"),
            resource=kmock.resource(group="", version="v1", plural="namespaces"),
            namespace=None,
            name=match.group(1),
            subresource=match.group(2),
        )
        self._requests.append(request)
        return await self._handle(request)

    async def _serve_version(self, request: Any) -> Any:
        # kmock 0.8 names the core group version "/v1"; kubectl then finds no core resources.
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and str(payload.get("groupVersion", "")).startswith("/"):
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        # kmock copies categories and short names onto subresources ("deployments/scale"): kubectl
        # then expands `get all` to subresources it cannot list and warns that `deploy` is ambiguous.
        for entry in payload.get("resources", []) if isinstance(payload, dict) else []:
            if "/" in entry.get("name", ""):
                entry["categories"], entry["shortNames"] = [], []
        return payload

    async def _serve_server_version(self, request: Any) -> Any:
        payload = await super()._serve_server_version(request)
        payload.update(SERVER_VERSION)
        return payload

    def served(self) -> list[openapi.Served]:
        """Every resource this API serves, with its CRD schema when it is a custom resource."""
        out = []
        for known, info in self.resources.items():
            custom = self._custom.get((known.group or "", known.plural))
            out.append(
                openapi.Served(
                    group=known.group or "",
                    version=known.version,
                    plural=known.plural,
                    kind=info.kind or known.plural.capitalize(),
                    namespaced=bool(info.namespaced),
                    subresources=frozenset(info.subresources or ()),
                    schema=custom.schema if custom else None,
                )
            )
        return out

    def _serve_openapi(self, path: str | None) -> aiohttp.web.StreamResponse:
        index, docs = openapi.documents(self.served(), SERVER_VERSION["gitVersion"])
        if not path:
            return aiohttp.web.json_response(index)
        if path in docs:
            return aiohttp.web.json_response(docs[path])
        return aiohttp.web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": "NotFound",
                "code": 404,
                "message": f"no OpenAPI document for {path!r}",
            },
            status=404,
        )

    # ----------------------------------------------------------------- dispatch

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if resource is None or resource.plural is None or resource.version is None:
            return await super()._handle(request)
        verb = self._verb(request)
        group = resource.group or ""
        self.audit.append(AuditRecord(verb, group, resource.plural, request.subresource, request.namespace))
        try:
            info = self._info(resource)
            for fault in self.faults:
                if fault.matches(verb, resource.plural):
                    fault.times -= 1
                    if fault.delay:
                        await asyncio.sleep(fault.delay)
                    if fault.status:
                        raise ApiError(fault.status, "InjectedFault", f"injected fault {fault.status}")
                    break
            if request.subresource == "log" and group == "" and resource.plural == "pods" and verb == "get":
                return await self._serve_log(request)
            if request.subresource not in (None, "status"):
                raise ApiError(404, "NotFound", f"subresource {request.subresource!r} is not served here")
            if request.subresource == "status" and "status" not in (info.subresources or set()):
                raise ApiError(404, "NotFound", f"{resource.plural} has no status subresource")
            handler = getattr(self, f"_do_{verb}")
            return await handler(request, group, resource, info)
        except kmock.KubernetesError as e:
            return await self._render_error(e)

    @staticmethod
    def _verb(request: Any) -> str:
        method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
        if method == "GET":
            if request.params.get("watch") in ("true", "1"):
                return "watch"
            return "get" if request.name else "list"
        if method == "POST" and not request.name:
            return "create"
        if method == "PATCH":
            return "patch"
        if method == "PUT":
            return "update"
        if method == "DELETE":
            return "delete" if request.name else "deletecollection"
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on this path")

    def _info(self, resource: Any) -> Any:
        for known, info in self.resources.items():
            if (
                known.group == (resource.group or "")
                and known.plural == resource.plural
                and known.version == resource.version
            ):
                return info
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _api_version(self, group: str, resource: Any) -> str:
        return f"{group}/{resource.version}" if group else resource.version

    # ----------------------------------------------------------------- events

    def _emit(self, event_type: str, group: str, plural: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        snapshot = copy.deepcopy(obj)
        if len(self._history) == self._history.maxlen:
            self._history_floor = self._history[0][0]
        self._history.append((rv, group, plural, event_type, snapshot))
        for watcher in self._watchers:
            if watcher.group == group and watcher.plural == plural and watcher.wants(snapshot):
                watcher.queue.put_nowait({"type": event_type, "object": snapshot})

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    # ----------------------------------------------------------------- reads

    def _selected(self, request: Any, group: str, plural: str) -> list[dict[str, Any]]:
        try:
            labels = parse_label_selector(request.params.get("labelSelector"))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        fields = parse_field_selector(request.params.get("fieldSelector"))
        return [
            o
            for (g, p, ns, _), o in self.store.items()
            if g == group
            and p == plural
            and (request.namespace is None or ns == request.namespace)
            and labels(o["metadata"].get("labels") or {})
            and fields(o)
        ]

    def _table(self, request: Any, group: str, resource: Any, objects: list[dict[str, Any]]) -> dict | None:
        """A Table when the client asked for one (kubectl get), else None."""
        if "as=Table" not in (request.headers.get("Accept") or ""):
            return None
        custom = self._custom.get((group, resource.plural))
        return table(objects, resource.plural, custom.printer_columns if custom else None, str(self._rv))

    async def _do_get(self, request: Any, group: str, resource: Any, info: Any) -> aiohttp.web.StreamResponse:
        obj = self._existing(request, group, resource)
        return aiohttp.web.json_response(self._table(request, group, resource, [obj]) or obj)

    async def _do_list(self, request: Any, group: str, resource: Any, info: Any) -> aiohttp.web.StreamResponse:
        items = sorted(
            self._selected(request, group, resource.plural),
            key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]),
        )
        if (as_table := self._table(request, group, resource, items)) is not None:
            return aiohttp.web.json_response(as_table)
        return aiohttp.web.json_response(
            {
                "apiVersion": self._api_version(group, resource),
                "kind": f"{info.kind}List",
                "metadata": {"resourceVersion": str(self._rv)},
                "items": items,
            }
        )

    async def _do_watch(self, request: Any, group: str, resource: Any, info: Any) -> aiohttp.web.StreamResponse:
        try:
            labels = parse_label_selector(request.params.get("labelSelector"))
        except ValueError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        watcher = _Watcher(
            group,
            resource.plural,
            request.namespace,
            request.name,
            labels,
            parse_field_selector(request.params.get("fieldSelector")),
        )
        since_raw = request.params.get("resourceVersion") or "0"
        since = int(since_raw) if since_raw.isdigit() else 0
        # Snapshot and subscription happen with no await in between: no event can fall in a gap.
        if since == 0:
            backlog = [
                {"type": "ADDED", "object": copy.deepcopy(o)}
                for o in self._selected(request, group, resource.plural)
                if watcher.wants(o)
            ]
        elif since < self._history_floor:
            backlog = [
                {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "code": 410,
                        "reason": "Expired",
                        "message": f"too old resource version: {since}",
                    },
                }
            ]
        else:
            backlog = [
                {"type": t, "object": o}
                for rv, g, p, t, o in self._history
                if rv > since and g == group and p == resource.plural and watcher.wants(o)
            ]
        self._watchers.append(watcher)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        try:
            await response.prepare(request._raw_request)
            for event in backlog:
                await response.write(json.dumps(event).encode() + b"\n")
            if backlog and backlog[0]["type"] == "ERROR":
                return response
            async for event in self._drain(watcher, timeout):
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watchers.remove(watcher)
        return response

    @staticmethod
    async def _drain(watcher: _Watcher, timeout: float | None) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            try:
                yield await asyncio.wait_for(watcher.queue.get(), remaining)
            except TimeoutError:
                return

    async def _serve_log(self, request: Any) -> aiohttp.web.StreamResponse:
        """`kubectl logs`: the pod process's output, as the kubelet would stream it."""
        pod = self.store.get(("", "pods", request.namespace, request.name))
        if pod is None:
            raise ApiError(404, "NotFound", f'pods "{request.name}" not found')
        path = self.log_dir / f"{request.namespace}_{request.name}.log" if self.log_dir else None
        params = request.params
        tail = int(params["tailLines"]) if params.get("tailLines", "").lstrip("-").isdigit() else None
        previous = params.get("previous") in ("true", "1")
        text, offset = read_log(path, previous=previous, tail_lines=tail)
        if text is None:
            container = pod["spec"]["containers"][0]["name"]
            which = "previous terminated container" if previous else "container"
            raise ApiError(
                400,
                "BadRequest",
                f'{which} "{container}" in pod "{request.name}" has no logs yet (is it waiting to start?)',
            )
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request._raw_request)
        await response.write(text.encode())
        if params.get("follow") in ("true", "1") and not previous and path is not None:
            await self._follow_log(response, path, offset, ("", "pods", request.namespace, request.name))
        return response

    async def _follow_log(self, response: Any, path: Path, offset: int, key: Key) -> None:
        """Stream what the current run appends until the pod is deleted or its process restarts."""
        uid = self.store[key]["metadata"].get("uid")
        try:
            while (self.store.get(key) or {}).get("metadata", {}).get("uid") == uid:
                await asyncio.sleep(0.5)
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                text = chunk.decode(errors="replace")
                if (restart := text.find("\n" + RUN_MARKER)) >= 0 or text.startswith(RUN_MARKER):
                    await response.write(text[: max(restart + 1, 0)].encode())
                    return
                if chunk:
                    await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError, FileNotFoundError):
            pass

    def _existing(self, request: Any, group: str, resource: Any) -> dict[str, Any]:
        obj = self.store.get((group, resource.plural, request.namespace, request.name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{resource.plural}.{group or "core"} "{request.name}" not found')
        return obj

    # ----------------------------------------------------------------- writes

    def _body(self, request: Any) -> Any:
        if request.data is not None:
            return copy.deepcopy(request.data)
        try:
            return safe_yaml.load(request.body.decode() or "null")
        except (yaml.YAMLError, safe_yaml.YamlLimitError) as e:
            raise ApiError(400, "BadRequest", f"cannot parse body: {e}") from None

    def _check_schema(self, group: str, resource: Any, obj: dict[str, Any], request: Any) -> dict[str, Any]:
        custom = self._custom.get((group, resource.plural))
        if custom is None:
            return obj
        stored, errors = validate(obj, custom.schema, strict=request.params.get("fieldValidation") == "Strict")
        if errors:
            name = obj.get("metadata", {}).get("name", "")
            detail = ", ".join(f"{e.field}: Invalid value: {e.message}" for e in errors)
            raise ApiError(422, "Invalid", f'{custom.kind}.{group} "{name}" is invalid: {detail}', errors)
        return stored

    async def _do_create(
        self, request: Any, group: str, resource: Any, info: Any, body: dict[str, Any] | None = None
    ) -> aiohttp.web.StreamResponse:
        obj = body if body is not None else self._body(request)
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name: Required value: name or generateName is required")
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        if info.namespaced:
            if meta.get("namespace") and request.namespace and meta["namespace"] != request.namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        key = (group, resource.plural, meta.get("namespace"), meta["name"])
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{resource.plural}.{group or "core"} "{meta["name"]}" already exists')
        obj.setdefault("apiVersion", self._api_version(group, resource))
        obj.setdefault("kind", info.kind)
        if "status" in (info.subresources or set()) and (group, resource.plural) in self._custom:
            obj.pop("status", None)
        obj = self._check_schema(group, resource, obj, request)
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._next_rv())
        meta.setdefault("generation", 1)
        manager = request.params.get("fieldManager")
        if manager:
            meta["managedFields"] = [
                {"manager": manager, "operation": "Apply" if body is not None else "Update", "time": _now()}
            ]
        self.store[key] = obj
        if group == "apiextensions.k8s.io" and resource.plural == "customresourcedefinitions":
            self.install_crd(obj)
            obj["status"] = {"conditions": [{"type": "Established", "status": "True"}]}
        self._emit("ADDED", group, resource.plural, obj)
        return aiohttp.web.json_response(obj, status=201)

    def _apply_patch(self, current: dict[str, Any], request: Any) -> dict[str, Any]:
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        body = self._body(request)
        if content_type == "application/json-patch+json":
            try:
                return jsonpatch.apply_patch(current, body)
            except jsonpatch.JsonPatchTestFailed as e:
                raise ApiError(422, "Invalid", f"the JSON patch test failed: {e}") from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be an object")
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        return _merge(copy.deepcopy(current), body)

    async def _do_patch(self, request: Any, group: str, resource: Any, info: Any) -> aiohttp.web.StreamResponse:
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        key = (group, resource.plural, request.namespace, request.name)
        if content_type == "application/apply-patch+yaml" and key not in self.store:
            if request.subresource:
                raise ApiError(404, "NotFound", "cannot apply a status to an object that does not exist")
            return await self._do_create(request, group, resource, info, body=self._body(request))
        current = self._existing(request, group, resource)
        patched = self._apply_patch(current, request)
        return self._store_update(request, group, resource, info, current, patched)

    async def _do_update(self, request: Any, group: str, resource: Any, info: Any) -> aiohttp.web.StreamResponse:
        current = self._existing(request, group, resource)
        body = self._body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body must be an object")
        rv = (body.get("metadata") or {}).get("resourceVersion")
        if not rv:
            raise ApiError(422, "Invalid", "metadata.resourceVersion: Invalid value: must be specified for an update")
        if rv != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        return self._store_update(request, group, resource, info, current, body)

    def _store_update(
        self, request: Any, group: str, resource: Any, info: Any, current: dict[str, Any], new: dict[str, Any]
    ) -> aiohttp.web.StreamResponse:
        has_status = "status" in (info.subresources or set())
        if request.subresource == "status":
            merged = copy.deepcopy(current)
            merged["status"] = new.get("status", {})
            new = merged
        elif has_status:
            new = copy.deepcopy(new)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            else:
                new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for immutable in ("uid", "name", "namespace", "creationTimestamp", "deletionTimestamp", "generation"):
            if immutable in current["metadata"]:
                meta[immutable] = current["metadata"][immutable]
            else:
                meta.pop(immutable, None)
        new = self._check_schema(group, resource, new, request)
        meta = new["metadata"]
        body_changed = {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in current.items() if k not in ("metadata", "status")
        }
        if body_changed:
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        manager = request.params.get("fieldManager")
        if manager and manager not in {m.get("manager") for m in meta.get("managedFields", [])}:
            meta.setdefault("managedFields", []).append({"manager": manager, "time": _now()})
        meta["resourceVersion"] = current["metadata"]["resourceVersion"]
        if new == current:
            return aiohttp.web.json_response(current)
        meta["resourceVersion"] = self._next_rv()
        key = (group, resource.plural, meta.get("namespace"), meta["name"])
        self.store[key] = new
        self._emit("MODIFIED", group, resource.plural, new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, orphan=False)
        return aiohttp.web.json_response(new)

    async def _do_delete(self, request: Any, group: str, resource: Any, info: Any) -> aiohttp.web.StreamResponse:
        current = self._existing(request, group, resource)
        options = self._body(request) if request.body else {}
        policy = request.params.get("propagationPolicy") or (options or {}).get("propagationPolicy")
        key = (group, resource.plural, request.namespace, request.name)
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                current["metadata"]["deletionTimestamp"] = _now()
                current["metadata"]["resourceVersion"] = self._next_rv()
                self._emit("MODIFIED", group, resource.plural, current)
            return aiohttp.web.json_response(current, status=202)
        self._remove(key, orphan=policy == "Orphan")
        return aiohttp.web.json_response(current)

    async def _do_deletecollection(
        self, request: Any, group: str, resource: Any, info: Any
    ) -> aiohttp.web.StreamResponse:
        for obj in self._selected(request, group, resource.plural):
            key = (group, resource.plural, obj["metadata"].get("namespace"), obj["metadata"]["name"])
            self._remove(key, orphan=False)
        return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    def _remove(self, key: Key, *, orphan: bool) -> None:
        """Delete an object and, unless orphaned, the objects it owns (as the garbage collector would)."""
        obj = self.store.pop(key, None)
        if obj is None:
            return
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit("DELETED", key[0], key[1], obj)
        if orphan:
            return
        uid = obj["metadata"].get("uid")
        for dep_key, dep in list(self.store.items()):
            owners = dep["metadata"].get("ownerReferences") or []
            if not any(o.get("uid") == uid for o in owners):
                continue
            alive = [o for o in owners if o.get("uid") != uid and self._uid_alive(o.get("uid"))]
            if alive:
                continue
            if dep["metadata"].get("finalizers"):
                if not dep["metadata"].get("deletionTimestamp"):
                    dep["metadata"]["deletionTimestamp"] = _now()
                    dep["metadata"]["resourceVersion"] = self._next_rv()
                    self._emit("MODIFIED", dep_key[0], dep_key[1], dep)
            else:
                self._remove(dep_key, orphan=False)

    def _uid_alive(self, uid: str | None) -> bool:
        return any(o["metadata"].get("uid") == uid for o in self.store.values())


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target


def kubeconfig(server_url: str) -> dict[str, Any]:
    """A kubeconfig that points kubectl, kopf and the kubernetes client at the local API."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "disaggserve-local",
        "clusters": [{"name": "disaggserve-local", "cluster": {"server": server_url.rstrip("/")}}],
        "users": [{"name": "disaggserve-local", "user": {"token": "local"}}],
        "contexts": [
            {
                "name": "disaggserve-local",
                "context": {"cluster": "disaggserve-local", "user": "disaggserve-local", "namespace": "default"},
            }
        ],
    }


def write_kubeconfig(server_url: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(kubeconfig(server_url), sort_keys=False))
    return path


@asynccontextmanager
async def serve_api(
    host: str = "127.0.0.1", port: int = 0, crds: list[dict[str, Any]] | None = None
) -> AsyncIterator[tuple[LocalApiServer, str]]:
    """Run the local API on host:port (0: any free port); yields the server and its URL."""
    api = LocalApiServer()
    for crd in crds or []:
        api.add_crd(crd)
    api.store[("", "namespaces", None, "default")] = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": "default",
            "uid": str(uuid.uuid4()),
            "resourceVersion": api._next_rv(),
            "creationTimestamp": _now(),
        },
        "status": {"phase": "Active"},
    }
    async with api, kmock.Server(api, host=host, port=port or None) as server:
        yield api, str(server.url).rstrip("/")
