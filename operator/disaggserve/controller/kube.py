"""A small async Kubernetes client for the operator's own calls (children, status, nodes).

kopf brings its own client for watching and for its handler bookkeeping; for our writes we
want server-side apply with a field manager, label-selected lists and precise error classes,
over any kind, without per-kind generated APIs. Credentials come from the official
`kubernetes` package's config loaders (in-cluster service account, else $KUBECONFIG, exec
plugins and token refresh included); the HTTP goes through httpx.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import ssl
from dataclasses import dataclass
from typing import Any

import httpx
import kubernetes

from disaggserve.api.constants import API_VERSION, FIELD_MANAGER, KIND, PLURAL

# (apiVersion, kind) -> (plural, namespaced)
KINDS: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Service"): ("services", True),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "Secret"): ("secrets", True),
    ("v1", "Pod"): ("pods", True),
    ("v1", "Node"): ("nodes", False),
    ("apps/v1", "StatefulSet"): ("statefulsets", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", True),
    ("inference.networking.k8s.io/v1", "InferencePool"): ("inferencepools", True),
    (API_VERSION, KIND): (PLURAL, True),
}

RETRYABLE_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
MAX_CONNECTIONS = 32
NODE_LIST_MAX_AGE = (
    10.0  # seconds a shared Node list is reused  # to the API server, shared by all handlers of this operator
)


class KubeError(Exception):
    """An API call failed; `retryable` says whether trying again later can help."""

    def __init__(self, status: int | None, message: str):
        self.status = status
        self.retryable = status is None or status in RETRYABLE_STATUSES
        super().__init__(f"{status or 'no answer'}: {message}")


@dataclass(frozen=True)
class Ref:
    api_version: str
    kind: str
    name: str
    namespace: str | None

    @classmethod
    def of(cls, obj: dict[str, Any]) -> Ref:
        meta = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    try:
        plural, namespaced = KINDS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if namespaced and namespace is not None:  # None on a namespaced kind: across all namespaces
        prefix += f"/namespaces/{namespace}"
    out = f"{prefix}/{plural}"
    if name:
        out += f"/{name}"
    if sub:
        out += f"/{sub}"
    return out


def _load_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    cfg = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        return cfg
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG is read now, not at import time (the kubernetes package caches it on import).
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=cfg)
    return cfg


class Kube:
    """Async API access with the operator's field manager and a bounded timeout per call."""

    def __init__(self, timeout: float | None = None, kubeconfig: str | None = None):
        # A hung API server must not hang a handler: calls time out and the handler is retried.
        timeout = timeout or float(os.environ.get("DISAGGSERVE_API_TIMEOUT", "15"))
        self._cfg = _load_configuration(kubeconfig)
        verify: ssl.SSLContext | bool = False
        if self._cfg.verify_ssl:
            verify = ssl.create_default_context(cafile=self._cfg.ssl_ca_cert) if self._cfg.ssl_ca_cert else True
        cert = (self._cfg.cert_file, self._cfg.key_file) if self._cfg.cert_file else None
        if cert and isinstance(verify, ssl.SSLContext):
            verify.load_cert_chain(*cert)
        # Waiting for a free connection is not an API failure: with many resources reconciling at
        # once (each applying its children concurrently) a pool timeout would fail them all and
        # their retries would collide again. Only connect/read/write are bounded.
        self._http = httpx.AsyncClient(
            base_url=self._cfg.host,
            verify=verify,
            timeout=httpx.Timeout(timeout, pool=None),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
        )

        self._shared_lists: dict[tuple[str, str], tuple[float, asyncio.Task[list[dict[str, Any]]]]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list_shared(
        self, api_version: str, kind: str, max_age: float = NODE_LIST_MAX_AGE
    ) -> list[dict[str, Any]]:
        """A cluster-wide list (Nodes) shared by every reconcile for `max_age` seconds.

        Each reconcile plans against the Nodes; with a hundred resources reconciling at once one
        LIST serves them all (concurrent callers share the call in flight). A failed list is not
        kept. Nodes change on a scale of minutes; the staleness is bounded by `max_age`.
        """
        key = (api_version, kind)
        now = asyncio.get_running_loop().time()
        entry = self._shared_lists.get(key)
        if entry is None or now - entry[0] > max_age or (entry[1].done() and entry[1].exception()):
            entry = (now, asyncio.ensure_future(self.list(api_version, kind)))
            self._shared_lists[key] = entry
        return copy.deepcopy(await asyncio.shield(entry[1]))

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._cfg.get_api_key_with_prefix("authorization") or self._cfg.get_api_key_with_prefix("BearerToken")
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _call(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        try:
            response = await self._http.request(
                method,
                url,
                params=params,
                headers=self._headers(content_type),
                content=json.dumps(body) if body is not None else None,
            )
        except httpx.HTTPError as e:  # timeouts, refused connections: retryable
            raise KubeError(None, f"{method} {url}: {type(e).__name__}: {e}") from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise KubeError(response.status_code, f"{method} {url}: {message}")
        return response.json()

    async def apply(self, obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply: we own exactly the fields we send, under our field manager."""
        ref = Ref.of(obj)
        result = await self._call(
            "PATCH",
            path(ref.api_version, ref.kind, ref.namespace, ref.name),
            params={"fieldManager": field_manager, "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )
        assert result is not None
        return result

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return await self._call("GET", path(api_version, kind, namespace, name), missing_ok=True)

    async def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self._call("GET", path(api_version, kind, namespace), params=params)
        assert result is not None
        items: list[dict[str, Any]] = result.get("items", [])
        for item in items:  # list items carry no apiVersion/kind on a real server
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        return items

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        result = await self._call(
            "DELETE",
            path(api_version, kind, namespace, name),
            params={"propagationPolicy": "Background"},
            missing_ok=True,
        )
        return result is not None

    async def patch(
        self, api_version: str, kind: str, namespace: str | None, name: str, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        """JSON merge patch of the main resource (fields outside what we apply, e.g. a clusterIP)."""
        return await self._call(
            "PATCH",
            path(api_version, kind, namespace, name),
            body=body,
            content_type="application/merge-patch+json",
            missing_ok=True,
        )

    async def patch_status(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        name: str,
        status: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource; with resource_version, refuse to overwrite newer data."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._call(
            "PATCH",
            path(api_version, kind, namespace, name, "status"),
            body=body,
            content_type="application/merge-patch+json",
            missing_ok=True,
        )
