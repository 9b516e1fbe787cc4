"""`kubectl disaggserve`: read a DisaggServe's plan and status as a person wants to see them.

`kubectl get dsv -o yaml` shows everything but answers none of the questions people ask: how
many GPUs does each phase get and why, are the replicas up, are we meeting the SLO, where do I
send requests. This plugin answers those from `status` alone, so it needs only `get` on
disaggserves and works with any operator version that writes the same status shape.

Installed as the console script `kubectl-disaggserve`, which kubectl finds on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import urllib3
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from disaggserve.api.constants import GROUP, PLURAL, VERSION
from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.api.status import DisaggServeStatus


class PluginError(Exception):
    """Something the user can fix; the message says what and how."""


def _load_client_config(kubeconfig: str | None, context: str | None) -> str | None:
    """Configure the `kubernetes` client; return the context's default namespace, if any.

    kubectl's order: --kubeconfig, then $KUBECONFIG (read now, not at import time: the
    kubernetes package caches it on import), then ~/.kube/config, and only when none exists
    the pod's service account.
    """
    import kubernetes

    default_file = os.path.expanduser("~/.kube/config")
    explicit = kubeconfig or context or os.environ.get("KUBECONFIG")
    if not explicit and not os.path.exists(default_file):
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            raise PluginError("no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not in a pod: "
                              "point $KUBECONFIG at your cluster's kubeconfig") from None
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                return f.read().strip() or None
        except OSError:
            return None
    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        kubernetes.config.load_kube_config(config_file=path, context=context)
        _, active = kubernetes.config.list_kube_config_contexts(config_file=path)
    except (kubernetes.config.ConfigException, FileNotFoundError, TypeError) as e:
        where = path or "~/.kube/config"
        raise PluginError(f"cannot load a Kubernetes configuration from {where}: {e}. "
                          "Set $KUBECONFIG or pass --kubeconfig.") from None
    chosen = active
    if context:
        contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=path)
        chosen = next((c for c in contexts if c["name"] == context), active)
    namespace: str | None = (chosen or {}).get("context", {}).get("namespace")
    return namespace


def fetch(name: str, namespace: str) -> dict[str, Any]:
    """The DisaggServe object, or a PluginError that says why it could not be read."""
    import kubernetes

    api = kubernetes.client.CustomObjectsApi()
    try:
        obj: dict[str, Any] = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            raise PluginError(f"DisaggServe {name!r} not found in namespace {namespace!r} "
                              f"(list them with `kubectl get dsv -n {namespace}`)") from None
        if e.status in (401, 403):
            raise PluginError(f"not allowed to read DisaggServe {name!r} in {namespace!r}: "
                              f"{e.reason}. Ask for `get` on {PLURAL}.{GROUP}.") from None
        raise PluginError(f"the API server answered {e.status} {e.reason} for {name!r}") from None
    except (urllib3.exceptions.HTTPError, OSError) as e:  # refused, DNS, TLS, timeouts (after retries)
        host = api.api_client.configuration.host
        local = "://127." in host or "://localhost" in host
        hint = ("Is `disaggserve up` running? Start it with `disaggserve up`." if local
                else "Check the kubeconfig's server and your network.")
        raise PluginError(f"cannot reach the API server at {host}: {type(e).__name__}. {hint}") from None
    return obj


def parse_status(obj: dict[str, Any]) -> DisaggServeStatus:
    raw = dict(obj.get("status") or {})
    raw.pop("kopf", None)  # kopf's own bookkeeping, not part of our status
    try:
        return DisaggServeStatus.model_validate(raw)
    except ValidationError as e:
        raise PluginError(f"status of {obj['metadata']['name']!r} does not match this plugin's version "
                          f"({e.error_count()} problem(s), first: {e.errors()[0]['loc']}): "
                          "install the kubectl-disaggserve that matches the operator") from None


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def plan_view(obj: dict[str, Any]) -> tuple[dict[str, Any], Table | None, list[str]]:
    """(JSON form, phase table, extra lines) of status.plan."""
    name = obj["metadata"]["name"]
    status = parse_status(obj)
    plan: Plan | None = status.plan
    if plan is None:
        raise PluginError(f"{name!r} has no plan yet: the operator has not reconciled it "
                          f"(is it running? see `kubectl disaggserve status {name}`)")
    unit = _unit(obj)
    table = Table(title=f"Plan of {obj['metadata']['namespace']}/{name}")
    for column in ("Phase", "Tensor", "Pipeline", "Replicas", f"{unit}s/instance", f"{unit}s"):
        table.add_column(column, justify="left" if column == "Phase" else "right")
    for phase in plan.roles:
        p = plan.phase(phase)
        table.add_row(phase, str(p.tensor), str(p.pipeline), str(p.replicas), str(p.gpus_per_instance), str(p.gpus))
    lines = [
        f"Placement: {plan.placement} ({plan.units} unit(s)); {plan.gpus_total} {unit}(s) in total; "
        f"source: {plan.source}",
        f"Predicted goodput per {unit}: {_fmt(plan.predicted_goodput_per_gpu, ' req/s', 2)}",
    ]
    if plan.predicted:
        lines.append(f"Predicted: TTFT p90 {_fmt(plan.predicted.ttft_p90_ms, ' ms')}, "
                     f"TPOT p90 {_fmt(plan.predicted.tpot_p90_ms, ' ms')}, "
                     f"attainment {_fmt(plan.predicted.attainment, '', 3)}")
    lines.append(f"Reason: {plan.reason or '-'}")
    if plan.updated_at:
        lines.append(f"Updated: {plan.updated_at}")
    return plan.model_dump(by_alias=True, mode="json", exclude_none=True), table, lines


def _unit(obj: dict[str, Any]) -> str:
    """What one device of the plan is: a GPU, or a CPU worker process (never called a GPU)."""
    device = ((obj.get("spec") or {}).get("hardware") or {}).get("device")
    return "CPU worker" if device == "cpu" else "GPU"


def status_view(
    obj: dict[str, Any], local_endpoint: str | None = None
) -> tuple[dict[str, Any], list[Table], list[str]]:
    """(JSON summary, tables, header lines) of the whole status.

    `local_endpoint`: where `disaggserve up` publishes the router on this machine (the
    status's endpoint is the in-cluster Service name, which does not resolve on the host).
    """
    name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
    status = parse_status(obj)
    spec_slo = _spec_slo(obj)
    lines = [f"{namespace}/{name}: phase {status.phase}", f"Endpoint: {status.endpoint or '-'}"]
    if local_endpoint:
        lines.append(f"Local endpoint (disaggserve up, on this machine): {local_endpoint}")
    stale = status.observed_generation is not None and status.observed_generation < obj["metadata"].get(
        "generation", status.observed_generation)
    if stale:
        lines.append("Status is older than the spec: the operator has not caught up with the last change yet.")

    conditions = Table(title="Conditions")
    for column in ("Type", "Status", "Reason", "Message"):
        conditions.add_column(column)
    for c in status.conditions:
        conditions.add_row(c.type, c.status, c.reason, c.message)

    replicas = Table(title="Replicas")
    for column in ("Phase", "Ready", "Desired"):
        replicas.add_column(column, justify="left" if column == "Phase" else "right")
    for phase in status.replicas.roles:
        r = getattr(status.replicas, phase)
        replicas.add_row(phase, str(r.ready), str(r.desired))

    slo = Table(title="SLO" + (f" (window {status.slo.window_seconds}s)" if status.slo and status.slo.window_seconds
                               else ""))
    for column in ("Metric", "Target", "Measured", "Met"):
        slo.add_column(column, justify="left" if column == "Metric" else "right")
    measured = status.slo
    rows = [
        ("TTFT p90", spec_slo.get("ttftMs"), measured.ttft_p90_ms if measured else None, " ms", False),
        ("TPOT p90", spec_slo.get("tpotMs"), measured.tpot_p90_ms if measured else None, " ms", False),
        ("Attainment", spec_slo.get("attainment"), measured.attainment if measured else None, "", True),
    ]
    for label, target, value, unit, higher_is_better in rows:
        met = "-" if target is None or value is None else (
            "yes" if (value >= target if higher_is_better else value <= target) else "NO")
        digits = 3 if not unit else 1
        slo.add_row(label, _fmt(target, unit, digits), _fmt(value, unit, digits), met)

    summary = {
        "name": name,
        "namespace": namespace,
        "phase": status.phase,
        "endpoint": status.endpoint,
        **({"localEndpoint": local_endpoint} if local_endpoint else {}),
        "observedGeneration": status.observed_generation,
        "conditions": [c.model_dump(by_alias=True, mode="json", exclude_none=True) for c in status.conditions],
        "replicas": {p: {"ready": getattr(status.replicas, p).ready, "desired": getattr(status.replicas, p).desired}
                     for p in status.replicas.roles},
        "slo": {"target": spec_slo,
                "measured": measured.model_dump(by_alias=True, mode="json", exclude_none=True) if measured else None},
    }
    return summary, [conditions, replicas, slo], lines


def _spec_slo(obj: dict[str, Any]) -> dict[str, float]:
    """Targets from the spec (with its defaults); an unparseable spec still shows what it says."""
    raw = (obj.get("spec") or {}).get("slo") or {}
    try:
        return DisaggServeSpec.model_validate(obj.get("spec") or {}).slo.model_dump(by_alias=True, mode="json")
    except ValidationError:
        return {k: v for k, v in raw.items() if isinstance(v, int | float)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl disaggserve", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the DisaggServe's name")
    common.add_argument("-n", "--namespace", help="its namespace (default: the context's, else `default`)")
    common.add_argument("-o", "--output", choices=("table", "json"), default="table")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)")
    common.add_argument("--context", help="kubeconfig context to use")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("plan", parents=[common], help="placement, per-phase parallelism and GPUs, prediction, reason")
    sub.add_parser("status", parents=[common], help="phase, conditions, replicas, SLO target vs measured, endpoint")
    return parser


def run(args: argparse.Namespace, console: Console, local_endpoint: str | None = None) -> int:
    context_ns = _load_client_config(args.kubeconfig, args.context)
    namespace = args.namespace or context_ns or "default"
    obj = fetch(args.name, namespace)
    if args.command == "plan":
        data, table, lines = plan_view(obj)
        if args.output == "json":
            console.out(json.dumps(data, indent=2), highlight=False)
            return 0
        console.print(table)
        for line in lines:
            console.print(line, highlight=False)
        return 0
    summary, tables, lines = status_view(obj, local_endpoint)
    if args.output == "json":
        console.out(json.dumps(summary, indent=2), highlight=False)
        return 0
    for line in lines:
        console.print(line, highlight=False)
    for table in tables:
        console.print(table)
    return 0


def main(argv: Sequence[str] | None = None, console: Console | None = None, local_endpoint: str | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = console or Console()
    try:
        return run(args, out, local_endpoint)
    except PluginError as e:
        Console(stderr=True).print(f"error: {e}", highlight=False, markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
