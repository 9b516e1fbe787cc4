"""A whole DisaggServe system on one machine: local API, the real operator, a node agent.

`disaggserve up` and the end-to-end tests both use this, so what the tests exercise is what a
user runs. The operator is a real `disaggserve operator` subprocess talking HTTP to the API,
exactly as in a cluster; the agent runs pods as local processes (see `local/agent.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from disaggserve.api.constants import API_VERSION, KIND
from disaggserve.api.crd import build_crd
from disaggserve.api.peering import build_peering_crds
from disaggserve.contract import ENV_KERNEL_CACHE, ROUTER_PORT
from disaggserve.controller.kube import Kube
from disaggserve.local.agent import NodeAgent, NodeSpec
from disaggserve.local.apiserver import LocalApiServer, serve_api, write_kubeconfig
from disaggserve.local.processes import die_with_parent
from disaggserve.resources.names import router_name

log = logging.getLogger("disaggserve.local")
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def node_kernel_cache() -> str:
    """The workers' compiled-kernel cache for every pod of this machine: the one given, else the
    user's own (where a worker run by hand or a test caches them). A pod's HOME is a folder of its
    own, so without this each new pod compiled the CPU kernels again, 45 s of a core on a slow
    host: most of a scale-out's delay there. The cache is keyed by source, flags, compiler and
    CPU, and written atomically, so processes share it safely."""
    if given := os.environ.get(ENV_KERNEL_CACHE):
        return given
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(base / "disaggserve" / "kernels")


def default_resource() -> dict[str, Any]:
    """The embedded default: the built-in tiny model on CPU (same as examples/tiny-cpu.yaml)."""
    text = resources.files("disaggserve").joinpath("data/tiny-cpu.yaml").read_text()
    resource: dict[str, Any] = yaml.safe_load(text)
    return resource


class LocalCluster:
    def __init__(
        self,
        state_dir: Path,
        *,
        api_port: int = 0,
        nodes: list[NodeSpec] | None = None,
        interval: float = 0.5,
        operator_env: dict[str, str] | None = None,
        run_pods: bool = True,
    ):
        self.state_dir = state_dir
        self.api_port = api_port
        self.nodes = nodes
        self.interval = interval
        self.operator_env = operator_env or {}
        self.run_pods = run_pods  # False: API + operator only (control-plane benchmarks)
        self.api: LocalApiServer | None = None
        self.url = ""
        self.kubeconfig = state_dir / "kubeconfig"
        self.kube: Kube | None = None
        self.agent: NodeAgent | None = None
        self._operator: subprocess.Popen[bytes] | None = None
        self._stack = AsyncExitStack()
        self._stop = asyncio.Event()
        self._agent_task: asyncio.Task[None] | None = None
        self._operator_task: asyncio.Task[None] | None = None
        self.operator_restarts = 0

    async def __aenter__(self) -> LocalCluster:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.api, self.url = await self._stack.enter_async_context(
            serve_api(port=self.api_port, crds=[build_crd(), *build_peering_crds()])
        )
        assert self.api is not None
        self.api.log_dir = self.state_dir / "logs"
        write_kubeconfig(self.url, self.kubeconfig)
        self.start_operator()
        self._operator_task = asyncio.create_task(self._supervise_operator())
        self.kube = Kube(kubeconfig=str(self.kubeconfig))
        if self.run_pods:
            self.agent = NodeAgent(
                self.kube,
                self.state_dir,
                self.nodes,
                interval=self.interval,
                pod_env={"KUBECONFIG": str(self.kubeconfig), ENV_KERNEL_CACHE: node_kernel_cache()},
            )
            self._agent_task = asyncio.create_task(self.agent.run(self._stop))
        return self

    @property
    def operator_pid(self) -> int | None:
        return self._operator.pid if self._operator else None

    def start_operator(self) -> None:
        log = open(self.state_dir / "logs" / "operator.log", "ab")  # noqa: SIM115 (owned by the process)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", **self.operator_env}
        self._operator = subprocess.Popen(
            [sys.executable, "-m", "disaggserve.cli", "operator", "--all-namespaces"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    async def _supervise_operator(self) -> None:
        """Restart the operator if it dies (as a Deployment would): its work is level-triggered,
        so a new process picks up where the old one stopped."""
        backoff = 1.0
        while not self._stop.is_set():
            proc = self._operator
            if proc is not None and proc.poll() is not None:
                self.operator_restarts += 1
                log.warning(
                    "the operator exited with %s; restarting it (restart %d, see %s)",
                    proc.returncode,
                    self.operator_restarts,
                    self.state_dir / "logs" / "operator.log",
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                if self._stop.is_set():
                    return
                self.start_operator()
            elif proc is not None:
                backoff = 1.0
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    def stop_operator(self) -> None:
        if self._operator is not None and self._operator.poll() is None:
            self._operator.terminate()
            try:
                self._operator.wait(20)
            except subprocess.TimeoutExpired:
                self._operator.kill()
                self._operator.wait()
        self._operator = None

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._operator_task is not None:
            await self._operator_task
        if self._agent_task is not None:
            try:
                await self._agent_task
            except Exception:  # the agent failed to stop its pods cleanly: make sure they are gone
                log.exception("the node agent failed while stopping")
            finally:
                if self.agent is not None:
                    self.agent.kill_all()
        await asyncio.to_thread(self.stop_operator)
        if self.kube is not None:
            await self.kube.aclose()
        await self._stack.aclose()

    async def apply(self, resource: dict[str, Any]) -> dict[str, Any]:
        """`kubectl apply --server-side` of one DisaggServe."""
        assert self.kube is not None
        resource = {**resource, "metadata": {**resource["metadata"]}}
        resource["metadata"].setdefault("namespace", "default")
        # What `kubectl apply` records, so that a later `kubectl apply -f` of the same file
        # computes its patch against it instead of warning about a missing annotation.
        resource["metadata"]["annotations"] = {
            **(resource["metadata"].get("annotations") or {}),
            LAST_APPLIED: json.dumps(resource, sort_keys=True, separators=(",", ":")),
        }
        return await self.kube.apply(resource, field_manager="kubectl")

    async def get(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        assert self.kube is not None
        return await self.kube.get(API_VERSION, KIND, namespace, name)

    async def wait_ready(
        self,
        name: str,
        namespace: str = "default",
        timeout: float = 300,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Wait for Ready=True; raise TimeoutError with the last status, or on a Failed phase."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: dict[str, Any] = {}
        while loop.time() < deadline:
            obj = await self.get(name, namespace) or {}
            last = obj.get("status") or {}
            if progress:
                progress(last)
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in last.get("conditions", [])):
                return obj
            if last.get("phase") == "Failed":
                ready = next((c for c in last.get("conditions", []) if c.get("type") == "Ready"), {})
                raise RuntimeError(f"{name}: {ready.get('reason')}: {ready.get('message')}")
            await asyncio.sleep(0.25)
        ready = next((c for c in last.get("conditions", []) if c.get("type") == "Ready"), {})
        why = f"{ready.get('reason')}: {ready.get('message')}" if ready else "no Ready condition yet"
        raise TimeoutError(f"{name} not Ready after {timeout:.0f}s (phase {last.get('phase', 'unknown')}; {why})")

    async def publish(self, name: str, namespace: str = "default", host_port: int = 8000) -> str:
        """Serve the resource's router on 127.0.0.1:host_port (fixed, unlike its cluster IP)."""
        assert self.agent is not None, "publishing needs the node agent (run_pods=True)"
        await self.agent.proxy.expose(namespace, router_name(name), ROUTER_PORT, "127.0.0.1", host_port)
        return f"http://127.0.0.1:{host_port}/v1"

    async def endpoint(self, name: str, namespace: str = "default") -> str:
        """The router's address on this machine (its Service's local cluster IP)."""
        assert self.kube is not None
        svc = await self.kube.get("v1", "Service", namespace, f"{name}-router")
        ip = (svc or {}).get("spec", {}).get("clusterIP")
        if not ip:
            raise RuntimeError(f"the router Service of {name} has no address yet")
        return f"http://{ip}:8000/v1"
