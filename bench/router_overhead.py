"""The router's CPU per streamed token, against a minimal pass-through proxy on the same stack.

The router (`disaggserve_worker.router`) turns each worker token into an OpenAI SSE chunk:
detokenizing, holding back stop strings, counting, shaping JSON, writing to the client. On a
2-vCPU host every CPU second it spends is one the workers do not get, and one router core caps
the tokens/s a deployment can stream. This bench measures that cost, in CPU seconds of the
router process per streamed token, read from `/proc/<pid>/schedstat` (nanoseconds on CPU;
`/proc/<pid>/stat` utime+stime in clock ticks beside it) before and after a closed-loop run.

Three processes per measured server, so no one else's CPU is billed to it:
- upstream: by default a real built-in worker (`--upstream worker`: colocated role on
  `builtin:tiny-llama`, one thread, serving `/internal/generate` as in a deployment). With
  `--upstream replay`, a FAKE worker instead (`serve_replay` below, clearly not an engine): it
  speaks the same internal contract (`/readyz`, `/internal/load`, `/internal/generate` NDJSON
  events `{token_id, text, finish_reason}`), replaying a fixed cycle of vocabulary ids as fast as
  its event loop allows, one write per token — for measuring the router when the workers are not
  the bottleneck.
- the measured server: the real router (`python -m disaggserve_worker.router.cli router`), or
  the reference: `serve_proxy` below, the least an aiohttp relay can do per token — the same
  library stack as the router (aiohttp server, aiohttp client session), one upstream NDJSON
  line in, one SSE event out (`data: <line>`), no tokenizer, no JSON work. Its CPU per token is
  the floor of this stack's cost; the router's ratio to it is what the router adds.
- the client: this process, closed loop at each concurrency, streaming chat (or completion)
  requests with `ignore_eos` and a fixed `max_tokens`, checking each stream ends in `[DONE]`
  and counting tokens from its `usage`.

Router and proxy runs are interleaved repeat by repeat so host load hits both alike; medians
over repeats. JSON to bench/results/router_overhead.json with the load average at start and end.

    PYTHONPATH=worker_image python bench/router_overhead.py [--upstream worker|replay]
        [--concurrency 1 8 32] [--requests 48] [--max-tokens 128] [--repeats 3] [--endpoint chat]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:tiny-llama"
SERVED = "tiny"
PROMPT = "Tell me a story about a router that streamed tokens to many clients at once."
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---- pure parts (tests/test_router_overhead_bench.py) --------------------------------------------


def cpu_seconds_from_stat(stat_line: str, clock_ticks: int = CLK_TCK) -> float:
    """utime + stime of a `/proc/<pid>/stat` line, in seconds. The command name (field 2) may hold
    spaces and parentheses, so fields are counted from the last ')'."""
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def cpu_seconds_from_schedstat(text: str) -> float:
    """Time on CPU of a `/proc/<pid>/schedstat` line (first field, nanoseconds), in seconds."""
    return int(text.split()[0]) / 1e9


def process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a whole process so far: every thread's schedstat summed, and utime+stime."""
    out = {"stat_s": cpu_seconds_from_stat(Path(f"/proc/{pid}/stat").read_text())}
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):  # a thread that just ended
            total += cpu_seconds_from_schedstat((task / "schedstat").read_text())
    out["schedstat_s"] = total
    return out


@dataclass
class StreamResult:
    """What one streamed answer held, as a client reads it."""

    events: int  # data events before [DONE]
    completion_tokens: int | None  # from the usage chunk
    done: bool  # ended with data: [DONE]
    error: str | None = None


def parse_sse(body: bytes) -> StreamResult:
    """Reads an SSE body: counts its data events, takes `usage.completion_tokens` from the last chunk
    that has one, notes an error event and whether `[DONE]` closed it."""
    events, tokens, done, error = 0, None, False, None
    for block in body.split(b"\n\n"):
        block = block.strip()
        if not block.startswith(b"data: "):
            continue
        data = block[len(b"data: "):]
        if data == b"[DONE]":
            done = True
            continue
        events += 1
        chunk = json.loads(data)
        if isinstance(chunk, dict):
            if chunk.get("error"):
                error = str(chunk["error"])
            usage = chunk.get("usage")
            if isinstance(usage, dict) and "completion_tokens" in usage:
                tokens = int(usage["completion_tokens"])
    return StreamResult(events, tokens, done, error)


def per_token(cpu_s: float, tokens: int) -> float | None:
    return cpu_s / tokens if tokens else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (server, concurrency) over repeats, and router/proxy ratios of the medians.

    Each run is {"server", "concurrency", "cpu_s", "tokens", "wall_s"}."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["server"], run["concurrency"]), []).append(run)
    cells: dict[str, dict[str, Any]] = {}
    for (server, conc), items in sorted(groups.items()):
        cpt = [run["cpu_s"] / run["tokens"] for run in items if run["tokens"]]
        tps = [run["tokens"] / run["wall_s"] for run in items if run["wall_s"] > 0]
        median_cpt = statistics.median(cpt) if cpt else None
        cells[f"{server}@{conc}"] = {
            "server": server, "concurrency": conc, "repeats": len(items),
            "cpu_ms_per_token": None if median_cpt is None else median_cpt * 1e3,
            "cpu_ms_per_token_each": [c * 1e3 for c in cpt],
            "tokens_per_core_s": None if not median_cpt else 1 / median_cpt,
            "client_tokens_per_s": statistics.median(tps) if tps else None,
        }
    ratios = {}
    for cell in cells.values():
        if cell["server"] != "router":
            continue
        proxy = cells.get(f"proxy@{cell['concurrency']}")
        if proxy and proxy["cpu_ms_per_token"] and cell["cpu_ms_per_token"] is not None:
            ratios[f"router/proxy@{cell['concurrency']}"] = cell["cpu_ms_per_token"] / proxy["cpu_ms_per_token"]
    return {"cells": cells, "router_over_proxy_cpu_per_token": ratios}


def sse_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


# ---- the reference proxy and the fake (replay) worker, each run as its own process ------------


def serve_proxy(host: str, port: int, upstream: str, prompt_ids: list[int]) -> None:
    """The reference: a minimal aiohttp relay, one NDJSON line from the worker in, one SSE event out."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(connector=TCPConnector(limit=0))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        upstream_body = {"request_id": uuid.uuid4().hex, "prompt_token_ids": prompt_ids,
                         "sampling": {"max_tokens": int(body.get("max_tokens", 16)), "temperature": 0.0,
                                      "ignore_eos": True}}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        count = 0
        async with request.app["session"].post(upstream + "/internal/generate", json=upstream_body,
                                               timeout=ClientTimeout(total=None)) as resp:
            await response.prepare(request)
            async for line in resp.content:
                line = line.strip()
                if line:
                    count += 1
                    await response.write(sse_event(line))
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": count, "total_tokens": len(prompt_ids) + count}
        await response.write(sse_event(json.dumps({"choices": [], "usage": usage}).encode()))
        await response.write(sse_event(b"[DONE]"))
        await response.write_eof()
        return response

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/completions", handle)
    app.router.add_get("/readyz", ready)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    web.run_app(app, host=host, port=port, access_log=None, print=None)


def serve_replay(host: str, port: int, token_ids: list[int]) -> None:
    """A FAKE worker (no engine): the internal contract's colocated endpoints, replaying `token_ids`
    in a cycle as fast as its event loop allows, one NDJSON write per token, with no text (the
    router decodes ids itself)."""
    from aiohttp import web

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        sampling = body.get("sampling", {})
        max_tokens = int(sampling.get("max_tokens", 16))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for i in range(max_tokens):
            finish = "length" if i + 1 == max_tokens else None
            event = {"token_id": token_ids[i % len(token_ids)], "text": "", "finish_reason": finish}
            await response.write((json.dumps(event) + "\n").encode())
            await asyncio.sleep(0)  # the other streams' tokens interleave, as a batch step's do
        await response.write_eof()
        return response

    async def load(request: web.Request) -> web.Response:
        return web.json_response({"role": "colocated", "model": SERVED, "queued_tokens": 0, "queued_requests": 0,
                                  "running": 0, "free_kv_tokens": 1 << 30, "held_caches": 0, "draining": False})

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ready": True, "status": "ok"})

    app = web.Application()
    app.router.add_post("/internal/generate", generate)
    app.router.add_get("/internal/load", load)
    app.router.add_get("/readyz", ok)
    app.router.add_get("/healthz", ok)
    web.run_app(app, host=host, port=port, access_log=None, print=None)


# ---- orchestration ------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "worker_image"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited:\n{log.read_text()[-3000:]}")
        with suppress(OSError), urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
            if resp.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready in time:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _start(cmd: list[str], url: str, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=_env())
    try:
        _wait_ready(url, proc, log)
    except BaseException:
        proc.kill()
        raise
    return proc


async def _one(session: Any, url: str, payload: dict[str, Any]) -> StreamResult:
    async with session.post(url, json=payload) as resp:
        body = await resp.read()
        if resp.status != 200:
            return StreamResult(0, None, False, f"HTTP {resp.status}: {body[:200]!r}")
    return parse_sse(body)


async def closed_loop(url: str, payload: dict[str, Any], concurrency: int, requests: int) -> tuple[int, float, int]:
    """`requests` streams, `concurrency` at a time; (completion tokens, wall seconds, failures)."""
    import aiohttp

    tokens, failures = 0, 0
    left = requests
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def client() -> None:
            nonlocal tokens, failures, left
            while left > 0:
                left -= 1
                result = await _one(session, url, payload)
                if result.error or not result.done or result.completion_tokens is None:
                    failures += 1
                else:
                    tokens += result.completion_tokens
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return tokens, time.perf_counter() - started, failures


def measure(server: str, pid: int, url: str, payload: dict[str, Any], concurrency: int,
            requests: int) -> dict[str, Any]:
    asyncio.run(closed_loop(url, payload, concurrency, min(concurrency, requests)))  # warm connections
    before = process_cpu(pid)
    tokens, wall, failures = asyncio.run(closed_loop(url, payload, concurrency, requests))
    after = process_cpu(pid)
    cpu = after["schedstat_s"] - before["schedstat_s"]
    return {"server": server, "concurrency": concurrency, "tokens": tokens, "wall_s": wall, "failures": failures,
            "cpu_s": cpu, "stat_cpu_s": after["stat_s"] - before["stat_s"], "requests": requests}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", choices=("worker", "replay"), default="worker",
                        help="a real built-in worker (default) or the FAKE replaying worker")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=48, help="streams per measured run")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    parser.add_argument("--servers", nargs="+", choices=("router", "proxy"), default=["router", "proxy"])
    parser.add_argument("--label", default="", help="a note stored in the result (e.g. before/after)")
    parser.add_argument("--profile", type=Path,
                        help="run the router under cProfile (thread CPU time), stats written here on exit")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/router_overhead.json")
    parser.add_argument("--serve-proxy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-replay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ids = [int(i) for i in args.ids.split(",") if i]
    if args.serve_proxy:
        serve_proxy(args.host, args.port, args.upstream_url, ids)
        return 0
    if args.serve_replay:
        serve_replay(args.host, args.port, ids)
        return 0

    from disaggserve_worker.router.model_info import load_model_info

    info = load_model_info(args.model, SERVED)
    prompt_ids = info.encode(info.chat_template.render([{"role": "user", "content": PROMPT}],
                                                       add_generation_prompt=True))
    replay_ids = info.encode(" ".join(["the quick brown fox jumps over a lazy dog, then naps."] * 4))
    block = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"router_overhead-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    upstream_url = f"http://{block}.1:8100"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started = time.time()
    load_start = os.getloadavg()
    try:
        if args.upstream == "worker":
            procs["upstream"] = _start(
                [sys.executable, "-m", "disaggserve_worker.cli", "serve", "--role", "colocated", "--model", args.model,
                 "--model-name", SERVED, "--host", f"{block}.1", "--port", "8100", "--kv-port", "8101",
                 "--device", "cpu", "--threads", "1", "--kv-cache-tokens", "65536", "--log-level", "WARNING"],
                upstream_url, work / "upstream.log")
        else:
            procs["upstream"] = _start([*me, "--serve-replay", "--host", f"{block}.1", "--port", "8100",
                                        "--ids", ",".join(map(str, replay_ids))], upstream_url, work / "upstream.log")
        urls = {"router": f"http://{block}.2:8000", "proxy": f"http://{block}.3:8000"}
        if "router" in args.servers:
            procs["router"] = _start(
                [sys.executable, *(_profiled(args.profile) if args.profile else ["-m"]),
                 "disaggserve_worker.router.cli", "router", "--model", args.model,
                 "--model-name", SERVED, "--host", f"{block}.2", "--port", "8000",
                 "--colocated-endpoints", upstream_url, "--log-level", "WARNING"],
                urls["router"], work / "router.log")
        if "proxy" in args.servers:
            procs["proxy"] = _start([*me, "--serve-proxy", "--host", f"{block}.3", "--port", "8000",
                                     "--upstream-url", upstream_url, "--ids", ",".join(map(str, prompt_ids))],
                                    urls["proxy"], work / "proxy.log")
        path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
        payload: dict[str, Any] = {"model": SERVED, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                                   "ignore_eos": True, "stream_options": {"include_usage": True}}
        if args.endpoint == "chat":
            payload["messages"] = [{"role": "user", "content": PROMPT}]
        else:
            payload["prompt"] = PROMPT
        idle = {}
        for server in args.servers:  # background CPU (load polls) of an idle server, per second
            before = process_cpu(procs[server].pid)["schedstat_s"]
            time.sleep(2.0)
            idle[server] = (process_cpu(procs[server].pid)["schedstat_s"] - before) / 2.0
        runs = []
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                order = args.servers if repeat % 2 == 0 else list(reversed(args.servers))
                for server in order:
                    run = measure(server, procs[server].pid, urls[server] + path, payload, concurrency, args.requests)
                    run["repeat"] = repeat
                    runs.append(run)
                    print(f"repeat {repeat} c={concurrency:3d} {server:6s}: {run['tokens']} tokens in "
                          f"{run['wall_s']:.2f} s, {run['cpu_s'] / max(run['tokens'], 1) * 1e3:.4f} ms CPU/token, "
                          f"{run['failures']} failures", flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    result = {
        "bench": "router_overhead", "label": args.label, "upstream": args.upstream,
        "upstream_note": "real built-in worker (colocated, 1 thread)" if args.upstream == "worker"
        else "FAKE worker replaying token ids over the internal contract (no engine)",
        "reference": "minimal aiohttp pass-through proxy (bench/router_overhead.py serve_proxy): one NDJSON line in, "
                     "one SSE event out, no tokenizer",
        "model": args.model, "endpoint": args.endpoint, "max_tokens": args.max_tokens, "requests": args.requests,
        "concurrency": args.concurrency, "repeats": args.repeats, "git": _git_head(),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "started_unix": started, "idle_cpu_s_per_s": idle,
        "runs": runs, **summarize(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, cell in result["cells"].items():
        print(f"{key:12s} {cell['cpu_ms_per_token']:.4f} ms CPU/token  {cell['tokens_per_core_s']:.0f} tokens/core-s  "
              f"client {cell['client_tokens_per_s']:.0f} tokens/s")
    for key, ratio in result["router_over_proxy_cpu_per_token"].items():
        print(f"{key}: {ratio:.2f}x")
    return 0


def _profiled(path: Path) -> list[str]:
    """`python -c` arguments that run a module (the next argument) under cProfile timed by the
    thread's CPU clock: a send that wakes the client and is preempted by it is not billed as the
    router's, which cProfile's default wall clock would do."""
    code = ("import cProfile, runpy, sys, time\n"
            "module = sys.argv.pop(1)\n"
            "profile = cProfile.Profile(time.thread_time)\n"
            "profile.enable()\n"
            "try:\n"
            "    runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n"
            "    pass\n"
            "finally:\n"
            "    profile.disable()\n"
            f"    profile.dump_stats({str(path)!r})\n")
    return ["-c", code]


def _git_head() -> str:
    with suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
