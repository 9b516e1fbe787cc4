"""The autoscaler loop for one resource: observe -> correct the profile -> re-plan -> policy.

Kept free of kopf (the timer in handlers.py calls `step`). State that only smooths decisions
(scrape windows, recent recommendations) lives in memory. After an operator restart the
autoscaler waits one metrics window before it acts again, and it treats the replicas then
running as a fresh recommendation, so a scale-down still waits out the stabilization window.
Both err on the side of holding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import Gauge

from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec, SpecError, parse_spec
from disaggserve.autoscaling.policy import Counts, Decision, Limits, PolicyState, Signals, decide
from disaggserve.contract import LABEL_COMPONENT
from disaggserve.controller.kube import Kube, KubeError
from disaggserve.controller.planning import PlanService
from disaggserve.controller.reconcile import Refused, load_profile, replica_record
from disaggserve.controller.view import ClusterView
from disaggserve.metrics import MetricsUnavailable, Observed
from disaggserve.metrics.observed import KvTransfers
from disaggserve.metrics.promql import PrometheusSource
from disaggserve.metrics.scrape import KvSample, RouterSample, ScrapeWindow, scrape_kv, scrape_router
from disaggserve.planner import PlanningError
from disaggserve.planner.replan import recommend
from disaggserve.status_logic import now as now_text
from disaggserve.status_logic import set_condition

DESIRED_REPLICAS = Gauge(
    "disaggserve_operator_desired_replicas",
    "Instances the operator wants per worker role: prefill, decode or colocated (after autoscaling decisions).",
    ["namespace", "disaggserve", "phase"],
)


@dataclass
class _Tracked:
    window: ScrapeWindow[RouterSample]
    policy: PolicyState = field(default_factory=PolicyState)
    last_decision: float = 0.0
    # The decode workers' KV pulls (the live KV link), kept while autoscaling; None: not scraped.
    kv_window: ScrapeWindow[KvSample] | None = None


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions", [])
    )


class Autoscaler:
    def __init__(
        self,
        kube: Kube,
        http: httpx.AsyncClient | None = None,
        planner: PlanService | None = None,
        view: ClusterView | None = None,
    ):
        self.kube = kube
        self.view = view or ClusterView(kube)  # where the router pods are read
        self.http = http or httpx.AsyncClient(timeout=3.0)
        self.planner = planner or PlanService(isolate=False)
        self.tracked: dict[tuple[str, str], _Tracked] = {}
        self.observers: dict[tuple[str, str], ScrapeWindow] = {}  # SLO windows while autoscaling is off

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _observe(self, spec: DisaggServeSpec, namespace: str, name: str, tracked: _Tracked) -> Observed:
        slo_ttft, slo_tpot = spec.slo.ttft_ms / 1000, spec.slo.tpot_ms / 1000
        source = spec.autoscaling.metrics
        if source.prometheus_url:
            return await PrometheusSource(source.prometheus_url, self.http).observe(
                namespace, name, source.window_seconds, slo_ttft, slo_tpot
            )
        await self._scrape(namespace, name, "router", tracked.window, scrape_router)
        # Scraped on every tick, before the routers' window may say "not enough yet": both windows fill together.
        kv = await self._observe_kv(namespace, name, tracked.kv_window) if tracked.kv_window is not None else None
        return tracked.window.observe(time.monotonic(), slo_ttft, slo_tpot).model_copy(update={"kv": kv})

    async def _scrape(self, namespace: str, name: str, component: str, window: ScrapeWindow[Any],
                      scrape: Callable[[httpx.AsyncClient, str], Awaitable[Any]]) -> None:
        """One scrape of every ready pod of `component` into `window`.

        A pod that does not answer contributes nothing now; staleness is judged by the window. Only a
        pod that is gone loses its samples. One that missed a scrape keeps them: an overloaded router
        answers /metrics late, and dropping its window then read as "no metrics" for two ticks,
        exactly when the autoscaler needs them (a CI run saw MetricsAvailable=False right after an
        overload)."""
        pods = await self.view.pods(namespace, name, {LABEL_COMPONENT: component})
        for pod in pods:
            ip = (pod.get("status") or {}).get("podIP")
            if not ip or not _ready(pod):
                continue
            try:
                window.add(pod["metadata"]["name"], await scrape(self.http, ip))
            except httpx.HTTPError:
                continue
        window.forget_missing({pod["metadata"]["name"] for pod in pods})

    async def _observe_kv(self, namespace: str, name: str, window: ScrapeWindow[KvSample]) -> KvTransfers | None:
        """The decode workers' KV pulls over the window (None when none answered or none pulled): the
        live link the planner's correction uses instead of the profile's (planner/replan.py)."""
        await self._scrape(namespace, name, "decode", window, scrape_kv)
        return window.kv_transfers(time.monotonic())

    async def observe_only(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """With autoscaling off: measure the SLOs anyway (status.slo and MetricsAvailable), decide nothing.

        The spec is read at every call, so an SLO edit is measured against from the next one on.
        """
        meta, status = body["metadata"], dict(body.get("status") or {})
        key = (meta["namespace"], meta["name"])
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError:
            return None
        if spec.autoscaling.enabled or not status.get("plan") or status.get("phase") == "Failed":
            self.observers.pop(key, None)
            return None
        window = self.observers.get(key)
        if window is None:
            window = self.observers[key] = ScrapeWindow(spec.autoscaling.metrics.window_seconds, stale_after=60.0)
        generation = status.get("observedGeneration")
        conditions = list(status.get("conditions") or [])
        try:
            observed = await self._observe(spec, key[0], key[1], _Tracked(window))
        except MetricsUnavailable as e:
            conditions = set_condition(conditions, "MetricsAvailable", False, "MetricsUnavailable", str(e), generation)
            update: dict[str, Any] = {"conditions": conditions}
        else:
            conditions = set_condition(
                conditions,
                "MetricsAvailable",
                True,
                "MetricsFresh",
                f"{observed.source}: {observed.requests:.0f} requests in {observed.window_seconds:.0f}s "
                "(autoscaling is off: measured only)",
                generation,
            )
            update = {"conditions": conditions, **self._slo(observed)}
        if all(status.get(k) == v for k, v in update.items()):
            return None
        return update

    async def step(self, body: Mapping[str, Any], emit: Any) -> dict[str, Any] | None:
        """One tick: returns the status patch to write (with a new plan when replicas change), or None."""
        meta, status = body["metadata"], dict(body.get("status") or {})
        namespace, name = meta["namespace"], meta["name"]
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError:
            return None
        record = replica_record(body)
        if not spec.autoscaling.enabled or not record or status.get("phase") == "Failed":
            self.tracked.pop((namespace, name), None)
            return None
        scaling = spec.autoscaling
        plan = Plan.model_validate(record)
        tracked = self.tracked.get((namespace, name))
        if tracked is None:
            stale_after = max(3.0 * scaling.interval_seconds, 30)
            tracked = self.tracked[(namespace, name)] = _Tracked(
                ScrapeWindow(scaling.metrics.window_seconds, stale_after),
                PolicyState.starting_at(Counts.of(plan), time.monotonic()),
                kv_window=ScrapeWindow(scaling.metrics.window_seconds, stale_after),
            )
        conditions = list(status.get("conditions") or [])
        generation = status.get("observedGeneration")
        try:
            observed: Observed | None = await self._observe(spec, namespace, name, tracked)
            conditions = set_condition(
                conditions,
                "MetricsAvailable",
                True,
                "MetricsFresh",
                f"{observed.source}: {observed.requests:.0f} requests in {observed.window_seconds:.0f}s",
                generation,
            )
        except MetricsUnavailable as e:
            observed = None
            conditions = set_condition(conditions, "MetricsAvailable", False, "MetricsUnavailable", str(e), generation)
        now = time.monotonic()
        if now - tracked.last_decision < scaling.interval_seconds:
            return {"conditions": conditions, **self._slo(observed)}  # keep observing between decisions
        tracked.last_decision = now
        decision, rec_text = await self._decide(spec, namespace, plan, status, observed, tracked, now)
        conditions = set_condition(
            conditions,
            "ScalingLimited",
            bool(decision.limited),
            "ScalingLimited" if decision.limited else "WithinLimits",
            decision.limited or "replicas within bounds",
            generation,
        )
        patch: dict[str, Any] = {"conditions": conditions, **self._slo(observed)}
        current = Counts.of(plan)
        for role in plan.roles:
            DESIRED_REPLICAS.labels(namespace, name, role).set(decision.counts.get(role))
        if decision.counts != current:
            units = plan.units
            if plan.placement == "low-affinity":
                per_p, per_d = plan.per_unit("prefill"), plan.per_unit("decode")
                units = max(1, math.ceil(decision.counts.prefill / per_p), math.ceil(decision.counts.decode / per_d))
                counts = Counts(units * per_p, units * per_d)
            else:
                counts = decision.counts
            new_plan = plan.model_copy(
                update={
                    **{role: plan.phase(role).model_copy(update={"replicas": counts.get(role)}) for role in plan.roles},
                    "units": units,
                    "source": "autoscaler",
                    "reason": f"autoscaler: {decision.reason}{rec_text}",
                    "updated_at": now_text(),
                }
            )
            patch["plan"] = new_plan.wire()
            emit("Normal", "Scaled", new_plan.reason)
        return patch

    async def _decide(
        self,
        spec: DisaggServeSpec,
        namespace: str,
        plan: Plan,
        status: dict[str, Any],
        observed: Observed | None,
        tracked: _Tracked,
        now: float,
    ) -> tuple[Decision, str]:
        scaling = spec.autoscaling
        current = Counts.of(plan)
        replicas = status.get("replicas") or {}
        rolling = bool(status.get("draining")) or any(
            (replicas.get(r) or {}).get("ready", 0) < (replicas.get(r) or {}).get("desired", 0) for r in plan.roles
        )
        recommended, rec_text = current, ""
        if observed is not None:
            # The rate's trend sets the headroom (plan one interval ahead while it rises) and lets a
            # sustained drop scale down early: the policy the autoscale bench measures.
            tracked.policy.observe_rate(now, observed.request_rate)
            try:
                # The spec's own profile: without it a resource planned from a ConfigMap profile
                # had every recommendation refused ("ConfigMap ... was not passed to the planner")
                # and scaled on the SLO signals alone.
                profile = await load_profile(self.kube, spec, namespace)
                # Off the event loop and bounded, like every plan (controller/planning.py).
                rec = await self.planner.run(None, recommend, spec, plan, observed, profile=profile,
                                             growth=tracked.policy.rate_growth())
                scale = rec.correction
                recommended = Counts(rec.prefill, rec.decode, rec.colocated)
                link = (f", KV link {rec.kv_link.gbps:.3g} Gbit/s measured" if rec.kv_link else "")
                rec_text = (
                    f" (planner at {rec.rate:.3g} rps, {observed.mean_input_tokens or 0:.0f}/"
                    f"{observed.mean_output_tokens or 0:.0f} tokens, profile x{scale[0]:.2f}/x{scale[1]:.2f}{link})"
                )
            except (PlanningError, Refused) as e:
                rec_text = f" (planner: {e})"
            except KubeError as e:  # the API server failed the ConfigMap read: plan again next tick
                rec_text = f" (planner: the profile ConfigMap could not be read: {e})"
        gpu = spec.hardware.device == "gpu"
        colocated = plan.colocated.gpus_per_instance if plan.colocated else 0
        limits = Limits(
            min=Counts(scaling.min_replicas.prefill, scaling.min_replicas.decode, scaling.min_colocated),
            max=Counts(scaling.max_replicas.prefill, scaling.max_replicas.decode, scaling.max_colocated),
            gpus_per_instance=Counts(plan.prefill.gpus_per_instance, plan.decode.gpus_per_instance, colocated)
            if gpu
            else Counts(0, 0),
            max_gpus=scaling.max_gpus if gpu else None,
            roles=plan.roles,
        )
        signals = Signals(
            metrics_available=observed is not None,
            rolling_out=rolling,
            attainment=observed.attainment if observed else None,
            target_attainment=spec.slo.attainment,
            ttft_within_slo=observed.ttft_within_slo if observed else None,
            tpot_within_slo=observed.tpot_within_slo if observed else None,
        )
        decision = decide(
            current, recommended, signals, limits, tracked.policy, now, scaling.scale_down_stabilization_seconds
        )
        return decision, rec_text

    @staticmethod
    def _slo(observed: Observed | None) -> dict[str, Any]:
        if observed is None:
            return {}
        return {
            "slo": {
                "ttftP90Ms": observed.ttft_p90_ms,
                "tpotP90Ms": observed.tpot_p90_ms,
                "attainment": observed.attainment,
                "windowSeconds": round(observed.window_seconds),
            }
        }
