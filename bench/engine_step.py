"""Built-in engine throughput: decode tokens/s at batch 1, 8 and 32, and prefill tokens/s.

Drives the engine through its public API (`Engine.submit` + the token streams), so the same
script measures any version of it: run it with another checkout's `worker_image` first on
PYTHONPATH (e.g. a `git worktree` of main) to get the "before" column, then compare with
`--compare before.json`.

- decode: B requests with a short prompt run together; after every request has produced a
  few tokens, tokens are counted over a fixed window of steady-state decode.
- prefill: P prompts of L tokens submitted at once with max_tokens 1; prompt tokens divided
  by the time until the last one finished.
Rates are per CPU-second of the process (one torch thread: a per-core figure that a shared,
loaded host distorts far less than wall time), wall-clock rates beside them. Medians over
repeats; the machine load is recorded.

    python bench/engine_step.py [--model builtin:small-llama] [--out bench/results/engine_step.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import disaggserve_worker
from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.model.loader import load_model

RESULTS = Path(__file__).parent / "results"


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


def summary(runs: list[tuple[float, float]]) -> dict[str, object]:
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    return {"tokens_per_s_median": statistics.median(cpu), "tokens_per_s": cpu,
            "wall_tokens_per_s_median": statistics.median(wall), "wall_tokens_per_s": wall}


async def run(args: argparse.Namespace) -> dict[str, object]:
    loaded = load_model(args.model, device="cpu")
    load_before = os.getloadavg()
    decode: dict[str, object] = {}
    for batch in args.batches:
        runs = [await decode_rate(loaded, batch, args.prompt_len, args.warm, args.window) for _ in range(args.repeats)]
        decode[str(batch)] = summary(runs)
        print(f"decode batch {batch:3d}: {decode[str(batch)]['tokens_per_s_median']:8.1f} tokens/CPU-s "
              f"({decode[str(batch)]['wall_tokens_per_s_median']:.1f}/s wall)")
    prefill = summary([await prefill_rate(loaded, args.prefill_prompts, args.prefill_len) for _ in range(args.repeats)])
    print(f"prefill: {prefill['tokens_per_s_median']:8.1f} tokens/CPU-s "
          f"({prefill['wall_tokens_per_s_median']:.1f}/s wall)")
    source = Path(disaggserve_worker.__file__).parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=source)
    return {
        "benchmark": "engine_step", "label": args.label, "model": args.model, "engine_source": str(source),
        "engine_commit": commit.stdout.strip(), "torch_threads": torch.get_num_threads(),
        "unit": "tokens per CPU-second of the whole process (engine, event loop): a per-core rate "
                "that a loaded, shared host distorts far less than wall time; wall rates beside it",
        "decode": decode, "prefill": {"prompts": args.prefill_prompts, "prompt_len": args.prefill_len, **prefill},
        "repeats": args.repeats, "decode_prompt_len": args.prompt_len, "window_s": args.window,
        "host": platform.node(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "note": "shared machine (several sessions at once): compare columns measured back to back",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--prefill-prompts", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "engine_step.json"))
    parser.add_argument("--label", default="built-in engine (this checkout)")
    parser.add_argument("--compare", nargs="*", default=[],
                        help="earlier result files (e.g. main's engine, vLLM-CPU) to put beside this one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = asyncio.run(run(args))
    columns = {}
    for path in args.compare:
        other = json.loads(Path(path).read_text())
        label = other.get("label", Path(path).stem)
        columns[label] = {
            "decode_ratio_this_over_other": {b: result["decode"][b]["tokens_per_s_median"]  # type: ignore[index]
                                             / other["decode"][b]["tokens_per_s_median"]
                                             for b in result["decode"] if b in other["decode"]},  # type: ignore[operator]
            "prefill_ratio_this_over_other": result["prefill"]["tokens_per_s_median"]  # type: ignore[index]
            / other["prefill"]["tokens_per_s_median"],
        }
        print(label, json.dumps(columns[label]))
    result["compared_with"] = columns
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
