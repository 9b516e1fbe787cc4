"""DisaggServe on vLLM (1 prefill + 1 decode vLLM, NixlConnector, our router) vs one plain vLLM
server on the same two cores, Poisson load, goodput at the SLO.

What a user would run instead of DisaggServe is one vLLM server using both cores; that is the
baseline (`VLLM_CPU_OMP_THREADS_BIND` = both cores, no KV connector, clients talk to it directly).
DisaggServe's side runs exactly the command lines and env the operator renders for a 1:1 plan
(`resources/engines/vllm.py`), the prefill server bound to one core and the decode server to the
other; with two single-core instances 1:1 is the only split, so the planned split is that one.
Both systems stay up for the whole run and are measured interleaved at every rate (A, B, then
B, A on the next repeat), so drift in the machine's background load hits both alike.

SLOs, unless given: 5x the plain server's unloaded TTFT (minimum) and 3x its unloaded TPOT
(median), as in bench/disagg_vs_colocated.py. Goodput is the highest tested rate up to which at
least 90 % of requests met both.

Run with the vLLM interpreter available (`--python`, default $DISAGGSERVE_VLLM_PYTHON or
.venv/vllm/bin/python); this script itself needs only aiohttp. Writes
bench/results/vllm_disagg_vs_colocated[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "operator"))
from disagg_vs_colocated import goodput, rate_row, unloaded  # noqa: E402
from disaggserve.api.plan import Plan  # noqa: E402
from disaggserve.api.spec import parse_spec  # noqa: E402
from disaggserve.resources.engines.vllm import VllmEngine  # noqa: E402
from loadgen import one_request, run_poisson, summarize, synthetic_prompt  # noqa: E402

RESULTS = HERE / "results"
SERVED = "bench"
TTFT_SLO_SCALE, TPOT_SLO_SCALE = 5.0, 3.0  # x the plain server's unloaded TTFT (minimum) / TPOT (median)


def vllm_python(given: str | None) -> str:
    default = str(ROOT / ".venv" / "vllm" / "bin" / "python")
    for candidate in (given, os.environ.get("DISAGGSERVE_VLLM_PYTHON"), default):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("no vLLM interpreter: pass --python or run scripts/test once (it builds .venv/vllm)")


def rendered(checkpoint: Path, args: argparse.Namespace) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The operator's command lines and env for a 1 prefill + 1 decode plan of this workload."""
    spec = parse_spec({
        "engine": {"kind": "vllm"},
        "model": {"name": SERVED, "source": {"path": str(checkpoint)}},
        "slo": {"ttftMs": 1000, "tpotMs": 100},
        "workload": {"requestRate": 4, "inputTokens": args.input_tokens, "outputTokens": args.output_tokens},
        "hardware": {"device": "cpu", "workerResources": {"cpu": "1", "memory": "4Gi"}},
    })
    plan = Plan.model_validate({"prefill": {"tensor": 1, "replicas": 1}, "decode": {"tensor": 1, "replicas": 1}})
    out = {}
    for phase in ("prefill", "decode"):
        container = VllmEngine().worker(spec, plan, "bench", "default", phase, None)
        env = {e["name"]: str(e["value"]) for e in container.env if "value" in e}
        out[phase] = (container.command[1:] + container.args, env)
    return out


def spawn(python: str, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> subprocess.Popen[bytes]:
    log = (logdir / f"{name}.log").open("wb")
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "worker_image")]),
                "VLLM_NO_USAGE_STATS": "1", **env}
    return subprocess.Popen([python, *argv], stdout=log, stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True)


def with_host(argv: list[str], host: str) -> list[str]:
    argv = list(argv)
    argv[argv.index("--host") + 1] = host
    return argv


def wait_ready(urls: dict[str, str], procs: dict[str, subprocess.Popen[bytes]], logdir: Path,
               timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for name, url in urls.items():
        while True:
            if procs[name].poll() is not None:
                raise SystemExit(f"{name} exited; see {logdir / (name + '.log')}")
            with suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not ready after {timeout_s:.0f}s; see {logdir / (name + '.log')}")
            time.sleep(2)


async def warm_up(url: str, input_tokens: int, output_tokens: int) -> None:
    """Bursts of 1, 2, 4, 8 and 16 concurrent requests before anything is timed: compiled vLLM
    compiles each new batch shape on first use, which spoiled the first tested rate otherwise
    (plain vLLM: 67 % at 0.25 req/s, 92 % at 0.5)."""
    import aiohttp

    rng = random.Random(5)
    async with aiohttp.ClientSession() as session:
        for burst in (1, 2, 4, 8, 16):
            await asyncio.gather(*(one_request(session, url, SERVED, synthetic_prompt(rng, input_tokens),
                                               output_tokens, time.perf_counter()) for _ in range(burst)))


async def measure(args: argparse.Namespace, urls: dict[str, str]) -> dict[str, Any]:
    for url in urls.values():
        await warm_up(url, args.input_tokens, args.output_tokens)
    base = {name: await unloaded(url, args.input_tokens, args.output_tokens, args.calibration)
            for name, url in urls.items()}
    ttft_slo = args.ttft_slo_ms or TTFT_SLO_SCALE * base["plain_vllm"]["ttft_ms"]
    tpot_slo = args.tpot_slo_ms or TPOT_SLO_SCALE * base["plain_vllm"]["tpot_ms"]
    print(f"unloaded: {base}; SLO TTFT {ttft_slo:.0f} ms, TPOT {tpot_slo:.1f} ms", flush=True)
    per_rate: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for rate in args.rates:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
        count = max(args.min_requests, min(args.max_requests, round(rate * args.point_seconds)))
        for rep in range(args.repeats):
            for name in (list(urls) if rep % 2 == 0 else list(reversed(urls))):
                results = await run_poisson(urls[name], SERVED, rate=rate, num_requests=count,
                                            input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                                            seed=rep)
                runs[name].append(summarize(results, ttft_slo / 1000, tpot_slo / 1000))
        for name, summaries in runs.items():
            row = rate_row(rate, summaries)
            per_rate[name].append(row)
            print(f"rate {rate:6.2f}  {name:22s} attainment {row['attainment']:.0%}  "
                  f"TTFT p90 {row['ttft_ms']['p90']}  TPOT p90 {row['tpot_ms']['p90']}  failed {row['failed']}",
                  flush=True)
    systems = {name: {"rates": rows, "goodput_rps": goodput(rows, args.target), "unloaded": base[name]}
               for name, rows in per_rate.items()}
    plain = systems["plain_vllm"]["goodput_rps"]
    return {"slo": {"ttft_ms": ttft_slo, "tpot_ms": tpot_slo,
                    "source": "flags" if args.ttft_slo_ms and args.tpot_slo_ms else
                    f"{TTFT_SLO_SCALE:g}x TTFT / {TPOT_SLO_SCALE:g}x TPOT of the plain vLLM server unloaded"},
            "target_attainment": args.target, "systems": systems,
            "goodput_ratio_disaggserve_over_plain": systems["disaggserve_vllm"]["goodput_rps"] / plain
            if plain else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rates, few requests, 1 repeat")
    parser.add_argument("--python", help="interpreter with vllm-cpu installed")
    parser.add_argument("--input-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rates", type=float, nargs="*", default=[0.25, 0.5, 1, 2, 3])
    parser.add_argument("--point-seconds", type=float, default=8.0)
    parser.add_argument("--min-requests", type=int, default=12)
    parser.add_argument("--max-requests", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ttft-slo-ms", type=float)
    parser.add_argument("--tpot-slo-ms", type=float)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--calibration", type=int, default=5)
    parser.add_argument("--start-timeout-s", type=float, default=900)
    args = parser.parse_args()
    if args.quick:
        args.rates, args.point_seconds, args.min_requests, args.repeats, args.calibration = [0.25, 1, 3], 4.0, 8, 1, 3
    python = vllm_python(args.python)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit(f"needs 2 CPU cores, this process may use {cores}")
    c0, c1 = cores[0], cores[1]
    block = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-bench-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    checkpoint = logdir / "tiny-llama"
    subprocess.run([python, "-m", "disaggserve_worker.cli", "export-checkpoint", "--out", str(checkpoint)],
                   check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker_image'}"})
    lines = rendered(checkpoint, args)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started, load_start = time.monotonic(), os.getloadavg()
    try:
        for phase, ip, core in (("prefill", f"{block}.1", c0), ("decode", f"{block}.2", c1)):
            argv, env = lines[phase]
            env = {**env, "VLLM_NIXL_SIDE_CHANNEL_HOST": ip, "VLLM_CPU_OMP_THREADS_BIND": str(core)}
            procs[phase] = spawn(python, phase, with_host(argv, ip), env, logdir)
        plain_argv = ["-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                      "--served-model-name", SERVED, "--host", f"{block}.3", "--port", "8100"]
        procs["plain_vllm"] = spawn(python, "plain_vllm", plain_argv,
                                    {"VLLM_CPU_KVCACHE_SPACE": lines["decode"][1]["VLLM_CPU_KVCACHE_SPACE"],
                                     "VLLM_CPU_OMP_THREADS_BIND": f"{c0},{c1}",
                                     # as the rendered pods of one rank: no spinning worker process
                                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                                    logdir)
        procs["router"] = spawn(python, "router", [
            "-m", "disaggserve_worker.cli", "router", "--engine", "vllm", "--model", str(checkpoint),
            "--model-name", SERVED, "--host", f"{block}.10", "--port", "8000",
            "--prefill-endpoints", f"http://{block}.1:8100", "--decode-endpoints", f"http://{block}.2:8100",
            "--log-level", "WARNING"], {}, logdir)
        wait_ready({"prefill": f"http://{block}.1:8100/health", "decode": f"http://{block}.2:8100/health",
                    "plain_vllm": f"http://{block}.3:8100/health", "router": f"http://{block}.10:8000/readyz"},
                   procs, logdir, args.start_timeout_s)
        print(f"started in {time.monotonic() - started:.0f}s", flush=True)
        measured_from = time.monotonic()
        result = asyncio.run(measure(args, {"disaggserve_vllm": f"http://{block}.10:8000",
                                            "plain_vllm": f"http://{block}.3:8100"}))
        result["measure_wall_s"] = time.monotonic() - measured_from
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    result.update({
        "benchmark": "vllm_disagg_vs_colocated", "quick": args.quick,
        "model": "builtin tiny-llama exported as a checkpoint (random weights, 4 layers, hidden 128)",
        "workload": {"input_tokens": args.input_tokens, "output_tokens": args.output_tokens, "rates": args.rates,
                     "repeats": args.repeats, "arrivals": "Poisson"},
        "setup": {"cores": [c0, c1],
                  "disaggserve_vllm": "prefill vLLM bound to core A, decode vLLM to core B (operator-rendered "
                                      "flags, NixlConnector host buffers), DisaggServe router --engine vllm",
                  "plain_vllm": "one vLLM server bound to both cores, no connector, clients direct"},
        "vllm_argv": {phase: argv for phase, (argv, _) in lines.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(),
                    "note": "load averages above the two cores mean neighbours shared them: absolute numbers "
                            "are then noisy; both systems were measured interleaved, so the ratio less so"},
        "wall_s": time.monotonic() - started,
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "vllm_disagg_vs_colocated" + ("-quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    g = {n: s["goodput_rps"] for n, s in result["systems"].items()}
    print(f"goodput at {args.target:.0%}: DisaggServe-on-vLLM {g['disaggserve_vllm']:g} req/s, plain vLLM "
          f"{g['plain_vllm']:g} req/s; wrote {RESULTS / stem}.json")


if __name__ == "__main__":
    main()
