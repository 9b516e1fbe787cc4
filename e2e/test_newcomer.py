"""The newcomer's path: the README's quick-start commands, run as a user runs them.

`disaggserve up` runs as its own process in a fresh folder (its output redirected, as in CI),
then the commands the README shows: `kubectl apply -f examples/tiny-cpu.yaml` with validation
on, `kubectl get all`, `kubectl logs`, `disaggserve status`, the `openai` example exactly as
`up` printed it, the official `kubernetes` client reading every kind the operator creates, and
`disaggserve plan -f examples/<each>.yaml --plot`. Then SIGTERM to `up` must leave no process.

The quick start's install step is not repeated: the tools come from the venv this suite runs in
(`scripts/test` installs the same extras). The only departure from the README's commands:
`--api-port` and `--port` are free ports, because a shared CI machine may already use the
defaults (6443, 8000).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_tools import ROOT, require_tool, tool

pytestmark = pytest.mark.timeout(900)
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def disaggserve() -> list[str]:
    found = tool("disaggserve")
    return [found] if found else [sys.executable, "-m", "disaggserve.cli"]


class Up:
    """A `disaggserve up` process and the folder it runs in."""

    def __init__(self, folder: Path, *args: str):
        self.folder = folder
        self.api_port, self.port = free_port(), free_port()
        self.out = folder / "up.out"
        self.env = {**os.environ, "KUBECONFIG": str(folder / ".disaggserve" / "kubeconfig")}
        self.env["KUBECACHEDIR"] = str(folder / "kube-cache")
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [*disaggserve(), "up", "--api-port", str(self.api_port), "--port", str(self.port), *args],
                cwd=folder,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 420) -> re.Match[str]:
        """Poll the output (generous timeout: this is about behaviour, not speed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output(), re.MULTILINE)
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"`disaggserve up` never printed {pattern!r}; its output:\n{self.output()}")

    def run(self, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout)

    def children(self) -> list[int]:
        """Every process `up` started (the operator and the pods), from /proc."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def up(tmp_path_factory) -> Iterator[Up]:
    require_tool("kubectl")
    started = Up(tmp_path_factory.mktemp("newcomer"))
    try:
        started.wait_for(r"^tiny is ready: ")
        # The last line of the ready block: the tests read what comes between (a test read the
        # output between "ready" and the lines after it once, and missed them).
        started.wait_for(r"^Press Ctrl-C")
        yield started
    finally:
        started.stop()


def test_up_prints_a_fixed_local_endpoint_and_progress_when_redirected(up):
    text = up.output()
    assert f"tiny is ready: http://127.0.0.1:{up.port}/v1" in text
    assert "tiny: phase Deploying" in text, "progress lines are printed when the output is not a terminal"
    assert "random weights" in text, "the built-in model's random output is explained up front"


def test_kubectl_apply_with_validation_get_all_and_logs(up):
    kubectl = require_tool("kubectl")
    version = up.run(kubectl, "version")
    assert version.returncode == 0 and "Server Version: v1.31" in version.stdout, version.stdout + version.stderr
    applied = up.run(kubectl, "apply", "-f", str(ROOT / "examples" / "tiny-cpu.yaml"))
    assert applied.returncode == 0, applied.stderr
    assert "disaggserve.disaggserve.io/tiny" in applied.stdout
    assert "Warning" not in applied.stderr, applied.stderr
    everything = up.run(kubectl, "get", "all")
    assert everything.returncode == 0, everything.stderr
    for name in (
        "pod/tiny-decode-0",
        "service/tiny-router",
        "deployment.apps/tiny-router",
        "statefulset.apps/tiny-prefill",
    ):
        assert name in everything.stdout, everything.stdout
    short = up.run(kubectl, "get", "dsv,deploy,svc,sts")
    assert short.returncode == 0 and "tiny-router" in short.stdout, short.stderr
    assert "Warning" not in short.stderr, short.stderr
    logs = up.run(kubectl, "logs", "tiny-decode-0")
    assert logs.returncode == 0 and "serving builtin:tiny-llama as decode" in logs.stdout, logs.stderr
    router_logs = up.run(kubectl, "logs", "deploy/tiny-router", "--tail", "5")
    assert router_logs.returncode == 0 and router_logs.stdout.strip(), router_logs.stderr


def test_the_printed_openai_example_works(up):
    line = next(
        (x.strip() for x in up.output().splitlines() if "from openai import OpenAI" in x),
        None,
    )
    assert line, up.output()
    done = subprocess.run(line, shell=True, cwd=up.folder, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the completion printed nothing"


def test_status_shows_the_local_endpoint(up):
    shown = up.run(*disaggserve(), "status")
    assert shown.returncode == 0, shown.stderr
    assert "phase Ready" in shown.stdout
    assert f"http://127.0.0.1:{up.port}/v1" in shown.stdout


def test_the_kubernetes_client_reads_every_kind_the_operator_creates(up):
    import kubernetes

    client = kubernetes.config.new_client_from_config(config_file=up.env["KUBECONFIG"])
    core, apps = kubernetes.client.CoreV1Api(client), kubernetes.client.AppsV1Api(client)
    rbac, policy = kubernetes.client.RbacAuthorizationV1Api(client), kubernetes.client.PolicyV1Api(client)
    networking = kubernetes.client.NetworkingV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    namespaced = {
        "Pod": (core.list_namespaced_pod, core.read_namespaced_pod),
        "Service": (core.list_namespaced_service, core.read_namespaced_service),
        "ConfigMap": (core.list_namespaced_config_map, core.read_namespaced_config_map),
        "Secret": (core.list_namespaced_secret, core.read_namespaced_secret),
        "NetworkPolicy": (networking.list_namespaced_network_policy, networking.read_namespaced_network_policy),
        "ServiceAccount": (core.list_namespaced_service_account, core.read_namespaced_service_account),
        "Event": (core.list_namespaced_event, core.read_namespaced_event),
        "StatefulSet": (apps.list_namespaced_stateful_set, apps.read_namespaced_stateful_set),
        "Deployment": (apps.list_namespaced_deployment, apps.read_namespaced_deployment),
        "Role": (rbac.list_namespaced_role, rbac.read_namespaced_role),
        "RoleBinding": (rbac.list_namespaced_role_binding, rbac.read_namespaced_role_binding),
        "PodDisruptionBudget": (
            policy.list_namespaced_pod_disruption_budget,
            policy.read_namespaced_pod_disruption_budget,
        ),
    }
    rendered = up.run(*disaggserve(), "render", "-f", str(ROOT / "examples" / "tiny-cpu.yaml"))
    assert rendered.returncode == 0, rendered.stderr
    kinds = set(re.findall(r"^kind: (\w+)$", rendered.stdout, re.MULTILINE))
    assert kinds and kinds <= set(namespaced), f"add the new kinds to this test: {kinds - set(namespaced)}"
    for kind, (list_fn, read_fn) in namespaced.items():
        items = list_fn("default").items
        if kind in kinds or kind in ("Pod", "Event"):
            assert items, f"no {kind} in the cluster"
        for item in items:
            assert read_fn(item.metadata.name, "default").metadata.uid == item.metadata.uid
    for pod in core.list_namespaced_pod("default").items:
        status = pod.status.container_statuses[0]
        assert status.image and status.image_id and status.container_id and status.ready
    assert [n.metadata.name for n in core.list_node().items]
    assert core.read_namespaced_pod_log("tiny-prefill-0", "default", tail_lines=50)
    resource = custom.get_namespaced_custom_object("disaggserve.io", "v1alpha1", "default", "disaggserves", "tiny")
    assert resource["status"]["phase"] == "Ready"


# Examples that only `disaggserve up` can run (it converts their builtin model; the example says so).
UP_ONLY = {"vllm-tiny-cpu.yaml"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_plan_plots_every_example(example, tmp_path):
    png = tmp_path / "p.png"
    done = subprocess.run(
        [*disaggserve(), "plan", "-f", str(example), "--plot", str(png)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if example.name in UP_ONLY:
        # builtin tiny-llama on vLLM exists only once `up` has written it as a checkpoint folder:
        # the file itself is refused, and the message must say where it runs.
        assert done.returncode != 0 and "disaggserve up" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_up_restarts_a_killed_operator_and_sigterm_stops_every_process(up):
    import kubernetes

    operator = next(
        (p for p in up.children() if b"operator" in Path(f"/proc/{p}/cmdline").read_bytes()),
        None,
    )
    assert operator is not None, "the operator runs as a child of `up`"
    os.kill(operator, signal.SIGKILL)
    up.wait_for(r"the operator exited with -9; restarting it")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        restarted = [p for p in up.children() if b"operator" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if restarted:
            break
        time.sleep(0.5)
    assert restarted and operator not in restarted

    client = kubernetes.config.new_client_from_config(config_file=up.env["KUBECONFIG"])
    pods = kubernetes.client.CoreV1Api(client).list_namespaced_pod("default").items
    pids = {int(p.status.container_statuses[0].container_id.rsplit("/", 1)[1]) for p in pods}
    pids |= set(up.children())
    assert pids and all(alive(p) for p in pids)
    up.stop()
    assert up.proc.returncode == 0, up.output()
    assert not [p for p in pids if alive(p)], "processes outlived `disaggserve up`"


def test_up_says_why_a_model_cannot_start(tmp_path):
    require_tool("kubectl")
    resource = (ROOT / "examples" / "tiny-cpu.yaml").read_text()
    resource = resource.replace("source: {builtin: tiny-llama}", "source: {path: /nonexistent/model}")
    (tmp_path / "broken.yaml").write_text(resource)
    failed = Up(tmp_path, "-f", "broken.yaml")
    try:
        failed.proc.wait(600)
    finally:
        failed.stop()
    text = failed.output()
    assert failed.proc.returncode == 1, text
    assert "keeps failing to start" in text and "/nonexistent/model" in text, text
    assert "full log: .disaggserve/logs/" in text
