"""kill -9 of a decode worker, a prefill worker and a router under a bounded streaming load.

Runs the whole system as `disaggserve up` does (local API, operator, node agent, real worker and
router processes): the tiny model, 1 prefill + 2 decode workers and 2 routers behind the router
Service. A fixed number of clients stream completions in a closed loop (bounded load) through the
Service, honouring Retry-After as the `openai` client does. While they run, one process of each
kind is killed with SIGKILL in turn; the node agent restarts it, as a kubelet would.

Every request is classified by how it ended, per phase (after which kill it was sent):
- `completed`: the whole answer ([DONE] after max_tokens tokens);
- `retryable_error`: an OpenAI error reply (HTTP 429/503, with Retry-After) or an error event in
  the stream: the client knows it failed and may retry;
- `connection_error`: the connection was refused or broke mid-stream (the transport says so:
  visible to the client, retryable, but not in OpenAI format): expected only when the router
  serving that stream is the one killed;
- `hung`: no answer within the client timeout; `silent_cut`: a stream that ended cleanly without
  [DONE] or an error. The claim is that these two are zero.

Writes bench/results/faults.json. The machine is shared: the counts, not the timings, are the
result. `python bench/faults.py [--clients 6] [--phase-seconds 20]`.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from disaggserve.local.cluster import LocalCluster, default_resource
from loadgen import RequestResult, one_request, synthetic_prompt

ROOT = Path(__file__).resolve().parent
KILLS = ["decode", "prefill", "router"]
MODEL = "tiny-llama"


def resource() -> dict[str, Any]:
    r = copy.deepcopy(default_resource())
    r["spec"]["parallelism"]["prefill"]["replicas"] = 1
    r["spec"]["parallelism"]["decode"]["replicas"] = 2
    r["spec"]["router"] = {"replicas": 2}
    return r


def outcome(r: RequestResult) -> str:
    if r.ok:
        return "completed"
    if r.kind == "timeout":
        return "hung"
    if r.kind == "silent_cut":
        return "silent_cut"
    if r.kind == "in_stream" or (r.kind == "http" and r.status is not None and r.status >= 400):
        return "retryable_error" if r.status in (200, 429, 503) or r.kind == "in_stream" else "other_http_error"
    return "connection_error"


def live_pods(cluster: LocalCluster, prefix: str) -> list[Any]:
    assert cluster.agent is not None
    return [p for key, p in cluster.agent.pods.items()
            if key[1].startswith(prefix) and not p.terminating and p.proc is not None and p.ready]


async def wait_all_ready(cluster: LocalCluster, timeout: float = 180) -> None:
    want = {"tiny-prefill-": 1, "tiny-decode-": 2, "tiny-router-": 2}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(live_pods(cluster, p)) >= n for p, n in want.items()):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("pods did not all come back ready")


async def client_loop(url: str, stop: asyncio.Event, phase: list[str], out: list[tuple[str, RequestResult]],
                      seed: int, output_tokens: int, timeout_s: float) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            result = await one_request(session, url, MODEL, synthetic_prompt(rng, 64), output_tokens,
                                       time.perf_counter(), timeout_s=timeout_s)
            if result.ok and result.output_tokens != output_tokens:
                result.ok, result.kind, result.error = False, "silent_cut", "short answer"
            # Attributed to the kill in effect when it ended: a stream cut by a kill ends after it.
            out.append((phase[0], result))
            if not result.ok:
                await asyncio.sleep(0.5)  # a client backs off after a failure


async def run(clients: int, phase_seconds: float, output_tokens: int, timeout_s: float) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="disaggserve-faults-"))
    async with LocalCluster(state, interval=0.3) as cluster:
        await cluster.apply(resource())
        await cluster.wait_ready("tiny", timeout=240)
        await wait_all_ready(cluster)
        url = (await cluster.endpoint("tiny")).removesuffix("/v1")
        phase = ["baseline"]
        results: list[tuple[str, RequestResult]] = []
        stop = asyncio.Event()
        tasks = [asyncio.create_task(client_loop(url, stop, phase, results, i, output_tokens, timeout_s))
                 for i in range(clients)]
        kills: list[dict[str, Any]] = []
        try:
            await asyncio.sleep(phase_seconds)
            for kind in KILLS:
                victims = live_pods(cluster, f"tiny-{kind}-")
                # The busiest-looking one is as good as any: pick the first, deterministically.
                victim = sorted(victims, key=lambda p: p.desired.name)[0]
                phase[0] = f"kill_{kind}"
                assert victim.proc is not None
                pid = victim.proc.pid
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                kills.append({"kind": kind, "pod": victim.desired.name, "pid": pid})
                while not (victim.proc is not None and victim.proc.pid != pid and victim.ready):
                    if time.monotonic() - killed_at > 240:
                        raise TimeoutError(f"{victim.desired.name} did not come back after kill -9")
                    await asyncio.sleep(0.2)  # the agent restarts it (backoff) and probes it ready
                kills[-1]["back_ready_after_s"] = round(time.monotonic() - killed_at, 1)
                await asyncio.sleep(max(0.0, phase_seconds - (time.monotonic() - killed_at)))
                await wait_all_ready(cluster)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    by_phase: dict[str, dict[str, int]] = {}
    for ended_in, r in results:
        by_phase.setdefault(ended_in, Counter())[outcome(r)] += 1  # type: ignore[index]
    totals = Counter(outcome(r) for _, r in results)
    errors = sorted({f"{outcome(r)}: {r.error[:160]}" for _, r in results if r.error and not r.ok})
    return {
        "setup": "disaggserve up (local cluster): tiny-llama on CPU, 1 prefill + 2 decode workers, 2 routers "
                 f"behind the Service; {clients} closed-loop streaming clients ({output_tokens} output tokens, "
                 f"client timeout {timeout_s:g} s, Retry-After honoured up to 2 retries); SIGKILL of one pod "
                 f"of each kind, {phase_seconds:g} s apart",
        "kills": kills,
        "requests": len(results),
        "outcomes": dict(sorted(totals.items())),
        "outcomes_by_phase": {k: dict(sorted(v.items())) for k, v in by_phase.items()},
        "retried_after_retry_after": sum(r.retries > 0 for _, r in results),
        "claim_holds": totals["hung"] == 0 and totals["silent_cut"] == 0 and totals["other_http_error"] == 0,
        "error_messages": errors[:12],
        "machine": {"load_average": os.getloadavg(), "cpus": os.cpu_count(),
                    "note": "shared 2-core machine (eight sessions); counts matter, timings do not"},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--phase-seconds", type=float, default=20)
    parser.add_argument("--output-tokens", type=int, default=48)
    parser.add_argument("--timeout-s", type=float, default=90)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "faults.json")
    args = parser.parse_args()
    report = asyncio.run(run(args.clients, args.phase_seconds, args.output_tokens, args.timeout_s))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("requests", "outcomes", "outcomes_by_phase", "claim_holds")},
                     indent=2))


if __name__ == "__main__":
    main()
