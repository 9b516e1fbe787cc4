"""The chart lints, renders and validates like a real cluster would judge it.

Rendered objects go through kubernetes-validate's strict schemas for the oldest and newest
Kubernetes we support; custom resources (kopf peerings, the examples) are checked against the
CRD schemas that ship with the chart.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chart.chartlib import (
    ALL_FEATURES,
    CHART,
    CRDS,
    DEPLOY,
    DOCS,
    MULTI_NAMESPACE,
    ROOT,
    docs_with_values_table,
    documents,
    helm,
    render_deploy,
    template,
)
from disaggserve import contract
from disaggserve.cli import build_parser

KUBE_VERSIONS = ("1.28.0", "1.33.0")
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {}, "all-features": ALL_FEATURES, "multi-namespace": MULTI_NAMESPACE,
}
# Kinds whose schemas live in the Prometheus Operator's CRDs, which are not available offline;
# test_chart_monitoring.py checks their content (promtool for the rules).
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _strip_extensions(node: Any) -> Any:
    """jsonschema does not understand x-kubernetes-* (CEL rules, preserve-unknown-fields)."""
    if isinstance(node, dict):
        return {k: _strip_extensions(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [_strip_extensions(v) for v in node]
    return node


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD in crds/."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in documents(path.read_text()):
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                out[key] = _strip_extensions(version["schema"]["openAPIV3Schema"])
    return out


def _validate_custom(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    """CRD schemas are OpenAPI 3.0 (boolean exclusiveMinimum): JSON Schema draft 4 reads them right."""
    jsonschema.Draft4Validator(schema).validate(obj)


def _validate(obj: dict[str, Any], kube_version: str, crd_schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas:
        _validate_custom(obj, crd_schemas[key])
    elif obj["kind"] not in MONITORING_KINDS:
        kubernetes_validate.validate(obj, kube_version, strict=True)


def test_lint_strict(helm_bin: str) -> None:
    helm("lint", "--strict", str(CHART))
    for values in VALUE_SETS.values():
        proc = subprocess.run(
            [helm_bin, "lint", "--strict", str(CHART), "--values", "-"],
            input=json.dumps(values), capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rendered_objects_validate(helm_bin: str, value_set: str, kube_version: str) -> None:
    objs = documents(template(VALUE_SETS[value_set], kube_version=kube_version, include_crds=True))
    kinds = {o["kind"] for o in objs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole"} <= kinds
    schemas = _crd_schemas()
    for obj in objs:
        try:
            _validate(obj, kube_version, schemas)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {kube_version}: {exc.message}")


def test_validation_catches_unknown_fields(helm_bin: str) -> None:
    """The validator used above is strict: a misspelled field is refused (guards the test itself)."""
    deployment = next(o for o in documents(template()) if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33.0", strict=True)


def test_chart_crds_are_byte_identical_copies() -> None:
    top = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert top == sorted(p.name for p in (CHART / "crds").glob("*.yaml")), "chart crds/ and crds/ hold different files"
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (CRDS / name).read_bytes(), (
            f"charts/disaggserve/crds/{name} differs from crds/{name}: run `python tests/chart/chartlib.py`"
        )


def test_deploy_manifests_in_sync(helm_bin: str) -> None:
    rendered = render_deploy()
    assert sorted(p.name for p in DEPLOY.glob("*.yaml")) == sorted(rendered)
    for name, text in rendered.items():
        assert (DEPLOY / name).read_text() == text, f"deploy/{name} is stale: run `python tests/chart/chartlib.py`"


def test_values_table_in_sync() -> None:
    text = DOCS.read_text()
    assert docs_with_values_table(text) == text, "docs/install.md values table is stale: run tests/chart/chartlib.py"


def test_every_value_is_described() -> None:
    """values.yaml and values.schema.json describe the same keys (the table is complete)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def compare(values: dict[str, Any], node: dict[str, Any], where: str) -> None:
        props = node.get("properties", {})
        assert set(values) <= set(props), f"{where}: undescribed keys {set(values) - set(props)}"
        for key, child in props.items():
            assert child.get("description"), f"{where}{key} has no description"
            if isinstance(values.get(key), dict) and "properties" in child:
                compare(values[key], child, f"{where}{key}.")

    compare(defaults, schema, "")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"watch": {"scop": "cluster"}}, "scop"),
        ({"watch": {"scope": "everywhere"}}, "scope"),
        ({"replicaCount": 0}, "replicaCount"),
        ({"prometheusRule": {"attainmentTarget": 1.5}}, "attainmentTarget"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
        ({"watch": {"scope": "cluster", "namespaces": ["a"]}}, "watch.namespaces lists namespaces but watch.scope"),
        ({"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 2}}, "minAvailable .2. must be below"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(helm_bin: str, values: dict[str, Any], expected: str) -> None:
    with pytest.raises(RuntimeError, match=expected):
        template(values)


def _deployment(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return next(o for o in documents(template(values)) if o["kind"] == "Deployment")


def test_operator_pod_is_restricted(helm_bin: str) -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsUser"] >= 10000
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_operator_runs_two_peered_replicas(helm_bin: str) -> None:
    deployment = _deployment()
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    # The image's entrypoint is `disaggserve`: its own parser must accept what the chart passes.
    parsed = build_parser().parse_args(args)
    assert parsed.command == "operator"
    assert parsed.peering == "disaggserve"
    assert parsed.liveness == "http://0.0.0.0:8080/healthz"
    assert parsed.namespace == ["disaggserve-system"] and not parsed.all_namespaces
    objs = documents(template())
    peering = [o for o in objs if o["kind"] == "KopfPeering"]
    assert [(p["metadata"]["name"], p["metadata"]["namespace"]) for p in peering] == [
        ("disaggserve", "disaggserve-system")
    ]


def test_scope_decides_flags_peering_and_roles(helm_bin: str) -> None:
    multi = documents(template(MULTI_NAMESPACE))
    args = next(o for o in multi if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert build_parser().parse_args(args).namespace == ["team-a", "team-b"]
    assert sorted(o["metadata"]["namespace"] for o in multi if o["kind"] == "Role") == ["team-a", "team-b"]
    assert sorted(o["metadata"]["namespace"] for o in multi if o["kind"] == "KopfPeering") == ["team-a", "team-b"]

    cluster = documents(template({"watch": {"scope": "cluster"}}))
    args = next(o for o in cluster if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(args)
    assert parsed.all_namespaces and not parsed.namespace
    assert not [o for o in cluster if o["kind"] in ("Role", "RoleBinding", "KopfPeering")]
    assert [o["metadata"]["name"] for o in cluster if o["kind"] == "ClusterKopfPeering"] == ["disaggserve"]


def test_image_digest_wins_over_tag(helm_bin: str) -> None:
    image = _deployment(ALL_FEATURES)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "ghcr.io/disaggserve/operator@sha256:" + "0" * 64
    assert _deployment()["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/disaggserve/operator:0.1.0"


def test_podmonitor_matches_the_wire_contract(helm_bin: str) -> None:
    """The PodMonitor scrapes the ports and labels the operator puts on routers and workers."""
    monitor = next(o for o in documents(template(ALL_FEATURES)) if o["kind"] == "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        contract.LABEL_NAME: contract.APP_NAME,
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
    }
    ports = sorted(e["targetPort"] for e in monitor["spec"]["podMetricsEndpoints"])
    assert ports == sorted([contract.ROUTER_PORT, contract.WORKER_PORT])
    assert {e["path"] for e in monitor["spec"]["podMetricsEndpoints"]} == {contract.PATH_METRICS}


def test_podmonitor_selects_every_pod_the_operator_renders(helm_bin: str) -> None:
    """Each router/worker pod the operator renders is selected, kept by one endpoint, on a declared port."""
    from disaggserve.api import parse_spec
    from disaggserve.planner import plan_for
    from disaggserve.resources import Owner, build_children

    monitor = next(o for o in documents(template(ALL_FEATURES)) if o["kind"] == "PodMonitor")
    spec = parse_spec(documents((ROOT / "examples" / "tiny-cpu.yaml").read_text())[0]["spec"])
    workloads = [c for c in build_children(Owner("tiny", "default"), spec, plan_for(spec))
                 if c["kind"] in ("StatefulSet", "Deployment")]
    assert {w["kind"] for w in workloads} == {"StatefulSet", "Deployment"}
    for workload in workloads:
        pod = workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), workload["metadata"]["name"]
        ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        keeping = [e for e in monitor["spec"]["podMetricsEndpoints"]
                   if re.fullmatch(e["relabelings"][0]["regex"], labels[contract.LABEL_COMPONENT])]
        assert len(keeping) == 1, f"{workload['metadata']['name']}: scraped by {len(keeping)} endpoints"
        assert keeping[0]["targetPort"] in ports, f"{workload['metadata']['name']} does not declare the scraped port"


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_validate_against_the_crd(example: str) -> None:
    schemas = _crd_schemas()
    for obj in documents((ROOT / "examples" / example).read_text()):
        _validate_custom(obj, schemas[(obj["apiVersion"], obj["kind"])])


def test_crd_schema_refuses_a_bad_example() -> None:
    """Guards the example test: the stripped schema still refuses a wrong type."""
    schemas = _crd_schemas()
    obj = documents((ROOT / "examples" / "tiny-cpu.yaml").read_text())[0]
    obj["spec"]["slo"]["ttftMs"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        _validate_custom(obj, schemas[(obj["apiVersion"], obj["kind"])])


def test_packaged_chart_carries_the_crds(helm_bin: str, tmp_path: Path) -> None:
    """What `helm package` ships (what users install from a repository) holds the very same CRDs."""
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("disaggserve-*.tgz")
    with tarfile.open(archive) as tar:
        for crd in sorted(CRDS.glob("*.yaml")):
            member = tar.extractfile(f"disaggserve/crds/{crd.name}")
            assert member is not None and member.read() == crd.read_bytes(), f"packaged crds/{crd.name} differs"
        assert "disaggserve/dashboards/disaggserve.json" in tar.getnames()
