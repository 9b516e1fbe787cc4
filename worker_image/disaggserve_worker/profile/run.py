"""`disaggserve-worker profile`: time what the engine really does per step over a sweep of shapes.

A timed step is what the engine's iteration runs, not only the forward pass: building the batch
layout from *paged* slot tables (blocks of 16 scattered over the pool, as the block allocator
hands them out after some churn), the forward pass, and greedy sampling of every row. Decode
batches mix contexts (uniform around the nominal one), because equal contexts understate the
attention kernel's padding. Each shape is timed after a warm-up in wall time and in this
thread's CPU time; the median of the repeats is kept. Decode shapes are short (1-10 ms on a
CPU) and were the noisy ones: the first shape after the prefill sweep ran up to 35 % slow (a
cold start for the decode path), and one pass's medians missed the fit by 14-44 % at batch
sizes that changed from run to run. So the decode path is warmed up first, and the decode
sweep runs in `passes` passes, each in a new shuffled order, keeping each shape's median over
the passes: a slow moment of the host then hits one pass of a shape, not its whole record.
On a CPU running one torch thread the fit uses CPU time, so a busy neighbour (the machine is
shared) does not bend it; on a GPU, where kernels run outside the thread, wall time. Decode
sweeps enough batch sizes to see the knee where steps stop being flat, and `fit.fit_entry`
splits the decode line there.

The fit and the document format live in `fit.py` (public: other engines' profilers use them).
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
from disaggserve_worker.profile.fit import Sample, errors_by_batch, fit_entry, fit_problems, predict, profile_document

BLOCK_SIZE = 16  # the engine's KV block size
CONTEXT_SPREAD = 0.5  # decode contexts uniform in [(1 - s)·c, (1 + s)·c]


@dataclass
class Sweep:
    prefill: list[tuple[int, int]]  # (prompts, length)
    decode: list[tuple[int, int]]  # (batch, mean context per sequence)
    repeats: int
    passes: int = 1  # decode sweeps, each in a new order; a shape keeps its median over them


QUICK = Sweep(prefill=[(b, n) for b in (1, 2, 4) for n in (16, 64, 128, 256)],
              decode=[(b, c) for b in (1, 2, 4, 8, 12, 16, 24, 32) for c in (32, 128, 512)], repeats=3)
FULL = Sweep(prefill=[(b, n) for b in (1, 2, 4, 8) for n in (16, 64, 128, 256, 512, 1024, 2048)
                      if b * n <= 8192],
             decode=[(b, c) for b in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
                     for c in (64, 256, 1024, 2048) if b * c <= 131072], repeats=7, passes=3)


@dataclass
class ProfileResult:
    profile: dict[str, Any]
    points: list[Sample] = field(default_factory=list)


def _paged_tables(totals: list[int], pool_slots: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """Slot tables as the block allocator gives them: whole blocks, scattered over the pool."""
    blocks_needed = [-(-n // BLOCK_SIZE) for n in totals]
    free = rng.permutation(pool_slots // BLOCK_SIZE)
    if sum(blocks_needed) > len(free):
        raise ValueError("the profiling KV pool is too small for this shape")
    tables, used = [], 0
    for count in blocks_needed:
        blocks = torch.from_numpy(free[used:used + count].copy()).long()
        used += count
        tables.append((blocks[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten())
    return tables


def _uses_cpu_time(loaded: LoadedModel) -> bool:
    """Thread CPU time measures the step only when this thread does all of its work."""
    return loaded.model.device.type == "cpu" and torch.get_num_threads() == 1


def _time_step(loaded: LoadedModel, pool: KVPool, pool_slots: int, news: list[int], pasts: list[int],
               repeats: int, rng: np.random.Generator) -> tuple[float, float]:
    """(median wall ms, median thread-CPU ms) of layout build + forward + greedy sampling."""
    model, device = loaded.model, loaded.model.device
    tables = _paged_tables([n + p for n, p in zip(news, pasts, strict=True)], pool_slots, rng)
    ids = torch.randint(0, model.config.vocab_size, (sum(news),), device=device)
    walls, cpus = [], []
    for i in range(repeats + 1):
        model.synchronize()
        wall, cpu = time.perf_counter(), time.thread_time()
        layout = BatchLayout.build(news, pasts, tables, device, model.sliding_window)
        logits = model.forward_step(ids, layout, pool)  # one row per sequence
        logits.argmax(dim=-1).tolist()  # greedy sampling, as the engine's sample_rows does
        model.synchronize()  # every stage and shard, not only the current device
        if i:  # the first run warms caches and kernels
            walls.append((time.perf_counter() - wall) * 1000)
            cpus.append((time.thread_time() - cpu) * 1000)
    return statistics.median(walls), statistics.median(cpus)


def _mixed_contexts(batch: int, context: int, rng: np.random.Generator) -> list[int]:
    lo, hi = max(1, int(context * (1 - CONTEXT_SPREAD))), max(1, int(context * (1 + CONTEXT_SPREAD)))
    pasts = rng.integers(lo, hi + 1, size=batch)
    return [int(p) for p in pasts]


def _gpu_label(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "-")


def profile_model(loaded: LoadedModel, sweep: Sweep, console: Console | None = None) -> ProfileResult:
    console = console or Console(stderr=True)
    config = loaded.config
    rng = np.random.default_rng(0)
    spread = 1 + CONTEXT_SPREAD
    need = max([b * n for b, n in sweep.prefill] + [int(b * (c * spread + 1)) for b, c in sweep.decode])
    pool_slots = (-(-need // BLOCK_SIZE) + max(len(sweep.decode), 8)) * BLOCK_SIZE * 2
    pool = loaded.model.new_kv_pool(pool_slots)
    cpu_time = _uses_cpu_time(loaded)
    points: list[Sample] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("profiling", total=len(sweep.prefill) + len(sweep.decode))
        for batch, length in sweep.prefill:
            wall, cpu = _time_step(loaded, pool, pool_slots, [length] * batch, [0] * batch, sweep.repeats, rng)
            points.append(Sample("prefill", batch, length, cpu if cpu_time else wall, wall, cpu))
            progress.advance(task)
        shapes = [_mixed_contexts(batch, context, rng) for batch, context in sweep.decode]
        warm = shapes[len(shapes) // 2]
        _time_step(loaded, pool, pool_slots, [1] * len(warm), warm, sweep.repeats, rng)  # untimed
        timed: list[list[tuple[float, float]]] = [[] for _ in shapes]
        for _ in range(max(1, sweep.passes)):
            for i in rng.permutation(len(shapes)):
                pasts = shapes[i]
                timed[i].append(_time_step(loaded, pool, pool_slots, [1] * len(pasts), pasts, sweep.repeats, rng))
            progress.advance(task, len(shapes) / max(1, sweep.passes))
        for pasts, runs in zip(shapes, timed, strict=True):
            wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
            mean_ctx = round(sum(pasts) / len(pasts)) + 1
            points.append(Sample("decode", len(pasts), mean_ctx, cpu if cpu_time else wall, wall, cpu))
    entry = fit_entry(points, tensor=loaded.model.tensor_parallel, pipeline=loaded.model.pipeline_parallel)
    dtype_bytes = torch.empty(0, dtype=loaded.model.dtype).element_size()
    clock = "thread CPU time" if cpu_time else "wall time"
    profile = profile_document(
        model=loaded.name,
        gpu=_gpu_label(loaded.model.device),
        dtype=str(loaded.model.dtype).removeprefix("torch."),
        facts={"layers": config.num_hidden_layers, "attention_heads": config.num_attention_heads,
               "kv_heads": config.kv_heads, "hidden_size": config.hidden_size,
               "parameters": config.parameter_count(), "dtype_bytes": dtype_bytes},
        entries=[entry],
        samples={entry["tensor"]: points},
        source=f"disaggserve-worker profile, {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}, "
               f"{socket.gethostname()}, fitted on {clock}",
    )
    return ProfileResult(profile, points)


def fit_errors(points: list[Sample], entry: dict[str, Any]) -> np.ndarray:
    """Relative error of the fitted model at each measured point."""
    return np.array([abs(predict(entry, p) - p.ms) / p.ms for p in points])


def report(result: ProfileResult, console: Console) -> None:
    entry = result.profile["entries"][0]
    table = Table(title=f"profile of {result.profile['model']} on {result.profile['gpu']}")
    for column in ("tensor", "phase", "points", "median rel. error", "worst batch size"):
        table.add_column(column)
    by_batch = errors_by_batch(result.points, entry)
    for phase in ("prefill", "decode"):
        pts = [p for p in result.points if p.phase == phase]
        errors = fit_errors(pts, entry)
        worst = max((x for x in by_batch if x[0] == phase), key=lambda x: abs(x[2]))
        table.add_row(str(entry["tensor"]), phase, str(len(pts)), f"{np.median(errors):.1%}",
                      f"batch {worst[1]}: {worst[2]:+.0%}")
    console.print(table)
    problems = fit_problems(result.points, entry)
    if problems:
        console.print("[yellow]the fit misses its own samples by more than 10% at: " + "; ".join(problems)
                      + ". The planner refuses this profile where a plan runs those batch sizes; re-run on "
                        "an idle node or with more repeats.[/yellow]")


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
        sweep = Sweep(sweep.prefill, sweep.decode, repeats, sweep.passes)
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
