"""`placement: auto` chooses colocated when the simulator says it needs fewer GPUs, says why with
both goodputs, and the operator renders it as colocated workers behind the same router."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import spec_dict
from disaggserve.api.spec import SpecError, parse_spec
from disaggserve.planner import plan_for
from disaggserve.planner.replan import recommend
from disaggserve.resources import Owner, build_children
from disaggserve.status_logic import readiness, replica_status

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama-3-8b-h100.yaml"


def llama_spec(**over) -> dict:
    """Llama-3-8B on H100 at 20 rps: one colocated GPU carries it, disaggregation needs two."""
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    spec.pop("speculation")
    spec["autoscaling"] = {"enabled": False}
    spec.update(over)
    return spec


def test_auto_chooses_colocated_when_it_needs_fewer_gpus():
    plan = plan_for(parse_spec(llama_spec()))
    assert plan.placement == "colocated"
    assert plan.colocated is not None and plan.colocated.replicas >= 1
    assert plan.prefill.replicas == 0 and plan.decode.replicas == 0
    assert plan.gpus_total == plan.colocated.gpus
    # both goodputs, and the reason says what disaggregation would have needed
    assert plan.predicted_goodput_per_gpu > 0 and plan.disaggregated_goodput_per_gpu > 0
    assert "disaggregated" in plan.reason and "would need" in plan.reason
    assert plan.predicted.attainment >= 0.9


def test_auto_keeps_disaggregation_where_it_wins():
    plan = plan_for(parse_spec(spec_dict()))  # OPT-66B, DistServe's own tables: disaggregation wins
    assert plan.placement in ("high-affinity", "low-affinity") and plan.colocated is None
    assert plan.baseline_goodput_per_gpu > 0


def test_colocated_as_an_explicit_choice():
    plan = plan_for(parse_spec(spec_dict(placement="colocated")))
    assert plan.placement == "colocated" and "requested" in plan.reason
    assert plan.colocated.replicas >= 1


def test_autoscaled_resource_is_planned_colocated_within_the_colocated_bounds():
    """Autoscaling no longer keeps `auto` from choosing colocated; carry_over bounds its count."""
    from disaggserve.planner.replan import carry_over

    spec = parse_spec(llama_spec(autoscaling={"enabled": True, "maxGpus": 32,
                                              "minReplicas": {"prefill": 1, "decode": 1, "colocated": 3}}))
    plan = plan_for(spec)
    assert plan.placement == "colocated" and "would need" in plan.reason
    assert carry_over(plan, None, spec).colocated.replicas == max(3, plan.colocated.replicas)
    # The autoscaler's count survives a re-plan of the same shape.
    scaled = plan.model_copy(update={"colocated": plan.colocated.model_copy(update={"replicas": 7}),
                                     "source": "autoscaler"})
    assert carry_over(plan, scaled.wire(), spec).colocated.replicas == 7


@pytest.mark.parametrize(
    ("over", "words"),
    [
        (
            {"placement": "colocated", "parallelism": {"prefill": {"tensor": 1}, "decode": {"tensor": 1}}},
            "planned automatically",
        ),
    ],
)
def test_colocated_refused_where_it_cannot_work(over, words):
    with pytest.raises(SpecError, match=words):
        parse_spec(spec_dict(**over))


def test_colocated_plan_renders_colocated_workers_behind_the_router():
    spec = parse_spec(llama_spec())
    plan = plan_for(spec)
    objects = build_children(Owner("llama", "ns", None), spec, plan)
    by_kind: dict[str, list[dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    sts = by_kind["StatefulSet"]
    assert [s["metadata"]["name"] for s in sts] == ["llama-colocated"]
    assert sts[0]["spec"]["replicas"] == plan.colocated.replicas
    pod = sts[0]["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "colocated"
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--role") + 1] == "colocated"
    gpus = pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == plan.colocated.gpus_per_instance
    assert [s["metadata"]["name"] for s in by_kind["Service"] if s["spec"].get("clusterIP") == "None"] == [
        "llama-colocated"
    ]
    assert [p["metadata"]["name"] for p in by_kind["PodDisruptionBudget"]] == ["llama-colocated"]
    assert len(by_kind["Deployment"]) == 1  # the same router, which serves colocated workers it discovers


def test_status_counts_colocated_replicas():
    plan = plan_for(parse_spec(llama_spec()))
    n = plan.colocated.replicas
    sts = {
        "kind": "StatefulSet",
        "metadata": {"labels": {"app.kubernetes.io/component": "colocated"}},
        "status": {"readyReplicas": n},
    }
    replicas = replica_status(plan, [sts])
    assert replicas.colocated.desired == n and replicas.colocated.ready == n
    _, phase = readiness([], replicas, (1, 1), 1)
    assert phase == "Ready"
    _, phase = readiness([], replica_status(plan, []), (1, 1), 1)
    assert phase == "Deploying"


def test_autoscaler_resizes_colocated_plans_from_the_measured_rate():
    from disaggserve.metrics import Observed

    spec = parse_spec(llama_spec())
    plan = plan_for(spec)
    counts = []
    for rate in (2.0, 20.0, 60.0):
        observed = Observed(request_rate=rate, source="test", requests=100, window_seconds=60)
        rec = recommend(spec, plan, observed, correct=False)
        assert rec.prefill == 0 and rec.decode == 0
        assert rec.predicted_attainment >= spec.slo.attainment
        counts.append(rec.colocated)
    assert counts[0] >= 1 and counts[0] <= counts[1] < counts[2]
