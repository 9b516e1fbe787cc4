"""The DisaggServe resource as pydantic models; the CRD schema is generated from them."""

from disaggserve.api.constants import GROUP, KIND, PLURAL, SINGULAR, VERSION
from disaggserve.api.spec import (
    Autoscaling,
    DisaggServeSpec,
    Hardware,
    ModelSource,
    ModelSpec,
    Parallelism,
    PhaseBounds,
    PhaseParallelism,
    Slo,
    Speculation,
    Workload,
    parse_spec,
)
from disaggserve.api.status import Condition, DisaggServeStatus

__all__ = [
    "GROUP",
    "KIND",
    "PLURAL",
    "SINGULAR",
    "VERSION",
    "Autoscaling",
    "Condition",
    "DisaggServeSpec",
    "DisaggServeStatus",
    "Hardware",
    "ModelSource",
    "ModelSpec",
    "Parallelism",
    "PhaseBounds",
    "PhaseParallelism",
    "Slo",
    "Speculation",
    "Workload",
    "parse_spec",
]
