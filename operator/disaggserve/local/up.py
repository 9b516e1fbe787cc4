"""`disaggserve up | down`: the whole system on this machine, one command, Ctrl-C to stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from disaggserve.api.files import ResourceFileError, load_resource
from disaggserve.local.agent import NodeSpec
from disaggserve.local.checkpoints import prepare_for_local
from disaggserve.local.cluster import LocalCluster, default_resource

DEFAULT_STATE_DIR = ".disaggserve"
DEFAULT_API_PORT = 6443


def _pid_file(state_dir: Path) -> Path:
    return state_dir / "up.pid"


def _running_pid(state_dir: Path) -> int | None:
    try:
        pid = int(_pid_file(state_dir).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _nodes(args: argparse.Namespace) -> list[NodeSpec] | None:
    if not args.gpu_nodes:
        return None
    return [
        NodeSpec(f"gpu-node-{i}", gpus=args.gpus_per_node, gpu_product=args.gpu_product, gpu_memory_mib=81920)
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
    async with LocalCluster(state_dir, api_port=args.api_port, nodes=_nodes(args)) as cluster:
        console.print(f"[bold]local Kubernetes API[/] {cluster.url}  (kubeconfig: {cluster.kubeconfig})")
        console.print(f"logs: {state_dir / 'logs'}")
        await cluster.apply(resource)
        (state_dir / "resource").write_text(f"{namespace}/{name}\n")
        with console.status(f"applying {name}…") as spinner:
            waiter = asyncio.create_task(
                cluster.wait_ready(
                    name,
                    namespace,
                    timeout=args.timeout,
                    progress=lambda s: spinner.update(f"{name}: {_progress_line(s)}"),
                )
            )
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
                console.print(f"[red]error:[/] {e}\nsee the logs in {state_dir / 'logs'}")
                return 1
        endpoint = await cluster.endpoint(name, namespace)
        model = resource["spec"]["model"]["name"]
        console.print(f"\n[bold green]{name} is ready[/]: {endpoint}\n")
        console.print("Try it:")
        console.print(
            f"  curl -s {endpoint}/completions -H 'Content-Type: application/json' \\\n"
            f'       -d \'{{"model": "{model}", "prompt": "Hello", "max_tokens": 16}}\'',
            markup=False,
        )
        console.print(
            "  python -c \"from openai import OpenAI; c = OpenAI(base_url='"
            f"{endpoint}', api_key='none'); print(c.completions.create(model='{model}', prompt='Hello', "
            'max_tokens=16).choices[0].text)"',
            markup=False,
        )
        console.print(f"\n  export KUBECONFIG={cluster.kubeconfig}; kubectl get disaggserve")
        console.print("  disaggserve status        # plan, replicas, SLOs")
        console.print("\nPress Ctrl-C (or run `disaggserve down`) to stop everything.")
        await stop.wait()
        console.print("stopping: draining workers, stopping the operator and the API…")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
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
    for _ in range(600):
        if _running_pid(state_dir) is None:
            print("stopped")
            return 0
        time.sleep(0.1)
    print(f"disaggserve: error: pid {pid} did not stop within 60 s", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    """`kubectl disaggserve status` against what `up` runs (or any cluster with --kubeconfig)."""
    from disaggserve import kubectl_plugin

    state_dir = Path(args.state_dir).resolve()
    name, namespace = args.name, args.namespace
    if name is None:
        try:
            namespace_default, name = (state_dir / "resource").read_text().strip().split("/", 1)
        except (OSError, ValueError):
            print("disaggserve: error: name a resource (nothing started by `disaggserve up` here)", file=sys.stderr)
            return 2
        namespace = namespace or namespace_default
    kubeconfig = args.kubeconfig or (str(state_dir / "kubeconfig") if (state_dir / "kubeconfig").exists() else None)
    argv = ["status", name, "-o", args.output]
    if namespace:
        argv += ["-n", namespace]
    if kubeconfig:
        argv += ["--kubeconfig", kubeconfig]
    return kubectl_plugin.main(argv)


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="run the whole system on this machine (local API, operator, workers)")
    up.add_argument("-f", "--file", help="a DisaggServe YAML (default: the built-in tiny model on CPU)")
    up.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="kubeconfig, logs and pod folders")
    up.add_argument("--api-port", type=int, default=DEFAULT_API_PORT, help="port of the local Kubernetes API")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for Ready")
    up.add_argument("--gpu-nodes", type=int, default=0, help="declare this many simulated GPU nodes")
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument("--gpu-product", default="NVIDIA-H100-80GB-HBM3")
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
