"""Test support for the router: real worker processes on loopback, an in-process router.

Each group of workers gets its own 127.x.y.0/24 block chosen at random, so several engineers (or test
runs) can use the contract's fixed worker ports side by side without colliding.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from disaggserve_worker.auth import ENV_WORKER_TOKEN
from disaggserve_worker.router.app import Router
from disaggserve_worker.router.cli import build_router
from disaggserve_worker.router.config import RouterConfig
from disaggserve_worker.router.http_server import OpenAIAppRunner

MODEL = "builtin:tiny-llama"
SERVED = "tiny"


@dataclass
class WorkerProcess:
    role: str
    ip: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the abrupt death a crash or an OOM kill is."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:  # a prefill worker holding unpulled KV caches would wait out their TTL: not here
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.kill()


def random_block() -> str:
    return f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"


def start_workers(specs: list[tuple[str, str]], tmp: Path, model: str = MODEL,
                  token: str | None = None, extra_args: dict[str, list[str]] | None = None) -> list[WorkerProcess]:
    """Starts `(role, ip)` workers in parallel and waits until each answers /readyz; with `token`,
    they accept only callers that send it (`disaggserve_worker.auth`). `extra_args` by ip: more
    flags for that worker (a later flag wins over the defaults here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(ENV_WORKER_TOKEN, None)
    if token:
        env[ENV_WORKER_TOKEN] = token
    workers = []
    for role, ip in specs:
        log = tmp / f"worker-{role}-{ip}.log"
        cmd = [sys.executable, "-m", "disaggserve_worker.cli", "serve", "--role", role, "--model", model,
               "--model-name", SERVED, "--host", ip, "--port", "8100", "--kv-port", "8101", "--device", "cpu",
               "--threads", "1", "--kv-cache-tokens", "16384", "--log-level", "WARNING",
               *(extra_args or {}).get(ip, [])]
        proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        workers.append(WorkerProcess(role, ip, 8100, proc, log))
    deadline = time.monotonic() + 90
    for worker in workers:
        while True:
            if worker.proc.poll() is not None:
                stop_all(workers)
                raise RuntimeError(f"worker {worker.role} at {worker.url} exited:\n{worker.log.read_text()}")
            with suppress(OSError), urllib.request.urlopen(worker.url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                stop_all(workers)
                raise RuntimeError(f"worker {worker.url} not ready in time:\n{worker.log.read_text()}")
            time.sleep(0.1)
    return workers


@pytest.fixture(scope="session")
def disagg_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    """One prefill and one decode worker, shared by the tests that do not harm them."""
    block = random_block()
    workers = start_workers([("prefill", f"{block}.1"), ("decode", f"{block}.2")],
                            tmp_path_factory.mktemp("workers"))
    yield workers
    stop_all(workers)


def stop_all(workers: list[WorkerProcess], *, graceful: bool = True) -> None:
    """SIGTERM to all first, then wait: the workers drain in parallel. Not graceful: SIGKILL, for
    workers a test left holding KV caches nobody will pull (they would wait out the TTL)."""
    for worker in workers:
        if not graceful:
            worker.kill()
        if worker.proc.poll() is None:
            worker.proc.terminate()
    for worker in workers:
        worker.stop()


@dataclass
class RunningRouter:
    router: Router
    url: str
    runner: web.AppRunner

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


async def start_router(config: RouterConfig) -> RunningRouter:
    router = build_router(config)
    runner = OpenAIAppRunner(router.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    return RunningRouter(router, f"http://{config.host}:{port}", runner)


def router_config(workers: list[WorkerProcess], **overrides: object) -> RouterConfig:
    by_role: dict[str, list[str]] = {"prefill": [], "decode": [], "colocated": []}
    for worker in workers:
        by_role[worker.role].append(worker.url)
    values: dict[str, object] = dict(
        model=MODEL, model_name=SERVED, host="127.0.0.1", port=0, prefill_endpoints=by_role["prefill"],
        decode_endpoints=by_role["decode"], colocated_endpoints=by_role["colocated"], ttft_slo_ms=2000,
        tpot_slo_ms=500, poll_interval_s=0.2, token_timeout_s=10)
    values.update(overrides)
    return RouterConfig.model_validate(values)


@pytest.fixture
async def disagg_router(disagg_workers: list[WorkerProcess]) -> AsyncIterator[RunningRouter]:
    running = await start_router(router_config(disagg_workers))
    yield running
    await running.runner.cleanup()
