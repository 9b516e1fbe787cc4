"""Alerts fire when they should (promtool runs the rendered rules on synthetic series), and the
dashboard queries are valid PromQL over the metric names the operator and workers export.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart.chartlib import ALL_FEATURES, CHART, documents, template
from disaggserve import contract

# Names the workers and the operator export besides the request metrics in contract.py
# (issue 8): KV transfer and speculation counters from workers, desired replicas from the operator.
EXTRA_METRICS = {
    "disaggserve_kv_transfer_bytes",
    "disaggserve_kv_transfer_seconds",
    "disaggserve_spec_proposed_tokens_total",
    "disaggserve_spec_accepted_tokens_total",
    "disaggserve_operator_desired_replicas",
    "up",
}
# vLLM-compatible worker series (both engines export them; disaggserve_worker.server.worker_metrics).
VLLM_METRICS = {
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
}
KNOWN_METRICS = {v for k, v in vars(contract).items() if k.startswith("METRIC_")} | EXTRA_METRICS | VLLM_METRICS
DASHBOARD = json.loads((CHART / "dashboards" / "disaggserve.json").read_text())
# Dashboard variables replaced by plain values, so each query can be checked as PromQL.
GRAFANA_VARS = {
    "$__rate_interval": "5m", "$namespace": ".*", "$disaggserve": ".*",
    "$ttft_slo_ms": "250", "$tpot_slo_ms": "100", "$attainment_target": "0.9",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool not installed (Debian package `prometheus`; scripts/test installs it as root)")
    return found


def _exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"(?<![\w:])(disaggserve_[a-z_]+|vllm:[a-z_]+|up)\b(?=\s*[{\[(])", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if not n.endswith("_total") else n for n in names}


def test_dashboard_queries_use_exported_metrics() -> None:
    used: set[str] = set()
    for title, expr in _exprs():
        names = _metric_names(expr)
        assert names or "$" in expr, f"panel {title!r} queries no metric: {expr}"
        unknown = names - KNOWN_METRICS
        assert not unknown, f"panel {title!r} uses metrics nobody exports: {unknown}"
        used |= names
    # Every exported series the issue asks for has a panel.
    assert {contract.METRIC_TTFT, contract.METRIC_TPOT, contract.METRIC_SLO_MET, contract.METRIC_REQUESTS} <= used
    assert used >= EXTRA_METRICS
    assert used >= VLLM_METRICS, "the engine panels read the shared vLLM names"


def test_worker_exports_every_vllm_name_the_dashboard_reads() -> None:
    from disaggserve_worker.server.worker_metrics import VLLM_METRICS as EXPORTED

    assert set(EXPORTED) >= VLLM_METRICS


def test_dashboard_has_the_panels_operators_need() -> None:
    titles = " | ".join(p["title"] for p in DASHBOARD["panels"]).lower()
    for topic in ("ttft", "tpot", "attainment", "desired vs ready", "goodput", "kv transfer", "speculation",
                  "kv-cache usage", "engine queue", "inter-token"):
        assert topic in titles, f"no dashboard panel about {topic!r}"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids confuse Grafana"


def test_dashboard_configmap_carries_the_json(helm_bin: str) -> None:
    cm = next(o for o in documents(template(ALL_FEATURES)) if o["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["disaggserve.json"]) == DASHBOARD


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = []
    for i, (_, expr) in enumerate(_exprs()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = _write(tmp_path / "dashboard.rules.yaml", {"groups": [{"name": "dashboard", "rules": rules}]})
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rule_groups(helm_bin: str) -> list[dict[str, Any]]:
    rule = next(o for o in documents(template(ALL_FEATURES)) if o["kind"] == "PrometheusRule")
    return rule["spec"]["groups"]


def test_rendered_rules_pass_promtool_check(helm_bin: str, tmp_path: Path) -> None:
    """Also checks the annotation templates ({{ $labels... }}), which the next test strips."""
    promtool = _promtool()
    path = _write(tmp_path / "rules.yaml", {"groups": _rule_groups(helm_bin)})
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def test_alerts_fire_on_synthetic_series(helm_bin: str, tmp_path: Path) -> None:
    """`tiny` misses its SLO and lacks a prefill worker; `good` is healthy; `ghost` has no router."""
    promtool = _promtool()
    groups = _rule_groups(helm_bin)
    for group in groups:  # promtool compares annotations exactly; they are prose, checked above
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = _write(tmp_path / "rules.yaml", {"groups": groups})
    tiny = {"namespace": "default", "disaggserve": "tiny"}
    good = {"namespace": "default", "disaggserve": "good"}
    ghost = {"namespace": "default", "disaggserve": "ghost"}
    router = {"component": "router"}
    series = [
        # 10 served requests a minute each (router series); tiny meets the SLO for half of them,
        # good for all. good's cancelled requests and its workers' series must not count.
        _series("disaggserve_requests_total", {**tiny, **router, "status": "ok"}, "0+10x40"),
        _series("disaggserve_slo_met_total", {**tiny, **router}, "0+5x40"),
        _series("disaggserve_requests_total", {**good, **router, "status": "ok"}, "0+10x40"),
        _series("disaggserve_requests_total", {**good, **router, "status": "cancelled"}, "0+30x40"),
        _series("disaggserve_slo_met_total", {**good, **router}, "0+10x40"),
        _series("disaggserve_requests_total", {**good, "component": "decode", "status": "ok"}, "0+50x40"),
        # tiny wants 2 prefill + 1 decode but only one prefill pod answers; good has all it wants.
        _series("disaggserve_operator_desired_replicas", {**tiny, "phase": "prefill"}, "2x40"),
        _series("disaggserve_operator_desired_replicas", {**tiny, "phase": "decode"}, "1x40"),
        _series("disaggserve_operator_desired_replicas", {**good, "phase": "prefill"}, "1x40"),
        _series("disaggserve_operator_desired_replicas", {**good, "phase": "decode"}, "1x40"),
        _series("disaggserve_operator_desired_replicas", {**ghost, "phase": "decode"}, "1x40"),
        _series("up", {**tiny, "component": "prefill", "pod": "tiny-prefill-0"}, "1x40"),
        _series("up", {**tiny, "component": "decode", "pod": "tiny-decode-0"}, "1x40"),
        _series("up", {**tiny, "component": "router", "pod": "tiny-router-0"}, "1x40"),
        _series("up", {**good, "component": "prefill", "pod": "good-prefill-0"}, "1x40"),
        _series("up", {**good, "component": "decode", "pod": "good-decode-0"}, "1x40"),
        _series("up", {**good, "component": "router", "pod": "good-router-0"}, "1x40"),
        _series("up", {**ghost, "component": "decode", "pod": "ghost-decode-0"}, "1x40"),
        # tiny's decode cache is full with a request waiting; good's prefill cache is full but nothing waits.
        _series("vllm:kv_cache_usage_perc", {**tiny, "component": "decode", "pod": "tiny-decode-0",
                                             "model_name": "m", "engine": "0"}, "0.99x40"),
        _series("vllm:num_requests_waiting", {**tiny, "component": "decode", "pod": "tiny-decode-0",
                                              "model_name": "m", "engine": "0"}, "3x40"),
        _series("vllm:kv_cache_usage_perc", {**good, "component": "prefill", "pod": "good-prefill-0",
                                             "model_name": "m", "engine": "0"}, "0.99x40"),
        _series("vllm:num_requests_waiting", {**good, "component": "prefill", "pod": "good-prefill-0",
                                              "model_name": "m", "engine": "0"}, "0x40"),
        # The operator's own target answers, so its metrics-missing alert stays quiet.
        _series("up", {"job": "disaggserve-metrics", "pod": "op-0"}, "1x40"),
    ]
    warning = {"severity": "warning"}
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DisaggServeSLOAttainmentLow",
                     "exp_alerts": [{"exp_labels": {**tiny, **warning}}]},
                    {"eval_time": "30m", "alertname": "DisaggServeReplicasNotReady",
                     "exp_alerts": [{"exp_labels": {**tiny, "phase": "prefill", **warning}}]},
                    {"eval_time": "30m", "alertname": "DisaggServeMetricsMissing",
                     "exp_alerts": [{"exp_labels": {**ghost, **warning}}]},
                    {"eval_time": "30m", "alertname": "DisaggServeOperatorMetricsMissing", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "DisaggServeKVCacheSaturated",
                     "exp_alerts": [{"exp_labels": {**tiny, "component": "decode", **warning}}]},
                    # `for: 10m` holds the alerts back at first.
                    {"eval_time": "5m", "alertname": "DisaggServeReplicasNotReady", "exp_alerts": []},
                ],
                "promql_expr_test": [
                    {"expr": 'disaggserve:slo_attainment:ratio{disaggserve="tiny"}', "eval_time": "30m",
                     "exp_samples": [{"labels": 'disaggserve:slo_attainment:ratio{namespace="default", '
                                                'disaggserve="tiny"}', "value": 0.5}]},
                    {"expr": 'disaggserve:slo_attainment:ratio{disaggserve="good"}', "eval_time": "30m",
                     "exp_samples": [{"labels": 'disaggserve:slo_attainment:ratio{namespace="default", '
                                                'disaggserve="good"}', "value": 1.0}]},
                ],
            },
            {
                "interval": "1m",
                "input_series": [_series("up", {"job": "disaggserve-metrics", "pod": "op-0"}, "0x40")],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "DisaggServeOperatorMetricsMissing",
                     "exp_alerts": [{"exp_labels": warning}]},
                ],
            },
        ],
    }
    path = _write(tmp_path / "rules.test.yaml", tests)
    proc = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_queries_select_only_labels_the_monitors_attach(helm_bin: str) -> None:
    """Dashboard and alerts filter on labels that the PodMonitor/ServiceMonitor relabelings create."""
    objs = documents(template(ALL_FEATURES))
    pod_monitor = next(o for o in objs if o["kind"] == "PodMonitor")
    service_monitor = next(o for o in objs if o["kind"] == "ServiceMonitor")
    attached = {r["targetLabel"] for e in pod_monitor["spec"]["podMetricsEndpoints"] for r in e["relabelings"]
                if "targetLabel" in r}
    # The operator labels its own series with the resource's `namespace` and `disaggserve`; the
    # ServiceMonitor keeps them (honorLabels) instead of the operator pod's namespace.
    assert all(e.get("honorLabels") for e in service_monitor["spec"]["endpoints"])
    attached |= {"namespace", "disaggserve"}
    # The metrics' own labels: `phase` (operator), `status` (router requests); `job` is Prometheus's.
    known = attached | {"phase", "status", "job"}
    exprs = [e for _, e in _exprs()] + [r["expr"] for g in _rule_groups(helm_bin) for r in g["rules"]]
    for expr in exprs:
        for selector in re.findall(r"\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", selector))
            assert used <= known, f"{expr!r} filters on {used - known}, which no monitor attaches"
        for grouping in re.findall(r"by \(([^)]*)\)", expr):
            used = {g.strip() for g in grouping.split(",")} - {"le"}
            assert used <= known, f"{expr!r} groups by {used - known}, which no monitor attaches"


def test_attainment_counts_what_the_autoscaler_counts(helm_bin: str) -> None:
    """Dashboard, alert and autoscaler agree on which requests were served (disaggserve.metrics)."""
    from disaggserve.metrics.series import NOT_SERVED

    excluded = f'status!~"{"|".join(sorted(NOT_SERVED))}"'
    record = next(r for g in _rule_groups(helm_bin) for r in g["rules"] if r.get("record"))
    panel = next(p for p in DASHBOARD["panels"] if p["title"] == "SLO attainment")
    for expr in (record["expr"], panel["targets"][0]["expr"]):
        assert excluded in expr, f"{expr!r} does not exclude {sorted(NOT_SERVED)}"
        assert expr.count('component="router"') == 2, expr
