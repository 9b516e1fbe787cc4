"""`disaggserve up | down`: the whole system on this machine, one command, Ctrl-C to stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from disaggserve.api.files import ResourceFileError, load_resource
from disaggserve.local.agent import Crash, NodeSpec
from disaggserve.local.checkpoints import prepare_for_local
from disaggserve.local.cluster import LocalCluster, default_resource

DEFAULT_STATE_DIR = ".disaggserve"
DEFAULT_API_PORT = 6443
DEFAULT_PORT = 8000  # the router's own port, on 127.0.0.1
CRASH_LOOP_RESTARTS = 3
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
# The longest pod grace period (the router's, 120 s) before SIGKILL, plus the operator's stop.
DOWN_TIMEOUT_S = 180.0


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "up.pid"


def _running_pid(state_dir: Path) -> int | None:
    try:
        pid = int(_pid_file(state_dir).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _nodes(args: argparse.Namespace, resource: dict[str, Any]) -> list[NodeSpec] | None:
    """Simulated GPU nodes; by default of the GPU model and memory the resource asks for."""
    if not args.gpu_nodes:
        return None
    hardware = (resource.get("spec") or {}).get("hardware") or {}
    product = args.gpu_product or hardware.get("gpuProduct") or DEFAULT_GPU_PRODUCT
    memory_mib = int(float(hardware.get("gpuMemoryGiB") or 80) * 1024)
    return [
        NodeSpec(f"gpu-node-{i}", gpus=args.gpus_per_node, gpu_product=product, gpu_memory_mib=memory_mib)
        for i in range(args.gpu_nodes)
    ]


def _progress_line(status: dict[str, Any]) -> str:
    replicas = status.get("replicas") or {}
    ready = next((c for c in status.get("conditions", []) if c.get("type") == "Ready"), {})
    return (
        f"phase {status.get('phase', 'Pending')}: prefill {replicas.get('prefill', {}).get('display', '-')}, "
        f"decode {replicas.get('decode', {}).get('display', '-')} ready"
        + (f" ({ready.get('reason')})" if ready.get("reason") else "")
    )


def _here(path: str | Path) -> str:
    """A path as the user should type it: relative when it is under the current directory."""
    path = Path(path)
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _crash_line(crash: Crash) -> str:
    return (
        f"pod {crash.pod} exited with code {crash.exit_code} (restart {crash.restarts}); "
        f"last output: {crash.message or '(nothing)'}  [log: {_here(crash.log)}]"
    )


class _Progress:
    """What `up` says while it waits: a spinner on a terminal, plain lines when redirected."""

    def __init__(self, console: Console, name: str):
        self.console, self.name = console, name
        self._last = ""
        self._spinner: Any = console.status(f"applying {name}…") if console.is_terminal else None

    def __enter__(self) -> _Progress:
        if self._spinner is not None:
            self._spinner.__enter__()
        else:
            self.console.print(f"applying {self.name}…")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spinner is not None:
            self._spinner.__exit__(*exc)

    def update(self, line: str) -> None:
        if self._spinner is not None:
            self._spinner.update(f"{self.name}: {line}")
        elif line != self._last:
            self.console.print(f"{self.name}: {line}", markup=False)
        self._last = line

    def say(self, line: str) -> None:
        self.console.print(line, markup=False)


async def _wait(cluster: LocalCluster, name: str, namespace: str, timeout: float, progress: _Progress) -> None:
    """Wait for Ready; say why each crashing pod crashed as it happens; give up on a crash loop."""
    reported: set[tuple[str, int]] = set()

    def check(status: dict[str, Any]) -> None:
        progress.update(_progress_line(status))
        agent = cluster.agent
        if agent is None:
            return
        for crash in agent.crashes():
            if (crash.pod, crash.restarts) not in reported:
                reported.add((crash.pod, crash.restarts))
                progress.say(_crash_line(crash))
        looping = agent.crash_looping(CRASH_LOOP_RESTARTS)
        if looping:
            crash = looping[0]
            raise CrashLoop(
                f"pod {crash.pod} keeps failing to start ({crash.restarts} restarts, last exit code "
                f"{crash.exit_code}): {crash.message or 'it printed nothing'}\n"
                f"  full log: {_here(crash.log)}"
            )

    await cluster.wait_ready(name, namespace, timeout=timeout, progress=check)


class CrashLoop(RuntimeError):
    """A pod crashed again and again without ever becoming ready: waiting longer will not help."""


async def _up(args: argparse.Namespace, console: Console) -> int:
    state_dir = Path(args.state_dir).resolve()
    if args.file:
        loaded = load_resource(prepare_for_local(args.file, state_dir))
        resource = loaded.raw
        name, namespace = loaded.name, loaded.namespace
    else:
        resource = default_resource()
        name, namespace = resource["metadata"]["name"], resource["metadata"].get("namespace", "default")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LocalCluster(state_dir, api_port=args.api_port, nodes=_nodes(args, resource)) as cluster:
        try:
            endpoint = await cluster.publish(name, namespace, args.port)
        except OSError as e:
            console.print(
                f"[red]error:[/] cannot serve the endpoint on 127.0.0.1:{args.port} ({e.strerror}); pass another --port"
            )
            return 1
        kubeconfig = _here(cluster.kubeconfig)
        console.print(f"[bold]local Kubernetes API[/] {cluster.url}  (kubeconfig: {kubeconfig})")
        console.print(f"logs: {_here(state_dir / 'logs')}")
        await cluster.apply(resource)
        (state_dir / "resource").write_text(f"{namespace}/{name}\n")
        (state_dir / "endpoint").write_text(endpoint + "\n")
        with _Progress(console, name) as progress:
            waiter = asyncio.create_task(_wait(cluster, name, namespace, args.timeout, progress))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if waiter not in done:
                waiter.cancel()
                console.print("stopping…")
                return 130
            try:
                waiter.result()
            except (TimeoutError, RuntimeError) as e:
                console.print(f"[red]error:[/] {e}", markup=True, highlight=False)
                console.print(f"logs of every component: {_here(state_dir / 'logs')}")
                return 1
        model = resource["spec"]["model"]["name"]
        python, disaggserve = _here(sys.executable), _here(Path(sys.executable).parent / "disaggserve")
        console.print(f"\n[bold green]{name} is ready[/]: {endpoint}\n")
        console.print("Try it:")
        console.print(
            f"  curl -s {endpoint}/completions -H 'Content-Type: application/json' \\\n"
            f'       -d \'{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}\'',
            markup=False,
        )
        console.print(
            f"  {python} -c \"from openai import OpenAI; c = OpenAI(base_url='"
            f"{endpoint}', api_key='none'); print(c.completions.create(model='{model}', prompt='Hello', "
            'max_tokens=16).choices[0].text)"',
            markup=False,
        )
        if _builtin(resource):
            console.print(
                "  (the built-in model has random weights: expect random text, replacement characters included)"
            )
        console.print(f"\n  export KUBECONFIG={kubeconfig}; kubectl get disaggserve", markup=False)
        console.print(f"  {disaggserve} status        # plan, replicas, SLOs", markup=False)
        console.print("\nPress Ctrl-C (or run `disaggserve down`) to stop everything.")
        await stop.wait()
        console.print("stopping: draining workers, stopping the operator and the API…")
    return 0


def _builtin(resource: dict[str, Any]) -> bool:
    return bool(((resource.get("spec") or {}).get("model") or {}).get("source", {}).get("builtin"))


class _NotCrashes(logging.Filter):
    """`up` reports pod exits itself (with the pod's last output); drop the agent's duplicate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("pod %s/%s exited")


def cmd_up(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    logging.getLogger("disaggserve.agent").addFilter(_NotCrashes())
    state_dir = Path(args.state_dir).resolve()
    if (pid := _running_pid(state_dir)) is not None:
        print(f"disaggserve: error: already running (pid {pid}); run `disaggserve down` first", file=sys.stderr)
        return 2
    if args.file:
        try:
            load_resource(prepare_for_local(args.file, state_dir))
        except ResourceFileError as e:
            print(f"disaggserve: error: {e}", file=sys.stderr)
            return 2
    state_dir.mkdir(parents=True, exist_ok=True)
    _pid_file(state_dir).write_text(str(os.getpid()))
    try:
        return asyncio.run(_up(args, console))
    except OSError as e:
        print(f"disaggserve: error: {e} (is port {args.api_port} in use? try --api-port)", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            _pid_file(state_dir).unlink()


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    pid = _running_pid(state_dir)
    if pid is None:
        print("nothing is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    print("stopping: workers drain their requests first (up to their grace period)…", flush=True)
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while time.monotonic() < deadline:
        if _running_pid(state_dir) is None:
            print("stopped")
            return 0
        time.sleep(0.1)
    print(f"disaggserve: error: pid {pid} did not stop within {DOWN_TIMEOUT_S:.0f} s", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    """`kubectl disaggserve status` against what `up` runs (or any cluster with --kubeconfig)."""
    from disaggserve import kubectl_plugin

    state_dir = Path(args.state_dir).resolve()
    name, namespace = args.name, args.namespace
    running = _running_pid(state_dir) is not None
    if name is None:
        try:
            namespace_default, name = (state_dir / "resource").read_text().strip().split("/", 1)
        except (OSError, ValueError):
            namespace_default = ""
        if not running or not name:
            print(
                "disaggserve: nothing started by `disaggserve up` is running here: start it with "
                "`disaggserve up` (or name a resource and pass --kubeconfig for another cluster)",
                file=sys.stderr,
            )
            return 2
        namespace = namespace or namespace_default
    local = running and not args.kubeconfig
    kubeconfig = args.kubeconfig or (str(state_dir / "kubeconfig") if local else None)
    local_endpoint = None
    if local:
        with contextlib.suppress(OSError):
            local_endpoint = (state_dir / "endpoint").read_text().strip() or None
    argv = ["status", name, "-o", args.output]
    if namespace:
        argv += ["-n", namespace]
    if kubeconfig:
        argv += ["--kubeconfig", kubeconfig]
    return kubectl_plugin.main(argv, local_endpoint=local_endpoint)


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="run the whole system on this machine (local API, operator, workers)")
    up.add_argument("-f", "--file", help="a DisaggServe YAML (default: the built-in tiny model on CPU)")
    up.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="kubeconfig, logs and pod folders")
    up.add_argument("--api-port", type=int, default=DEFAULT_API_PORT, help="port of the local Kubernetes API")
    up.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="serve the resource's OpenAI endpoint on 127.0.0.1:PORT (fixed across runs)",
    )
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    up.add_argument("--gpu-nodes", type=int, default=0, help="declare this many simulated GPU nodes")
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument(
        "--gpu-product",
        help=f"GPU model label of the simulated nodes (default: the resource's hardware.gpuProduct, "
        f"else {DEFAULT_GPU_PRODUCT})",
    )
    up.set_defaults(func=cmd_up)
    status = sub.add_parser("status", help="a resource's phase, plan, replicas and SLO table")
    status.add_argument("name", nargs="?", help="default: the resource `disaggserve up` applied")
    status.add_argument("-n", "--namespace")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument("--kubeconfig", help="default: the one `disaggserve up` wrote, else $KUBECONFIG")
    status.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    status.set_defaults(func=cmd_status)
    down = sub.add_parser("down", help="stop what `disaggserve up` started")
    down.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    down.set_defaults(func=cmd_down)
