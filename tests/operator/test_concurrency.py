"""One writer per resource (issue 16 item 2): the three entry points that reconcile — the
spec update handler, the StatefulSet event handler and the autoscaler timer — fired together,
many times, never move replicas away from the autoscaler's latest decision.

The handlers are called directly (as kopf calls them) against the local API server, so the
test decides exactly what runs concurrently: each round starts a scaling decision, a spec
update and a StatefulSet event holding the replica count from before, in one gather. Every
write of the decode StatefulSet is checked against the decision recorded at that moment.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kopf

from disaggserve.api.plan import Plan
from disaggserve.controller import handlers
from disaggserve.controller.kube import Kube
from disaggserve.controller.planning import PlanService
from disaggserve.controller.reconcile import REPLICA_RECORD
from disaggserve.status_logic import now
from helpers import GROUP, create, example

NS, NAME, STS = "default", "tiny", "tiny-decode"
ROUNDS = 25
DECISIONS = [3, 5, 2, 4, 1, 6]  # decode replicas the scripted autoscaler chooses, in turn


class ScriptedAutoscaler:
    """Stands in for the metrics-driven autoscaler: each tick decides the next count of DECISIONS."""

    def __init__(self) -> None:
        self.decided: list[int] = []

    async def step(self, body: dict[str, Any], emit: Any) -> dict[str, Any] | None:
        plan = Plan.model_validate(body["status"]["plan"])
        replicas = DECISIONS[len(self.decided) % len(DECISIONS)]
        self.decided.append(replicas)
        await asyncio.sleep(0)  # let the other entry points interleave
        new = plan.model_copy(
            update={
                "decode": plan.decode.model_copy(update={"replicas": replicas}),
                "source": "autoscaler",
                "reason": f"autoscaler: decision {len(self.decided)}",
                "updated_at": now(),
            }
        )
        return {"plan": new.wire()}

    async def observe_only(self, body: dict[str, Any]) -> None:
        return None

    async def aclose(self) -> None:
        pass


class Spy(Kube):
    """Records, in call order, every decision recorded on the resource and every decode StatefulSet write."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int]] = []

    async def patch(self, api_version, kind, namespace, name, body):  # type: ignore[override]
        result = await super().patch(api_version, kind, namespace, name, body)
        record = ((body.get("metadata") or {}).get("annotations") or {}).get(REPLICA_RECORD)
        if record:
            self.log.append(("decided", json.loads(record)["decode"]["replicas"]))
        return result

    async def apply(self, obj, field_manager="disaggserve"):  # type: ignore[override]
        if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == STS:
            self.log.append(("applied", obj["spec"]["replicas"]))
        return await super().apply(obj, field_manager)


async def test_timer_update_and_statefulset_events_never_undo_the_autoscaler(apiserver, no_events):
    body = example(name=NAME)
    body["spec"]["autoscaling"] = {
        "enabled": True,
        "minReplicas": {"prefill": 1, "decode": 1},
        "maxReplicas": {"prefill": 8, "decode": 8},
    }
    assert (await create(apiserver.url, body)).status_code == 201
    kube = Spy()
    memo = kopf.Memo(kube=kube, planner=PlanService(), locks=handlers.Locks(), autoscaler=ScriptedAutoscaler())
    logger = __import__("logging").getLogger("test")
    try:
        await handlers.reconcile_handler(name=NAME, namespace=NS, memo=memo)
        for round_ in range(ROUNDS):
            stale = apiserver.get("apps", "statefulsets", NS, STS)  # the replicas before this round's decision
            spec_patch = {"spec": {"workload": {"requestRate": 2 + round_ % 3}}}
            await kube.patch(f"{GROUP}/v1alpha1", "DisaggServe", NS, NAME, spec_patch)
            await asyncio.gather(
                handlers.autoscale(name=NAME, namespace=NS, memo=memo, logger=logger),
                handlers.reconcile_handler(name=NAME, namespace=NS, memo=memo),
                handlers.child_changed(
                    event={"type": "MODIFIED", "object": stale},
                    body=stale,
                    namespace=NS,
                    memo=memo,
                    logger=logger,
                ),
            )
            latest = memo.autoscaler.decided[-1]
            assert apiserver.get("apps", "statefulsets", NS, STS)["spec"]["replicas"] == latest, round_
            owner = apiserver.get(GROUP, "disaggserves", NS, NAME)
            assert owner["status"]["plan"]["decode"]["replicas"] == latest
            assert json.loads(owner["metadata"]["annotations"][REPLICA_RECORD])["decode"]["replicas"] == latest
    finally:
        await kube.aclose()
        await memo.planner.aclose()
    # Every write of the StatefulSet carried the decision recorded last before it: none went back.
    decided: int | None = None
    moved_away = []
    for what, replicas in kube.log:
        if what == "decided":
            decided = replicas
        elif decided is not None and replicas != decided:
            moved_away.append((decided, replicas))
    assert len(memo.autoscaler.decided) == ROUNDS
    assert moved_away == [], kube.log
