"""Engine renderers: the per-engine parts of worker pods (`spec.engine.kind`)."""

from __future__ import annotations

from disaggserve.api.spec import DisaggServeSpec
from disaggserve.resources.engines.base import EngineRenderer, WorkerContainer
from disaggserve.resources.engines.builtin import BuiltinEngine
from disaggserve.resources.engines.vllm import VllmEngine

_RENDERERS: dict[str, EngineRenderer] = {"builtin": BuiltinEngine(), "vllm": VllmEngine()}


def renderer_for(spec: DisaggServeSpec) -> EngineRenderer:
    return _RENDERERS[spec.engine.kind]


__all__ = ["BuiltinEngine", "EngineRenderer", "VllmEngine", "WorkerContainer", "renderer_for"]
