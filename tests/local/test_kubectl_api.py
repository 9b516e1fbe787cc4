"""What kubectl and the official `kubernetes` client need from the local API: a supported
version, discovery without ambiguous subresources, `/openapi/v3` (kubectl's validation),
`pods/log`, and pod statuses with every field a kubelet sets."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from kubernetes.client import V1Pod

from disaggserve.api.crd import build_crd
from disaggserve.local.apiserver import serve_api, write_kubeconfig
from disaggserve.local.podlogs import last_line, read_log, start_line
from disaggserve.local.pods import container_status, qos_class
from e2e_tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
PODS = "/api/v1/namespaces/default/pods"


@pytest.fixture
async def api():
    async with serve_api(crds=[build_crd()]) as (server, url), httpx.AsyncClient(base_url=url) as client:
        client.server = server  # type: ignore[attr-defined]
        client.url = url  # type: ignore[attr-defined]
        yield client


async def test_reports_a_supported_kubernetes_version(api):
    version = (await api.get("/version")).json()
    assert (int(version["major"]), int(version["minor"])) >= (1, 28)
    assert version["gitVersion"].startswith(f"v{version['major']}.{version['minor']}.")


async def test_subresources_carry_no_categories_or_short_names(api):
    """kubectl expands `get all` through categories and resolves short names: subresources must not match."""
    apps = (await api.get("/apis/apps/v1")).json()["resources"]
    deployments = next(r for r in apps if r["name"] == "deployments")
    assert "all" in deployments["categories"] and "deploy" in deployments["shortNames"]
    for sub in (r for r in apps if "/" in r["name"]):
        assert sub["categories"] == [] and sub["shortNames"] == [], sub["name"]


async def test_openapi_v3_advertises_server_side_field_validation_for_every_kind(api):
    index = (await api.get("/openapi/v3")).json()["paths"]
    assert {"api/v1", "apis/apps/v1", "apis/disaggserve.io/v1alpha1"} <= set(index)
    url = index["apis/disaggserve.io/v1alpha1"]["serverRelativeURL"]
    assert url.startswith("/openapi/v3/apis/disaggserve.io/v1alpha1?hash=")
    doc = (await api.get(url)).json()
    patch = doc["paths"]["/apis/disaggserve.io/v1alpha1/namespaces/{namespace}/disaggserves/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {
        "group": "disaggserve.io",
        "version": "v1alpha1",
        "kind": "DisaggServe",
    }
    assert any(p["name"] == "fieldValidation" and p["in"] == "query" for p in patch["parameters"])
    # kubectl must not compute strategic merge patches: this API applies them as merge patches
    assert "application/strategic-merge-patch+json" not in patch["requestBody"]["content"]
    schema = doc["components"]["schemas"]["io.disaggserve.v1alpha1.DisaggServe"]
    assert schema["properties"]["spec"]["required"], "the CRD schema is served for `kubectl explain`"
    core = (await api.get(index["api/v1"]["serverRelativeURL"])).json()
    assert "/api/v1/namespaces/{namespace}/pods/{name}" in core["paths"]
    assert (await api.get("/openapi/v3/apis/nothing/v1")).status_code == 404


async def test_kubectl_applies_with_validation_and_the_server_refuses_unknown_fields(api, tmp_path):
    kubectl = require_tool("kubectl")
    env = {**os.environ, "KUBECONFIG": str(write_kubeconfig(api.url, tmp_path / "kubeconfig"))}
    env["KUBECACHEDIR"] = str(tmp_path / "cache")

    async def run(*args: str) -> subprocess.CompletedProcess[str]:  # in a thread: the API serves on this loop
        return await asyncio.to_thread(
            subprocess.run, [kubectl, *args], env=env, capture_output=True, text=True, timeout=120
        )

    applied = await run("apply", "-f", str(ROOT / "examples" / "tiny-cpu.yaml"))
    assert applied.returncode == 0, applied.stderr
    assert "created" in applied.stdout
    again = await run("apply", "-f", str(ROOT / "examples" / "tiny-cpu.yaml"))
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stdout + again.stderr
    bad = (ROOT / "examples" / "tiny-cpu.yaml").read_text().replace("  slo:", "  slos: {}\n  slo:")
    (tmp_path / "bad.yaml").write_text(bad)
    refused = await run("apply", "-f", str(tmp_path / "bad.yaml"))
    assert refused.returncode != 0
    assert "slos" in refused.stderr, refused.stderr


async def test_pod_log_serves_the_current_and_previous_run(api, tmp_path):
    api.server.log_dir = tmp_path
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
    await api.post(PODS, json=pod)
    missing = await api.get(f"{PODS}/p/log")
    assert missing.status_code == 400 and "no logs yet" in missing.json()["message"]
    (tmp_path / "default_p.log").write_text(
        start_line("t0", ["worker"]) + "one\ncrashed: no model\n" + start_line("t1", ["worker"]) + "a\nb\nc\n"
    )
    assert (await api.get(f"{PODS}/p/log")).text == "a\nb\nc\n"
    assert (await api.get(f"{PODS}/p/log", params={"tailLines": "2"})).text == "b\nc\n"
    assert (await api.get(f"{PODS}/p/log", params={"previous": "true"})).text == "one\ncrashed: no model\n"
    assert (await api.get(f"{PODS}/nope/log")).status_code == 404


def test_log_runs_and_last_line(tmp_path):
    log = tmp_path / "x.log"
    assert read_log(log) == (None, 0) and last_line(log) is None
    log.write_text(start_line("t0", ["a"]) + "Traceback\nValueError: bad model\n\n" + start_line("t1", ["a"]))
    assert last_line(log, previous=True) == "ValueError: bad model"
    assert read_log(log)[0] == "" and last_line(log) is None
    assert read_log(log, previous=True, tail_lines=0)[0] == ""


def test_pod_status_is_readable_by_the_official_client():
    container = {"name": "worker", "image": "ghcr.io/x/worker:1", "resources": {"requests": {"cpu": "1"}}}
    spec = {"containers": [container]}
    running = container_status(
        container,
        ready=True,
        restarts=1,
        pid=42,
        started_at="2026-01-01T00:00:00Z",
        last_exit=(-9, "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "killed"),
    )
    waiting = container_status(container, ready=False, restarts=0, pid=None, started_at="", last_exit=None)
    crashed = container_status(
        container,
        ready=False,
        restarts=3,
        pid=None,
        started_at="",
        last_exit=(1, "2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "OSError: no model"),
    )
    for status in (running, waiting, crashed):
        pod = V1Pod.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default"},
                "spec": spec,
                "status": {"phase": "Running", "qosClass": qos_class(spec), "containerStatuses": [status]},
            }
        )
        assert pod.status.container_statuses[0].image == "ghcr.io/x/worker:1"
    assert running["lastState"]["terminated"]["exitCode"] == 137
    assert crashed["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert crashed["lastState"]["terminated"]["message"] == "OSError: no model"
    assert qos_class(spec) == "Burstable" and qos_class({"containers": [{"name": "c"}]}) == "BestEffort"
    limited = {"cpu": "1", "memory": "1Gi"}
    assert qos_class({"containers": [{"name": "c", "resources": {"limits": limited}}]}) == "Guaranteed"


async def test_pod_log_follow_streams_until_the_process_restarts(api, tmp_path):
    api.server.log_dir = tmp_path
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "f"}, "spec": {"containers": [{"name": "c"}]}}
    await api.post(PODS, json=pod)
    log = tmp_path / "default_f.log"
    log.write_text(start_line("t0", ["w"]) + "first\n")
    seen = ""
    async with api.stream("GET", f"{PODS}/f/log", params={"follow": "true"}, timeout=60) as response:
        async for chunk in response.aiter_text():
            seen += chunk
            if seen == "first\n":
                with log.open("a") as f:
                    f.write("second\n" + start_line("t1", ["w"]) + "next run\n")
    assert seen == "first\nsecond\n", "follow ends where the next run of the process starts"
