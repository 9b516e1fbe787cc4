"""`kubectl disaggserve plan|status` against the test API server, through the real kubernetes client."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rich.console import Console

from disaggserve.kubectl_plugin import main
from helpers import CR_PATH, create, example

STATUS: dict[str, Any] = {
    "observedGeneration": 1,
    "phase": "Ready",
    "conditions": [
        {"type": "Ready", "status": "True", "reason": "Serving", "message": "all replicas ready"},
        {"type": "Planned", "status": "True", "reason": "Planned", "message": "planner: 2 prefill, 3 decode"},
    ],
    "plan": {
        "placement": "low-affinity", "units": 1, "source": "planner",
        "prefill": {"tensor": 2, "pipeline": 1, "replicas": 2},
        "decode": {"tensor": 1, "pipeline": 2, "replicas": 3},
        "predictedGoodputPerGpu": 1.25,
        "predicted": {"ttftP90Ms": 180.0, "tpotP90Ms": 40.0, "attainment": 0.95},
        "reason": "prefill-bound at 10 req/s: tensor 2 halves TTFT",
        "updatedAt": "2026-11-24T01:00:00Z",
    },
    "replicas": {"prefill": {"desired": 2, "ready": 2, "display": "2/2"},
                 "decode": {"desired": 3, "ready": 1, "display": "1/3"}},
    "slo": {"ttftP90Ms": 620.0, "tpotP90Ms": 42.5, "attainment": 0.81, "windowSeconds": 120},
    "endpoint": "http://tiny-router.default.svc:8000/v1",
    "kopf": {"progress": {}},
}


async def _run(*argv: str) -> tuple[int, str]:
    """The plugin is synchronous (kubernetes client); run it off the loop that serves the API."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    code = await asyncio.to_thread(main, list(argv), console)
    return code, buffer.getvalue()


async def _with_status(url: str, status: dict[str, Any] | None = STATUS, namespace: str = "default") -> None:
    resp = await create(url, example(namespace=namespace))
    assert resp.status_code == 201, resp.text
    if status is None:
        return
    async with httpx.AsyncClient(base_url=url) as client:
        resp = await client.patch(f"{CR_PATH.format(ns=namespace)}/tiny/status", json={"status": status},
                                  headers={"Content-Type": "application/merge-patch+json"})
    assert resp.status_code == 200, resp.text


async def test_plan_table(apiserver: Any) -> None:
    await _with_status(apiserver.url)
    code, out = await _run("plan", "tiny", "-n", "default")
    assert code == 0, out
    assert "low-affinity" in out and "source: planner" in out
    prefill = next(line for line in out.splitlines() if "prefill" in line)
    cells = [c.strip() for c in prefill.split("│")[1:-1]]
    assert cells == ["prefill", "2", "1", "2", "2", "4"]  # phase, tensor, pipeline, replicas, GPUs/instance, GPUs
    assert "10 CPU worker(s) in total" in out  # 2 x 2 + 3 x 2 (the fixture is a device: cpu resource)
    assert "prefill-bound at 10 req/s" in out
    assert "TTFT p90 180.0 ms" in out


async def test_plan_json(apiserver: Any) -> None:
    await _with_status(apiserver.url)
    code, out = await _run("plan", "tiny", "-n", "default", "-o", "json")
    assert code == 0
    plan = json.loads(out)
    assert plan["prefill"] == {"tensor": 2, "pipeline": 1, "replicas": 2}
    assert plan["predictedGoodputPerGpu"] == 1.25


async def test_status_table_compares_slo_target_and_measured(apiserver: Any) -> None:
    await _with_status(apiserver.url)
    code, out = await _run("status", "tiny", "-n", "default")
    assert code == 0, out
    assert "default/tiny: phase Ready" in out
    assert "Endpoint: http://tiny-router.default.svc:8000/v1" in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") >= 3}
    # example: ttftMs 500, tpotMs 100, attainment 0.9
    assert rows["TTFT p90"] == ["500.0 ms", "620.0 ms", "NO"]
    assert rows["TPOT p90"] == ["100.0 ms", "42.5 ms", "yes"]
    assert rows["Attainment"] == ["0.900", "0.810", "NO"]
    assert rows["decode"] == ["1", "3"]
    assert rows["Ready"][:2] == ["True", "Serving"]


async def test_status_json(apiserver: Any) -> None:
    await _with_status(apiserver.url)
    code, out = await _run("status", "tiny", "-n", "default", "--output", "json")
    assert code == 0
    data = json.loads(out)
    assert data["replicas"] == {"prefill": {"ready": 2, "desired": 2}, "decode": {"ready": 1, "desired": 3}}
    assert data["slo"]["target"]["ttftMs"] == 500
    assert data["slo"]["measured"]["attainment"] == 0.81
    assert [c["type"] for c in data["conditions"]] == ["Ready", "Planned"]


async def test_namespace_comes_from_the_kubeconfig_context(apiserver: Any, tmp_path: Path) -> None:
    await _with_status(apiserver.url, namespace="team-a")
    config = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())  # the fixture's
    for context in config["contexts"]:
        context["context"]["namespace"] = "team-a"
    path = tmp_path / "kubeconfig-team-a"
    path.write_text(yaml.safe_dump(config))
    code, out = await _run("status", "tiny", "--kubeconfig", str(path), "-o", "json")
    assert code == 0, out
    assert json.loads(out)["namespace"] == "team-a"


async def test_missing_resource_is_a_clear_error(apiserver: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = await _run("status", "nope", "-n", "default")
    assert code == 1
    assert "DisaggServe 'nope' not found in namespace 'default'" in capsys.readouterr().err


async def test_plan_before_reconcile_says_why(apiserver: Any, capsys: pytest.CaptureFixture[str]) -> None:
    await _with_status(apiserver.url, status=None)
    code, _ = await _run("plan", "tiny", "-n", "default")
    assert code == 1
    assert "has no plan yet" in capsys.readouterr().err


async def test_unreadable_kubeconfig_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = await _run("status", "tiny", "--kubeconfig", str(tmp_path / "missing"))
    assert code == 1
    assert "cannot load a Kubernetes configuration" in capsys.readouterr().err


async def test_unreachable_api_server_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    code, _ = await _run("status", "tiny", "--kubeconfig", str(path))
    assert code == 1
    assert f"cannot reach the API server at http://127.0.0.1:{port}" in capsys.readouterr().err


async def test_no_configuration_at_all_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    code, _ = await _run("plan", "tiny")
    assert code == 1
    assert "point $KUBECONFIG at your cluster's kubeconfig" in capsys.readouterr().err


COLOCATED_STATUS: dict[str, Any] = {
    **STATUS,
    "plan": {
        "placement": "colocated", "units": 1, "source": "autoscaler",
        "prefill": {"tensor": 1, "pipeline": 1, "replicas": 0},
        "decode": {"tensor": 1, "pipeline": 1, "replicas": 0},
        "colocated": {"tensor": 2, "pipeline": 1, "replicas": 3},
        "reason": "autoscaler: scale-up: 1 colocated -> 3 colocated",
    },
    "replicas": {"colocated": {"desired": 3, "ready": 2, "display": "2/3"}},
}


async def test_a_colocated_plan_shows_its_colocated_instances(apiserver: Any) -> None:
    await _with_status(apiserver.url, COLOCATED_STATUS)
    code, out = await _run("plan", "tiny", "-n", "default")
    assert code == 0, out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") >= 3}
    assert rows["colocated"] == ["2", "1", "3", "2", "6"] and "prefill" not in rows
    code, out = await _run("status", "tiny", "-n", "default", "--output", "json")
    assert code == 0
    assert json.loads(out)["replicas"] == {"colocated": {"ready": 2, "desired": 3}}
