"""The local node agent: StatefulSet/Deployment controller, scheduler and kubelet for one machine.

It runs each pod of the operator's workloads as a local process on its own loopback address
(127.x.y.z, the pod's port unchanged), and writes back what a kubelet and the workload
controllers write on a cluster: Pod objects (node, IP, phase, readiness from the container's
HTTP readiness probe, restart counts) and StatefulSet/Deployment status (ready replicas). So
the operator, the router's discovery and the tests see the same API objects as on
Kubernetes. Crashed processes restart with exponential backoff; scale-down and deletion send
SIGTERM, wait the pod's grace period, then SIGKILL.

It polls the API (every `interval` seconds) rather than watching: a level-triggered loop over
a handful of objects is cheap and cannot miss an event.

Local stand-ins for what a container runtime provides: the pod's address is given to the
process by rewriting the contract's `--host 0.0.0.0` to the pod IP; `emptyDir` volumes become a
per-pod folder (TMPDIR/HOME); a pod on a simulated GPU node runs with `--device cpu` and tensor
and pipeline size 1 (it still requests and is placed on its T×P simulated GPUs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from disaggserve.controller.kube import Kube, KubeError
from disaggserve.local.addresses import Addresses
from disaggserve.local.podlogs import last_line, start_line
from disaggserve.local.pods import (
    HOSTNAME,
    DesiredPod,
    NodeView,
    container_status,
    cpu_threads,
    desired_pods,
    pod_manifest,
    qos_class,
    resource_field_value,
    schedule,
)
from disaggserve.local.processes import die_with_parent
from disaggserve.local.proxy import ServiceProxy
from disaggserve.status_logic import now

log = logging.getLogger("disaggserve.agent")
FIELD_MANAGER = "disaggserve-agent"
MAX_BACKOFF = 30.0
PYTHON_ENTRY_POINTS = {"disaggserve-worker": "disaggserve_worker.cli", "disaggserve": "disaggserve.cli"}


def _ports(pod_spec: dict[str, Any]) -> list[int]:
    return [int(p["containerPort"]) for c in pod_spec.get("containers", []) for p in c.get("ports", []) or []]


@dataclass(frozen=True)
class NodeSpec:
    """A node to declare: the local machine, or a simulated GPU node for topology tests."""

    name: str
    gpus: int = 0
    gpu_product: str | None = None
    gpu_memory_mib: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def simulated_gpu(self) -> bool:
        return self.gpus > 0

    def manifest(self) -> dict[str, Any]:
        labels = {HOSTNAME: self.name, "kubernetes.io/os": "linux", **self.labels}
        if self.gpus:
            labels["nvidia.com/gpu.count"] = str(self.gpus)
            if self.gpu_product:
                labels["nvidia.com/gpu.product"] = self.gpu_product
            if self.gpu_memory_mib:
                labels["nvidia.com/gpu.memory"] = str(self.gpu_memory_mib)
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": dict(self.annotations)},
            "spec": {},
        }

    def status(self) -> dict[str, Any]:
        gpus = {"nvidia.com/gpu": str(self.gpus)} if self.gpus else {}
        resources = {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": "110", **gpus}
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now()}],
            "addresses": [{"type": "Hostname", "address": self.name}, {"type": "InternalIP", "address": "127.0.0.1"}],
        }


@dataclass
class LocalPod:
    desired: DesiredPod
    node: str
    ip: str
    workdir: Path
    log_path: Path
    simulated_gpu: bool
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    next_start: float = 0.0
    started_at: float = 0.0
    terminating: bool = False
    reported: dict[str, Any] | None = None
    created: str = field(default_factory=now)  # wall-clock times, as a kubelet reports them
    started: str = ""
    ever_ready: bool = False
    last_exit: Crash | None = None


@dataclass(frozen=True)
class Crash:
    """How a pod's process last ended: what `kubectl describe` shows as Last State."""

    pod: str
    exit_code: int
    started: str
    finished: str
    message: str | None  # the last line the process wrote (kubelet: FallbackToLogsOnError)
    restarts: int
    log: Path


class NodeAgent:
    def __init__(
        self,
        kube: Kube,
        state_dir: Path,
        nodes: list[NodeSpec] | None = None,
        *,
        ip_prefix: str | None = None,
        interval: float = 0.5,
        pod_env: dict[str, str] | None = None,
    ):
        self.kube = kube
        self.state_dir = state_dir
        self.nodes = nodes or [NodeSpec("local")]
        self.interval = interval
        self.pod_env = pod_env or {}  # what a cluster mounts into every pod (e.g. API credentials)
        self.pods: dict[tuple[str, str], LocalPod] = {}
        # A random block of 127/8 per agent, skipping addresses whose ports are taken: two local
        # clusters (or a stale one) never share pod addresses.
        self._ips = Addresses(ip_prefix)
        self._ip_of: dict[tuple[str, str], str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http = httpx.AsyncClient(timeout=1.0)
        self.proxy = ServiceProxy(kube)
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        await self.declare_nodes()
        while not stop.is_set():
            try:
                await self.step()
            except KubeError as e:
                log.warning("agent step failed, retrying: %s", e)
            except Exception:  # never let one bad pass stop every pod's supervision
                log.exception("agent step failed unexpectedly, retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        await self.shutdown()

    async def declare_nodes(self) -> None:
        for node in self.nodes:
            await self.kube.apply(node.manifest(), field_manager=FIELD_MANAGER)
            await self.kube.patch_status("v1", "Node", None, node.name, node.status())

    async def shutdown(self) -> None:
        """Stop every local pod (SIGTERM, grace, SIGKILL), as on node shutdown."""
        await asyncio.gather(*(self._terminate(p, delete=False) for p in list(self.pods.values())))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.proxy.close()
        await self._http.aclose()

    # ------------------------------------------------------------------ one pass

    async def step(self) -> None:
        workloads = [*await self.kube.list("apps/v1", "StatefulSet"), *await self.kube.list("apps/v1", "Deployment")]
        api_pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in await self.kube.list("v1", "Pod")}
        desired: dict[tuple[str, str], DesiredPod] = {}
        by_workload: dict[tuple[str, str, str], list[DesiredPod]] = {}
        for w in workloads:
            pods = desired_pods(w)
            by_workload[(w["kind"], w["metadata"]["namespace"], w["metadata"]["name"])] = pods
            for pod in pods:
                desired[pod.key] = pod

        await self._retire(desired, by_workload)
        await self._start_missing(desired, api_pods)
        await self._supervise(api_pods)
        await self._report_workloads(workloads, by_workload)
        # Readiness changed during this pass: route by what the API says now, not at its start.
        await self.proxy.sync(await self.kube.list("v1", "Pod"))

    async def _retire(
        self, desired: dict[tuple[str, str], DesiredPod], by_workload: dict[tuple[str, str, str], list[DesiredPod]]
    ) -> None:
        """Stop pods nobody wants any more; roll pods whose template changed, one at a time."""
        for key, pod in list(self.pods.items()):
            if pod.terminating:
                continue
            want = desired.get(key)
            if want is None:
                owner = (pod.desired.owner_kind, pod.desired.namespace, pod.desired.owner_name)
                siblings = by_workload.get(owner)
                # A Deployment keeps old pods until the new revision is ready (maxUnavailable 0).
                if (
                    pod.desired.owner_kind == "Deployment"
                    and siblings
                    and not all(self.pods.get(s.key) and self.pods[s.key].ready for s in siblings)
                ):
                    continue
                self._spawn(self._terminate(pod))
            elif want.revision != pod.desired.revision:
                owner = (want.owner_kind, want.namespace, want.owner_name)
                others = [self.pods.get(s.key) for s in by_workload.get(owner, []) if s.key != key]
                if all(o is not None and o.ready and not o.terminating for o in others):
                    log.info("rolling %s/%s to revision %s", *key, want.revision)
                    self._spawn(self._terminate(pod))

    async def _start_missing(
        self, desired: dict[tuple[str, str], DesiredPod], api_pods: dict[tuple[str, str], dict]
    ) -> None:
        views = [NodeView(n.name, n.manifest()["metadata"]["labels"], n.gpus) for n in self.nodes]
        for key, want in desired.items():
            if key in self.pods:
                continue
            placed = [
                (p.node, p.desired.template.get("metadata", {}).get("labels", {}), p.desired.template["spec"])
                for p in self.pods.values()
            ]
            node_name = schedule(want.template["spec"], views, placed)
            if node_name is None:
                if key not in api_pods:
                    await self.kube.apply(pod_manifest(want, None, None), field_manager=FIELD_MANAGER)
                    await self.kube.patch_status(
                        "v1",
                        "Pod",
                        want.namespace,
                        want.name,
                        {
                            "phase": "Pending",
                            "conditions": [
                                {
                                    "type": "PodScheduled",
                                    "status": "False",
                                    "reason": "Unschedulable",
                                    "message": "no node has the GPUs, labels or affinity this pod requires",
                                }
                            ],
                        },
                    )
                continue
            node = next(n for n in self.nodes if n.name == node_name)
            if key not in self._ip_of:
                self._ip_of[key] = self._ips.take(_ports(want.template["spec"]))
            ip = self._ip_of[key]
            workdir = self.state_dir / "pods" / f"{want.namespace}_{want.name}"
            pod = LocalPod(
                want,
                node_name,
                ip,
                workdir,
                self.state_dir / "logs" / f"{want.namespace}_{want.name}.log",
                node.simulated_gpu,
            )
            self.pods[key] = pod
            await self.kube.apply(pod_manifest(want, node_name, ip), field_manager=FIELD_MANAGER)
            await self._launch(pod)

    async def _supervise(self, api_pods: dict[tuple[str, str], dict]) -> None:
        loop = asyncio.get_running_loop()
        for key, pod in list(self.pods.items()):
            if pod.terminating:
                continue
            if key not in api_pods and loop.time() - pod.started_at > 2:
                # Someone deleted the Pod object: like the StatefulSet controller, replace it.
                log.info("pod %s/%s was deleted through the API; replacing it", *key)
                self._spawn(self._terminate(pod, delete=False))
                continue
            if pod.proc is not None and pod.proc.returncode is not None:
                code = pod.proc.returncode
                with contextlib.suppress(ProcessLookupError):  # a dead container takes its children along
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                pod.proc, pod.ready = None, False
                pod.restarts += 1
                pod.last_exit = Crash(
                    f"{key[0]}/{key[1]}", code, pod.started, now(), last_line(pod.log_path), pod.restarts, pod.log_path
                )
                backoff = min(MAX_BACKOFF, 2.0 ** min(pod.restarts - 1, 5))
                pod.next_start = loop.time() + backoff
                log.warning(
                    "pod %s/%s exited with %s; restart %d in %.0fs; last output: %s",
                    *key,
                    code,
                    pod.restarts,
                    backoff,
                    pod.last_exit.message or "(none)",
                )
            if pod.proc is None and loop.time() >= pod.next_start:
                await self._launch(pod)
            if pod.proc is not None:
                pod.ready = await self._probe(pod)
                pod.ever_ready |= pod.ready
            await self._report_pod(pod)

    def crash_looping(self, restarts: int = 3) -> list[Crash]:
        """Pods whose process ended `restarts` times without ever becoming ready (nothing will fix them)."""
        return [
            p.last_exit
            for p in self.pods.values()
            if p.last_exit is not None and not p.ever_ready and not p.terminating and p.restarts >= restarts
        ]

    def crashes(self) -> list[Crash]:
        """The last exit of every pod that has exited at least once."""
        return [p.last_exit for p in self.pods.values() if p.last_exit is not None and not p.terminating]

    # ------------------------------------------------------------------ processes

    async def _secret_env(self, pod: LocalPod) -> dict[str, str] | None:
        """Values of `valueFrom.secretKeyRef` env entries; None when a required one is missing
        (a kubelet then reports CreateContainerConfigError and retries: so does the caller)."""
        container = pod.desired.template["spec"]["containers"][0]
        values: dict[str, str] = {}
        for item in container.get("env") or []:
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            secret = await self.kube.get("v1", "Secret", pod.desired.namespace, ref["name"])
            raw = ((secret or {}).get("data") or {}).get(ref.get("key", ""))
            if raw is None:
                if ref.get("optional"):
                    continue
                log.warning("pod %s/%s waits for secret %s key %s (env %s)", *pod.desired.key, ref["name"],
                            ref.get("key"), item["name"])
                return None
            values[item["name"]] = base64.b64decode(raw).decode()
        return values

    def _command(self, pod: LocalPod, secret_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
        container = pod.desired.template["spec"]["containers"][0]
        command = list(container.get("command") or [])
        args = list(container.get("args") or [])
        if command and command[0] in PYTHON_ENTRY_POINTS:
            # Our own console scripts run on the agent's interpreter, so a pod sees exactly the
            # packages the agent sees (an image would bring its own).
            command = [sys.executable, "-m", PYTHON_ENTRY_POINTS[command[0]], *command[1:]]
        elif command and command[0] in ("python", "python3"):
            # An image's interpreter (vLLM pods run `python3 -m vllm...`): here the agent's own,
            # which has the same packages the agent sees.
            command[0] = sys.executable
        elif command and os.sep not in command[0]:
            command[0] = shutil.which(command[0]) or command[0]
        for i, arg in enumerate(args[:-1]):
            if arg == "--host" and args[i + 1] in ("0.0.0.0", "::"):
                args[i + 1] = pod.ip
            if arg == "--device" and pod.simulated_gpu:
                args[i + 1] = "cpu"
            if arg in ("--tensor-parallel", "--pipeline-parallel") and pod.simulated_gpu:
                args[i + 1] = "1"  # a CPU process cannot shard over simulated GPUs: one process, whole model
        threads = str(cpu_threads(pod.desired.template["spec"]))
        env = {
            **os.environ,
            **self.pod_env,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        }
        fields = {
            "metadata.name": pod.desired.name,
            "metadata.namespace": pod.desired.namespace,
            "status.podIP": pod.ip,
            "spec.nodeName": pod.node,
        }
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif field_path := ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath"):
                env[item["name"]] = fields.get(field_path, "")
            elif resource_field := (item.get("valueFrom") or {}).get("resourceFieldRef"):
                env[item["name"]] = resource_field_value(container, resource_field)
            elif item["name"] in (secret_env or {}):
                env[item["name"]] = (secret_env or {})[item["name"]]
        env["TMPDIR"] = str(pod.workdir / "tmp")
        env["HOME"] = str(pod.workdir / "tmp")
        env["HF_HOME"] = str(pod.workdir / "tmp" / "hf")
        return command + args, env

    async def _launch(self, pod: LocalPod) -> None:
        secret_env = await self._secret_env(pod)
        if secret_env is None:
            pod.next_start = asyncio.get_running_loop().time() + 1.0
            return
        argv, env = self._command(pod, secret_env)
        (pod.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        with open(pod.log_path, "ab") as out:
            out.write(start_line(now(), argv).encode())
            out.flush()
            pod.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        pod.started = now()
        pod.started_at = asyncio.get_running_loop().time()
        log.info("started pod %s/%s on %s (%s), pid %d", *pod.desired.key, pod.node, pod.ip, pod.proc.pid)

    async def _probe(self, pod: LocalPod) -> bool:
        container = pod.desired.template["spec"]["containers"][0]
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        if not probe:
            return pod.proc is not None and pod.proc.returncode is None
        port = probe["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)
        try:
            response = await self._http.get(f"http://{pod.ip}:{port}{probe.get('path', '/')}")
            return 200 <= response.status_code < 400
        except httpx.HTTPError:
            return False

    async def _terminate(self, pod: LocalPod, *, delete: bool = True) -> None:
        pod.terminating, pod.ready = True, False
        await self._report_pod(pod)
        grace = float(pod.desired.template["spec"].get("terminationGracePeriodSeconds", 30))
        proc = pod.proc
        if proc is not None and proc.returncode is None:
            # As a container runtime does: SIGTERM to the main process only (a server with worker
            # processes, like vLLM, drains through them; signalled too they would just exit), and
            # when it is gone, or the grace period is over, SIGKILL to whatever is left of the pod.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                log.warning("pod %s/%s did not stop within %.0fs; killing it", *pod.desired.key, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        elif proc is not None:
            # The main process died on its own before the loop noticed: its children (vLLM's engine
            # core and worker, reparented to init) still hold the process group and spin.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.pods.pop(pod.desired.key, None)
        if delete:
            with contextlib.suppress(KubeError):
                await self.kube.delete("v1", "Pod", pod.desired.namespace, pod.desired.name)
        log.info("stopped pod %s/%s", *pod.desired.key)

    def kill_all(self) -> None:
        """Last resort on exit: no pod process outlives its agent, whatever happened before."""
        for pod in self.pods.values():
            if pod.proc is not None:  # a main process already reaped may have left children in its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGKILL)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ status

    async def _report_pod(self, pod: LocalPod) -> None:
        """The Pod status a kubelet writes, every field a real API server's clients expect."""
        running = pod.proc is not None and pod.proc.returncode is None
        ready = "True" if pod.ready and not pod.terminating else "False"
        previous = pod.reported or {}
        since = {c["type"]: c for c in previous.get("conditions", [])}

        def condition(kind: str, value: str) -> dict[str, Any]:
            old = since.get(kind)
            changed = old is None or old["status"] != value
            return {
                "type": kind,
                "status": value,
                "lastProbeTime": None,
                "lastTransitionTime": now() if changed else old["lastTransitionTime"],
            }

        spec = pod.desired.template["spec"]
        crash = pod.last_exit
        status = {
            "phase": "Running" if running else "Pending",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": pod.created,
            "qosClass": qos_class(spec),
            "conditions": [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": [
                container_status(
                    spec["containers"][0],
                    ready=ready == "True",
                    restarts=pod.restarts,
                    pid=pod.proc.pid if running and pod.proc is not None else None,
                    started_at=pod.started,
                    last_exit=(crash.exit_code, crash.started, crash.finished, crash.message) if crash else None,
                )
            ],
        }
        if status != pod.reported:
            with contextlib.suppress(KubeError):
                await self.kube.patch_status("v1", "Pod", pod.desired.namespace, pod.desired.name, status)
                pod.reported = status

    async def _report_workloads(
        self, workloads: list[dict[str, Any]], by_workload: dict[tuple[str, str, str], list[DesiredPod]]
    ) -> None:
        for w in workloads:
            meta = w["metadata"]
            wanted = by_workload[(w["kind"], meta["namespace"], meta["name"])]
            local = [self.pods.get(p.key) for p in wanted]
            ready = sum(1 for p in local if p is not None and p.ready and not p.terminating)
            updated = sum(
                1
                for p, want in zip(local, wanted, strict=True)
                if p is not None and p.desired.revision == want.revision
            )
            status = {
                "observedGeneration": meta.get("generation", 1),
                "replicas": len(wanted),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "updatedReplicas": updated,
            }
            if w["kind"] == "StatefulSet":
                status["currentReplicas"] = updated
            current = w.get("status") or {}
            if any(current.get(k) != v for k, v in status.items()):
                await self.kube.patch_status(w["apiVersion"], w["kind"], meta["namespace"], meta["name"], status)
