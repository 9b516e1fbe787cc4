"""Crash-looping workers are reported (issue 11 item 5): the Ready condition names the pod, its
restart count, the last exit and the last line it logged (lastState.terminated), with an Event,
instead of a bare ReplicasNotReady."""

from __future__ import annotations

import httpx

from disaggserve.resources.names import component_labels
from disaggserve.status_logic import REASON_CRASH_LOOP
from helpers import GROUP, condition, create, example, wait_for

NS = "default"
POD_PATH = "/api/v1/namespaces/default/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}


def crash_looping(restarts: int) -> dict:
    return {
        "phase": "Running",
        "podIP": "10.0.0.7",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [
            {
                "name": "worker",
                "ready": False,
                "restartCount": restarts,
                "image": "ghcr.io/disaggserve/worker:0.1.0",
                "imageID": "",
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "reason": "Error",
                        "message": "loading /nonexistent/model\n"
                        "FileNotFoundError: /nonexistent/model has no config.json\n",
                    }
                },
            }
        ],
    }


async def test_a_crash_looping_worker_is_reported_with_its_last_log_line_and_an_event(apiserver, operator):
    assert (await create(apiserver.url, example())).status_code == 201
    await wait_for(lambda: apiserver.get("apps", "statefulsets", NS, "tiny-decode"), message="workers")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "tiny-decode-0", "namespace": NS, "labels": component_labels("tiny", "decode")},
        "spec": {"containers": [{"name": "worker", "image": "ghcr.io/disaggserve/worker:0.1.0"}]},
    }
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        assert (await client.post(POD_PATH, json=pod)).status_code in (200, 201)
        r = await client.patch(f"{POD_PATH}/tiny-decode-0/status", json={"status": crash_looping(4)}, headers=MERGE)
        assert r.status_code == 200, r.text
    cr = lambda: apiserver.get(GROUP, "disaggserves", NS, "tiny")  # noqa: E731
    ready = await wait_for(
        lambda: (c := condition(cr(), "Ready")) and c["reason"] == REASON_CRASH_LOOP and c, message="crash loop"
    )
    assert ready["status"] == "False"
    message = ready["message"]
    assert "tiny-decode-0 restarted 4 times" in message
    assert "CrashLoopBackOff" in message and "last exit code 1 (Error)" in message
    assert "FileNotFoundError: /nonexistent/model has no config.json" in message
    events = lambda: [e for e in apiserver.list("", "events", NS) if e.get("reason") == REASON_CRASH_LOOP]  # noqa: E731
    await wait_for(events, message="a WorkersCrashLooping event")
    assert events()[0]["type"] == "Warning"
    # Another restart: the report follows it.
    async with httpx.AsyncClient(base_url=apiserver.url) as client:
        await client.patch(f"{POD_PATH}/tiny-decode-0/status", json={"status": crash_looping(5)}, headers=MERGE)
    await wait_for(lambda: "restarted 5 times" in condition(cr(), "Ready")["message"], message="the new count")
