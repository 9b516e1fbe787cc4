"""The built-in worker (`disaggserve-worker serve`): the embedded default and the planner's reference."""

from __future__ import annotations

from typing import Any

from disaggserve.api.plan import Plan, Role
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import KV_PORT, WORKER_BINARY, WORKER_PORT, worker_args
from disaggserve.resources.engines.base import WorkerContainer
from disaggserve.resources.pods import http_probes

# Decode (and colocated) workers hold streams that are still generating; give them time to finish
# them on scale-down.
GRACE_SECONDS: dict[str, int] = {"prefill": 60, "decode": 180, "colocated": 180}


def _speculation_args(spec: DisaggServeSpec) -> dict[str, str | int]:
    s = spec.speculation
    if s.mode == "off":
        return {}
    args: dict[str, str | int] = {
        "mode": s.mode,
        "proposer": s.proposer,
        "num-speculative-tokens": s.num_speculative_tokens,
        "ngram-min": s.ngram_min,
        "ngram-max": s.ngram_max,
    }
    if s.proposer == "draft" and s.draft_model:
        args["draft-model"] = s.draft_model.worker_arg()
    return args


class BuiltinEngine:
    kind = "builtin"

    def worker(
        self, spec: DisaggServeSpec, plan: Plan, name: str, namespace: str, phase: Role, unit: int | None
    ) -> WorkerContainer:
        phase_plan = plan.phase(phase)
        args = worker_args(
            role=phase,
            model=spec.model.source.worker_arg(),
            model_name=spec.model.name,
            tensor=phase_plan.tensor,
            pipeline=phase_plan.pipeline,
            device="cuda" if spec.hardware.device == "gpu" else "cpu",
            max_model_len=spec.model.max_model_len,
            dtype=spec.model.dtype,
            speculation=_speculation_args(spec) if phase in ("decode", "colocated") else None,
            # The plan's prefill L_m (planner/batching.py); decode and colocated keep the worker's default.
            max_batch_tokens=phase_plan.max_batch_tokens,
        )
        return WorkerContainer(
            image=spec.image.reference,
            pull_policy=spec.image.pull_policy,
            command=[WORKER_BINARY],
            args=args,
            ports=[
                {"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"},
                {"name": "kv", "containerPort": KV_PORT, "protocol": "TCP"},
            ],
            probes=http_probes("http", startup_seconds=1800),
            metrics_port=WORKER_PORT,
            grace_seconds=GRACE_SECONDS[phase],
        )

    def service_ports(self, spec: DisaggServeSpec) -> list[dict[str, Any]]:
        return [
            {"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"},
            {"name": "kv", "port": KV_PORT, "targetPort": "kv", "protocol": "TCP"},
        ]

    def network_objects(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return objects
