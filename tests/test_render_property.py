"""Every resource the CRD accepts renders children a real API server and our worker accept
(issue 11 items 3 and 4).

Hypothesis generates DisaggServe objects from the CRD's own openAPIV3Schema (patterns, bounds,
enums, optional fields), keeps those the local API server's schema check accepts (the same
schema and CEL rules a real API server evaluates), plans them and renders the children. Each
child must then pass `kubernetes-validate --strict`, the Kubernetes name and label rules the
OpenAPI schemas do not carry (DNS labels and subdomains, label keys and values, the 63-character
pod-name budget of StatefulSet pods), and the worker's own argument parser. A spec the operator
refuses must be refused with a clear RenderError/PlanningError/SpecError (a Ready=False
condition), never with children the API server would reject.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from disaggserve.api.constants import MAX_REQUEST_RATE, MIN_REQUEST_RATE
from disaggserve.api.crd import build_crd
from disaggserve.api.spec import SpecError, parse_spec
from disaggserve.local.schema import validate
from disaggserve.planner import PlanningError, plan_for
from disaggserve.planner.hook import capacity_problem
from disaggserve.resources import Owner, RenderError, build_children
from disaggserve_worker.cli import build_parser, validate_serve_args

SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z")
# Custom resources kubernetes-validate has no schema for (the Gateway API inference extension's
# InferencePool is checked against its vendored CRD in test_gateway.py); names and labels still are.
CUSTOM_GROUPS = ("inference.networking",)
REVISION_HASH = 10  # StatefulSet pods carry controller-revision-hash=<sts>-<10 chars>


@pytest.fixture(scope="module", autouse=True)
def _schemas_parsed_once():
    """kubernetes-validate parses its JSON schemas (megabytes) on every call; once is enough here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            kubernetes_validate.utils,
            "schema_contents",
            functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents),
        )
        yield


def _regex(pattern: str) -> str:
    # JSON Schema's `$` (ECMA, and Go's RE2 in the API server) does not match before a trailing
    # newline as Python's does: generate what the API server would accept.
    return pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern


def _from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values the schema accepts (CEL aside): the strategy follows type, enum, pattern and bounds."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo, hi = schema.get("minimum", -(2**31)), schema.get("maximum", 2**31)
        return st.one_of(st.integers(lo, min(hi, lo + 16)), st.integers(lo, hi))  # small values often
    if kind == "number":
        lo, hi = schema.get("minimum", 0.0), schema.get("maximum", 1e6)
        if schema.get("exclusiveMinimum"):
            lo = lo + 1e-9 if lo == 0 else lo
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if kind == "string":
        max_len = schema.get("maxLength", 80)
        if "pattern" in schema:
            strategy = st.from_regex(_regex(schema["pattern"]), fullmatch=True)
        else:
            strategy = st.text(st.characters(codec="utf-8"), max_size=max_len)
        return strategy.filter(lambda s, n=max_len, m=schema.get("minLength", 0): m <= len(s) <= n)
    if kind == "array":
        return st.lists(_from_schema(schema.get("items", {}), depth + 1), max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object":
        props: dict[str, Any] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, dict):
            keys = st.from_regex(r"\A[a-z0-9]([-a-z0-9_.]{0,20}[a-z0-9])?(/[a-z0-9]{1,8})?\Z", fullmatch=True)
            return st.dictionaries(keys, _from_schema(extra, depth + 1), max_size=3)
        if not props or depth > 6:
            return st.just({})
        required = set(schema.get("required") or [])
        fields = {k: _from_schema(v, depth + 1) for k, v in props.items()}
        return st.fixed_dictionaries(
            {k: fields[k] for k in props if k in required},
            optional={k: fields[k] for k in props if k not in required},
        )
    return st.just(None)


SPEC = copy.deepcopy(SCHEMA["properties"]["spec"])
# Planning by hand keeps each example fast (the DistServe search takes seconds); the search's
# own output is checked against the same rules in test_cpu_auto_plans_render_what_the_worker_runs.
SPEC["required"] = [*SPEC.get("required", []), "parallelism"]
# Hardware and model facts the search would need are irrelevant to a manual plan; keep the
# generated documents small.
NAME = SCHEMA["properties"]["metadata"]["properties"]["name"]


def _one_source(source: dict[str, Any], builtin: str) -> dict[str, Any]:
    kept = next((k for k in ("builtin", "path", "hf") if k in source), None)
    out = {kept: source[kept]} if kept else {"builtin": builtin}
    if kept == "path" and "pvc" in source:
        out["pvc"] = source["pvc"]
    return out


def _repair(spec: dict[str, Any]) -> dict[str, Any]:
    """Nudge a generated spec toward the CRD's cross-field (CEL) rules, so that most examples
    reach the operator; the schema check below still decides what is accepted."""
    spec = copy.deepcopy(spec)
    spec["model"]["source"] = _one_source(spec["model"]["source"], "tiny-llama")
    hw = spec.get("hardware") or {}
    gpu = "hardware" in spec and hw.get("device", "gpu") == "gpu"  # without hardware: CPU
    if gpu:
        hw.setdefault("gpuProduct", "NVIDIA-H100-80GB-HBM3")
    for phase in spec["parallelism"].values():
        if not gpu:
            phase["tensor"] = phase["pipeline"] = 1
        else:
            per_node = hw.get("gpusPerNode", 8)
            phase["tensor"] = max(t for t in (1, 2, 4, 8) if t <= max(1, min(per_node, phase.get("tensor", 1))))
            phase["pipeline"] = max(1, min(phase.get("pipeline", 1), per_node // phase["tensor"]))
    scaling = spec.get("autoscaling")
    if scaling is not None:  # (the CRD has no defaults for the bounds yet: issue 17)
        lo = scaling.setdefault("minReplicas", {"prefill": 1, "decode": 1})
        hi = scaling.setdefault("maxReplicas", {"prefill": 16, "decode": 16})
        for p in ("prefill", "decode"):
            lo[p], hi[p] = sorted((lo[p], hi[p]))
    speculation = spec.get("speculation") or {}
    if "ngramMin" in speculation or "ngramMax" in speculation:
        speculation["ngramMin"], speculation["ngramMax"] = sorted(
            (speculation.get("ngramMin", 1), speculation.get("ngramMax", 3))
        )
    if "draftModel" in speculation:
        speculation["draftModel"] = _one_source(speculation["draftModel"], "tiny-llama-draft")
    elif speculation.get("proposer") == "draft":
        speculation["draftModel"] = {"builtin": "tiny-llama-draft"}
    for tol in hw.get("tolerations") or []:
        if tol.get("operator") == "Exists":
            tol.pop("value", None)
        if "key" not in tol:
            tol["operator"] = "Exists"
            tol.pop("value", None)
    if "slo" in spec and "attainment" in spec["slo"]:
        spec["slo"]["attainment"] = min(max(spec["slo"]["attainment"], 0.01), 1.0)
    return spec


def resources() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda name, spec: {
            "apiVersion": "disaggserve.io/v1alpha1",
            "kind": "DisaggServe",
            "metadata": {"name": name, "namespace": "default"},
            "spec": _repair(spec),
        },
        _from_schema(NAME),
        _from_schema(SPEC),
    )


def _check_labels(labels: dict[str, str], where: str) -> None:
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        assert not prefix or (len(prefix) <= 253 and DNS_SUBDOMAIN.match(prefix)), f"{where}: label key {key!r}"
        assert len(name) <= 63 and LABEL_NAME.match(name), f"{where}: label key {key!r}"
        assert len(value) <= 63 and LABEL_VALUE.match(value), f"{where}: label {key}={value!r}"


def _check_child(obj: dict[str, Any], schema: bool = True) -> None:
    if schema and not obj["apiVersion"].startswith(CUSTOM_GROUPS):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    meta, kind = obj["metadata"], obj["kind"]
    name = meta["name"]
    where = f"{kind} {name}"
    if kind == "Service":
        assert len(name) <= 63 and DNS_1035.match(name), f"{where}: Service names are DNS-1035 labels"
    else:
        assert len(name) <= 253 and DNS_SUBDOMAIN.match(name), f"{where}: not a DNS subdomain"
    _check_labels(meta.get("labels") or {}, where)
    if kind == "StatefulSet":
        # pod <sts>-<ordinal> is a DNS label; its revision-hash label value must fit 63 characters
        assert DNS_LABEL.match(name) and len(name) + 1 + REVISION_HASH <= 63, f"{where}: pod names too long"
    if kind == "Deployment":
        assert len(name) + 1 + 10 + 1 + 5 <= 253, where
    template = (obj.get("spec") or {}).get("template")
    if template:
        _check_labels(template["metadata"].get("labels") or {}, f"{where} pods")
        _check_labels(obj["spec"]["selector"]["matchLabels"], f"{where} selector")
        pod = template["spec"]
        _check_labels(pod.get("nodeSelector") or {}, f"{where} nodeSelector")
        for tol in pod.get("tolerations") or []:
            if tol.get("key"):
                _check_labels({tol["key"]: tol.get("value") or ""}, f"{where} toleration")
        (container,) = pod["containers"]
        args = build_parser().parse_args(container["args"])  # exits (SystemExit) on what it refuses
        if args.command == "serve":
            assert validate_serve_args(args) == [], container["args"]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure reproduces, CI is stable
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(resources())
def test_every_resource_the_crd_accepts_renders_children_the_api_server_and_worker_accept(body):
    stored, errors = validate(body, SCHEMA, strict=True)
    event("accepted by the schema" if not errors else "refused by the schema")
    assume(not errors)  # the API server refuses it: nothing reaches the operator
    try:
        spec = parse_spec(stored["spec"])
        plan = plan_for(spec, max_tensor=1 if spec.hardware.device == "cpu" else None)
        children = build_children(Owner(stored["metadata"]["name"], "default", "uid-1"), spec, plan)
    except (SpecError, PlanningError, RenderError) as e:
        # Refused by the operator with a condition a person can act on: a message, not a crash.
        assert str(e)
        event(f"refused by the operator: {type(e).__name__}")
        return
    event("rendered")
    seen: dict[tuple[str, str | None], int] = {}
    for child in children:
        # Units repeat one shape under other names: names of all, the full schema of a few.
        shape = (child["kind"], (child["metadata"].get("labels") or {}).get("app.kubernetes.io/component"))
        seen[shape] = seen.get(shape, 0) + 1
        _check_child(child, schema=seen[shape] <= 2)


@pytest.mark.parametrize("rate", [MIN_REQUEST_RATE, 2.0, 1000.0, MAX_REQUEST_RATE])
def test_cpu_auto_plans_render_what_the_worker_runs(rate):
    """The search on CPU never chooses tensor/pipeline > 1 (the worker exits 2 on those), and a plan
    larger than the Nodes can hold is caught before anything is created."""
    body = {
        "model": {"name": "tiny-llama", "source": {"builtin": "tiny-llama"}},
        "slo": {"ttftMs": 500, "tpotMs": 100},
        "workload": {"requestRate": rate, "inputTokens": 64, "outputTokens": 32},
        "hardware": {"device": "cpu"},
    }
    spec = parse_spec(body)
    plan = plan_for(spec, max_tensor=1)
    assert {(p.tensor, p.pipeline) for p in (plan.prefill, plan.decode)} == {(1, 1)}
    for child in build_children(Owner("tiny", "default", "u"), spec, plan):
        _check_child(child)
    node = {"metadata": {"name": "n"}, "status": {"allocatable": {"cpu": "2", "pods": "110"}}}
    needed = plan.prefill.replicas + plan.decode.replicas
    assert (capacity_problem(spec, plan, [node]) is None) == (needed <= 110)
