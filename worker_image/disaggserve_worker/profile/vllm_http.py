"""`disaggserve-worker profile-vllm`: measure a running vLLM server into the planner's profile format.

The planner plans from per-iteration latencies (DistServe's model: prefill `a + b·Σl + c·Σl²`,
decode `a + b·Σctx + c·B`). A vLLM server exposes no per-iteration timer, so this measures them
from outside over its OpenAI API, as a load generator would see them:

- prefill (batch b, length n): b prompts of n random tokens sent at once with `max_tokens: 1`;
  the time until the last answer is one prefill iteration holding all b prompts (they fit one
  batch while b·n ≤ `--max-num-batched-tokens`; larger shapes are skipped);
- decode (batch B, context c): B streams of prompt c sent at once with `ignore_eos`; the step
  time is the median gap between consecutive tokens of the streams once all B are decoding.

Each shape is the median of `repeats` runs after one warm-up, and the fitting is the built-in
profiler's (`profile/run.py`), so the file has the same entries the planner reads. What is
measured includes HTTP and scheduling overhead, which is what a request pays; prefix caching is
defeated by fresh random prompts per run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from disaggserve_worker.profile.fit import Sample, fit_entry, profile_document
from disaggserve_worker.profile.run import FULL, QUICK, Sweep


async def _completion(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                      max_tokens: int) -> list[float]:
    """Arrival times (perf_counter) of each streamed token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    stamps: list[float] = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"vLLM at {url} answered {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
                continue
            event = json.loads(line[5:])
            ids = [t for c in event.get("choices") or [] for t in c.get("token_ids") or []]
            stamps += [time.perf_counter()] * len(ids)
    return stamps


def _prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]


async def measure(url: str, model: str, sweep: Sweep, vocab: int, max_batched_tokens: int,
                  decode_tokens: int = 12) -> list[Sample]:
    rng = random.Random(7)
    points: list[Sample] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        for batch, length in sweep.prefill:
            if batch * length > max_batched_tokens:
                continue
            samples = []
            for i in range(sweep.repeats + 1):
                start = time.perf_counter()
                await asyncio.gather(*(_completion(session, url, model, _prompt(rng, length, vocab), 1)
                                       for _ in range(batch)))
                if i:
                    samples.append((time.perf_counter() - start) * 1000)
            points.append(Sample("prefill", batch, length, statistics.median(samples)))
        for batch, context in sweep.decode:
            samples = []
            for i in range(sweep.repeats + 1):
                streams = await asyncio.gather(*(
                    _completion(session, url, model, _prompt(rng, context, vocab), decode_tokens)
                    for _ in range(batch)))
                all_decoding = max(s[0] for s in streams if s)  # every stream has its first token
                gaps = [b - a for s in streams for a, b in itertools.pairwise(s) if a >= all_decoding]
                if i and gaps:
                    samples.append(statistics.median(gaps) * 1000)
            if samples:
                points.append(Sample("decode", batch, context, statistics.median(samples)))
    return points


def build_profile(points: list[Sample], *, model: str, gpu: str, dtype: str, tensor: int, pipeline: int,
                  facts: dict[str, Any], url: str) -> dict[str, Any]:
    """The planner's profile document (`profile/fit.py`, as the built-in profiler writes it)."""
    prefill = [p for p in points if p.phase == "prefill"]
    decode = [p for p in points if p.phase == "decode"]
    if len(prefill) < 3 or len(decode) < 6:
        raise RuntimeError(f"too few shapes measured ({len(prefill)} prefill, {len(decode)} decode) to fit")
    entry = fit_entry(points, tensor=tensor, pipeline=pipeline)
    return profile_document(
        model=model, gpu=gpu, dtype=dtype, facts=facts, entries=[entry], samples={tensor: points},
        source=f"disaggserve-worker profile-vllm {url}, {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")


def facts_from_checkpoint(folder: str | None) -> tuple[dict[str, Any] | None, int]:
    """(model_facts, vocab size) from a checkpoint's config.json, when the folder is given."""
    if not folder or not (Path(folder) / "config.json").exists():
        return None, 500
    c = json.loads((Path(folder) / "config.json").read_text())
    heads, hidden, layers = c["num_attention_heads"], c["hidden_size"], c["num_hidden_layers"]
    kv_heads = c.get("num_key_value_heads", heads)
    inter, vocab = c.get("intermediate_size", 4 * hidden), c["vocab_size"]
    per_layer = 2 * hidden * hidden + 2 * hidden * (hidden * kv_heads // heads) + 3 * hidden * inter
    params = layers * per_layer + vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    facts = {"layers": layers, "attention_heads": heads, "kv_heads": kv_heads, "hidden_size": hidden,
             "parameters": params, "dtype_bytes": 2}
    return facts, vocab


def run(url: str, model: str, out: str, *, quick: bool, checkpoint: str | None, gpu: str, dtype: str,
        tensor: int, pipeline: int, max_batched_tokens: int) -> dict[str, Any]:
    sweep = QUICK if quick else FULL
    facts, vocab = facts_from_checkpoint(checkpoint)
    if facts is None:
        raise RuntimeError("--checkpoint: the folder with the served model's config.json (the planner needs "
                           "its layers, heads and size)")
    points = asyncio.run(measure(url.rstrip("/"), model, sweep, vocab, max_batched_tokens))
    profile = build_profile(points, model=model, gpu=gpu, dtype=dtype, tensor=tensor, pipeline=pipeline,
                            facts=facts, url=url)
    Path(out).write_text(json.dumps(profile, indent=2) + "\n")
    return profile
