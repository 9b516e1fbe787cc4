"""The router as the operator runs it: the `disaggserve-worker router` subcommand with the flags
`disaggserve.contract.router_args` renders, SIGTERM handling in a real process, and colocated mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from router_harness import (
    MODEL,
    SERVED,
    WorkerProcess,
    random_block,
    router_config,
    start_router,
    start_workers,
)

from disaggserve_worker.cli import build_parser

pytestmark = pytest.mark.slow


def test_operator_rendered_flags_parse(tmp_path: Path) -> None:
    contract = pytest.importorskip("disaggserve.contract")
    keys = tmp_path / "api-keys"
    keys.write_text("k\n")
    argv = contract.router_args(model=MODEL, model_name=SERVED, namespace="ns", instance="demo",
                                ttft_slo_ms=250, tpot_slo_ms=50, api_key_file=str(keys))
    from disaggserve_worker.router.cli import config_from_args

    args = build_parser().parse_args(argv)
    assert args.command == "router"
    config = config_from_args(args)
    assert config.discovery == "kubernetes" and config.selector == "app.kubernetes.io/instance=demo"
    assert config.namespace == "ns" and config.ttft_slo_ms == 250 and config.tpot_slo_ms == 50
    assert config.api_key_file == keys


@pytest.mark.parametrize("argv, message", [
    (["--discovery", "static"], "needs endpoints"),
    (["--prefill-endpoints", "http://127.0.0.1:1"], "both --prefill-endpoints and --decode-endpoints"),
    (["--colocated-endpoints", "127.0.0.1:8100"], "http://host:port"),
    (["--discovery", "kubernetes"], "needs --selector"),
    (["--mode", "colocated", "--prefill-endpoints", "http://a:1", "--decode-endpoints", "http://b:1"],
     "--mode colocated needs --colocated-endpoints"),
])
def test_bad_flags_are_explained(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["router", "--model", MODEL, "--model-name", SERVED, *argv])
    assert args.handler(args) == 2
    assert message in capsys.readouterr().err


def test_kubernetes_discovery_without_credentials_fails_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    args = build_parser().parse_args(["router", "--model", MODEL, "--model-name", SERVED, "--discovery",
                                      "kubernetes", "--selector", "app.kubernetes.io/instance=x"])
    assert args.handler(args) == 2
    assert "found no credentials" in capsys.readouterr().err


@pytest.fixture(scope="module")
def colocated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    block = random_block()
    workers = start_workers([("colocated", f"{block}.1"), ("colocated", f"{block}.2")],
                            tmp_path_factory.mktemp("colocated"))
    yield workers
    for worker in workers:
        worker.stop()


async def test_colocated_mode_spreads_load(colocated: list[WorkerProcess]) -> None:
    running = await start_router(router_config(colocated))
    try:
        assert running.router.pool.mode == "colocated"
        pool = running.router.pool
        picked: list[tuple[str, int]] = []  # (worker chosen, requests already in flight at that moment)
        pick = pool.pick_colocated

        def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
            worker = pick(*args, **kwargs)
            picked.append((worker.url, sum(w.inflight_requests for w in pool.of_role("colocated"))))
            return worker

        pool.pick_colocated = spy  # type: ignore[method-assign]
        api = openai.AsyncOpenAI(base_url=running.base_url, api_key="x", max_retries=0)
        # Long enough that the first is still generating when the second arrives, on any machine.
        streams = [await api.completions.create(model=SERVED, prompt="Hello", max_tokens=200, stream=True,
                                                extra_body={"ignore_eos": True}) for _ in range(2)]
        for stream in streams:
            assert [c async for c in stream][-1].choices[0].finish_reason == "length"
        assert picked[1][1] == 1, "the second request arrived while the first was in flight"
        assert picked[0][0] != picked[1][0], "two concurrent requests went to the two workers"
    finally:
        await running.runner.cleanup()


def test_router_process_drains_on_sigterm(colocated: list[WorkerProcess], tmp_path: Path) -> None:
    ip = f"{random_block()}.9"
    log = tmp_path / "router.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "disaggserve_worker.cli", "router", "--model", MODEL, "--model-name", SERVED,
         "--host", ip, "--port", "8000", "--colocated-endpoints", ",".join(w.url for w in colocated)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://{ip}:8000"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        # Long enough to be in flight when readiness is checked 0.3 s after SIGTERM: 200 tokens
        # took longer than that once, but no longer with the CPU kernels (the router had drained
        # and exited, and /readyz refused the connection instead of answering 503).
        stream = client.completions.create(model=SERVED, prompt="Hi", max_tokens=1500, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/readyz", timeout=2)
        assert info.value.code == 503
        assert [c for c in stream][-1].choices[0].finish_reason == "length"  # the in-flight one finishes
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
