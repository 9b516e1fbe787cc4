"""Fitting measured step times into the planner's profile format — the public seam every engine's
profiler uses (the built-in engine's `run.py`, and any other engine that times its own steps).

The format is DistServe's iteration-time model: prefill `a + b·Σl + c·Σl²`, decode
`a + b·Σctx + c·B` with one coefficient set below `decode_batch_threshold` and one from it on.
Use it as:

    samples = [Sample("decode", batch=8, length=512, ms=12.3), ...]   # one per timed step shape
    entry = fit_entry(samples, tensor=1)                                # coefficients + threshold
    problems = fit_problems(samples, entry)                            # where the fit misses
    doc = profile_document(model=..., gpu=..., dtype=..., facts=..., entries=[entry], samples=samples)

Fits minimise *relative* error with non-negative coefficients. Relative because the planner
cares about percentages: an absolute fit would let the long batches dominate and mispredict
short ones by 2x. Non-negative because a negative coefficient predicts negative times outside
the measured range (and the planner's profile schema refuses it). With three unknowns, trying
every subset of columns is exact NNLS. The decode threshold is chosen among the measured batch
sizes where the two lines miss the samples least, so the fit follows the engine's knee instead
of a fixed 95. The planner refuses a profile whose fit misses its own samples by more than
`MAX_FIT_ERROR` (median per batch size) at the batch sizes a plan uses; `fit_problems` is the
same check, for the profiler to report before anyone plans with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

MAX_FIT_ERROR = 0.10  # the planner's limit (disaggserve.planner.profile.MAX_FIT_ERROR)
DISTSERVE_BATCH_THRESHOLD = 95
MIN_POINTS_PER_SIDE = 3  # three coefficients per decode line


@dataclass
class Sample:
    """One timed step shape. `ms` is what the fit uses; `wall_ms`/`cpu_ms` are kept for the record
    (the built-in engine fits thread CPU time on a one-thread CPU, so neighbours' load stays out
    of the fit, and wall time on a GPU, where kernels run outside the thread)."""

    phase: str  # "prefill" or "decode"
    batch: int
    length: int  # prompt length (prefill) or mean context per sequence (decode)
    ms: float
    wall_ms: float | None = None
    cpu_ms: float | None = None

    @property
    def features(self) -> list[float]:
        if self.phase == "prefill":
            return [1.0, float(self.batch * self.length), float(self.batch * self.length**2)]
        return [1.0, float(self.batch * self.length), float(self.batch)]


def fit_relative_nonnegative(features: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Coefficients β ≥ 0 minimising Σ((Xβ − y)/y)²; features (n, k), times (n,) > 0."""
    if features.ndim != 2 or features.shape[0] != times.shape[0]:
        raise ValueError("features must be (n, k) with one row per measured time")
    if np.any(times <= 0):
        raise ValueError("measured times must be positive")
    weighted = features / times[:, None]
    target = np.ones_like(times)
    best, best_residual = np.zeros(features.shape[1]), float(np.sum(target**2))
    columns = range(features.shape[1])
    for size in range(1, features.shape[1] + 1):
        for subset in combinations(columns, size):
            sub = weighted[:, list(subset)]
            coef, *_ = np.linalg.lstsq(sub, target, rcond=None)
            if np.any(coef < 0):
                continue
            residual = float(np.sum((sub @ coef - target) ** 2))
            if residual < best_residual:
                best_residual = residual
                best = np.zeros(features.shape[1])
                best[list(subset)] = coef
    return best


def coefficients(samples: list[Sample]) -> dict[str, float]:
    """{a, b, c} of one phase (or one side of the decode threshold)."""
    coef = fit_relative_nonnegative(np.array([s.features for s in samples]), np.array([s.ms for s in samples]))
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2])}


def predict(entry: dict[str, Any], s: Sample) -> float:
    if s.phase == "prefill":
        c = entry["prefill"]
    else:
        c = entry["decode_small"] if s.batch < entry["decode_batch_threshold"] else entry["decode_large"]
    f = s.features
    return c["a"] * f[0] + c["b"] * f[1] + c["c"] * f[2]


def errors_by_batch(samples: list[Sample], entry: dict[str, Any]) -> list[tuple[str, int, float]]:
    """(phase, batch, median signed relative error of the fit over that batch size's samples)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for s in samples:
        groups.setdefault((s.phase, s.batch), []).append((predict(entry, s) - s.ms) / s.ms)
    out = []
    for (phase, batch), errs in sorted(groups.items()):
        errs.sort()
        out.append((phase, batch, errs[len(errs) // 2]))
    return out


def _decode_split(samples: list[Sample]) -> tuple[int, dict[str, float], dict[str, float]]:
    sizes = sorted({s.batch for s in samples})
    best: tuple[float, int, dict[str, float], dict[str, float]] | None = None
    for threshold in sizes[1:]:
        small = [s for s in samples if s.batch < threshold]
        large = [s for s in samples if s.batch >= threshold]
        if len(small) < MIN_POINTS_PER_SIDE or len(large) < MIN_POINTS_PER_SIDE:
            continue
        cs, cl = coefficients(small), coefficients(large)
        entry = {"decode_small": cs, "decode_large": cl, "decode_batch_threshold": threshold}
        worst = max(abs(e) for _, _, e in errors_by_batch(samples, entry))
        if best is None or worst < best[0]:
            best = (worst, threshold, cs, cl)
    if best is None:  # too few sizes to split: one line for both sides
        one = coefficients(samples)
        return DISTSERVE_BATCH_THRESHOLD, one, one
    return best[1], best[2], best[3]


def fit_entry(samples: list[Sample], tensor: int = 1, pipeline: int = 1) -> dict[str, Any]:
    """A profile entry for one (tensor, pipeline) shape from its prefill and decode samples."""
    prefill = [s for s in samples if s.phase == "prefill"]
    decode = [s for s in samples if s.phase == "decode"]
    if not prefill or not decode:
        raise ValueError("a profile entry needs prefill and decode samples")
    threshold, small, large = _decode_split(decode)
    return {
        "tensor": tensor,
        "pipeline": pipeline,
        "prefill": coefficients(prefill),
        "decode_small": small,
        "decode_large": large,
        "decode_batch_threshold": threshold,
    }


def fit_problems(samples: list[Sample], entry: dict[str, Any], limit: float = MAX_FIT_ERROR) -> list[str]:
    """Batch sizes where the fit misses its samples by more than `limit` (the planner's check)."""
    return [
        f"{phase} batch {batch}: fit {abs(err):.0%} {'above' if err > 0 else 'below'} the measured times"
        for phase, batch, err in errors_by_batch(samples, entry)
        if abs(err) > limit
    ]


def profile_document(
    *,
    model: str,
    gpu: str,
    dtype: str,
    facts: dict[str, int],
    entries: list[dict[str, Any]],
    samples: dict[int, list[Sample]],
    source: str,
    overheads: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document the operator reads (`disaggserve.planner.profile.LatencyProfile`).

    `facts`: layers, attention_heads, kv_heads, hidden_size, parameters, dtype_bytes. `samples`
    by tensor size: kept as `measurements` so the planner can check the fit where it plans.
    `overheads`: per-process costs outside the model and the measured KV link (see
    `profile/overheads.py`)."""
    doc: dict[str, Any] = {
        "model": model,
        "gpu": gpu,
        "dtype": dtype,
        "source": source,
        "model_facts": facts,
        "entries": entries,
        "measurements": [
            {
                "tensor": tensor,
                "phase": s.phase,
                "batch": s.batch,
                "length": s.length,
                "ms": round(s.ms, 4),
                "wall_ms": None if s.wall_ms is None else round(s.wall_ms, 4),
                "cpu_ms": None if s.cpu_ms is None else round(s.cpu_ms, 4),
                "predicted_ms": round(predict(next(e for e in entries if e["tensor"] == tensor), s), 4),
            }
            for tensor, group in samples.items()
            for s in group
        ],
    }
    if overheads:
        doc["overheads"] = overheads
    return doc
