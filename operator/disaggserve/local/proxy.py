"""kube-proxy for the local cluster: each ClusterIP Service gets a loopback address whose ports
forward TCP to the Service's ready pods (round robin), so clients use one stable endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

from disaggserve.controller.kube import Kube
from disaggserve.local.addresses import Addresses, ports_free

log = logging.getLogger("disaggserve.proxy")


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _target_port(pod: dict[str, Any], target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    for container in pod["spec"].get("containers", []):
        for port in container.get("ports", []):
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


class ServiceProxy:
    def __init__(self, kube: Kube, ip_prefix: str | None = None):
        self.kube = kube
        self._ips = Addresses(ip_prefix)
        self.cluster_ips: dict[tuple[str, str], str] = {}
        self._servers: dict[tuple[str, str, int], asyncio.AbstractServer] = {}
        self._backends: dict[tuple[str, str, int], list[tuple[str, int]]] = {}
        self._turn = itertools.count()
        self._published: list[asyncio.AbstractServer] = []

    async def sync(self, pods: list[dict[str, Any]]) -> None:
        services = [s for s in await self.kube.list("v1", "Service") if s["spec"].get("clusterIP") != "None"]
        live = set()
        for svc in services:
            meta = svc["metadata"]
            key = (meta["namespace"], meta["name"])
            ports = [int(port["port"]) for port in svc["spec"].get("ports", [])]
            ip = self.cluster_ips.get(key) or svc["spec"].get("clusterIP")
            if not ip or not ip.startswith("127.") or (key not in self.cluster_ips and not ports_free(ip, ports)):
                ip = self._ips.take(ports)
            if svc["spec"].get("clusterIP") != ip:
                await self.kube.patch("v1", "Service", meta["namespace"], meta["name"], {"spec": {"clusterIP": ip}})
            self.cluster_ips[key] = ip
            selector = svc["spec"].get("selector") or {}
            members = [
                p
                for p in pods
                if p["metadata"]["namespace"] == meta["namespace"]
                and _ready(p)
                and all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
            ]
            for port in svc["spec"].get("ports", []):
                skey = (*key, int(port["port"]))
                live.add(skey)
                target = port.get("targetPort", port["port"])
                self._backends[skey] = [
                    (p["status"]["podIP"], tp) for p in members if (tp := _target_port(p, target)) is not None
                ]
                if skey not in self._servers:
                    try:
                        self._servers[skey] = await asyncio.start_server(
                            lambda r, w, k=skey: self._forward(k, r, w), ip, int(port["port"])
                        )
                    except OSError as e:  # taken since we chose it: a new address on the next pass
                        log.warning("service %s/%s:%s cannot listen on %s (%s); moving it", *skey, ip, e)
                        self._release(key)
                        break
                    log.info("service %s/%s:%s listens on %s", *skey, ip)
        for skey in set(self._servers) - live:
            self._servers.pop(skey).close()
            self._backends.pop(skey, None)

    def _release(self, key: tuple[str, str]) -> None:
        self.cluster_ips.pop(key, None)
        for skey in [k for k in self._servers if k[:2] == key]:
            self._servers.pop(skey).close()

    async def expose(self, namespace: str, name: str, port: int, host: str, host_port: int) -> None:
        """Forward host:host_port to a Service's port, like kind's port mappings or
        `kubectl port-forward svc/NAME`: one fixed address that outlives the Service's cluster IP."""
        key = (namespace, name, port)
        self._published.append(await asyncio.start_server(lambda r, w: self._forward(key, r, w), host, host_port))
        log.info("service %s/%s:%s is published on %s:%s", namespace, name, port, host, host_port)

    async def _forward(
        self, key: tuple[str, str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        backends = self._backends.get(key) or []
        for _ in range(50):  # like a Service with no ready endpoint yet: hold the client up to 5 s
            if backends:
                break
            await asyncio.sleep(0.1)
            backends = self._backends.get(key) or []
        if not backends:
            writer.close()
            return
        host, port = backends[next(self._turn) % len(backends)]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        for server in [*self._servers.values(), *self._published]:
            server.close()
        self._servers.clear()
        self._published.clear()
