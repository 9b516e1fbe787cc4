"""Synthetic profiles and specs shared by the planner tests."""

from __future__ import annotations

from typing import Any

import pytest

from disaggserve.planner.profile import LatencyProfile, parse_profile


def coeffs(a: float, b: float, c: float = 0.0) -> dict[str, float]:
    return {"a": a, "b": b, "c": c}


def entry(tensor: int, prefill: dict[str, float], decode: dict[str, float]) -> dict[str, Any]:
    return {
        "tensor": tensor,
        "pipeline": 1,
        "prefill": prefill,
        "decode_small": decode,
        "decode_large": decode,
        "decode_batch_threshold": 95,
    }


def synthetic_profile(
    entries: list[dict[str, Any]],
    *,
    layers: int = 3,
    heads: int = 8,
    parameters: int = 1_000_000,
    **extra: Any,
) -> LatencyProfile:
    """A tiny model (weights ≈ nothing) so memory never decides; `layers` = 3 allows pipeline 1 or 3."""
    doc = {
        "model": "synthetic",
        "gpu": "TEST-GPU",
        "source": "constructed for tests",
        "model_facts": {
            "layers": layers,
            "attention_heads": heads,
            "kv_heads": heads,
            "hidden_size": 64,
            "parameters": parameters,
            "dtype_bytes": 2,
        },
        "stage_overhead_ms": 0.0,
        "entries": entries,
        **extra,
    }
    return parse_profile(doc)


def spec_dict(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "facebook/opt-66b", "source": {"path": "/models/opt-66b"}},
        "slo": {"ttftMs": 2000, "tpotMs": 150, "attainment": 0.9},
        "workload": {"requestRate": 5, "inputTokens": 512, "outputTokens": 128},
        "hardware": {"gpuProduct": "NVIDIA-A100-SXM4-80GB", "gpuMemoryGiB": 80, "gpusPerNode": 8},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@pytest.fixture
def opt66b_spec() -> dict[str, Any]:
    return spec_dict()
