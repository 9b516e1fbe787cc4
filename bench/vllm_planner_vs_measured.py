"""How well the planner predicts a vLLM deployment: attainment predicted vs measured (colocated).

bench/planner_vs_measured.py holds the simulator against the built-in torch worker; this is the
same check for vLLM. The disaggregated vLLM pair (two servers, NIXL) does not fit two cores with
room for the router and the load generator (bench/vllm_disagg_vs_colocated.py: load 27, nothing
met the SLO), so the deployment here is the colocated one: one plain vLLM server behind our router.

1. Start it as the operator deploys a colocated vLLM plan: the command line and env
   `resources/engines/vllm.py` renders (`--max-num-seqs`, `--max-num-batched-tokens`,
   `VLLM_ENABLE_V1_MULTIPROCESSING=0`, one OpenMP thread), the engine's thread bound to the first
   core (`VLLM_CPU_OMP_THREADS_BIND`, as bench/vllm_disagg_vs_colocated.py binds its servers: the
   exclusive core a static CPU manager would give), and the router
   (`disaggserve-worker router --engine vllm --colocated-endpoints ...`) unpinned, as
   bench/planner_vs_measured.py runs it. The model is the built-in `tiny-llama` exported as a
   Hugging Face checkpoint (`disaggserve-worker export-checkpoint`, what e2e/test_vllm.py serves).
   One flag beyond the defaults, through `engine.extraArgs` as a user would add it:
   `--no-enable-prefix-caching` (EXTRA_ARGS says why: the unloaded requests repeat prompts).
2. Profile the running server with `disaggserve-worker profile-vllm` (over its HTTP API, so the
   step times include vLLM's HTTP and scheduling costs) into the planner's profile format. The
   quick sweep by default (`--full-profile` for the full one): the full sweep's decode batches go to
   256 at contexts to 2048, past the rendered `--max-num-seqs` (queued streams would be measured as
   slow steps) and far past what two cores do in the time a run has.
3. From here on it is bench/planner_vs_measured.py's `evaluate`, unchanged: the router's costs
   outside the engine (per request and per token, its CPU time from /proc over sequential requests
   of two completion lengths) into the profile's `overheads`; SLOs at 3x the unloaded median TTFT
   and 2x the unloaded median TPOT through the router; the unloaded correction (`calibrated`); the
   measured knee by a x1.3 ramp of Poisson windows from 2 req/s; the live correction at that knee
   (`corrected_live`, the autoscaler's `replan.correction`); a grid of 0.2x..1.2x the knee with 3
   repeats per rate, each window's requests stored ([sent at s, TTFT ms, TPOT ms]); predictions by
   the simulator's `ColocatedDeployment` for each correction.

Same prompt and completion lengths as bench/planner_vs_measured.py (INPUT, OUTPUT: 256 in, 32
out): vLLM-CPU serves the tiny model at them with room to spare (about 100 ms TTFT, 3-4 ms TPOT
unloaded). Windows of 40 s (`--quick`: 6 s) instead of planner_vs_measured's 10 s: the knee here is
1-1.6 req/s, and at 0.2x of it a 10 s window holds the minimum 8 requests, 12.5 pp each. Gaps in
percentage points, goal: median <= 3 pp, max <= 8 pp. The machine may be shared: the load
averages before and after go into the result.

Measured (two full runs on the quiet host, docs/planner-method.md "vLLM: predicted vs measured"):
unloaded-corrected median / max gap 2.2 / 16.0 pp (vllm_planner_vs_measured.json) and 0.9 / 4.2
pp (-repeat.json); live-corrected 9.5 / 21.0 and 1.0 / 6.3. Every miss is a TPOT miss: the TPOT SLO
(2x the unloaded step) sits at about one prefill interleaved into a stream, and the unloaded step,
from back-to-back requests, moved 3.87 -> 4.59 ms between the runs while the streams under Poisson
traffic did not; where it was low (run 1), the simulator missed the cliff at 1.2x the knee.

Run with the main interpreter; vLLM and the router run under the vLLM one (`--python`, default
$DISAGGSERVE_VLLM_PYTHON or .venv/vllm/bin/python). Writes
bench/results/vllm_planner_vs_measured[-quick].json.

    python bench/vllm_planner_vs_measured.py [--quick] [--full-profile] [--window-s S]
    python bench/vllm_planner_vs_measured.py --rescore bench/results/vllm_planner_vs_measured.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT / "operator", ROOT / "worker_image"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from disaggserve.api.plan import Plan  # noqa: E402
from disaggserve.api.spec import parse_spec  # noqa: E402
from disaggserve.planner.profile import fit_problems, parse_profile  # noqa: E402
from disaggserve.resources.engines.vllm import VllmEngine  # noqa: E402
from disaggserve_worker.profile.overheads import overheads_section  # noqa: E402
from disaggserve_worker.profile.run import FULL, QUICK, Sweep  # noqa: E402
from planner_vs_measured import (  # noqa: E402
    INPUT,
    OUTPUT,
    TARGET,
    calibrated,
    corrected_live,
    evaluate,
    gap_summary,
    load_average,
    predict,
    predict_row,
    predict_window,
)
from vllm_disagg_vs_colocated import SERVED, spawn, vllm_python, wait_ready, warm_up, with_host  # noqa: E402

MODEL = "tiny-llama"  # the built-in model vLLM serves here (exported as a checkpoint)
RESULTS = HERE / "results"
# What the rendered flags are sized from (batch_limits): the planner's spec, which this bench does
# not know before it has measured the SLOs. Sized so --max-num-seqs (32) holds every decode batch of
# the quick profile sweep and more streams than run at once below the knee.
RENDER_WORKLOAD = {"requestRate": 4, "inputTokens": INPUT, "outputTokens": OUTPUT}
RENDER_SLO = {"ttftMs": 1000, "tpotMs": 100}
# engine.extraArgs of the rendered spec. vLLM caches prompt prefixes by default, and
# planner_vs_measured's unloaded requests (`sequential`) draw the same prompts for each completion
# length (one seeded generator per call): with the cache on, the quick run's second unloaded set
# were cache hits (TTFT 48-85 ms against 94-112 ms fresh) and the SLOs and the unloaded correction
# came from them. The Poisson windows' prompts are all fresh, so the cache never serves them:
# turning it off changes nothing measured there and makes the unloaded medians real prefills.
EXTRA_ARGS = ["--no-enable-prefix-caching"]
def render_colocated(checkpoint: Path, core: int) -> tuple[list[str], dict[str, str]]:
    """The operator's vLLM command line (after `python3`) and literal env for one colocated
    instance of this workload, with the engine's OpenMP thread bound to `core`.

    The pod's env takes OMP_NUM_THREADS from its CPU request (1 here) and the API key and NIXL
    host from the API server; locally: one thread, no key (the router runs without a token), no
    connector (a colocated instance has none)."""
    spec = parse_spec({
        "engine": {"kind": "vllm", "extraArgs": EXTRA_ARGS},
        "model": {"name": SERVED, "source": {"path": str(checkpoint)}},
        "slo": RENDER_SLO,
        "workload": RENDER_WORKLOAD,
        "hardware": {"device": "cpu", "workerResources": {"cpu": "1", "memory": "4Gi"}},
        "placement": "colocated",
    })
    plan = Plan.model_validate({"placement": "colocated", "prefill": {"tensor": 1, "replicas": 0},
                                "decode": {"tensor": 1, "replicas": 0},
                                "colocated": {"tensor": 1, "replicas": 1}})
    container = VllmEngine().worker(spec, plan, "bench", "default", "colocated", None)
    env = {e["name"]: str(e["value"]) for e in container.env if "value" in e}
    env.update({"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core)})
    return container.command[1:] + container.args, env


def server_limits(argv: list[str]) -> tuple[int, int]:
    """(--max-num-seqs, --max-num-batched-tokens) of a vLLM command line."""
    return int(argv[argv.index("--max-num-seqs") + 1]), int(argv[argv.index("--max-num-batched-tokens") + 1])


def sweep_fits(sweep: Sweep, max_num_seqs: int) -> list[int]:
    """The sweep's decode batch sizes the server would not run at once: vLLM queues the streams
    past --max-num-seqs, and profile-vllm would time the queue as slow decode steps."""
    return sorted({batch for batch, _ in sweep.decode if batch > max_num_seqs})


def rescore(path: Path) -> dict[str, Any]:
    """Predictions of a stored run again with the current simulator, from its stored profile,
    router costs and prefill stall, both corrections derived again (`calibrated` from the stored
    unloaded medians, `corrected_live` from the stored window at the knee), as
    planner_vs_measured's --rescore does: a simulator change is judged against measurements
    already taken, in seconds instead of a half-hour run."""
    run = json.loads(path.read_text())
    dep = run["deployment"]
    ttft_ms, tpot_ms = dep["slo"]["ttft_ms"], dep["slo"]["tpot_ms"]
    doc = run["profile"]
    with_costs = {**doc, "overheads": overheads_section(dep["costs"], None,
                                                        dep["unloaded"].get("prefill_stall_ms", 0.0))}
    at_knee = next(p for p in reversed(dep["ramp"]) if p["rate"] == dep["knee_rps"])
    start = calibrated(with_costs, "colocated", dep["unloaded"])[0]
    profiles = {"gap_pp": start, "gap_speed_calibrated_pp": start,
                "gap_live_corrected_pp": corrected_live(with_costs, "colocated", at_knee, ttft_ms, tpot_ms)[0],
                "gap_uncorrected_pp": with_costs, "gap_without_overheads_pp": doc}
    rows, traced = [], []
    for row in dep["rows"]:
        predicted = {key: predict_row(prof, "colocated", row, ttft_ms, tpot_ms) if key == "gap_speed_calibrated_pp"
                     else predict(prof, "colocated", row["rate"], ttft_ms, tpot_ms) for key, prof in profiles.items()}
        rows.append({key: round(100 * (p - row["measured_median"]), 1) for key, p in predicted.items()})
        if row.get("per_request"):
            traced.append({key: round(100 * (trace_predicted(profiles[key], row, ttft_ms, tpot_ms,
                                                             at_speed=key == "gap_speed_calibrated_pp")
                                             - row["measured_median"]), 1)
                           for key in ("gap_pp", "gap_speed_calibrated_pp", "gap_live_corrected_pp")})
        print(f"{row['fraction_of_knee']:.1f}x knee ({row['rate']} rps): measured {row['measured_median']}, "
              f"gaps {rows[-1]}, trace-driven {traced[-1] if row.get('per_request') else None}", flush=True)
    trace = {f"trace_{k}": v for k, v in gap_summary(traced).items() if "uncorrected" not in k and "without" not in k}
    return {**gap_summary(rows), **trace}


def trace_predicted(prof: dict[str, Any], row: dict[str, Any], ttft_ms: float, tpot_ms: float,
                    at_speed: bool = False) -> float:
    """Median over a grid row's windows of the simulator run on each window's own arrivals
    (planner_vs_measured's `predict_window`): what the model misses, apart from what a window's
    Poisson bursts do. `at_speed`: each window on the profile scaled by its measured speed."""
    speeds = row.get("speed") if at_speed and row.get("speed") else [None] * len(row["per_request"])
    base = parse_profile(prof)
    return statistics.median(
        predict_window(prof if s is None else base.scaled(*s).model_dump(mode="json"), "colocated", row["rate"],
                       [r[0] for r in rep], ttft_ms, tpot_ms)
        for rep, s in zip(row["per_request"], speeds, strict=True))


def export_checkpoint(python: str, out: Path) -> None:
    subprocess.run([python, "-m", "disaggserve_worker.cli", "export-checkpoint", "--model", MODEL, "--out", str(out)],
                   check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker_image'}"})


def profile_vllm(url: str, checkpoint: Path, out: Path, max_batched_tokens: int, full: bool) -> dict[str, Any]:
    """`disaggserve-worker profile-vllm` against the server itself (not through the router: the
    router's costs go into the profile's overheads separately)."""
    cmd = [sys.executable, "-m", "disaggserve_worker.cli", "profile-vllm", "--url", url, "--model-name", SERVED,
           "--checkpoint", str(checkpoint), "--gpu", "cpu", "--dtype", "bfloat16",
           "--max-num-batched-tokens", str(max_batched_tokens), "--out", str(out)] + ([] if full else ["--quick"])
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'operator'}:{ROOT / 'worker_image'}"})
    if done.returncode != 0:
        raise SystemExit(f"profile-vllm failed: {done.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def start(python: str, checkpoint: Path, logdir: Path, core: int, block: str, timeout_s: float,
          procs: dict[str, subprocess.Popen[bytes]]) -> list[str]:
    """The vLLM server (operator-rendered) and the router in front of it, each put into `procs` as
    soon as it is spawned (an interrupted start-up still stops them); returns vLLM's argv once
    both answer."""
    argv, env = render_colocated(checkpoint, core)
    argv = with_host(argv, f"{block}.1")
    procs["vllm"] = spawn(python, "vllm", argv, env, logdir)
    procs["router"] = spawn(python, "router", [
        "-m", "disaggserve_worker.cli", "router", "--engine", "vllm", "--model", str(checkpoint),
        "--model-name", SERVED, "--host", f"{block}.10", "--port", "8000",
        "--colocated-endpoints", f"http://{block}.1:8100", "--log-level", "WARNING"], {}, logdir)
    wait_ready({"vllm": f"http://{block}.1:8100/health", "router": f"http://{block}.10:8000/readyz"},
               procs, logdir, timeout_s)
    return argv


def stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each process group (vLLM's engine core is a child), SIGKILL after 30 s."""
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


def report(args: argparse.Namespace, doc: dict[str, Any], argv: list[str], result: dict[str, Any],
           load_before: list[float], seconds: float) -> dict[str, Any]:
    seqs, tokens = server_limits(argv)
    return {
        "benchmark": "vllm_planner_vs_measured",
        "engine": "vllm-cpu (colocated: one server behind the DisaggServe router)",
        "model": f"builtin {MODEL} exported as a Hugging Face checkpoint (random weights)",
        "input_tokens": INPUT,
        "output_tokens": OUTPUT,
        "quick": args.quick,
        "window_s": args.window_s,
        "profile_sweep": "full" if args.full_profile else "quick",
        "slo": f"3x unloaded median TTFT, 2x unloaded median TPOT through the router, attainment {TARGET}",
        "vllm_argv": argv,
        "vllm_limits": {"max_num_seqs": seqs, "max_num_batched_tokens": tokens},
        "profile": doc,
        "profile_fit_problems": fit_problems(parse_profile(doc), max_decode_batch=seqs, max_prefill_tokens=tokens),
        "deployment": result,
        **gap_summary(result.get("rows", [])),
        "goal": "median <= 3 pp, max <= 8 pp",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "note": "'predicted' (gap_pp): the simulator's ColocatedDeployment on the profile-vllm profile plus the "
                "router's measured costs, scaled by the unloaded measured/predicted TTFT and TPOT; 'live corrected': "
                "scaled by the autoscaler's correction from the ramp's window at the measured knee; 'uncorrected': "
                "neither ratio; 'without overheads': the profile alone (no router costs).",
        "seconds": round(seconds, 1),
    }


def measure(args: argparse.Namespace, python: str, logdir: Path,
            started: float) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Start, profile, evaluate, stop: (profile, vLLM argv, planner_vs_measured's `evaluate` result)."""
    core = sorted(os.sched_getaffinity(0))[0]
    block = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"
    checkpoint = logdir / MODEL
    export_checkpoint(python, checkpoint)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        argv = start(python, checkpoint, logdir, core, block, args.start_timeout_s, procs)
        print(f"started in {time.perf_counter() - started:.0f} s: {' '.join(argv)}", flush=True)
        vllm_url, router_url = f"http://{block}.1:8100", f"http://{block}.10:8000"
        asyncio.run(warm_up(vllm_url, INPUT, OUTPUT))  # vLLM compiles each batch shape on first use
        seqs, tokens = server_limits(argv)
        if too_big := sweep_fits(FULL if args.full_profile else QUICK, seqs):
            raise SystemExit(f"the profile sweep's decode batches {too_big} exceed --max-num-seqs {seqs}")
        doc = profile_vllm(vllm_url, checkpoint, logdir / "profile.json", tokens, args.full_profile)
        print(f"profiled in {time.perf_counter() - started:.0f} s: {json.dumps(doc['entries'][0])[:600]}",
              flush=True)
        result = evaluate("colocated", router_url, {"router": procs["router"].pid}, {}, doc, args.quick,
                          None, args.window_s)
    finally:
        stop(procs)
        print(f"server logs in {logdir}", flush=True)
    return doc, argv, result


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below still stops the servers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="development run: 4 grid rates, short windows")
    parser.add_argument("--full-profile", action="store_true",
                        help="profile-vllm's full sweep instead of the quick one (needs --max-num-seqs >= 256)")
    parser.add_argument("--window-s", type=float, default=None,
                        help="seconds of Poisson traffic per measured point (default 40, --quick 6)")
    parser.add_argument("--python", help="interpreter with vllm-cpu installed")
    parser.add_argument("--start-timeout-s", type=float, default=900)
    parser.add_argument("--out", default=None, help="default bench/results/vllm_planner_vs_measured[-quick].json")
    parser.add_argument("--rescore", type=Path, default=None, metavar="RESULTS",
                        help="measure nothing: predict a stored run's grid again with the current simulator")
    args = parser.parse_args()
    if args.rescore is not None:
        print(json.dumps(rescore(args.rescore), indent=2))
        return
    args.window_s = args.window_s or (6.0 if args.quick else 40.0)
    python = vllm_python(args.python)
    started, load_before = time.perf_counter(), load_average()
    logdir = Path(tempfile.mkdtemp(prefix="vllm-pvm-"))  # kept: the servers' logs, if one fails
    doc, argv, result = measure(args, python, logdir, started)
    out = report(args, doc, argv, result, load_before, time.perf_counter() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"vllm_planner_vs_measured{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    keys = [k for k in out if k.startswith(("median_abs", "max_abs", "goal_met", "load_average"))]
    print(json.dumps({"knee_rps": result.get("knee_rps"), "slo": result.get("slo"),
                      **{k: out[k] for k in keys}, "seconds": out["seconds"]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
