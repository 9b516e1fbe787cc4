"""`disaggserve plan`: what the planner would deploy for a resource, and why, without a cluster.

Exit codes: 0 a plan, 1 no plan is possible (the reason says why, with numbers), 2 bad input
(missing file, bad YAML, invalid spec, bad --cluster). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from typing import Any

from disaggserve.api.files import ResourceFileError, load_resource, read_yaml_documents
from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import WORKER_MAX_TENSOR_PARALLEL, max_tensor_parallel
from disaggserve.planner.auto import BASELINE_SIMULATED_INSTANCES, Baseline, PlanOutcome, plan_automatically
from disaggserve.planner.deployment import ColocatedDeployment, Deployment
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.hook import manual_plan
from disaggserve.planner.inputs import build_search
from disaggserve.planner.replan import deployment_of
from disaggserve.planner.search import Searcher
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
    out = {"tensor": p.tensor, "pipeline": p.pipeline, "replicas": p.replicas, "gpus": p.gpus}
    if p.max_batch_tokens is not None:
        out["max_batch_tokens"] = p.max_batch_tokens
    return out


def _print_table(facts: dict[str, Any], unit: str = "GPU") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"DisaggServe plan: {facts['placement']} ({facts['placement_reason']})")
    for col in ("phase", "tensor", "pipeline", "replicas", f"{unit}s", "batch tokens"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for phase in ("colocated",) if facts.get("colocated") else ("prefill", "decode"):
        p = facts[phase]
        table.add_row(phase, str(p["tensor"]), str(p["pipeline"]), str(p["replicas"]), str(p["gpus"]),
                      str(p.get("max_batch_tokens", "-")))
    table.add_row("total", "", "", f"{facts['units']} unit(s)", str(facts["gpus_total"]), "")
    console.print(table)
    pred = facts["predicted"] or {}
    if pred:
        console.print(
            f"predicted at {facts['rate']:g} rps: TTFT p90 {pred['ttft_p90_ms']:.1f} ms, TPOT p90 "
            f"{pred['tpot_p90_ms']:.1f} ms, attainment {pred['attainment']:.1%}"
        )
    if facts["goodput_per_gpu"] is not None:
        line = f"goodput per {unit}: {facts['goodput_per_gpu']:.3g} rps"
        base = facts["baseline_colocated"]
        if base:
            line += (
                f"; colocated baseline (tp{base['tensor']}·pp{base['pipeline']} × {base['instances']}): "
                f"{base['goodput_per_gpu']:.3g} rps/{unit}; ratio {facts['ratio_vs_colocated']}× per {unit}"
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


@dataclass
class PlotInput:
    """What the attainment plot compares: a deployment and the colocated baseline, per GPU."""

    searcher: Searcher
    deployment: Deployment | ColocatedDeployment
    rate: float
    label: str
    baseline: Baseline | None
    unit: str = "GPU"


def plot_input(o: PlanOutcome, unit: str = "GPU") -> PlotInput:
    return PlotInput(o.searcher, o.deployment, o.rate, f"plan ({o.plan.placement})", o.baseline, unit)


def manual_plot_input(
    spec: DisaggServeSpec,
    plan: Plan,
    *,
    nodes: list[dict[str, Any]] | None,
    profile: dict[str, Any] | None,
    rate: float | None,
    lengths: Any,
    max_tensor: int,
) -> PlotInput:
    """A hand-written plan (spec.parallelism), simulated with the same profile and workload the
    planner would use, next to the best colocated engine. Raises PlanningError (e.g. no profile)."""
    setup = build_search(spec, nodes=nodes, profile=profile, rate=rate, lengths=lengths, max_tensor=max_tensor)
    deployment = deployment_of(plan, setup)
    colocated = setup.searcher.colocated()
    baseline = None
    if colocated:
        best = colocated[0]
        instances = max(1, deployment.gpus // best.shape.gpus)
        baseline = Baseline(best.shape, instances, best.goodput / best.shape.gpus)
    unit = "CPU worker" if spec.hardware.device == "cpu" else "GPU"
    return PlotInput(setup.searcher, deployment, setup.rate, f"manual plan ({plan.placement})", baseline, unit)


def plot_attainment(p: PlotInput, path: str) -> None:
    """SLO attainment against the load per GPU, for the deployment and the colocated baseline.

    Per GPU, because the two use different numbers of GPUs: at the same x both carry the same
    requests per GPU, so the curve further right is the one with more goodput per GPU — the
    ratio the text output prints.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from disaggserve.planner.simulator import simulate_colocated

    s, dep, slo = p.searcher, p.deployment, p.searcher.slo
    per_gpu = [dep.goodput(s) / dep.gpus, p.rate / dep.gpus]
    if p.baseline:
        per_gpu.append(p.baseline.goodput_per_gpu)
    rates = np.linspace(max(per_gpu) * 1.6 / 20, max(per_gpu) * 1.6, 16)
    planned = [dep.simulate(s, float(x) * dep.gpus).attainment(slo.ttft_ms, slo.tpot_ms) for x in rates]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(rates, planned, marker="o", label=f"{p.label}: {dep.gpus} {p.unit}s")
    if p.baseline:
        b = p.baseline
        # A few replicas behind least-loaded dispatch stand for many, as in the planner; per GPU
        # the load is the same, so the curve is the whole baseline's.
        k = min(b.instances, BASELINE_SIMULATED_INSTANCES)
        lat = s.latency(b.shape, colocated=True)
        gpus = k * b.shape.gpus
        base = [
            simulate_colocated(s.requests_for(float(x) * gpus), float(x) * gpus, lat, s.capacity_tokens(b.shape), k)
            .after_warmup(0.2)
            .attainment(slo.ttft_ms, slo.tpot_ms)
            for x in rates
        ]
        total = b.instances * b.shape.gpus
        ax.plot(rates, base, marker="s", label=f"colocated {b.shape} × {b.instances}: {total} {p.unit}s")
    ax.axhline(slo.attainment, color="grey", linestyle="--", label=f"target {slo.attainment:.0%}")
    ax.axvline(p.rate / dep.gpus, color="grey", linestyle=":", label=f"planned {p.rate:g} rps")
    ax.set_xlabel(f"request rate per {p.unit} (rps / {p.unit})")
    ax.set_ylabel("SLO attainment (TTFT and TPOT)")
    ax.set_title("further right at the target = more goodput per " + p.unit, fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_plot(path: str | None) -> None:
    """`--plot` needs matplotlib (not a dependency of the operator): say so before planning."""
    if path and importlib.util.find_spec("matplotlib") is None:
        raise InputError(
            "--plot needs matplotlib, which is not installed: `pip install matplotlib` "
            "(the README's quick start installs it with the `local` extra)"
        )


def _profile_hint(e: PlanningError) -> str:
    if e.reason != "ProfileMissing":
        return ""
    return (
        "\nhint: to plan without a cluster, pass a measured profile: `disaggserve-worker profile --model M "
        "--out profile.json`, then `disaggserve plan -f FILE --profile profile.json`"
    )


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
        _check_plot(args.plot)
    except (InputError, TopologyError, WorkloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if spec.parallelism is not None:
        plan = manual_plan(spec, profile)
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
        if args.plot:
            try:
                drawn = manual_plot_input(
                    spec,
                    plan,
                    nodes=nodes,
                    profile=profile,
                    rate=args.rate,
                    lengths=lengths,
                    max_tensor=args.max_tensor,
                )
            except PlanningError as e:
                print(f"error: cannot plot the manual plan: {e.reason}: {e}{_profile_hint(e)}", file=sys.stderr)
                return 1
            plot_attainment(drawn, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    try:
        outcome = plan_automatically(
            spec, nodes=nodes, profile=profile, rate=args.rate, lengths=lengths, max_tensor=args.max_tensor
        )
    except PlanningError as e:
        print(f"error: {e.reason}: {e}{_profile_hint(e)}", file=sys.stderr)
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
        _print_table(facts, _unit(spec))
    if args.plot:
        plot_attainment(plot_input(outcome, _unit(spec)), args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _unit(spec: DisaggServeSpec) -> str:
    """What one device of a plan is: CPU workers are never called GPUs."""
    return "CPU worker" if spec.hardware.device == "cpu" else "GPU"
