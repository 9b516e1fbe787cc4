"""Where the workers are: a fixed list, or the Pods the operator runs, followed live.

Kubernetes discovery lists and then watches Pods in one namespace that match the instance's label
selector, and keeps in the pool exactly those that are Ready, have a pod IP, are not being deleted
and carry a worker role in `app.kubernetes.io/component`. The official `kubernetes` package loads
the credentials (in-cluster service account or $KUBECONFIG, every auth form it knows); the list and
watch themselves run on aiohttp, so they live in the router's event loop. The label selector is
also applied on our side: it costs nothing, and an API server (or emulator) that ignores it cannot
make the router send traffic to another instance's pods. A watch that ends or fails is followed by a
fresh list, which is also how events lost during a disconnect are recovered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..contract import LABEL_COMPONENT, LABEL_UNIT, ROLES, WORKER_PORT
from .pool import Worker, WorkerPool

log = logging.getLogger(__name__)


def static_workers(prefill: list[str], decode: list[str], colocated: list[str]) -> list[Worker]:
    return ([Worker(url, "prefill") for url in prefill] + [Worker(url, "decode") for url in decode]
            + [Worker(url, "colocated") for url in colocated])


def parse_selector(selector: str) -> dict[str, str]:
    """Equality selectors (`a=b,c=d`), the form the operator renders; others are refused clearly."""
    labels: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or not key or "!" in key or any(c in term for c in "()"):
            raise ValueError(f"--selector term {term!r} is not an equality selector (label=value)")
        labels[key.strip()] = value.strip()
    if not labels:
        raise ValueError("--selector is empty; pass label=value, e.g. app.kubernetes.io/instance=NAME")
    return labels


def pod_to_worker(pod: Mapping[str, Any], selector: Mapping[str, str]) -> Worker | None:
    """The worker a Pod stands for, or None when it should get no traffic (yet)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return None
    role = labels.get(LABEL_COMPONENT)
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if role not in ROLES or not ip or meta.get("deletionTimestamp"):
        return None
    conditions = status.get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return None
    return Worker(f"http://{_host(ip)}:{_http_port(pod)}", role, unit=labels.get(LABEL_UNIT),
                  name=meta.get("name"))


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _http_port(pod: Mapping[str, Any]) -> int:
    """The container port named `http` (the chart names it so), else the contract's worker port."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http" and port.get("containerPort"):
                return int(port["containerPort"])
    return WORKER_PORT


@dataclass
class ApiAccess:
    """How to reach the API server: base URL, headers and TLS, from the official client's loaders."""

    server: str
    headers: dict[str, str]
    ssl_context: ssl.SSLContext | bool

    @classmethod
    def load(cls) -> ApiAccess:
        from kubernetes import client, config  # the standard client, used only for its credential loaders

        cfg = client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            path = os.environ.get("KUBECONFIG")
            try:
                config.load_kube_config(config_file=path, client_configuration=cfg)
            except (config.ConfigException, FileNotFoundError) as exc:
                raise RuntimeError(
                    "--discovery kubernetes found no credentials: not in a cluster (no "
                    f"KUBERNETES_SERVICE_HOST) and the kubeconfig ({path or '~/.kube/config'}) "
                    f"could not be loaded: {exc}") from exc
        headers = {}
        token = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if token:
            prefix = cfg.api_key_prefix.get("authorization") or cfg.api_key_prefix.get("BearerToken")
            headers["Authorization"] = token if token.lower().startswith("bearer ") or not prefix \
                else f"{prefix} {token}"
        ssl_ctx: ssl.SSLContext | bool = False
        if cfg.host.startswith("https://"):
            ssl_ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.verify_ssl else False
            if isinstance(ssl_ctx, ssl.SSLContext) and cfg.cert_file:
                ssl_ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        return cls(cfg.host.rstrip("/"), headers, ssl_ctx)


class KubernetesDiscovery:
    """Keeps `pool` equal to the ready worker Pods of the selector, until cancelled."""

    def __init__(self, pool: WorkerPool, namespace: str, selector: str, access: ApiAccess | None = None,
                 *, resync_s: float = 30.0, retry_s: float = 1.0) -> None:
        self.pool = pool
        self.namespace = namespace
        self.selector = selector
        self.labels = parse_selector(selector)
        self.access = access
        self.resync_s = resync_s
        self.retry_s = retry_s
        self.synced = asyncio.Event()

    async def run(self) -> None:
        while True:
            # Credentials are re-read on every round: projected service-account tokens rotate.
            access = self.access or ApiAccess.load()
            url = f"{access.server}/api/v1/namespaces/{self.namespace}/pods"
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.resync_s + 30)
            try:
                async with aiohttp.ClientSession(headers=access.headers, timeout=timeout) as session:
                    version = await self._list(session, url, access)
                    await self._watch(session, url, access, version)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("pod discovery (%s in %s) failed, retrying in %.1fs: %s", self.selector,
                            self.namespace, self.retry_s, exc)
                await asyncio.sleep(self.retry_s)

    async def _list(self, session: aiohttp.ClientSession, url: str, access: ApiAccess) -> str | None:
        async with session.get(url, params={"labelSelector": self.selector}, ssl=access.ssl_context) as resp:
            await _raise_for_status(resp, "list pods")
            body = await resp.json()
        workers = [w for w in (pod_to_worker(p, self.labels) for p in body.get("items") or []) if w]
        self.pool.replace(workers)
        self.synced.set()
        version = (body.get("metadata") or {}).get("resourceVersion")
        return version if version and version.isdigit() else None

    async def _watch(self, session: aiohttp.ClientSession, url: str, access: ApiAccess,
                     version: str | None) -> None:
        params = {"watch": "true", "labelSelector": self.selector, "timeoutSeconds": str(int(self.resync_s)),
                  "allowWatchBookmarks": "true"}
        if version:
            params["resourceVersion"] = version
        async with session.get(url, params=params, ssl=access.ssl_context) as resp:
            await _raise_for_status(resp, "watch pods")
            async for raw in resp.content:
                if raw.strip():
                    self._apply(json.loads(raw))

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind, pod = event.get("type"), event.get("object") or {}
        if kind == "ERROR":  # e.g. 410 Gone: our resourceVersion is too old; re-list
            raise ValueError(f"watch error: {pod.get('message', pod)}")
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        name = (pod.get("metadata") or {}).get("name")
        worker = pod_to_worker(pod, self.labels) if kind != "DELETED" else None
        # A pod's URL can change (new IP after a restart): drop whatever this pod was before.
        for url, known in list(self.pool.workers.items()):
            if known.name == name and (worker is None or known.url != worker.url):
                self.pool.remove(url)
        if worker is not None:
            self.pool.upsert(worker)


async def _raise_for_status(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status >= 400:
        text = (await resp.text())[:300]
        hint = " (the router's ServiceAccount needs get/list/watch on pods)" \
            if resp.status in (401, 403) else ""
        raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status,
                                          message=f"{what}: {text}{hint}")
