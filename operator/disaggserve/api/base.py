"""Shared base for resource models: camelCase on the wire, unknown fields refused, CEL rules.

Cross-field rules are written once, in CEL, on the model that owns them. The CRD carries them
as `x-kubernetes-validations` (so a real API server refuses bad input) and the model evaluates
the very same expressions when it validates (so the operator, the CLI and the test emulator
agree with the API server without a second, hand-written copy of each rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import celpy
from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry: `rule` must hold for `self`, else `message`."""

    rule: str
    message: str

    def as_schema(self) -> dict[str, str]:
        return {"rule": self.rule, "message": self.message}


@lru_cache(maxsize=512)
def _compiled(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_holds(rule: str, value: Any) -> bool:
    """Evaluate a CEL rule against a JSON value the way the API server would.

    An evaluation error (for instance a field the rule reads is absent) counts as a failed
    rule, as it does in Kubernetes.
    """
    try:
        result = _compiled(rule).evaluate({"self": celpy.json_to_cel(value)})
    except Exception:  # celpy raises its own error types, and returns CELEvalError values
        return False
    return isinstance(result, celpy.celtypes.BoolType) and bool(result)


class ApiModel(BaseModel):
    """Base of every spec/status model."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> ApiModel:
        if self.cel_rules:
            wire = self.model_dump(by_alias=True, exclude_none=True, mode="json")
            failed = [r.message for r in self.cel_rules if not cel_holds(r.rule, wire)]
            if failed:
                raise ValueError("; ".join(failed))
        return self

    def wire(self) -> dict[str, Any]:
        """The object as it is written to the API server (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
