"""Validate custom resources against a CRD's structural schema, as the API server does.

Three things a real API server does that plain JSON Schema does not: it knows which fields are
unknown (and refuses them under strict field validation, else prunes them), it applies
`default`s, and it evaluates `x-kubernetes-validations` CEL rules. The OpenAPI v3.0 dialect of
CRDs uses boolean `exclusiveMinimum`, which is JSON Schema draft 4's form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import jsonschema

from disaggserve.api.base import cel_holds


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    reason: str = "FieldValueInvalid"


def _plain(schema: Any) -> Any:
    """The schema without Kubernetes extensions, for jsonschema."""
    if isinstance(schema, list):
        return [_plain(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format"):
            continue
        out[key] = value if key in ("enum", "default", "required") else _plain(value)
    return out


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def prune_and_default(obj: Any, schema: dict[str, Any], path: str, unknown: list[str]) -> Any:
    """Apply defaults and drop unknown fields in place; unknown field paths go to `unknown`."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return obj
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None:
            for key in list(obj):
                if key not in props:
                    unknown.append(_join(path, key))
                    del obj[key]
            for key, sub in props.items():
                if key not in obj and "default" in sub:
                    obj[key] = copy.deepcopy(sub["default"])
                if key in obj:
                    obj[key] = prune_and_default(obj[key], sub, _join(path, key), unknown)
        elif isinstance(extra, dict):
            for key in obj:
                obj[key] = prune_and_default(obj[key], extra, _join(path, key), unknown)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            obj[i] = prune_and_default(item, schema["items"], _join(path, i), unknown)
    return obj


def _cel_errors(obj: Any, schema: dict[str, Any], path: str) -> list[FieldError]:
    errors = [
        FieldError(path or "<root>", rule.get("message") or f"failed rule: {rule['rule']}")
        for rule in schema.get("x-kubernetes-validations", [])
        if not cel_holds(rule["rule"], obj)
    ]
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj:
                errors += _cel_errors(obj[key], sub, _join(path, key))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            errors += _cel_errors(item, schema["items"], _join(path, i))
    return errors


def validate(obj: dict[str, Any], schema: dict[str, Any], *, strict: bool) -> tuple[dict[str, Any], list[FieldError]]:
    """Return the stored form of `obj` (defaulted, pruned) and the errors that refuse it.

    `spec` and `status` are checked, and `metadata.name` against what the root schema may say
    of it (a CRD may restrict metadata.name and nothing else of metadata).
    """
    stored = copy.deepcopy(obj)
    errors: list[FieldError] = []
    props = schema.get("properties", {})
    name_schema = ((props.get("metadata") or {}).get("properties") or {}).get("name")
    name = (stored.get("metadata") or {}).get("name")
    if name_schema and isinstance(name, str):
        for err in jsonschema.Draft4Validator(_plain(name_schema)).iter_errors(name):
            errors.append(FieldError("metadata.name", err.message))
    for top in ("spec", "status"):
        if top not in stored or top not in props:
            continue
        unknown: list[str] = []
        stored[top] = prune_and_default(stored[top], props[top], top, unknown)
        if strict:
            errors += [FieldError(u, "field not declared in schema", "FieldValueInvalid") for u in unknown]
        validator = jsonschema.Draft4Validator(_plain(props[top]))
        for err in sorted(validator.iter_errors(stored[top]), key=lambda e: list(e.absolute_path)):
            field = top
            for part in err.absolute_path:
                field = _join(field, part)
            errors.append(FieldError(field, err.message))
        errors += _cel_errors(stored[top], props[top], top)
    for name in schema.get("required", []):
        if name not in stored:
            errors.append(FieldError(name, "Required value", "FieldValueRequired"))
    return stored, errors
