"""Generate the CustomResourceDefinition from the pydantic models.

The models are the one source of truth: `disaggserve crd` writes
`crds/disaggserve.io_disaggserves.yaml`, and a test fails when the committed file drifts.
pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema, so
references are inlined, `Optional` unions collapse to their non-null branch, numeric
`exclusiveMinimum` becomes the boolean form, `additionalProperties: false` is dropped (the
API server prunes or, with strict field validation, refuses unknown fields itself), and each
model's CEL rules are attached as `x-kubernetes-validations`.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from disaggserve.api.base import ApiModel
from disaggserve.api.constants import GROUP, KIND, MAX_NAME_LENGTH, NAME_PATTERN, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.api.status import DisaggServeStatus

_DROP_KEYS = {"title", "additionalProperties_false", "discriminator"}


def _models_by_name(root: type[BaseModel]) -> dict[str, type[ApiModel]]:
    found: dict[str, type[ApiModel]] = {}
    stack: list[type[Any]] = [root]
    while stack:
        cls = stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, ApiModel)) or cls.__name__ in found:
            continue
        found[cls.__name__] = cls
        for field in cls.model_fields.values():
            stack.extend(_types_in(field.annotation))
    return found


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if args:
        return [t for a in args for t in _types_in(a)]
    meta = getattr(annotation, "__origin__", None)
    return [meta or annotation]


def _convert(node: Any, defs: dict[str, Any], models: dict[str, type[ApiModel]]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs, models) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = _convert(defs[name], defs, models)
        rules = [r.as_schema() for r in models[name].cel_rules] if name in models else []
        if rules:
            target["x-kubernetes-validations"] = rules
        extra = {k: v for k, v in node.items() if k not in ("$ref",) and k not in _DROP_KEYS}
        return {**target, **_convert(extra, defs, models)}
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            merged = {**_convert(branches[0], defs, models), **_convert(rest, defs, models)}
            merged.pop("default", None) if rest.get("default", 0) is None else None
            return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "default" and value is None:
            continue
        if key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        out[key] = _convert(value, defs, models) if key != "enum" else value
    if "enum" in out and "type" not in out:
        sample = out["enum"][0]
        out["type"] = "integer" if isinstance(sample, int) else "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def model_schema(model: type[ApiModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of one model (inlined, with its CEL rules)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    models = _models_by_name(model)
    schema = _convert(raw, defs, models)
    if model.cel_rules:
        schema["x-kubernetes-validations"] = [r.as_schema() for r in model.cel_rules]
    return schema


def build_crd() -> dict[str, Any]:
    spec_schema = model_schema(DisaggServeSpec)
    status_schema = model_schema(DisaggServeStatus)
    # kopf keeps per-handler progress under status.kopf when annotations cannot hold it.
    status_schema["properties"]["kopf"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "listKind": f"{KIND}List",
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {
                            "name": "Prefill",
                            "type": "string",
                            "description": "ready/desired prefill instances",
                            "jsonPath": ".status.replicas.prefill.display",
                        },
                        {
                            "name": "Decode",
                            "type": "string",
                            "description": "ready/desired decode instances",
                            "jsonPath": ".status.replicas.decode.display",
                        },
                        {
                            "name": "Attainment",
                            "type": "number",
                            "format": "float",
                            "description": "measured share of requests within both SLOs",
                            "jsonPath": ".status.slo.attainment",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        {"name": "Placement", "type": "string", "priority": 1, "jsonPath": ".status.plan.placement"},
                        {"name": "Endpoint", "type": "string", "priority": 1, "jsonPath": ".status.endpoint"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A language model served with prefill and decode on separate GPUs.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                # The API server lets the root schema restrict metadata.name only.
                                "metadata": {
                                    "type": "object",
                                    "properties": {
                                        "name": {
                                            "type": "string",
                                            "maxLength": MAX_NAME_LENGTH,
                                            "pattern": NAME_PATTERN,
                                            "description": "A DNS-1035 label of at most "
                                            f"{MAX_NAME_LENGTH} characters: it names Services and pods.",
                                        }
                                    },
                                },
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Kubernetes tooling reads YAML anchors poorly; write shared sub-schemas out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_NoAliasDumper.add_representer(str, _str_representer)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, width=120)


def render_crd_yaml() -> str:
    header = "# Generated by `disaggserve crd` from disaggserve.api; do not edit by hand.\n"
    return header + dump_yaml(build_crd())
