"""Open-loop Poisson load against an OpenAI-compatible endpoint, measuring what clients see.

Open loop (arrivals do not wait for answers) is what exposes queueing: a closed loop slows its own
arrivals down when the server slows down and hides the overload. Prompts are token-id lists, so the
input length is exact whatever the tokenizer, and `ignore_eos` (vLLM's extension, honoured by
DisaggServe) fixes the output length. TTFT is the time to the first streamed token; TPOT is the
mean gap between the following tokens, as in DistServe.

Library use (the autoscaler benchmark reuses it):

    results = await run_poisson(url, model, rate=8, num_requests=100, input_tokens=512, output_tokens=64)
    summary = summarize(results, ttft_slo_s=0.4, tpot_slo_s=0.02)

A refusal with `Retry-After` (429 overloaded, 503 no workers) is retried after the time it names,
at most `max_retries` times, as the `openai` SDK does by default (2); the time waited counts in the
request's latency. Every result records how it ended (`status`, `kind`), so an overload test can
tell a shed request (429 with Retry-After) from a timeout or a reset connection.

Command line: `python bench/loadgen.py --url http://127.0.0.1:8000 --model tiny --rate 5 --requests 50`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestResult:
    sent_at_s: float  # since the start of the run
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    error: str | None = None
    status: int | None = None  # HTTP status of the last attempt (None: no answer at all)
    retry_after: str | None = None  # its Retry-After header, when it had one
    kind: str | None = None  # how a failure ended: http | in_stream | timeout | connection | silent_cut
    retries: int = 0  # attempts retried after a Retry-After
    token_times_s: list[float] = field(default_factory=list)  # arrival of each streamed token, since sent

    @property
    def shed(self) -> bool:
        """Refused by the server's load shedding (429 with Retry-After), the clean way to fail."""
        return not self.ok and self.status == 429 and bool(self.retry_after)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def tpot_p90_s(self) -> float | None:
        """The request's 90th-percentile gap between streamed tokens: a stall the mean over
        many tokens would dilute (DistServe judges TPOT per request)."""
        gaps = [b - a for a, b in itertools.pairwise(self.token_times_s)]
        return percentile(gaps, 90) if gaps else self.tpot_s

    def meets(self, ttft_slo_s: float, tpot_slo_s: float, tpot_stat: str = "mean") -> bool:
        tpot = self.tpot_p90_s if tpot_stat == "p90" else self.tpot_s
        return bool(self.ok and self.ttft_s is not None and self.ttft_s <= ttft_slo_s
                    and (tpot is None or tpot <= tpot_slo_s))


def synthetic_prompt(rng: random.Random, length: int, vocab_low: int = 3, vocab_high: int = 500) -> list[int]:
    """Random ordinary token ids (the low ids are special tokens in the built-in tokenizer)."""
    return [rng.randrange(vocab_low, vocab_high) for _ in range(length)]


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                      output_tokens: int, started: float, headers: dict[str, str] | None = None,
                      timeout_s: float = 120.0, max_retries: int = 2,
                      max_retry_after_s: float = 60.0) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    sent = time.perf_counter()
    result = RequestResult(sent_at_s=sent - started, ok=False)
    while True:
        wait = await _attempt(session, url, body, headers, timeout_s, sent, result)
        if wait is None or result.retries >= max_retries or wait > max_retry_after_s:
            break
        result.retries += 1
        await asyncio.sleep(wait)
    result.e2e_s = time.perf_counter() - sent
    return result


async def _attempt(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None,
                   timeout_s: float, sent: float, result: RequestResult) -> float | None:
    """One try; returns the seconds to wait before a retry the server invited (Retry-After), else None."""
    try:
        async with session.post(url.rstrip("/") + "/v1/completions", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                result.kind = "http"
                result.retry_after = resp.headers.get("Retry-After")
                if resp.status in (429, 503) and result.retry_after:
                    try:
                        return max(0.0, float(result.retry_after))
                    except ValueError:
                        return None
                return None
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    result.ok = True
                    result.error = result.kind = None
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message"))
                    result.kind = "in_stream"
                    break
                if event.get("choices"):
                    now = time.perf_counter() - sent
                    if result.ttft_s is None:
                        result.ttft_s = now
                    result.token_times_s.append(now)
                if event.get("usage"):
                    result.output_tokens = int(event["usage"]["completion_tokens"])
            else:  # a clean end of the HTTP body without [DONE] or an error: the one silent cut
                result.error, result.kind = "the stream ended without [DONE] or an error", "silent_cut"
    except TimeoutError as exc:
        result.error, result.kind = f"TimeoutError: {exc}", "timeout"
    except aiohttp.ClientError as exc:
        result.error, result.kind = f"{type(exc).__name__}: {exc}", "connection"
    return None


async def run_poisson(url: str, model: str, *, rate: float, num_requests: int, input_tokens: int,
                      output_tokens: int, seed: int = 0, api_key: str | None = None,
                      max_retries: int = 2) -> list[RequestResult]:
    """Sends `num_requests` with exponential gaps of mean 1/rate; returns when all have answered."""
    rng = random.Random(seed)
    prompts = [synthetic_prompt(rng, input_tokens) for _ in range(num_requests)]
    gaps = [rng.expovariate(rate) for _ in range(num_requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        tasks = []
        next_at = started
        for prompt, gap in zip(prompts, gaps, strict=True):
            next_at += gap
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(
                one_request(session, url, model, prompt, output_tokens, started, headers,
                            max_retries=max_retries)))
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(results: list[RequestResult], ttft_slo_s: float, tpot_slo_s: float,
              tpot_stat: str = "mean") -> dict[str, Any]:
    """Percentiles (ms) and SLO attainment; a failed request counts as missing both SLOs.

    `tpot_stat`: what a request's TPOT is — "mean" (over its tokens) or "p90" (of its gaps)."""
    ttft = [r.ttft_s * 1000 for r in results if r.ok and r.ttft_s is not None]

    def tpot_of(r: RequestResult) -> float | None:
        return r.tpot_p90_s if tpot_stat == "p90" else r.tpot_s

    tpot = [t * 1000 for r in results if r.ok and (t := tpot_of(r)) is not None]
    span = max((r.sent_at_s for r in results), default=0.0)
    return {
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
        "shed": sum(r.shed for r in results),  # failed as 429 + Retry-After, after the client's retries
        "retried": sum(r.retries > 0 for r in results),
        "failures_by_kind": dict(sorted(Counter(
            "shed" if r.shed else (r.kind or "unknown") for r in results if not r.ok).items())),
        "achieved_rate": (len(results) - 1) / span if span > 0 else None,
        "ttft_ms": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)},
        "tpot_ms": {f"p{q}": percentile(tpot, q) for q in (50, 90, 99)},
        "ttft_attainment": sum(r.ok and r.ttft_s is not None and r.ttft_s <= ttft_slo_s for r in results)
        / max(1, len(results)),
        "tpot_attainment": sum(r.ok and ((t := tpot_of(r)) is None or t <= tpot_slo_s) for r in results)
        / max(1, len(results)),
        "attainment": sum(r.meets(ttft_slo_s, tpot_slo_s, tpot_stat) for r in results) / max(1, len(results)),
        "tpot_stat": tpot_stat,
        "errors": sorted({r.error for r in results if r.error})[:3],
        "mean_ttft_ms": statistics.fmean(ttft) if ttft else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="router base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--rate", type=float, required=True, help="mean requests per second")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--input-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--ttft-slo-ms", type=float, default=1000)
    parser.add_argument("--tpot-slo-ms", type=float, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key")
    parser.add_argument("--raw", action="store_true", help="also print every request's result")
    args = parser.parse_args()
    results = asyncio.run(run_poisson(args.url, args.model, rate=args.rate, num_requests=args.requests,
                                      input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                                      seed=args.seed, api_key=args.api_key))
    out: dict[str, Any] = {"summary": summarize(results, args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)}
    if args.raw:
        out["results"] = [asdict(r) for r in results]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
