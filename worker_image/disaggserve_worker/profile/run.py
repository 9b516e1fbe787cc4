"""`disaggserve-worker profile`: time the engine's real forward passes over a sweep of shapes.

Prefill batches vary prompt count and length (the model is `a + b·Σl + c·Σl²`); decode steps
vary batch size and context (`a + b·Σctx + c·B`, one set below the batch threshold and one
above). Each shape is timed after a warm-up and the median of the repeats is kept, so one
scheduler hiccup on a shared CPU does not bend the fit.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from disaggserve_worker.contract import TENSOR_SIZES
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.errors import ModelLoadError
from disaggserve_worker.model.kv_pool import KVPool
from disaggserve_worker.model.loader import LoadedModel, load_model, resolve_device
from disaggserve_worker.profile.fit import fit_relative_nonnegative

DISTSERVE_BATCH_THRESHOLD = 95


@dataclass
class Sweep:
    prefill: list[tuple[int, int]]  # (prompts, length)
    decode: list[tuple[int, int]]  # (batch, context per sequence)
    repeats: int


QUICK = Sweep(prefill=[(b, n) for b in (1, 2, 4) for n in (16, 64, 128, 256)],
              decode=[(b, c) for b in (1, 2, 4, 8, 16, 32) for c in (32, 128, 512)], repeats=3)
FULL = Sweep(prefill=[(b, n) for b in (1, 2, 4, 8) for n in (16, 64, 128, 256, 512, 1024, 2048)
                      if b * n <= 8192],
             decode=[(b, c) for b in (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
                     for c in (64, 256, 1024, 2048) if b * c <= 131072], repeats=7)


@dataclass
class Point:
    phase: str
    batch: int
    length: int  # prompt length (prefill) or context (decode), per sequence
    ms: float
    predicted_ms: float = 0.0

    @property
    def features(self) -> list[float]:
        if self.phase == "prefill":
            total = self.batch * self.length
            return [1.0, float(total), float(self.batch * self.length**2)]
        return [1.0, float(self.batch * self.length), float(self.batch)]


@dataclass
class ProfileResult:
    profile: dict[str, Any]
    points: list[Point] = field(default_factory=list)


def _time_step(loaded: LoadedModel, pool: KVPool, news: list[int], pasts: list[int],
               repeats: int) -> float:
    model, device = loaded.model, loaded.model.device
    tables, offset = [], 0
    for n, p in zip(news, pasts, strict=True):
        tables.append(torch.arange(offset, offset + n + p))
        offset += n + p
    layout = BatchLayout.build(news, pasts, tables, device, model.sliding_window)
    ids = torch.randint(0, model.config.vocab_size, (sum(news),), device=device)
    samples = []
    for i in range(repeats + 1):
        model.synchronize()
        start = time.perf_counter()
        model.forward_step(ids, layout, pool)
        model.synchronize()  # every stage and shard, not only the current device
        if i:  # the first run warms caches and kernels
            samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def _threshold(batches: list[int]) -> int:
    """DistServe's 95 when the sweep reaches it; otherwise split the measured sizes in two."""
    sizes = sorted(set(batches))
    if sizes[-1] >= DISTSERVE_BATCH_THRESHOLD and sizes[0] < DISTSERVE_BATCH_THRESHOLD:
        return DISTSERVE_BATCH_THRESHOLD
    return sizes[len(sizes) // 2]


def _coefficients(points: list[Point]) -> dict[str, float]:
    features = np.array([p.features for p in points])
    times = np.array([p.ms for p in points])
    coef = fit_relative_nonnegative(features, times)
    for point, predicted in zip(points, features @ coef, strict=True):
        point.predicted_ms = float(predicted)
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2])}


def _gpu_label(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "-")


def profile_model(loaded: LoadedModel, sweep: Sweep, console: Console | None = None) -> ProfileResult:
    console = console or Console(stderr=True)
    config = loaded.config
    need = max([b * n for b, n in sweep.prefill] + [b * c for b, c in sweep.decode])
    pool = loaded.model.new_kv_pool(need)
    points: list[Point] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("profiling", total=len(sweep.prefill) + len(sweep.decode))
        for batch, length in sweep.prefill:
            ms = _time_step(loaded, pool, [length] * batch, [0] * batch, sweep.repeats)
            points.append(Point("prefill", batch, length, ms))
            progress.advance(task)
        for batch, context in sweep.decode:
            ms = _time_step(loaded, pool, [1] * batch, [context - 1] * batch, sweep.repeats)
            points.append(Point("decode", batch, context, ms))
            progress.advance(task)
    prefill = [p for p in points if p.phase == "prefill"]
    decode = [p for p in points if p.phase == "decode"]
    threshold = _threshold([p.batch for p in decode])
    small = [p for p in decode if p.batch < threshold]
    large = [p for p in decode if p.batch >= threshold]
    dtype_bytes = torch.empty(0, dtype=loaded.model.dtype).element_size()
    entry = {"tensor": loaded.model.tensor_parallel, "pipeline": loaded.model.pipeline_parallel,
             "prefill": _coefficients(prefill),
             "decode_small": _coefficients(small), "decode_large": _coefficients(large),
             "decode_batch_threshold": threshold}
    profile = {
        "model": loaded.name, "gpu": _gpu_label(loaded.model.device),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "source": f"disaggserve-worker profile, {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}, "
                  f"{socket.gethostname()}",
        "model_facts": {"layers": config.num_hidden_layers, "attention_heads": config.num_attention_heads,
                        "kv_heads": config.kv_heads, "hidden_size": config.hidden_size,
                        "parameters": config.parameter_count(), "dtype_bytes": dtype_bytes},
        "entries": [entry],
        "measurements": [{"tensor": entry["tensor"], "phase": p.phase, "batch": p.batch, "length": p.length,
                          "ms": round(p.ms, 4), "predicted_ms": round(p.predicted_ms, 4)} for p in points],
    }
    return ProfileResult(profile, points)


def fit_errors(points: list[Point]) -> np.ndarray:
    """Relative error of the fitted model at each measured point."""
    return np.array([abs(p.predicted_ms - p.ms) / p.ms for p in points])


def report(result: ProfileResult, console: Console) -> None:
    table = Table(title=f"profile of {result.profile['model']} on {result.profile['gpu']}")
    for column in ("tensor", "phase", "points", "median rel. error", "max rel. error"):
        table.add_column(column)
    tensor = str(result.profile["entries"][0]["tensor"])
    for phase in ("prefill", "decode"):
        pts = [p for p in result.points if p.phase == phase]
        errors = fit_errors(pts)
        table.add_row(tensor, phase, str(len(pts)), f"{np.median(errors):.1%}", f"{np.max(errors):.1%}")
    console.print(table)


def auto_tensor_sizes(device: str) -> list[int]:
    """Every size the operator may plan that this machine can run: 1 on a CPU, else up to the GPU count."""
    if resolve_device(device).type != "cuda":
        return [1]
    return [size for size in TENSOR_SIZES if size <= torch.cuda.device_count()]


def merge(results: list[ProfileResult]) -> dict[str, Any]:
    """One profile document with an entry per tensor size: the planner chooses among them."""
    profile = dict(results[0].profile)
    profile["entries"] = [entry for r in results for entry in r.profile["entries"]]
    profile["measurements"] = [m for r in results for m in r.profile["measurements"]]
    return profile


def run_profile(model: str, device: str = "auto", dtype: str = "auto", out: str = "profile.json",
                quick: bool = False, repeats: int | None = None,
                tensor_sizes: list[int] | None = None) -> dict[str, Any]:
    """Profile each tensor size (pipeline 1: the planner derives stages from it) into one file.

    With sizes left to `auto`, a size the model cannot split into or that does not fit in GPU
    memory is skipped with a note (a 70B model has no tensor-1 entry on 80 GB GPUs); sizes asked
    for explicitly must all work.
    """
    console = Console(stderr=True)
    explicit = tensor_sizes is not None
    sweep = QUICK if quick else FULL
    if repeats:
        sweep = Sweep(sweep.prefill, sweep.decode, repeats)
    results: list[ProfileResult] = []
    skipped: list[str] = []
    for size in tensor_sizes or auto_tensor_sizes(device):
        try:
            loaded = load_model(model, device, dtype, tensor=size)
            result = profile_model(loaded, sweep, console)
        except (ModelLoadError, torch.cuda.OutOfMemoryError) as error:
            if explicit:
                raise ModelLoadError(f"tensor size {size}: {error}") from error
            skipped.append(f"tensor {size}: {str(error).splitlines()[0]}")
            console.print(f"skipping tensor size {size}: {error}")
            continue
        finally:
            loaded = None  # free this size's weights before loading the next
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        report(result, console)
        results.append(result)
    if not results:
        raise ModelLoadError("no tensor size could be profiled: " + "; ".join(skipped))
    profile = merge(results)
    Path(out).write_text(json.dumps(profile, indent=2) + "\n")
    console.print(f"wrote {out} (tensor sizes {', '.join(str(e['tensor']) for e in profile['entries'])})")
    return profile
