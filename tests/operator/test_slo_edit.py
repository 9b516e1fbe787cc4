"""Editing the SLOs restarts no worker (issue 16 item 3): worker pod templates carry no SLO, so
the StatefulSets do not change at all; the autoscaler reads the SLO from the spec at every tick
and judges the measured latencies against the new value at its next tick."""

from __future__ import annotations

import httpx

from disaggserve.controller.autoscaler import Autoscaler
from helpers import GROUP, OneRouter, create, example, patch_spec, router_metrics, wait_for

NS = "default"
WORKERS = ("tiny-prefill", "tiny-decode")


async def test_an_slo_edit_changes_no_worker_statefulset(apiserver, operator):
    assert (await create(apiserver.url, example())).status_code == 201
    await wait_for(lambda: all(apiserver.get("apps", "statefulsets", NS, n) for n in WORKERS), message="workers")
    await wait_for(lambda: apiserver.get("apps", "deployments", NS, "tiny-router"), message="router")
    before = {n: apiserver.get("apps", "statefulsets", NS, n) for n in WORKERS}
    r = await patch_spec(apiserver.url, "tiny", {"slo": {"tpotMs": 40, "ttftMs": 300}})
    assert r.status_code == 200, r.text
    await wait_for(
        lambda: (apiserver.get(GROUP, "disaggserves", NS, "tiny").get("status") or {}).get("observedGeneration") == 2,
        message="the edit reconciled",
    )
    router = apiserver.get("apps", "deployments", NS, "tiny-router")
    router_args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert router_args[router_args.index("--tpot-slo-ms") + 1] == "40"  # the router counts SLO hits itself
    for name in WORKERS:
        after = apiserver.get("apps", "statefulsets", NS, name)
        assert after["metadata"]["uid"] == before[name]["metadata"]["uid"]
        assert after["spec"]["template"] == before[name]["spec"]["template"]
        # Not even written: a StatefulSet whose template is untouched rolls no pod.
        assert after["metadata"]["resourceVersion"] == before[name]["metadata"]["resourceVersion"]


async def test_the_autoscaler_uses_an_edited_slo_at_its_next_tick(monkeypatch):
    served = iter([0, 100, 200, 300])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=router_metrics(next(served)))

    autoscaler = Autoscaler(OneRouter(), http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    seen = []
    observe = autoscaler._observe

    async def spy(spec, namespace, name, tracked):
        observed = await observe(spec, namespace, name, tracked)
        seen.append((spec.slo.tpot_ms, observed.tpot_within_slo))
        return observed

    monkeypatch.setattr(autoscaler, "_observe", spy)
    body = example()
    body["metadata"]["uid"] = "u"
    body["spec"]["autoscaling"] = {"enabled": True, "intervalSeconds": 3600}
    plan = {
        "placement": "high-affinity",
        "prefill": {"tensor": 1, "pipeline": 1, "replicas": 1},
        "decode": {"tensor": 1, "pipeline": 1, "replicas": 1},
        "source": "manual",
    }
    body["status"] = {"plan": plan, "phase": "Ready"}
    emit = lambda *a: None  # noqa: E731
    try:
        body["spec"]["slo"]["tpotMs"] = 100
        assert "MetricsUnavailable" in str(await autoscaler.step(body, emit))  # one scrape is not a window
        await autoscaler.step(body, emit)
        body["spec"]["slo"]["tpotMs"] = 50  # the edit; nothing else changes
        last = await autoscaler.step(body, emit)
    finally:
        await autoscaler.aclose()
    assert [s for s in seen if s[1] is not None] == [(100, 0.9), (50, 0.5)]
    assert last["slo"]["attainment"] == 0.5  # measured by the router's own SLO counter


async def test_slos_are_measured_with_autoscaling_off():
    """status.slo (the ATTAINMENT column) is filled without the autoscaler, which decides nothing."""
    served = iter([0, 100])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=router_metrics(next(served)))

    autoscaler = Autoscaler(OneRouter(), http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    body = example()
    assert not body["spec"].get("autoscaling", {}).get("enabled")
    body["status"] = {
        "phase": "Ready",
        "plan": {
            "prefill": {"tensor": 1, "pipeline": 1, "replicas": 1},
            "decode": {"tensor": 1, "pipeline": 1, "replicas": 1},
        },
    }
    try:
        first = await autoscaler.observe_only(body)
        assert first["conditions"][0]["reason"] == "MetricsUnavailable"  # one scrape is not a window
        body["status"]["conditions"] = first["conditions"]
        second = await autoscaler.observe_only(body)
    finally:
        await autoscaler.aclose()
    assert second["slo"]["attainment"] == 0.5
    assert second["slo"]["tpotP90Ms"] is not None
    available = next(c for c in second["conditions"] if c["type"] == "MetricsAvailable")
    assert available["status"] == "True" and "autoscaling is off" in available["message"]
    assert "plan" not in second  # measured only: no replica decision


async def test_a_router_that_misses_one_scrape_keeps_its_window():
    """A scrape that times out (an overloaded router answers late) is a missing sample, not a
    missing router: the window it already has still gives an observation."""
    answers = iter([0, 100, None, 300])

    def handler(request: httpx.Request) -> httpx.Response:
        served = next(answers)
        if served is None:
            raise httpx.ReadTimeout("the router answered too late", request=request)
        return httpx.Response(200, text=router_metrics(served))

    autoscaler = Autoscaler(OneRouter(), http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    body = example()
    body["status"] = {
        "phase": "Ready",
        "plan": {
            "prefill": {"tensor": 1, "pipeline": 1, "replicas": 1},
            "decode": {"tensor": 1, "pipeline": 1, "replicas": 1},
        },
    }
    available = []
    try:
        for _ in range(4):
            update = await autoscaler.observe_only(body)
            if update is not None:
                body["status"].update(update)
            condition = next(c for c in body["status"]["conditions"] if c["type"] == "MetricsAvailable")
            available.append(condition["status"])
    finally:
        await autoscaler.aclose()
    assert available == ["False", "True", "True", "True"]
