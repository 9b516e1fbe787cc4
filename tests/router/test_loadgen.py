"""The load generator's accounting: a failed request misses both SLOs, TPOT excludes the first
token, goodput-relevant attainment needs both SLOs at once."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from loadgen import RequestResult, percentile, summarize, synthetic_prompt


def test_tpot_excludes_first_token() -> None:
    r = RequestResult(0.0, True, ttft_s=0.2, e2e_s=1.2, output_tokens=11)
    assert r.tpot_s is not None and abs(r.tpot_s - 0.1) < 1e-9
    assert RequestResult(0.0, True, ttft_s=0.2, e2e_s=0.2, output_tokens=1).tpot_s is None


def test_attainment_needs_both_slos_and_success() -> None:
    results = [
        RequestResult(0.0, True, ttft_s=0.1, e2e_s=0.1 + 9 * 0.01, output_tokens=10),  # meets both
        RequestResult(0.5, True, ttft_s=0.9, e2e_s=0.9 + 9 * 0.01, output_tokens=10),  # TTFT miss
        RequestResult(1.0, True, ttft_s=0.1, e2e_s=0.1 + 9 * 0.05, output_tokens=10),  # TPOT miss
        RequestResult(1.5, False, error="HTTP 503"),  # failed
    ]
    s = summarize(results, ttft_slo_s=0.5, tpot_slo_s=0.02)
    assert s["attainment"] == 0.25
    assert s["ttft_attainment"] == 0.5 and s["tpot_attainment"] == 0.5
    assert s["failed"] == 1 and s["errors"] == ["HTTP 503"]
    assert s["achieved_rate"] == 2.0


def test_percentile_and_prompt() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0], 100) == 3.0
    prompt = synthetic_prompt(random.Random(1), 512)
    assert len(prompt) == 512 and min(prompt) >= 3


async def test_retry_after_is_honoured_and_failures_say_how_they_ended() -> None:
    import json

    import aiohttp
    from aiohttp import web

    from loadgen import one_request

    calls = {"n": 0}

    async def completions(request: web.Request) -> web.StreamResponse:
        calls["n"] += 1
        mode = request.headers.get("X-Mode")
        if mode == "always-429" or (mode == "429-once" and calls["n"] == 1):
            return web.json_response({"error": {"message": "busy"}}, status=429, headers={"Retry-After": "0"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        if mode == "cut":
            return response  # ends without [DONE]
        await response.write(b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 1}}).encode()
                             + b"\n\ndata: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            retried = await one_request(session, url, "m", [5], 1, 0.0, {"X-Mode": "429-once"})
            assert retried.ok and retried.retries == 1 and retried.output_tokens == 1
            shed = await one_request(session, url, "m", [5], 1, 0.0, {"X-Mode": "always-429"}, max_retries=2)
            assert not shed.ok and shed.shed and shed.retries == 2 and shed.status == 429
            cut = await one_request(session, url, "m", [5], 1, 0.0, {"X-Mode": "cut"})
            assert not cut.ok and not cut.shed and cut.kind == "silent_cut"
        s = summarize([retried, shed, cut], 1.0, 1.0)
        assert s["failed"] == 2 and s["shed"] == 1 and s["failures_by_kind"] == {"shed": 1, "silent_cut": 1}
    finally:
        await runner.cleanup()
