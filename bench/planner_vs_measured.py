"""How well the planner predicts this machine's real workers: attainment predicted vs measured.

1. Profile the model with the worker's own `profile` command (one thread, pinned, fitted on
   thread CPU time so neighbours' load stays out of the fit).
2. Start the deployment on real processes: 1 prefill + 1 decode worker (pinned to cores 0 and 1)
   behind the router; then, separately, 1 colocated worker behind the router.
3. Measure what requests cost outside the forward passes (`profile/overheads.py`): sequential
   requests of two completion lengths, each process's CPU time from /proc, minus the forward
   passes the profile predicts; and the KV link from transfers of two sizes over the workers'
   own transport. These go into the profile's `overheads` section.
4. Find the *measured* knee: the highest rate whose measured attainment still meets the target,
   by a geometric ramp of short Poisson runs.
5. On a grid of 0.2x..1.2x that knee, with >= 3 repeats per rate (5 from 0.8x the knee up, where
   one window's Poisson bursts move attainment most), compare the median measured attainment with
   the planner simulator's prediction (with the measured overheads, and — for reference — without
   them, as the planner predicted before). Gaps in percentage points.
6. The machine's speed drifts: on this 2-vCPU VM the same forward pass, alone on an idle host,
   took 35 ms in one minute and 48 ms in the next, and windows at 0.2x the knee (no queueing)
   differ by up to 27 % in median TPOT. Around every window a short sequential probe
   (PROBE_REQUESTS unloaded requests) measures the machine's speed then, and the window is also
   predicted with the profile scaled by the two probes' mean over the start's unloaded medians
   (`speed`; `predicted_speed_calibrated`). It uses nothing the window itself measured. The
   headline stays the prediction calibrated once at the start: on the first run with probes the
   per-window calibration did not narrow the gaps (a 6-request median is about as noisy as the
   drift it measures).

SLOs come from the unloaded measurement at the start (TTFT 3x, TPOT 2x its medians), so the knee
falls inside the tested rates. The machine this runs on may be shared: the load average before
and after is recorded with the result, and a busy neighbour moves the measured knee.

    python bench/planner_vs_measured.py [--quick] [--skip-colocated] [--out FILE]
    python bench/planner_vs_measured.py --rescore bench/results/planner_vs_measured.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from disagg_vs_colocated import SERVED, router, wait_ready, worker
from disaggserve.api import parse_spec
from disaggserve.metrics.observed import Observed
from disaggserve.planner.batching import prefill_token_budget
from disaggserve.planner.deployment import ColocatedDeployment, Deployment
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.inputs import build_search
from disaggserve.planner.profile import fit_problems, parse_profile, phase_latency
from disaggserve.planner.replan import correction
from disaggserve.planner.search import Shape
from disaggserve.planner.workload import RequestSample
from disaggserve_worker.profile.overheads import (
    Run,
    fit_link,
    overheads_section,
    prefill_stall_ms,
    process_cpu_ms,
    solve_costs,
)
from loadgen import one_request, run_poisson, summarize, synthetic_prompt

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:small-llama"
INPUT, OUTPUT = 256, 32
SHORT, LONG = 2, 24  # completion lengths that separate per-request from per-token costs
CONCURRENT = 8  # requests at once in the run that separates per-iteration from per-token costs
STEPS_METRIC = "disaggserve_decode_iteration_seconds_count"
TARGET = 0.9
PROBE_REQUESTS = 6  # sequential unloaded requests around each window (~1.3 s): the machine's speed then
MIN_RAMP_RPS = 0.2
BUDGET = 2048  # decode and colocated workers: the worker's default --max-batch-tokens, which the operator keeps
# Cores the workers are pinned to (prefill 0 and decode 1; colocated 0). The router and this process
# (the client) float over the host: where the workers' cores are all it has, they share them
# (planner/profile.py PhaseLatency.sharing); a core no worker owns absorbs them instead.
WORKER_CORES = {"disaggregated": 2, "colocated": 1}
SHARED_CORES = {mode: cores if (os.cpu_count() or 1) <= cores else 0 for mode, cores in WORKER_CORES.items()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def profile(out: Path, quick: bool) -> dict[str, Any]:
    cmd = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "disaggserve_worker.cli",
        "profile",
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
    ] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def spec_for(rate: float, ttft_ms: float, tpot_ms: float) -> Any:
    return parse_spec(
        {
            "model": {"name": "small-llama", "source": {"builtin": "small-llama"}},
            "slo": {"ttftMs": ttft_ms, "tpotMs": tpot_ms, "attainment": TARGET},
            "workload": {"requestRate": rate, "inputTokens": INPUT, "outputTokens": OUTPUT},
            "hardware": {"device": "cpu", "gpusPerNode": 2},
        }
    )


def deployment(mode: str, setup: Any) -> Deployment | ColocatedDeployment:
    if mode == "disaggregated":
        return Deployment(Shape(1, 1), 1, Shape(1, 1), 1, 1, setup.topology.intra_gbps)
    return ColocatedDeployment(Shape(1, 1), 1)


def predict(doc: dict[str, Any], mode: str, rate: float, ttft_ms: float, tpot_ms: float) -> float:
    setup = build_search(spec_for(rate, ttft_ms, tpot_ms), profile=doc, check_fit=False)
    return deployment(mode, setup).simulate(setup.searcher, rate).attainment(ttft_ms, tpot_ms)


def predict_window(doc: dict[str, Any], mode: str, rate: float, sent_at_s: list[float], ttft_ms: float,
                   tpot_ms: float) -> float:
    """The simulator on one measured window's own arrivals, from an empty system and with no
    warm-up dropped, as the window was measured: separates what the model misses from what a
    30 s window's Poisson bursts do (the steady-state prediction averages those away)."""
    setup = build_search(spec_for(rate, ttft_ms, tpot_ms), profile=doc, check_fit=False)
    n = len(sent_at_s)
    trace = RequestSample(np.asarray(sorted(sent_at_s)) * rate, np.full(n, INPUT), np.full(n, OUTPUT))
    searcher = dataclasses.replace(setup.searcher, sample=trace, min_requests=n, _goodputs={}, _probes={})
    return deployment(mode, setup).simulate(searcher, rate).after_warmup(0.0).attainment(ttft_ms, tpot_ms)


def rescore(path: Path, stall_ms: float | None = None,
            shared_cores: dict[str, int] | None = None) -> dict[str, float]:
    """Predictions of a stored run again, from its stored fit, costs, KV link and prefill stall (the
    model facts are the shipped small-llama profile's), with both corrections derived again from
    the stored unloaded medians and knee window: a simulator change is judged against
    measurements already taken, in a minute instead of a 25-minute run. Also the trace-driven
    prediction of every window (`predict_window`). `stall_ms` replaces the stored prefill stall
    (runs before it was measured have none), `shared_cores` the stored shared cores per mode (runs
    before it have none, and no client costs: only the router's CPU is then shared)."""
    run = json.loads(path.read_text())
    base = json.loads((ROOT / "operator" / "disaggserve" / "data" / "profiles" / "small-llama-cpu.json").read_text())
    doc = {**base, "entries": [{"tensor": 1, "pipeline": 1, **run["profile_fit"]}],
           "measurements": run["profile_measurements"]}
    gaps: dict[str, list[float]] = {"steady": [], "steady_live": [], "trace": [], "trace_live": []}
    for dep in run["deployments"]:
        mode, ttft_ms, tpot_ms = dep["mode"], dep["slo"]["ttft_ms"], dep["slo"]["tpot_ms"]
        stall = dep["unloaded"].get("prefill_stall_ms", 0.0) if stall_ms is None else stall_ms
        shared = dep.get("shared_cores", 0) if shared_cores is None else shared_cores.get(mode, 0)
        with_costs = {**doc, "overheads": overheads_section(dep["costs"], run["kv_link"], stall, shared)}
        at_knee = next(p for p in reversed(dep["ramp"]) if p["rate"] == dep["knee_rps"])
        profiles = {"": calibrated(with_costs, mode, dep["unloaded"])[0],
                    "_live": corrected_live(with_costs, mode, at_knee, ttft_ms, tpot_ms)[0]}
        for row in dep["rows"]:
            measured = row["measured_median"]
            for suffix, prof in profiles.items():
                steady = predict(prof, mode, row["rate"], ttft_ms, tpot_ms)
                windows = [predict_window(prof, mode, row["rate"], [r[0] for r in rep], ttft_ms, tpot_ms)
                           for rep in row["per_request"]]
                gaps["steady" + suffix].append(abs(steady - measured) * 100)
                gaps["trace" + suffix].append(abs(statistics.median(windows) - measured) * 100)
                print(f"{mode} {row['fraction_of_knee']:.1f}x{suffix or ' (unloaded corrected)'}: measured "
                      f"{row['measured']}, steady {steady:.3f}, windows {[round(w, 3) for w in windows]}", flush=True)
    return {f"{k}_{stat}_abs_gap_pp": round(f(v), 2) for k, v in gaps.items()
            for stat, f in (("median", statistics.median), ("max", max))}


def decode_step_fit_ms(doc: dict[str, Any], batch: float, mean_context: float) -> float:
    e = doc["entries"][0]
    c = e["decode_small"] if batch < e["decode_batch_threshold"] else e["decode_large"]
    return c["a"] + c["b"] * batch * mean_context + c["c"] * batch


def forward_ms_batched(doc: dict[str, Any], requests: int, output_tokens: int, steps: int) -> tuple[float, float]:
    """(prefill, decode) forward-pass CPU the profile predicts for `requests` concurrent requests
    whose decode ran `steps` iterations (the batch is the tokens per iteration)."""
    e = doc["entries"][0]
    p = e["prefill"]
    prefill = requests * (p["a"] + p["b"] * INPUT + p["c"] * INPUT**2)
    if steps <= 0:
        return prefill, 0.0
    batch = min(max(requests * (output_tokens - 1) / steps, 1.0), float(requests))
    return prefill, steps * decode_step_fit_ms(doc, batch, INPUT + output_tokens / 2)


def forward_ms(doc: dict[str, Any], output_tokens: int) -> tuple[float, float]:
    """(prefill, decode) forward-pass CPU the profile predicts for one request."""
    e = doc["entries"][0]
    p = e["prefill"]
    prefill = p["a"] + p["b"] * INPUT + p["c"] * INPUT**2
    decode = sum(decode_step_fit_ms(doc, 1, INPUT + 1 + step) for step in range(output_tokens - 1))
    return prefill, decode


# One seeded stream of prompts for the whole run: every measuring request gets a fresh prompt, so an
# engine with a prefix cache (vLLM's default) cannot answer the unloaded runs from it (each call
# re-seeding its own generator sent the same prompts again, and half of vLLM's unloaded TTFTs were
# cache hits).
_PROMPTS = random.Random(3)


async def sequential(url: str, n: int, output_tokens: int) -> list[Any]:
    rng = _PROMPTS
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            r = await one_request(
                session, url, SERVED, synthetic_prompt(rng, INPUT), output_tokens, time.perf_counter()
            )
            if not r.ok:
                raise SystemExit(f"request failed while measuring overheads: {r.error}")
            out.append(r)
    return out


async def concurrent(url: str, n: int, output_tokens: int) -> list[Any]:
    rng = _PROMPTS
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        answered = await asyncio.gather(*(
            one_request(session, url, SERVED, synthetic_prompt(rng, INPUT), output_tokens, started)
            for _ in range(n)))
    if not all(r.ok for r in answered):
        raise SystemExit(f"request failed while measuring overheads: {[r.error for r in answered if not r.ok]}")
    return list(answered)


def decode_steps(worker_urls: dict[str, str]) -> dict[str, int]:
    """Decode iterations each worker has run so far (its own histogram's count; 0 for others)."""
    import urllib.request

    steps = {}
    for role, base in worker_urls.items():
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        steps[role] = int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                              if line.startswith(STEPS_METRIC)))
    return steps


def measure_costs(
    url: str, pids: dict[str, int], worker_urls: dict[str, str], doc: dict[str, Any], n: int
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-process costs outside the forward passes (see profile/overheads.py), and the unloaded
    wall-clock TTFT and TPOT (medians) of the sequential requests. Sequential runs of two
    completion lengths, then CONCURRENT requests at once, with each worker's decode iterations
    counted: per-iteration costs separate from per-token ones only where a batch forms."""
    asyncio.run(sequential(url, 2, SHORT))  # warm connections and caches
    # This process is the client: what it spends per request is CPU the workers' cores may lose.
    pids = {**pids, "client": os.getpid()}
    runs: dict[str, list[Run]] = {role: [] for role in pids}
    ttfts, tpots = [], []
    for tokens, at_once in ((SHORT, 1), (LONG, 1), (LONG, CONCURRENT)):
        before = {role: process_cpu_ms(pid) for role, pid in pids.items()}
        steps_before = decode_steps(worker_urls)
        if at_once == 1:
            answered = asyncio.run(sequential(url, n, tokens))
            ttfts += [r.ttft_s * 1000 for r in answered if r.ttft_s is not None]
            tpots += [r.tpot_s * 1000 for r in answered if tokens == LONG and r.tpot_s is not None]
        else:
            answered = asyncio.run(concurrent(url, at_once, tokens))
        after = {role: process_cpu_ms(pid) for role, pid in pids.items()}
        steps = {role: count - steps_before[role] for role, count in decode_steps(worker_urls).items()}
        requests = len(answered)
        for role in pids:
            ran = steps.get(role, 0)
            if at_once == 1:
                pre, dec = (requests * x for x in forward_ms(doc, tokens))
            else:
                pre, dec = forward_ms_batched(doc, requests, tokens, ran)
            fwd = {"router": 0.0, "client": 0.0, "prefill": pre, "decode": dec, "colocated": pre + dec}[role]
            runs[role].append(Run(requests, tokens, after[role] - before[role], fwd, steps=ran))
    unloaded = {"ttft_ms": statistics.median(ttfts), "tpot_ms": statistics.median(tpots),
                "prefill_stall_ms": prefill_stall_ms(ttfts), "ttfts_ms": [round(t, 2) for t in ttfts]}
    # A process that runs no decode iterations (router, prefill) learns nothing from the
    # concurrent run but the batching of its prefills, which the profile does not model here.
    return {role: solve_costs(*(r if any(x.steps for x in r) else r[:2])) for role, r in runs.items()}, unloaded


def probe(url: str) -> dict[str, float]:
    """The deployment's unloaded median TTFT and TPOT now (PROBE_REQUESTS sequential requests of the
    unloaded measurement's longer completion)."""
    answered = asyncio.run(sequential(url, PROBE_REQUESTS, LONG))
    return {"ttft_ms": round(statistics.median(r.ttft_s * 1000 for r in answered), 2),
            "tpot_ms": round(statistics.median(r.tpot_s * 1000 for r in answered), 3)}


def speed(before: dict[str, float], after: dict[str, float], unloaded: dict[str, float]) -> list[float]:
    """How much slower (> 1) or faster the machine ran a window than at the start: the mean of the
    probes either side of it over the start's unloaded medians, for prefill (TTFT) and decode (TPOT)."""
    return [round((before[key] + after[key]) / 2 / unloaded[key], 3) for key in ("ttft_ms", "tpot_ms")]


def predict_row(doc: dict[str, Any], mode: str, row: dict[str, Any], ttft_ms: float, tpot_ms: float) -> float:
    """The prediction for a grid row: the median, over its windows, of the simulator on `doc` scaled
    by each window's measured `speed`; `doc` as it is for rows measured without probes."""
    rate = float(row["rate"])
    speeds = row.get("speed") or []
    if not speeds:
        return predict(doc, mode, rate, ttft_ms, tpot_ms)
    base = parse_profile(doc)
    return statistics.median(
        predict(base.scaled(k_p, k_d).model_dump(mode="json"), mode, rate, ttft_ms, tpot_ms) for k_p, k_d in speeds)


VARIANTS = {  # result key infix -> a grid row's gap field
    "": "gap_pp",  # calibrated once, by the unloaded run at the start
    "_speed_calibrated": "gap_speed_calibrated_pp",  # and by the unloaded probes around each window
    "_live_corrected": "gap_live_corrected_pp",
    "_uncorrected": "gap_uncorrected_pp",
    "_without_overheads": "gap_without_overheads_pp",
}
JUDGED = ("", "_speed_calibrated", "_live_corrected")  # variants the goal is judged for


def gap_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and max absolute gap (pp) of each prediction variant over the grid, and whether the
    goal (median <= 3 pp, max <= 8 pp) is met by the calibrated and live-corrected ones."""
    out: dict[str, Any] = {}
    for infix, field in VARIANTS.items():
        gaps = [abs(float(r[field])) for r in rows if r.get(field) is not None]
        out[f"median_abs_gap{infix}_pp"] = round(statistics.median(gaps), 2) if gaps else None
        out[f"max_abs_gap{infix}_pp"] = round(max(gaps), 2) if gaps else None
    for infix in JUDGED:
        median, worst = out[f"median_abs_gap{infix}_pp"], out[f"max_abs_gap{infix}_pp"]
        out[f"goal_met{infix}"] = median is not None and median <= 3 and worst <= 8
    return out


def calibrated(doc: dict[str, Any], mode: str, unloaded: dict[str, float]) -> tuple[dict[str, Any], list[float]]:
    """The profile scaled so its unloaded prediction matches the unloaded measurement: the
    autoscaler's correction (planner/replan.py), applied before the run. On a shared machine the
    wall time of a step is its CPU time stretched by the neighbours' load."""
    setup = build_search(spec_for(0.05, 600_000, 60_000), profile=doc, check_fit=False)
    idle = deployment(mode, setup).simulate(setup.searcher, 0.05)
    k_p = unloaded["ttft_ms"] / max(idle.ttft_p(50), 1e-6)
    k_d = unloaded["tpot_ms"] / max(idle.tpot_p(50), 1e-6)
    return parse_profile(doc).scaled(k_p, k_d).model_dump(mode="json"), [round(k_p, 3), round(k_d, 3)]


def corrected_live(doc: dict[str, Any], mode: str, point: dict[str, Any], ttft_ms: float,
                   tpot_ms: float) -> tuple[dict[str, Any], list[float]]:
    """The profile as the autoscaler corrects it while the deployment runs: `replan.correction`
    (measured over predicted median TTFT and TPOT at the measured rate) from one Poisson window
    at the measured knee, the last ramp point that met the target."""
    rate = point["rate"]
    setup = build_search(spec_for(rate, ttft_ms, tpot_ms), profile=doc, check_fit=False)
    observed = Observed(source="bench", window_seconds=point["requests"] / rate, requests=point["requests"],
                        request_rate=rate, ttft_p90_ms=point["ttft_p90_ms"], tpot_p90_ms=point["tpot_p90_ms"],
                        ttft_p50_ms=point["ttft_p50_ms"], tpot_p50_ms=point["tpot_p50_ms"])
    k_p, k_d = correction(setup.searcher, deployment(mode, setup), observed)  # type: ignore[arg-type]
    return parse_profile(doc).scaled(k_p, k_d).model_dump(mode="json"), [round(k_p, 3), round(k_d, 3)]


def measure_link(quick: bool) -> dict[str, float] | None:
    """The KV link between two engines over the workers' transport (bench/kv_transfer.py)."""
    try:
        from kv_transfer import run as kv_run
    except ImportError:
        return None
    result = asyncio.run(kv_run(MODEL, [128, 1024], 3 if quick else 5, 1))
    transfers = [(int(size["bytes"]), float(s)) for size in result["sizes"] for s in size["kv_seconds"]]
    return fit_link(transfers)


def measured_point(url: str, rate: float, seconds: float, ttft_ms: float, tpot_ms: float, seed: int) -> dict[str, Any]:
    """One Poisson window: its attainment, the p50/p90s the autoscaler would see (per-request
    TPOT), and every request's [sent at s, TTFT ms, TPOT ms] (null TTFT: it failed), so where the
    violations come from (a spread, or stalls) can be read from a run afterwards."""
    n = max(8, int(rate * seconds))
    results = asyncio.run(
        run_poisson(url, SERVED, rate=rate, num_requests=n, input_tokens=INPUT, output_tokens=OUTPUT, seed=seed)
    )
    s = summarize(results, ttft_ms / 1000, tpot_ms / 1000)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {"rate": round(rate, 3), "requests": n, "attainment": round(float(s["attainment"]), 3),
            "ttft_p90_ms": s["ttft_ms"]["p90"], "tpot_p90_ms": s["tpot_ms"]["p90"],
            "ttft_p50_ms": s["ttft_ms"]["p50"], "tpot_p50_ms": s["tpot_ms"]["p50"],
            "per_request": [[round(r.sent_at_s, 3), ms(r.ttft_s if r.ok else None), ms(r.tpot_s)] for r in results]}


def find_knee(url: str, start: float, seconds: float, ttft_ms: float, tpot_ms: float) -> tuple[float | None, list]:
    """Highest rate on a x1.3 ramp whose measured attainment meets the target (down by 1.6x
    from `start` until one does, not below MIN_RAMP_RPS)."""
    ramp, rate, good = [], start, None
    for step in range(12):
        if rate < MIN_RAMP_RPS:
            break
        point = measured_point(url, rate, seconds, ttft_ms, tpot_ms, seed=100 + step)
        att = point["attainment"]
        ramp.append(point)
        print(f"  ramp {rate:6.2f} rps: {att:.2f}", flush=True)
        if att >= TARGET:
            good = rate
            rate *= 1.3
        elif good is None:
            rate /= 1.6
        else:
            break
    return good, ramp


def evaluate(
    mode: str,
    url: str,
    pids: dict[str, int],
    worker_urls: dict[str, str],
    doc: dict[str, Any],
    quick: bool,
    link: dict[str, float] | None,
    window_s: float | None = None,
) -> dict[str, Any]:
    costs, unloaded = measure_costs(url, pids, worker_urls, doc, 6 if quick else 12)
    # SLOs from what this deployment does unloaded *now*: on a loaded shared machine SLOs set
    # from the profile's CPU times can be out of reach at any rate. TTFT 3x, TPOT 2x the medians.
    ttft_ms, tpot_ms = 3 * unloaded["ttft_ms"], 2 * unloaded["tpot_ms"]
    with_costs = {**doc, "overheads": overheads_section(costs, link, unloaded["prefill_stall_ms"],
                                                       SHARED_CORES.get(mode, 0))}
    corrected, factors = calibrated(with_costs, mode, unloaded)
    print(
        f"{mode}: costs outside the model {json.dumps(costs)}; unloaded {unloaded}; "
        f"SLO {ttft_ms:.1f} / {tpot_ms:.2f} ms; correction x{factors}",
        flush=True,
    )
    # One request is 100/(rate x seconds) points of attainment: at 1.6 req/s and 10 s a single
    # late request moves a repeat by 6 pp, more than the goal's 8 pp allows for the whole gap.
    seconds = window_s or (5 if quick else 10)
    # the ramp, not the simulator, decides the knee (the grid must not come from the prediction)
    knee, ramp = find_knee(url, 2.0, seconds, ttft_ms, tpot_ms)
    result: dict[str, Any] = {
        "mode": mode,
        "shared_cores": SHARED_CORES.get(mode, 0),
        "costs": costs,
        "unloaded": unloaded,
        "slo": {"ttft_ms": round(ttft_ms, 2), "tpot_ms": round(tpot_ms, 2)},
        "correction": factors,
        "knee_rps": None if knee is None else round(knee, 3),
        "ramp": ramp,
        "rows": [],
    }
    if knee is None:
        result["error"] = (
            f"no rate down to {MIN_RAMP_RPS} rps met {TARGET:.0%} attainment of SLOs set at 3x/2x the unloaded "
            "latency minutes earlier: the machine's load changed faster than one run (see load averages)"
        )
        return result
    at_knee = next(p for p in reversed(ramp) if p["rate"] == round(knee, 3))
    live, live_factors = corrected_live(with_costs, mode, at_knee, ttft_ms, tpot_ms)
    result["correction_live"] = live_factors
    print(f"  live correction at the knee ({at_knee}): x{live_factors}", flush=True)
    fractions = [0.2, 0.6, 1.0, 1.2] if quick else [0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
    rows = []
    last_probe = probe(url)
    for f in fractions:
        rate = round(knee * f, 3)
        points, speeds = [], []
        for i in range(5 if f >= 0.8 and not quick else 3):
            before = last_probe
            points.append(measured_point(url, rate, seconds, ttft_ms, tpot_ms, seed=1000 * i + int(f * 10)))
            last_probe = probe(url)
            speeds.append(speed(before, last_probe, unloaded))
        measured = [float(point["attainment"]) for point in points]
        m = statistics.median(measured)
        row: dict[str, Any] = {"mode": mode, "fraction_of_knee": f, "rate": rate, "speed": speeds}
        p = predict(corrected, mode, rate, ttft_ms, tpot_ms)
        p_speed = predict_row(corrected, mode, row, ttft_ms, tpot_ms)
        p_live = predict(live, mode, rate, ttft_ms, tpot_ms)
        p_costs = predict(with_costs, mode, rate, ttft_ms, tpot_ms)
        p_old = predict(doc, mode, rate, ttft_ms, tpot_ms)
        row.update(
            {
                "measured": [round(x, 3) for x in measured],
                "measured_median": round(m, 3),
                "predicted": round(p, 3),
                "predicted_speed_calibrated": round(p_speed, 3),
                "predicted_live_corrected": round(p_live, 3),
                "predicted_uncorrected": round(p_costs, 3),
                "predicted_without_overheads": round(p_old, 3),
                "gap_pp": round(100 * (p - m), 1),
                "gap_speed_calibrated_pp": round(100 * (p_speed - m), 1),
                "gap_live_corrected_pp": round(100 * (p_live - m), 1),
                "gap_uncorrected_pp": round(100 * (p_costs - m), 1),
                "gap_without_overheads_pp": round(100 * (p_old - m), 1),
                "per_request": [point["per_request"] for point in points],
            }
        )
        rows.append(row)
        print(
            f"  {mode} {rate:6.2f} rps ({f:.1f}x knee): measured {m:.2f} {measured}, predicted {p:.2f} (at each "
            f"window's speed {p_speed:.2f}, {speeds}; live corrected {p_live:.2f}, uncorrected {p_costs:.2f}, "
            f"without overheads {p_old:.2f})",
            flush=True,
        )
    result["rows"] = rows
    return result


def main() -> None:
    # a timeout's SIGTERM must still stop the workers (the finally blocks below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-colocated", action="store_true")
    parser.add_argument("--window-s", type=float, default=None,
                        help="seconds of Poisson traffic per measured point (default 10, --quick 5)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_vs_measured.json"))
    parser.add_argument("--rescore", type=Path, default=None, metavar="RESULTS",
                        help="measure nothing: predict a stored run's windows again (steady state and "
                             "trace-driven) and print the gaps")
    parser.add_argument("--stall-ms", type=float, default=None,
                        help="with --rescore: the prefill stall to predict with instead of the stored one")
    parser.add_argument("--shared-cores", action="store_true",
                        help="with --rescore: predict with this bench's shared cores (SHARED_CORES) whatever "
                             "the run stored")
    args = parser.parse_args()
    if args.rescore is not None:
        print(json.dumps(rescore(args.rescore, args.stall_ms, SHARED_CORES if args.shared_cores else None),
                         indent=2))
        return
    started = time.perf_counter()
    load_before = load_average()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        doc = profile(logdir / "profile.json", args.quick)
        prof = parse_profile(doc)
        # The prefill worker batches up to the profile's L_m, as the operator renders a planned prefill pod
        # and as the simulator predicts it (planner/batching.py).
        prefill_budget = prefill_token_budget(phase_latency(prof, 1, 1))
        fit_issues = fit_problems(prof, max_decode_batch=64, max_prefill_tokens=max(2048, prefill_budget))
        e = doc["entries"][0]
        prefill_ms = e["prefill"]["a"] + e["prefill"]["b"] * INPUT + e["prefill"]["c"] * INPUT**2
        step_ms = e["decode_small"]["a"] + e["decode_small"]["b"] * INPUT + e["decode_small"]["c"]
        profile_slo = (4 * prefill_ms, 3 * step_ms)  # for reference: from the profile's CPU times
        link = measure_link(args.quick)
        print(
            f"profile SLO TTFT {profile_slo[0]:.1f} ms, TPOT {profile_slo[1]:.2f} ms; KV link {link}; "
            f"fit problems {fit_issues}; prefill budget (L_m) {prefill_budget} tokens",
            flush=True,
        )
        deployments = [
            (
                "disaggregated",
                [
                    worker("prefill", "prefill", "127.61.0.1", 0, MODEL, logdir, prefill_budget),
                    worker("decode", "decode", "127.61.0.2", 1, MODEL, logdir, BUDGET),
                ],
                ["--prefill-endpoints", "http://127.61.0.1:8100", "--decode-endpoints", "http://127.61.0.2:8100"],
            )
        ]
        if not args.skip_colocated:
            deployments.append(("colocated", None, ["--colocated-endpoints", "http://127.61.0.4:8100"]))
        for mode, workers, endpoints in deployments:
            if workers is None:
                workers = [worker("colocated", "colocated", "127.61.0.4", 0, MODEL, logdir, BUDGET)]
            procs = [
                *workers,
                router(
                    f"router-{mode}",
                    "127.61.0.3" if mode == "disaggregated" else "127.61.0.5",
                    MODEL,
                    endpoints,
                    logdir,
                ),
            ]
            try:
                wait_ready(procs)
                pids = {
                    p.name if p.name in ("prefill", "decode", "colocated") else "router": p.popen.pid for p in procs
                }
                worker_urls = {p.name: p.url for p in procs if p.name in ("prefill", "decode", "colocated")}
                results.append(evaluate(mode, procs[-1].url, pids, worker_urls, doc, args.quick, link, args.window_s))
            except PlanningError as err:
                results.append({"mode": mode, "error": str(err)})
            finally:
                for p in procs:
                    p.popen.terminate()
                for p in procs:
                    p.popen.wait(30)
    rows = [r for res in results for r in res.get("rows", [])]
    report = {
        "benchmark": "planner_vs_measured",
        "model": MODEL,
        "input_tokens": INPUT,
        "output_tokens": OUTPUT,
        "quick": args.quick,
        "window_s": args.window_s or (5 if args.quick else 10),
        "slo": "per deployment: 3x unloaded TTFT, 2x unloaded TPOT measured at the start of its run, "
        f"attainment {TARGET}",
        "slo_from_profile_cpu_times": {"ttft_ms": round(profile_slo[0], 2), "tpot_ms": round(profile_slo[1], 2)},
        "profile_fit": {
            k: doc["entries"][0][k] for k in ("prefill", "decode_small", "decode_large", "decode_batch_threshold")
        },
        "profile_fit_problems": fit_issues,
        "prefill_budget": prefill_budget,
        "profile_measurements": doc.get("measurements"),
        "kv_link": link,
        "deployments": results,
        **gap_summary(rows),
        "goal": "median <= 3 pp, max <= 8 pp",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpus": os.cpu_count(),
        "note": "measured on a 2-core machine (load averages above; on a shared host neighbours' load moves the "
        "measured curve, not the prediction). 'predicted' is "
        "the simulator with the measured overheads and KV link, corrected by the unloaded measured/predicted "
        "latency ratio measured at the start; 'speed calibrated' also by each window's speed (unloaded probes "
        "before and after it over the start's unloaded medians); "
        "'live corrected' with the autoscaler's own correction (replan.correction: measured over "
        "predicted median TTFT and TPOT) from the ramp's window at the measured knee, as the autoscaler corrects "
        "while the deployment runs; 'uncorrected' without either ratio (the first plan); 'without overheads' "
        "is the forward-pass-only profile as the planner used before",
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "median_abs_gap_pp",
                    "max_abs_gap_pp",
                    "median_abs_gap_speed_calibrated_pp",
                    "max_abs_gap_speed_calibrated_pp",
                    "median_abs_gap_live_corrected_pp",
                    "max_abs_gap_live_corrected_pp",
                    "median_abs_gap_without_overheads_pp",
                    "load_average_before",
                    "load_average_after",
                    "seconds",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
