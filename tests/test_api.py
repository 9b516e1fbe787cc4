"""The resource API: defaults, messages, and the generated CRD kept in sync with the models."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from disaggserve.api import parse_spec
from disaggserve.api.crd import build_crd, render_crd_yaml
from disaggserve.api.spec import SpecError
from disaggserve.local.checkpoints import prepare_for_local
from disaggserve.local.schema import validate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def minimal() -> dict:
    return {
        "model": {"name": "m", "source": {"builtin": "tiny-llama"}},
        "slo": {"ttftMs": 200, "tpotMs": 50},
        "workload": {"requestRate": 1, "inputTokens": 10, "outputTokens": 10},
    }


def test_committed_crd_matches_the_models():
    committed = (ROOT / "crds" / "disaggserve.io_disaggserves.yaml").read_text()
    assert committed == render_crd_yaml(), "run `disaggserve crd -o crds/disaggserve.io_disaggserves.yaml`"


def test_crd_shape():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "disaggserves.disaggserve.io"
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Ready", "Prefill", "Decode", "Attainment", "Age"]
    text = yaml.safe_dump(crd)
    assert "$ref" not in text and "anyOf" not in text and "additionalProperties: false" not in text
    rules = [r["rule"] for r in _all_rules(version["schema"]["openAPIV3Schema"])]
    assert any("minReplicas.prefill <= self.maxReplicas.prefill" in r for r in rules)
    assert any("self.tensor in [1, 2, 4, 8]" in r for r in rules)
    assert any("attainment > 0.0" in r for r in rules)


def _all_rules(schema):
    if isinstance(schema, dict):
        yield from schema.get("x-kubernetes-validations", [])
        for value in schema.values():
            yield from _all_rules(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _all_rules(value)


def test_defaults():
    spec = parse_spec(minimal())
    assert spec.slo.attainment == 0.9
    assert spec.hardware.device == "cpu"
    assert spec.placement == "auto"
    assert spec.speculation.mode == "off"
    assert spec.autoscaling.min_replicas.prefill == 1
    assert spec.image.reference == "ghcr.io/disaggserve/worker:0.1.0"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse_and_validate_against_the_crd(path, tmp_path):
    # As `disaggserve up -f` applies them (a vLLM example's builtin model becomes a checkpoint folder).
    doc = yaml.safe_load(prepare_for_local(path, tmp_path).read_text())
    parse_spec(doc["spec"])
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    _, errors = validate(doc, schema, strict=True)
    assert errors == []


def test_errors_name_the_wire_field_and_say_what_is_accepted():
    raw = minimal()
    raw["slo"]["attainment"] = 1.5
    raw["hardware"] = {"device": "gpu", "gpusPerNode": 0}
    raw["extra"] = True
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    text = "\n".join(err.value.problems)
    assert "spec.slo: slo.attainment must be in (0, 1]" in text
    assert "spec.hardware.gpusPerNode" in text
    assert "spec.extra: unknown field" in text


def test_an_unknown_model_dtype_is_refused_with_the_choices():
    raw = minimal()
    raw["model"]["dtype"] = "fp8"
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    text = "\n".join(err.value.problems)
    assert "spec.model.dtype" in text and "bfloat16" in text, text


def test_model_and_operator_agree_with_the_crd_on_cel_rules():
    """Each CEL rule refuses the same specs in the model (pydantic) and in the CRD (API server)."""
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    bad = minimal()
    bad["autoscaling"] = {"minReplicas": {"prefill": 5, "decode": 1}, "maxReplicas": {"prefill": 2, "decode": 2}}
    _, errors = validate({"spec": bad}, schema, strict=True)
    assert [e.message for e in errors] == [
        "autoscaling.minReplicas.prefill must not exceed autoscaling.maxReplicas.prefill"
    ]
    with pytest.raises(SpecError, match=r"minReplicas\.prefill must not exceed"):
        parse_spec(bad)


@pytest.mark.parametrize(
    ("bounds", "refused"),
    [
        ({"minReplicas": {"prefill": 1, "decode": 1, "colocated": 5}, "maxReplicas": {"prefill": 8, "decode": 8,
                                                                                      "colocated": 4}}, True),
        # Without maxReplicas.colocated the maximum is maxReplicas.prefill + maxReplicas.decode.
        ({"minReplicas": {"prefill": 1, "decode": 1, "colocated": 5}, "maxReplicas": {"prefill": 2, "decode": 2}},
         True),
        ({"minReplicas": {"prefill": 1, "decode": 1, "colocated": 4}, "maxReplicas": {"prefill": 2, "decode": 2}},
         False),
    ],
)
def test_colocated_bounds_are_checked_in_the_crd_and_the_model(bounds, refused):
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = minimal()
    spec["autoscaling"] = {"enabled": True, **bounds}
    _, errors = validate({"spec": spec}, schema, strict=True)
    messages = [e.message for e in errors]
    if refused:
        assert len(messages) == 1 and "minReplicas.colocated must not exceed" in messages[0]
        with pytest.raises(SpecError, match=r"minReplicas\.colocated must not exceed"):
            parse_spec(spec)
    else:
        assert messages == []
        scaling = parse_spec(spec).autoscaling
        assert (scaling.min_colocated, scaling.max_colocated) == (4, 4)


def test_colocated_bounds_default_from_the_phase_bounds():
    scaling = parse_spec({**minimal(), "autoscaling": {"enabled": True}}).autoscaling
    assert (scaling.min_colocated, scaling.max_colocated) == (1, 32)
