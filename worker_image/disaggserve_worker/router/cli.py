"""`disaggserve-worker router`: flags (as `disaggserve.contract.router_args` renders them) and the
process lifecycle (serve until SIGTERM, then drain)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiohttp import web
from pydantic import ValidationError

from ..contract import ENV_NAMESPACE, ROUTER_PORT
from .app import Router
from .config import RouterConfig
from .discovery import ApiAccess, KubernetesDiscovery, static_workers
from .http_server import OpenAIAppRunner
from .pool import WorkerPool

log = logging.getLogger(__name__)


def _endpoints(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds the `router` subcommand to the worker CLI."""
    p = subparsers.add_parser("router", help="OpenAI-compatible router in front of the workers",
                              description=__doc__)
    p.add_argument("--model", required=True, help="same --model as the workers (builtin:<name> or a folder)")
    p.add_argument("--model-name", required=True, help="name clients send in the OpenAI `model` field")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=ROUTER_PORT)
    p.add_argument("--discovery", choices=("static", "kubernetes"), default="static")
    p.add_argument("--namespace", help="namespace of the worker Pods (kubernetes discovery)")
    p.add_argument("--selector",
                   help="label selector of the worker Pods, e.g. app.kubernetes.io/instance=NAME")
    p.add_argument("--prefill-endpoints", type=_endpoints, default=[], help="comma-separated http://ip:port")
    p.add_argument("--decode-endpoints", type=_endpoints, default=[], help="comma-separated http://ip:port")
    p.add_argument("--colocated-endpoints", type=_endpoints, default=[], help="comma-separated http://ip:port")
    p.add_argument("--mode", choices=("disaggregated", "colocated"),
                   help="default: disaggregated when prefill and decode workers exist, else colocated")
    p.add_argument("--engine", choices=("builtin", "vllm"), default="builtin",
                   help="what the workers run: builtin (disaggserve-worker serve) or vllm (vLLM's OpenAI server)")
    p.add_argument("--ttft-slo-ms", type=float)
    p.add_argument("--tpot-slo-ms", type=float)
    p.add_argument("--api-key-file", help="file with accepted bearer keys, one per line (a mounted Secret)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-attempts", type=int, default=3, help="tries per request across workers")
    p.add_argument("--max-inflight-per-worker", type=int,
                   help="requests run at once per decode (or colocated) worker; the rest queue (default 64)")
    p.add_argument("--max-queued", type=int, help="requests that may wait for a worker; beyond: 429 (default 1024)")
    p.add_argument("--queue-timeout-s", type=float,
                   help="longest wait in the queue before 429 (503 without any worker) (default 10)")
    p.add_argument("--body-timeout-s", type=float, help="longest wait for a request body (default 30)")
    p.add_argument("--token-timeout-s", type=float,
                   help="longest silence between two tokens before the worker is given up on (default 30)")
    p.add_argument("--prefill-timeout-s", type=float,
                   help="longest wait for a prefill worker's first token (default 120)")
    p.add_argument("--drain-timeout-s", type=float, default=60.0)
    p.add_argument("--drain-accept-s", type=float,
                   help="after SIGTERM, how long new requests are still served, each answered with "
                        "Connection: close, before they are refused with 503 + Retry-After (default 5)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(handler=main_router)
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    fields = set(RouterConfig.model_fields)
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.discovery == "kubernetes" and not values.get("namespace"):
        values["namespace"] = os.environ.get(ENV_NAMESPACE, "default")
    return RouterConfig.model_validate(values)


def build_router(config: RouterConfig) -> Router:
    from .model_info import load_model_info

    pool = WorkerPool(forced_mode=config.mode)
    router = Router(config, load_model_info(config.model, config.model_name, config.max_model_len), pool)
    if config.discovery == "static":
        pool.replace(static_workers(config.prefill_endpoints, config.decode_endpoints,
                                    config.colocated_endpoints))
    else:
        assert config.selector is not None
        discovery = KubernetesDiscovery(pool, config.namespace or "default", config.selector)
        router.add_background(discovery.run)
    return router


async def serve(router: Router, host: str, port: int) -> None:
    """Serves until SIGTERM/SIGINT, then drains: readyz false, new requests served for the accept
    window and refused after it, in-flight finish."""
    runner = OpenAIAppRunner(router.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("router serving %s on http://%s:%d (mode: %s)", router.model.name, host, port,
             router.pool.mode or "waiting for workers")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await router.drain()
    finally:
        await runner.cleanup()


def main_router(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            print(f"disaggserve-worker router: {where + ': ' if where else ''}{err['msg']}", file=sys.stderr)
        return 2
    if config.discovery == "kubernetes":
        try:  # fail at start, not in a background loop, when there are no credentials at all
            ApiAccess.load()
        except RuntimeError as exc:
            print(f"disaggserve-worker router: {exc}", file=sys.stderr)
            return 2
    router = build_router(config)
    asyncio.run(serve(router, config.host, config.port))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m disaggserve_worker.router.cli`), for when the worker CLI is absent."""
    parser = argparse.ArgumentParser(prog="disaggserve-worker")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
