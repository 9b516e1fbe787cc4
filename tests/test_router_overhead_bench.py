"""The pure parts of bench/router_overhead.py: reading CPU time from /proc, reading an SSE body,
summarizing runs. Behaviour only; no timings are judged here."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import router_overhead as bench


def test_cpu_from_a_stat_line_counts_fields_after_the_command_name():
    # A command name with spaces and a ')' must not shift the fields: utime 250, stime 50 ticks.
    rest = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30
    line = "1234 (odd) name (x)) " + " ".join(rest)
    assert bench.cpu_seconds_from_stat(line, clock_ticks=100) == pytest.approx(3.0)


def test_cpu_from_schedstat_is_nanoseconds():
    assert bench.cpu_seconds_from_schedstat("1500000000 20000 31\n") == pytest.approx(1.5)


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="needs Linux /proc schedstat")
def test_process_cpu_grows_with_work_done():
    before = bench.process_cpu(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    after = bench.process_cpu(os.getpid())
    assert after["schedstat_s"] - before["schedstat_s"] >= 0.04


def _sse(*chunks: object) -> bytes:
    return b"".join(bench.sse_event(c if isinstance(c, bytes) else json.dumps(c).encode()) for c in chunks)


def test_an_sse_body_gives_its_usage_and_its_done():
    body = _sse({"choices": [{"delta": {"content": "a"}}]}, {"choices": [{"delta": {"content": "b"}}]},
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
                b"[DONE]")
    result = bench.parse_sse(body)
    assert (result.events, result.completion_tokens, result.done, result.error) == (3, 2, True, None)


def test_a_stream_cut_by_an_error_is_not_done():
    body = _sse({"choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "worker died"}})
    result = bench.parse_sse(body)
    assert not result.done and result.completion_tokens is None and "worker died" in (result.error or "")


def test_summary_takes_medians_and_router_over_proxy_ratios():
    runs = [{"server": "router", "concurrency": 8, "cpu_s": cpu, "tokens": 1000, "wall_s": 1.0}
            for cpu in (0.3, 0.1, 0.2)]
    runs += [{"server": "proxy", "concurrency": 8, "cpu_s": cpu, "tokens": 1000, "wall_s": 2.0}
             for cpu in (0.05, 0.04, 0.06)]
    summary = bench.summarize(runs)
    router = summary["cells"]["router@8"]
    assert router["cpu_ms_per_token"] == pytest.approx(0.2)
    assert router["tokens_per_core_s"] == pytest.approx(5000)
    assert router["client_tokens_per_s"] == pytest.approx(1000)
    assert summary["router_over_proxy_cpu_per_token"]["router/proxy@8"] == pytest.approx(4.0)


def test_summary_without_a_reference_has_no_ratio():
    summary = bench.summarize([{"server": "router", "concurrency": 1, "cpu_s": 0.1, "tokens": 10, "wall_s": 1}])
    assert summary["router_over_proxy_cpu_per_token"] == {}
