"""`disaggserve plan`: what the planner would deploy for a resource, and why, without a cluster.

Exit codes: 0 a plan, 1 no plan is possible (the reason says why, with numbers), 2 bad input
(missing file, bad YAML, invalid spec, bad --cluster). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from disaggserve.api.files import ResourceFileError, load_resource, read_yaml_documents
from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import WORKER_MAX_TENSOR_PARALLEL, max_tensor_parallel
from disaggserve.planner.auto import PlanOutcome, plan_automatically
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.hook import manual_plan
from disaggserve.planner.workload import WorkloadError, load_trace
from disaggserve.topology import TopologyError, parse_cluster, synthetic_nodes


class InputError(Exception):
    """Bad command-line input: exit code 2."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="plan GPUs, parallelism and placement for a DisaggServe resource", description=__doc__
    )
    p.add_argument("-f", "--filename", required=True, help="DisaggServe resource (YAML), or just its spec")
    p.add_argument("--profile", help="latency profile JSON (worker `profile` output) or a ConfigMap YAML holding it")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--nodes", help="Node objects (YAML/JSON: a List, a list, or several documents)")
    where.add_argument("--cluster", help="a described cluster NODESxGPUS, e.g. 4x8 (GPU type from spec.hardware)")
    p.add_argument("--rate", type=float, help="requests per second (default: spec.workload.requestRate)")
    p.add_argument("--trace", help="JSONL of {input_tokens, output_tokens}: lengths from a real trace")
    p.add_argument("--output", choices=("table", "json"), default="table")
    p.add_argument("--plot", help="write attainment vs rate for the plan and the colocated baseline (PNG)")
    p.add_argument(
        "--max-tensor",
        type=int,
        choices=(1, 2, 4, 8),
        default=8,
        help=f"largest tensor-parallel size to consider (default {WORKER_MAX_TENSOR_PARALLEL}, what the operator "
        "plans with on GPUs; a CPU worker runs size 1)",
    )
    p.set_defaults(func=run)


def _read_yaml(path: str, what: str) -> list[Any]:
    try:
        return read_yaml_documents(path, what)
    except ResourceFileError as e:
        raise InputError(str(e)) from None


def load_spec(path: str) -> DisaggServeSpec:
    try:
        return load_resource(path, allow_bare_spec=True).spec
    except ResourceFileError as e:
        raise InputError(str(e)) from None


def load_nodes(path: str) -> list[dict[str, Any]]:
    docs = _read_yaml(path, "nodes")
    nodes: list[dict[str, Any]] = []
    for d in docs:
        if isinstance(d, list):
            nodes.extend(d)
        elif isinstance(d, dict) and "items" in d:
            nodes.extend(d["items"] or [])
        elif isinstance(d, dict):
            nodes.append(d)
    bad = [n for n in nodes if not isinstance(n, dict) or n.get("kind", "Node") != "Node"]
    if bad:
        raise InputError(f"nodes {path}: expected Node objects (kubectl get nodes -o yaml), found {bad[0]!r:.80}")
    return nodes


def load_profile_doc(path: str) -> dict[str, Any]:
    docs = _read_yaml(path, "profile")
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise InputError(f"profile {path}: expected one JSON object (or a ConfigMap holding it)")
    return docs[0]


def outcome_facts(o: PlanOutcome) -> dict[str, Any]:
    """The JSON output: stable keys (documented in the issue), safe for scripts."""
    plan = o.plan
    base = o.baseline
    ratio = (
        plan.predicted_goodput_per_gpu / base.goodput_per_gpu
        if base and base.goodput_per_gpu and plan.predicted_goodput_per_gpu
        else None
    )
    return {
        "placement": plan.placement,
        "placement_reason": o.placement_why,
        "prefill": _phase(plan, "prefill"),
        "decode": _phase(plan, "decode"),
        "colocated": _phase(plan, "colocated") if plan.colocated else None,
        "disaggregated_goodput_per_gpu": plan.disaggregated_goodput_per_gpu,
        "units": plan.units,
        "gpus_total": plan.gpus_total,
        "rate": o.rate,
        "goodput_per_gpu": plan.predicted_goodput_per_gpu,
        "predicted": plan.predicted.model_dump() if plan.predicted else None,
        "baseline_colocated": None
        if base is None
        else {
            "tensor": base.shape.tensor,
            "pipeline": base.shape.pipeline,
            "instances": base.instances,
            "goodput_per_gpu": round(base.goodput_per_gpu, 4),
        },
        "ratio_vs_colocated": round(ratio, 3) if ratio else None,
        "scaling_limited": plan.scaling_limited.model_dump() if plan.scaling_limited else None,
        "alternatives": o.alternatives,
        "profile": o.profile_source,
        "estimated": o.estimated,
        "search": {
            "configs": o.stats.simulated,
            "pruned": o.stats.pruned_bound + o.stats.pruned_zero_load,
            "simulations": o.stats.probes,
            "seconds": round(o.seconds, 3),
        },
        "reason": plan.reason,
    }


def _phase(plan: Plan, phase: str) -> dict[str, int]:
    p = plan.phase(phase)  # type: ignore[arg-type]
    return {"tensor": p.tensor, "pipeline": p.pipeline, "replicas": p.replicas, "gpus": p.gpus}


def _print_table(facts: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"DisaggServe plan: {facts['placement']} ({facts['placement_reason']})")
    for col in ("phase", "tensor", "pipeline", "replicas", "GPUs"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for phase in ("colocated",) if facts.get("colocated") else ("prefill", "decode"):
        p = facts[phase]
        table.add_row(phase, str(p["tensor"]), str(p["pipeline"]), str(p["replicas"]), str(p["gpus"]))
    table.add_row("total", "", "", f"{facts['units']} unit(s)", str(facts["gpus_total"]))
    console.print(table)
    pred = facts["predicted"] or {}
    if pred:
        console.print(
            f"predicted at {facts['rate']:g} rps: TTFT p90 {pred['ttft_p90_ms']:.1f} ms, TPOT p90 "
            f"{pred['tpot_p90_ms']:.1f} ms, attainment {pred['attainment']:.1%}"
        )
    if facts["goodput_per_gpu"] is not None:
        line = f"goodput per GPU: {facts['goodput_per_gpu']:.3g} rps"
        base = facts["baseline_colocated"]
        if base:
            line += (
                f"; colocated baseline (tp{base['tensor']}·pp{base['pipeline']} × {base['instances']}): "
                f"{base['goodput_per_gpu']:.3g} rps/GPU; ratio {facts['ratio_vs_colocated']}×"
            )
        console.print(line)
    if facts.get("scaling_limited"):
        console.print(f"[yellow]ScalingLimited: {facts['scaling_limited']['message']}[/yellow]")
    if facts.get("alternatives"):
        console.print("next best: " + "; ".join(facts["alternatives"]))
    s = facts.get("search")
    if s:
        console.print(
            f"search: {s['configs']} configurations simulated, {s['pruned']} pruned, "
            f"{s['simulations']} simulations, {s['seconds']:.2f} s; profile: {facts['profile']}"
        )
    console.print(f"why: {facts['reason']}")


def plot_attainment(o: PlanOutcome, path: str) -> None:
    """Attainment vs rate for the planned deployment and the colocated baseline deployment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from disaggserve.planner.simulator import simulate_colocated

    s = o.searcher
    top = max(o.deployment.goodput(s), o.rate) * 1.6
    rates = np.linspace(top / 20, top, 16)
    slo = s.slo
    planned = [o.deployment.simulate(s, float(r)).attainment(slo.ttft_ms, slo.tpot_ms) for r in rates]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(rates, planned, marker="o", label=f"plan ({o.plan.gpus_total} GPUs, {o.plan.placement})")
    if o.baseline:
        b = o.baseline
        lat = s.latency(b.shape, colocated=True)
        base = [
            simulate_colocated(s.requests_for(float(r)), float(r), lat, s.capacity_tokens(b.shape), b.instances)
            .after_warmup(0.2)
            .attainment(slo.ttft_ms, slo.tpot_ms)
            for r in rates
        ]
        ax.plot(
            rates, base, marker="s", label=f"colocated {b.shape} × {b.instances} ({b.instances * b.shape.gpus} GPUs)"
        )
    ax.axhline(slo.attainment, color="grey", linestyle="--", label=f"target {slo.attainment:.0%}")
    ax.axvline(o.rate, color="grey", linestyle=":", label=f"planned rate {o.rate:g} rps")
    ax.set_xlabel("request rate (rps)")
    ax.set_ylabel("SLO attainment (TTFT and TPOT)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.filename)
        nodes = None
        if args.nodes:
            nodes = load_nodes(args.nodes)
        elif args.cluster:
            count, gpus = parse_cluster(args.cluster)
            nodes = synthetic_nodes(
                count,
                gpus,
                product=spec.hardware.gpu_product,
                memory_gib=spec.hardware.gpu_memory_gib,
                cross_gbps=spec.hardware.cross_node_gbps,
            )
        profile = load_profile_doc(args.profile) if args.profile else None
        lengths = load_trace(args.trace) if args.trace else None
        if args.rate is not None and args.rate <= 0:
            raise InputError(f"--rate {args.rate:g}: must be a positive number of requests per second")
    except (InputError, TopologyError, WorkloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if spec.parallelism is not None:
        plan = manual_plan(spec)
        if args.output == "json":
            print(
                json.dumps(
                    {
                        "placement": plan.placement,
                        "prefill": _phase(plan, "prefill"),
                        "decode": _phase(plan, "decode"),
        "colocated": _phase(plan, "colocated") if plan.colocated else None,
        "disaggregated_goodput_per_gpu": plan.disaggregated_goodput_per_gpu,
                        "units": plan.units,
                        "gpus_total": plan.gpus_total,
                        "reason": plan.reason,
                    },
                    indent=2,
                )
            )
        else:
            print(plan.reason)
        return 0
    try:
        outcome = plan_automatically(
            spec, nodes=nodes, profile=profile, rate=args.rate, lengths=lengths, max_tensor=args.max_tensor
        )
    except PlanningError as e:
        print(f"error: {e.reason}: {e}", file=sys.stderr)
        return 1
    except TopologyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    facts = outcome_facts(outcome)
    worker_max = max_tensor_parallel(spec.hardware.device)
    facts["deployable_by_operator"] = max(outcome.plan.prefill.tensor, outcome.plan.decode.tensor) <= worker_max
    if not facts["deployable_by_operator"] and args.output != "json":
        print(
            f"note: this plan uses tensor parallelism; a {spec.hardware.device.upper()} worker runs tensor size "
            f"{worker_max}, so the operator plans with --max-tensor {worker_max}",
            file=sys.stderr,
        )
    if args.output == "json":
        print(json.dumps(facts, indent=2, ensure_ascii=False))
    else:
        _print_table(facts)
    if args.plot:
        plot_attainment(outcome, args.plot)
    return 0
