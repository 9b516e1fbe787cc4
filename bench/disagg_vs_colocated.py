"""Disaggregated (1 prefill + 1 decode worker) vs colocated (2 workers), same cores, Poisson load.

Each worker is pinned to one core (`taskset`, one torch thread), so both systems get exactly two
cores for the model; the routers and this load generator run unpinned and are the same for both.
Both systems stay up for the whole run and are measured interleaved at every rate (A, B, then B, A
on the next repeat), so drift in the machine's background load hits both alike.

Regimes (`--regime`):
- distserve (default): prompt-heavy requests (1024 in / 16 out), a tight TPOT SLO judged per
  request at its p90 token gap (a prefill stall in the middle of a stream counts, the mean over
  the request would dilute it), TTFT SLO 3x unloaded — where DistServe shows its gain;
- decode-heavy: short prompts, long outputs (64 in / 128 out), mean TPOT — where there is little
  interference to remove and the lone decode core is the bottleneck: disaggregation was expected to
  lose here (it did not in results/disagg_vs_colocated-decode-heavy-bfloat16.json; docs/architecture.md);
- legacy: the earlier setting (512 in / 64 out, TTFT 5x, mean TPOT 3x).
SLOs are set from the colocated system's own unloaded latency (minimum TTFT, median TPOT at one
request at a time) unless given. Goodput is the highest tested rate up to which at least 90 % of
requests meet both SLOs (per GPU here: per core; both use two).

The colocated baseline is the strongest this engine has: one fused forward per iteration with
chunked prefill under a token budget (vLLM's max_num_batched_tokens), run at `--colocated-budget`
(the SLO base) and at each of `--colocated-budgets`; the ratio is taken against whichever colocated
system reaches the higher goodput (a smaller budget stalls decodes less, delays first tokens more).
Goodput is reported as the highest tested rate and interpolated where the curve crosses the
target, so the grid's spacing does not decide the ratio. The
prefill:decode split is what the per-phase cost measured unloaded asks for; with two cores the
only split of whole cores is 1:1, so the ideal share is recorded beside it (`pd_split`), and
`--pd-split measured` splits the same total of worker compute as that share asks, with the CPU
caps. Rates are a grid around the measured knee: fractions of one core's prefill capacity
(1 / unloaded TTFT) for prompt-heavy regimes, multiples of 1 / (unloaded request latency) for
decode-heavy ones.

The prefill worker batches whole prompts up to `--prefill-budget` tokens (DistServe's L_m: past
the length where the device saturates, batching saves nothing and delays the first prompts; the
planner's M/D/1 prefill model assumes the same); on one core that is ~1024 tokens, so the
distserve regime's 1024-token prompts go one per iteration.

The same requests are also judged against other TPOT SLOs (`--tpot-sweep`, DistServe's SLO-scale
curves): `tpot_slo_sweep` holds each system's goodput and the ratio per TPOT SLO, and the plot's
right panel the ratio against the SLO — where a colocated chunk's stall fits under the SLO and
where it does not.

Also measured: the router's added latency — the same small request sent to a colocated worker
directly (`/internal/generate`) and through the router (`/v1/completions`), interleaved.

Writes bench/results/disagg_vs_colocated[-REGIME][-DTYPE][-quick].json and .png. `--quick`: a smoke
run (< 1 min). `--dtype bfloat16`: every worker in bfloat16 (on an AMX CPU the faster choice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import one_request, run_poisson, summarize, synthetic_prompt

RESULTS = Path(__file__).resolve().parent / "results"
SERVED = "bench"
REGIMES: dict[str, dict[str, Any]] = {
    "distserve": {"input_tokens": 1024, "output_tokens": 16, "ttft_scale": 3.0, "tpot_scale": 3.0,
                  "tpot_stat": "p90", "rate_factors": [0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.95, 1.1, 1.25, 1.4],
                  "rate_base": "prefill", "worker_cpu_share": 0.9},
    # Rates as multiples of one request's whole unloaded latency: decode batching is the capacity.
    "decode-heavy": {"input_tokens": 64, "output_tokens": 128, "ttft_scale": 5.0, "tpot_scale": 2.0,
                     "tpot_stat": "mean", "rate_factors": [1.0, 2.5, 5.0, 8.0, 11.0, 14.0], "rate_base": "request",
                     "worker_cpu_share": 0.7},
    "legacy": {"input_tokens": 512, "output_tokens": 64, "ttft_scale": 5.0, "tpot_scale": 3.0,
               "tpot_stat": "mean", "rate_factors": [0.12, 0.2, 0.3, 0.45, 0.6], "rate_base": "prefill",
               "worker_cpu_share": 0.8},
}


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log: Path


def spawn(name: str, args: list[str], url: str, logdir: Path, core: int | None = None) -> Proc:
    cmd = [sys.executable, "-m", "disaggserve_worker.cli", *args]
    if core is not None:
        if shutil.which("taskset") is None:
            raise SystemExit("taskset (util-linux) is needed to pin workers to cores")
        cmd = ["taskset", "-c", str(core), *cmd]
    log = logdir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    return Proc(name, url, popen, log)


class CpuCaps:
    """Caps each worker at a share of its core with the kernel's CFS bandwidth control (a cgroup per
    worker: v2 `cpu.max`, or v1 `cpu.cfs_quota_us`). Why: with no core to spare, the harness (routers,
    load generator) runs on the workers' cores. Uncapped, a system that leaves a core idle absorbs the
    harness there for free while one that keeps both cores busy loses it from its workers (measured:
    colocated workers 66-74 % of a core while overloaded, the disaggregated decode worker 92-99 %), so the
    comparison favoured disaggregation. Capped at the same share, every worker of both systems gets the
    same compute whatever the harness does, and the harness has the rest of each core: an emulation of
    dedicated worker cores that run slower. Each worker's group also weighs 10x a plain process, so up to
    its cap it runs whenever it wants to (a capped group otherwise competes as one process against each
    of the harness's and the host's, and got 49-61 % of a core while overloaded at a 0.7 cap); the
    harness runs in what is left. The period is the shortest that still delivers the share asked: a
    spinning process capped at 0.7 got 0.51 of its core with a 2 ms period (the unthrottle timer's
    latency), 0.68 with 5 ms, 0.70 with 10 ms. A worker that exhausts its quota stalls for up to
    (1 - share) x 10 ms, a busy worker of either system alike; each regime's default share is the
    largest that leaves the harness what it was measured to need, so the stall stays short where the
    SLO judges single token gaps."""

    PERIOD_US = 10_000

    def __init__(self, share: float):
        self.share = share
        self.groups: list[Path] = []
        v2 = Path("/sys/fs/cgroup")
        controllers = (v2 / "cgroup.controllers").read_text().split() if (v2 / "cgroup.controllers").exists() else []
        if "cpu" in controllers:
            self.root, self.v2 = v2, True
        elif (Path("/sys/fs/cgroup/cpu") / "cpu.cfs_quota_us").exists():
            self.root, self.v2 = Path("/sys/fs/cgroup/cpu"), False
        else:
            raise SystemExit("--worker-cpu-share needs the cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us); "
                             "none is mounted here. Pass --worker-cpu-share 1 to run uncapped (the harness then "
                             "takes its CPU from whichever worker is busy; the result records how much)")
        # The kernel's smallest quota is 1 ms: a share below 0.1 needs a longer period.
        self.period_us = max(self.PERIOD_US, round(1000 / share))

    def cap(self, proc: Proc, share: float | None = None) -> None:
        """Cap a worker at `share` of a core (default: the common share); again to change it."""
        group = self.root / f"disagg-bench-{os.getpid()}-{proc.name}"
        quota = round((share or self.share) * self.period_us)
        try:
            if group not in self.groups:
                group.mkdir(exist_ok=True)
                self.groups.append(group)
            if self.v2:
                (group / "cpu.max").write_text(f"{quota} {self.period_us}")
                (group / "cpu.weight").write_text("1000")  # default 100
            else:
                (group / "cpu.cfs_period_us").write_text(str(self.period_us))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
                (group / "cpu.shares").write_text("10240")  # default 1024
            (group / "cgroup.procs").write_text(str(proc.popen.pid))
        except OSError as error:
            raise SystemExit(f"cannot cap {proc.name} at {self.share:g} of a core in {group}: {error}. Run as root "
                             "with a writable cgroup cpu controller, or pass --worker-cpu-share 1 to run uncapped") \
                from error

    def release(self) -> None:
        """Remove the cgroups (each is empty once its worker has exited)."""
        for group in self.groups:
            with suppress(OSError):
                group.rmdir()


def pd_shares(total: float, prefill_share: float) -> tuple[float, float]:
    """The prefill and decode workers' shares of a core for `total` cores of worker compute split as
    the per-phase cost asks (`prefill_share` of it to prefill), each within (0.1, 1]: one worker runs
    one engine thread, so it can use one core at most, and a phase never gets nothing."""
    prefill = min(1.0, max(0.1, total * prefill_share))
    decode = min(1.0, total - prefill)
    return round(total - decode, 3), round(decode, 3)


def wait_ready(procs: list[Proc], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        while True:
            if proc.popen.poll() is not None:
                raise SystemExit(f"{proc.name} exited:\n{proc.log.read_text()[-3000:]}")
            with suppress(OSError), urllib.request.urlopen(proc.url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{proc.name} not ready after {timeout_s:.0f}s:\n"
                                 f"{proc.log.read_text()[-3000:]}")
            time.sleep(0.2)


def worker(name: str, role: str, ip: str, core: int, model: str, logdir: Path, budget: int,
           dtype: str = "auto") -> Proc:
    return spawn(name, ["serve", "--role", role, "--model", model, "--model-name", SERVED, "--host", ip,
                        "--port", "8100", "--kv-port", "8101", "--device", "cpu", "--threads", "1",
                        "--dtype", dtype, "--max-batch-tokens", str(budget), "--log-level", "WARNING"],
                 f"http://{ip}:8100", logdir, core)


def router(name: str, ip: str, model: str, endpoints: list[str], logdir: Path, cores: list[int] | None = None) -> Proc:
    proc = spawn(name, ["router", "--model", model, "--model-name", SERVED, "--host", ip, "--port", "8000",
                        *endpoints, "--log-level", "WARNING"], f"http://{ip}:8000", logdir)
    if cores:
        os.sched_setaffinity(proc.popen.pid, cores)
    return proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SystemProcs:
    """The processes one system under test runs: its pinned workers and its router."""

    workers: dict[str, int]  # name -> pid
    router: int


def cpu_snapshot(procs: SystemProcs) -> dict[str, float]:
    """CPU seconds so far of a system's workers and router, this process's (the load generator's) and the clock."""
    return {**{name: cpu_seconds(pid) for name, pid in procs.workers.items()},
            "router": cpu_seconds(procs.router), "loadgen": time.process_time(), "wall": time.perf_counter()}


def cpu_use(before: dict[str, float], after: dict[str, float], cores: int) -> dict[str, Any]:
    """Where the CPU went during one run. Why: on a host with no core to spare, the routers and the
    load generator (the harness) run on the workers' cores and preempt whichever worker is busy; a
    system that leaves a core idle (disaggregated, in a regime where one phase is light) absorbs the
    harness there for free, while one that keeps both cores busy (colocated) loses it from its
    workers. `worker_busy` (fraction of a core each worker ran) and `harness_share` (the harness's CPU
    over all cores of the run) make that visible in the result instead of hiding it in the latencies."""
    wall = after["wall"] - before["wall"]
    used = {key: after[key] - before[key] for key in after if key != "wall"}
    workers = {key: value for key, value in used.items() if key not in ("router", "loadgen")}
    return {"wall_s": wall, "cpu_s": used,
            "worker_busy": {name: value / wall for name, value in workers.items()} if wall > 0 else {},
            "harness_share": (used["router"] + used["loadgen"]) / (wall * cores) if wall > 0 else None}


async def router_overhead(worker_url: str, router_url: str, repeats: int) -> dict[str, Any]:
    """Same small request, directly and through the router, interleaved; medians of e2e latency."""
    rng = random.Random(7)
    prompt = synthetic_prompt(rng, 16)
    direct, routed = [], []
    async with aiohttp.ClientSession() as session:
        for i in range(repeats + 2):
            body = {"request_id": f"overhead-{i}", "prompt_token_ids": prompt,
                    "sampling": {"max_tokens": 8, "temperature": 0, "ignore_eos": True}}
            t0 = time.perf_counter()
            async with session.post(worker_url + "/internal/generate", json=body) as resp:
                lines = [line async for line in resp.content if line.strip()]
            t_direct = time.perf_counter() - t0
            assert json.loads(lines[-1])["finish_reason"] == "length", lines[-1]
            t0 = time.perf_counter()
            async with session.post(router_url + "/v1/completions", json={
                    "model": SERVED, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True}) as resp:
                answer = await resp.json()
            t_routed = time.perf_counter() - t0
            assert answer["usage"]["completion_tokens"] == 8, answer
            if i >= 2:  # the first two warm connections and caches
                direct.append(t_direct * 1000)
                routed.append(t_routed * 1000)
    d, r = statistics.median(direct), statistics.median(routed)
    return {"repeats": repeats, "request": "16 prompt tokens, 8 output tokens, non-streaming",
            "direct_p50_ms": d, "router_p50_ms": r, "added_p50_ms": r - d, "ratio": r / d}


async def unloaded(url: str, input_tokens: int, output_tokens: int, n: int) -> dict[str, float]:
    """TTFT and TPOT of requests sent one at a time (the first, a warm-up, is dropped)."""
    rng = random.Random(11)
    ttft, tpot, tpot_p90 = [], [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(n + 1):
            res = await one_request(session, url, SERVED, synthetic_prompt(rng, input_tokens), output_tokens,
                                    time.perf_counter())
            if not res.ok:
                raise SystemExit(f"calibration request failed: {res.error}")
            ttft.append(res.ttft_s)
            tpot.append(res.tpot_s)
            tpot_p90.append(res.tpot_p90_s)
    # TTFT: the minimum, the prefill time itself (background load on a shared machine only adds);
    # TPOT: the median, already an average over all the request's decode steps; and the median of
    # each request's p90 token gap, the base of an SLO judged by that statistic (a mean base with
    # a p90 judgement fails requests for ordinary jitter, loaded or not).
    return {"ttft_ms": min(ttft[1:]) * 1000, "tpot_ms": statistics.median(tpot[1:]) * 1000,
            "tpot_p90_ms": statistics.median(tpot_p90[1:]) * 1000}


def goodput(rows: list[dict[str, Any]], target: float) -> float:
    """Highest rate up to which every tested rate met the target: one lucky point past a miss, on a
    noisy machine, does not count."""
    best = 0.0
    for row in sorted(rows, key=lambda r: r["rate"]):
        if row["attainment"] < target:
            break
        best = row["rate"]
    return best


def goodput_interpolated(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Where the attainment curve crosses the target, read between the last tested rate that met it
    and the first that did not (linear in between, as goodput is read off DistServe's curves): the
    grid's spacing no longer decides a ratio. `bounded` is False when no tested rate missed."""
    ordered = sorted(rows, key=lambda r: r["rate"])
    last = None
    for row in ordered:
        if row["attainment"] < target:
            if last is None:
                return {"rps": 0.0, "bounded": True}
            a1, a2 = last["attainment"], row["attainment"]
            rps = last["rate"] + (a1 - target) / (a1 - a2) * (row["rate"] - last["rate"])
            return {"rps": round(rps, 3), "bounded": True}
        last = row
    return {"rps": last["rate"] if last else 0.0, "bounded": False}


def load_note(load_start: tuple[float, ...], load_end: tuple[float, ...], cpus: int) -> str:
    """What the load averages say about the numbers. Only the load at the start tells of other
    work: by the end this bench's own workers, routers and load generator keep the cores busy."""
    if load_start[0] > cpus / 2:
        return (f"busy host (1-min load {load_start[0]:.1f} on {cpus} CPUs before this bench started): "
                "treat as indicative, re-run quiet")
    return (f"quiet host at the start (1-min load {load_start[0]:.1f} on {cpus} CPUs); the load at the end "
            f"({load_end[0]:.1f}) is mostly this bench's own processes")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result.get("tpot_slo_sweep") or []
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11.5 if sweep else 6.4, 4.2), squeeze=False)
    ax = axes[0][0]
    styles = ["o-", "s--", "^:", "v-."]
    for i, (name, system) in enumerate(result["systems"].items()):
        rows = system["rates"]
        budget = result.get("colocated_budgets", {}).get(name)
        label = f"{name} (budget {budget})" if budget and name == "colocated" else name
        ax.plot([r["rate"] for r in rows], [100 * r["attainment"] for r in rows], styles[i % len(styles)],
                label=f"{label}: goodput {system['goodput_interpolated']['rps']:g} req/s")
    ax.axhline(100 * result["target_attainment"], color="grey", lw=0.8, ls=":")
    slo = result["slo"]
    ax.set(xlabel="request rate (req/s, Poisson)", ylabel="SLO attainment (%)", ylim=(-2, 102),
           title=f"{result['model']} on 2 CPU cores: TTFT ≤ {slo['ttft_ms']:.0f} ms, "
                 f"TPOT ≤ {slo['tpot_ms']:.1f} ms")
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    if sweep:
        right = axes[0][1]
        right.plot([r["tpot_ms"] for r in sweep], [r["ratio"] or 0 for r in sweep], "o-")
        right.axhline(1.0, color="grey", lw=0.8, ls=":")
        right.axvline(slo["tpot_ms"], color="grey", lw=0.8, ls="--")
        right.set(xlabel="TPOT SLO (ms, per-request p90 gap)", ylabel="goodput ratio, disaggregated / best colocated",
                  title="same requests, other TPOT SLOs")
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def measure(args: argparse.Namespace, urls: dict[str, str], coloc_worker: str,
                  procs: dict[str, SystemProcs], resplit: Callable[[float], str] | None = None) -> dict[str, Any]:
    overhead = await router_overhead(coloc_worker, urls["colocated"], args.overhead_repeats)
    print(f"router overhead: p50 {overhead['added_p50_ms']:.2f} ms added "
          f"({overhead['direct_p50_ms']:.1f} → {overhead['router_p50_ms']:.1f} ms)", flush=True)
    base = {name: await unloaded(url, args.input_tokens, args.output_tokens, args.calibration)
            for name, url in urls.items()}
    ttft_slo = args.ttft_slo_ms or args.ttft_scale * base["colocated"]["ttft_ms"]
    tpot_base = base["colocated"]["tpot_p90_ms" if args.tpot_stat == "p90" else "tpot_ms"]
    tpot_slo = args.tpot_slo_ms or args.tpot_scale * tpot_base
    # Per-phase cost of one request, unloaded: the split a planner would choose for this mix.
    prefill_ms = base["colocated"]["ttft_ms"]
    decode_ms = base["colocated"]["tpot_ms"] * max(0, args.output_tokens - 1)
    pd_split = {"prefill_cost_ms": prefill_ms, "decode_cost_ms": decode_ms,
                "ideal_prefill_share": prefill_ms / (prefill_ms + decode_ms) if prefill_ms + decode_ms else None,
                "used": "1 prefill core : 1 decode core (the only split two pinned cores allow)"}
    if resplit and pd_split["ideal_prefill_share"] is not None:
        pd_split["used"] = resplit(pd_split["ideal_prefill_share"])
        print(f"split: {pd_split['used']}", flush=True)
    print(f"unloaded: {base}; SLO TTFT {ttft_slo:.0f} ms, TPOT {tpot_slo:.1f} ms", flush=True)
    unit_ms = prefill_ms if args.rate_base == "prefill" else prefill_ms + decode_ms
    rates = args.rates or [round(f * 1000 / unit_ms, 2) for f in args.rate_factors]
    per_rate: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    raw: dict[str, list[tuple[float, list[list[Any]]]]] = {name: [] for name in urls}  # rate, repeats' results
    for rate in rates:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
        kept: dict[str, list[list[Any]]] = {name: [] for name in urls}
        # A fixed arrival window per point keeps the run's length independent of the machine's speed.
        count = max(args.min_requests, min(args.max_requests, round(rate * args.point_seconds)))
        for rep in range(args.repeats):
            order = list(urls) if rep % 2 == 0 else list(reversed(urls))
            for name in order:
                before = cpu_snapshot(procs[name])
                results = await run_poisson(urls[name], SERVED, rate=rate, num_requests=count,
                                            input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                                            seed=rep)
                summary = summarize(results, ttft_slo / 1000, tpot_slo / 1000, args.tpot_stat)
                summary["cpu"] = cpu_use(before, cpu_snapshot(procs[name]), args.host_cores)
                runs[name].append(summary)
                kept[name].append(results)
        for name, results_by_repeat in kept.items():
            raw[name].append((rate, results_by_repeat))
        for name, summaries in runs.items():
            row = rate_row(rate, summaries)
            per_rate[name].append(row)
            busy = " ".join(f"{w} {b:.0%}" for w, b in row["worker_busy"].items())
            print(f"rate {rate:6.2f}  {name:14s} attainment {row['attainment']:.0%}  "
                  f"TTFT p90 {row['ttft_ms']['p90']:.0f} ms  TPOT p90 {row['tpot_ms']['p90']:.1f} ms  "
                  f"busy {busy}  harness {row['harness_share']:.0%}", flush=True)
    systems = {name: {"rates": rows, "goodput_rps": goodput(rows, args.target),
                      "goodput_rps_per_core": goodput(rows, args.target) / 2,
                      "goodput_interpolated": goodput_interpolated(rows, args.target),
                      "unloaded": base[name]} for name, rows in per_rate.items()}
    # The baseline is the best colocated system of those run (one per chunked-prefill budget):
    # a smaller budget stalls decodes less and delays first tokens more; which wins depends on
    # the SLOs, so each is measured rather than one picked.
    colocated = [name for name in systems if name != "disaggregated"]
    best = max(colocated, key=lambda n: (systems[n]["goodput_interpolated"]["rps"], systems[n]["goodput_rps"]))
    ratio = (systems["disaggregated"]["goodput_rps"] / systems[best]["goodput_rps"]
             if systems[best]["goodput_rps"] else None)
    interp = systems[best]["goodput_interpolated"]["rps"]
    ratio_interp = systems["disaggregated"]["goodput_interpolated"]["rps"] / interp if interp else None
    source = "flags" if args.ttft_slo_ms and args.tpot_slo_ms else \
        f"{args.ttft_scale:g}x TTFT / {args.tpot_scale:g}x TPOT of the colocated system unloaded"
    sweep = slo_sweep(raw, args, ttft_slo, tpot_base)
    for row in sweep:
        print(f"TPOT SLO {row['tpot_scale']:g}x ({row['tpot_ms']:.1f} ms): goodput {row['goodput_rps']}, "
              f"ratio over the best colocated {row['ratio']}", flush=True)
    return {"slo": {"ttft_ms": ttft_slo, "tpot_ms": tpot_slo, "source": source,
                    "tpot_judged_as": "per-request p90 token gap" if args.tpot_stat == "p90"
                    else "per-request mean over its tokens"},
            "pd_split": pd_split,
            "target_attainment": args.target, "systems": systems,
            "best_colocated": best,
            "goodput_ratio_disagg_over_colocated": ratio,
            "goodput_ratio_interpolated": None if ratio_interp is None else round(ratio_interp, 3),
            "goodput_ratio_definitions": {
                "goodput_ratio_disagg_over_colocated": "highest tested rate up to which every tested rate met "
                                                       "the target, disaggregated over the best colocated system",
                "goodput_ratio_interpolated": "the same, each goodput read where the curve crosses the target "
                                              "(linear between the tested rates around it)"},
            "router_overhead": overhead,
            "tpot_slo_sweep": sweep,
            "requests": {name: [{"rate": rate, "repeats": [[[r.ttft_s, r.tpot_p90_s if args.tpot_stat == "p90"
                                                              else r.tpot_s] if r.ok else None for r in results]
                                                            for results in repeats]}
                                for rate, repeats in rows]
                         for name, rows in raw.items()}}


@dataclass(frozen=True)
class StoredRequest:
    """A request as a result file keeps it: [TTFT s, the TPOT statistic judged, s], None if it failed."""

    pair: list[float | None] | None

    def meets(self, ttft_slo_s: float, tpot_slo_s: float, tpot_stat: str = "mean") -> bool:
        del tpot_stat  # the file keeps the statistic the run judged
        if self.pair is None:
            return False
        ttft, tpot = self.pair
        return ttft is not None and ttft <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)


def resweep(path: Path, scales: list[float]) -> None:
    """Judge a result file's stored requests at other TPOT SLOs and write its sweep (and plot)
    anew: the SLO-scale curve extended without running the load again."""
    result = json.loads(path.read_text())
    stat = "p90" if result["slo"]["tpot_judged_as"] == "per-request p90 token gap" else "mean"
    raw = {name: [(row["rate"], [[StoredRequest(pair) for pair in repeat] for repeat in row["repeats"]])
                  for row in rows] for name, rows in result["requests"].items()}
    tpot_base = result["systems"]["colocated"]["unloaded"]["tpot_p90_ms" if stat == "p90" else "tpot_ms"]
    judge = argparse.Namespace(tpot_sweep=scales, tpot_stat=stat, target=result["target_attainment"])
    result["tpot_slo_sweep"] = slo_sweep(raw, judge, result["slo"]["ttft_ms"], tpot_base)
    result["tpot_slo_sweep_judged"] = "again from the stored requests (--resweep), same run"
    for row in result["tpot_slo_sweep"]:
        print(f"TPOT SLO {row['tpot_scale']:g}x ({row['tpot_ms']:.1f} ms): goodput {row['goodput_rps']}, "
              f"ratio over the best colocated {row['ratio']}", flush=True)
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))


def _attainment(results: list[Any], ttft_slo_s: float, tpot_slo_s: float, tpot_stat: str) -> float:
    """Share of requests meeting both SLOs (a failed one meets neither), as `summarize` counts it."""
    return sum(r.meets(ttft_slo_s, tpot_slo_s, tpot_stat) for r in results) / max(1, len(results))


def slo_sweep(raw: dict[str, list[tuple[float, list[list[Any]]]]], args: argparse.Namespace, ttft_slo: float,
              tpot_base: float) -> list[dict[str, Any]]:
    """Goodput of every system at other TPOT SLOs, from the same requests (DistServe's SLO-scale
    curves): where a chunked colocated iteration's stall fits under the TPOT SLO, colocated
    serves prompts on both cores and wins; below it, disaggregation's isolation decides. One
    run shows both regimes and where the crossover is, instead of a ratio that depends on
    which side of the stall an SLO measured from noisy unloaded latencies happened to land."""
    out = []
    for scale in args.tpot_sweep:
        tpot_ms = scale * tpot_base
        goodputs = {}
        for name, rows in raw.items():
            curve = [{"rate": rate, "attainment": statistics.median(
                _attainment(results, ttft_slo / 1000, tpot_ms / 1000, args.tpot_stat)
                for results in repeats)} for rate, repeats in rows]
            goodputs[name] = goodput_interpolated(curve, args.target)["rps"]
        best = max((n for n in goodputs if n != "disaggregated"), key=lambda n: goodputs[n])
        ratio = goodputs["disaggregated"] / goodputs[best] if goodputs[best] else None
        out.append({"tpot_scale": scale, "tpot_ms": round(tpot_ms, 2), "goodput_rps": goodputs,
                    "best_colocated": best, "ratio": None if ratio is None else round(ratio, 3)})
    return out


def rate_row(rate: float, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One tested rate of one system: medians over its repeats' `summarize` results."""
    return {"rate": rate, "attainment": statistics.median(s["attainment"] for s in summaries),
            "ttft_attainment": statistics.median(s["ttft_attainment"] for s in summaries),
            "tpot_attainment": statistics.median(s["tpot_attainment"] for s in summaries),
            "ttft_ms": _median_dicts([s["ttft_ms"] for s in summaries]),
            "tpot_ms": _median_dicts([s["tpot_ms"] for s in summaries]),
            "failed": sum(s["failed"] for s in summaries),
            "worker_busy": _median_dicts([s["cpu"]["worker_busy"] for s in summaries]) if "cpu" in summaries[0] else {},
            "harness_share": statistics.median(s["cpu"]["harness_share"] for s in summaries)
            if "cpu" in summaries[0] else None,
            "repeats": summaries}


def _median_dicts(dicts: list[dict[str, float | None]]) -> dict[str, float | None]:
    out = {}
    for key in dicts[0]:
        values = [d[key] for d in dicts if d[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rates, few requests, 1 repeat")
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="distserve")
    parser.add_argument("--input-tokens", type=int)
    parser.add_argument("--output-tokens", type=int)
    parser.add_argument("--colocated-budget", type=int, default=256,
                        help="token budget per iteration (chunked prefill) of the decode worker and of the "
                             "colocated system the SLOs are set from")
    parser.add_argument("--prefill-budget", type=int, default=1024,
                        help="token budget of a prefill worker's iteration: DistServe batches prompts only up to "
                             "L_m, the length where the device saturates, since a longer batch only delays the "
                             "first prompts. Measured on one core (small-llama, bfloat16): batching two 512-token "
                             "prompts saves 16 %% of the time, two 1024-token ones 0.3 %%; a prompt longer than "
                             "the budget still goes whole")
    parser.add_argument("--colocated-budgets", type=int, nargs="*", default=[128],
                        help="more colocated systems, one per budget; the baseline is the best of all")
    parser.add_argument("--point-seconds", type=float, default=12.0,
                        help="arrival window per rate and repeat; requests = rate x this, clamped")
    parser.add_argument("--min-requests", type=int, default=20)
    parser.add_argument("--max-requests", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rates", type=float, nargs="*", help="req/s; default: factors of 1/unloaded TTFT")
    parser.add_argument("--rate-factors", type=float, nargs="*",
                        help="rates as fractions of one core's prefill capacity (1 / unloaded TTFT)")
    parser.add_argument("--ttft-slo-ms", type=float)
    parser.add_argument("--tpot-slo-ms", type=float)
    parser.add_argument("--target", type=float, default=0.9, help="SLO attainment goodput is defined at")
    parser.add_argument("--tpot-sweep", type=float, nargs="*", default=[1.1, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0],
                        help="TPOT SLOs (multiples of the unloaded base) to also read goodput at, same requests")
    parser.add_argument("--calibration", type=int, default=7, help="unloaded requests for the SLO base")
    parser.add_argument("--overhead-repeats", type=int, default=30)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="every worker's --dtype (auto: float32 on a CPU); not auto: its own result file")
    parser.add_argument("--worker-cpu-share", type=float,
                        help="cap every worker at this share of its core (cgroup CPU bandwidth), leaving the rest "
                             "to the routers and load generator; default where they have no core of their own (two "
                             "cores): the regime's (distserve 0.9: the harness took <= 7 %% of both cores there; "
                             "decode-heavy 0.7: up to 26 %%, it streams 8x the tokens; legacy 0.8), else 1 (uncapped)")
    parser.add_argument("--pd-split", choices=("equal", "measured"), default="equal",
                        help="equal: the prefill and decode workers get the same share of their cores; measured: "
                             "the same total split as the per-phase cost measured unloaded asks (each worker at most "
                             "one core), as a planner splits GPUs between the phases (writes its own result file)")
    parser.add_argument("--resweep", type=Path, metavar="RESULT",
                        help="judge RESULT's stored requests at the --tpot-sweep SLOs, rewrite its sweep and "
                             "plot, and run nothing")
    args = parser.parse_args()
    if args.resweep:
        resweep(args.resweep, args.tpot_sweep)
        return
    regime = REGIMES[args.regime]
    args.input_tokens = args.input_tokens or regime["input_tokens"]
    args.output_tokens = args.output_tokens or regime["output_tokens"]
    args.rate_factors = args.rate_factors or regime["rate_factors"]
    args.ttft_scale, args.tpot_scale, args.tpot_stat = regime["ttft_scale"], regime["tpot_scale"], regime["tpot_stat"]
    args.rate_base = regime["rate_base"]
    if args.quick:
        args.point_seconds, args.min_requests, args.repeats, args.calibration = 3.0, 8, 1, 3
        args.overhead_repeats = 10
        args.rate_factors = args.rate_factors[::2]
    # SIGTERM (a timeout, a CI cancel) must still stop the workers: raise, so `finally` runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit(f"needs at least 2 CPU cores to pin workers to, this process may use {cores}")
    block = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}"
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"disagg-bench-{os.getpid()}"
    logdir.mkdir(parents=True, exist_ok=True)
    c0, c1 = cores[0], cores[1]
    # Where a third core exists, the routers and this load generator get the cores the workers do
    # not use, as a deployment's routers run off the GPU nodes; on two cores they must share.
    harness = cores[2:]
    if harness:
        os.sched_setaffinity(0, harness)
    args.host_cores = len(cores)
    share = args.worker_cpu_share if args.worker_cpu_share is not None else \
        (1.0 if harness else regime["worker_cpu_share"])
    if not 0 < share <= 1:
        raise SystemExit(f"--worker-cpu-share must be in (0, 1], got {share:g}")
    caps = CpuCaps(share) if share < 1 or args.pd_split == "measured" else None
    procs: list[Proc] = []
    started = time.monotonic()
    load_start = os.getloadavg()
    try:
        # The prefill worker needs no chunking (no decode to protect): whole prompts per iteration,
        # batched up to --prefill-budget (DistServe's L_m) and not beyond.
        spec = {"model": args.model, "logdir": logdir, "dtype": args.dtype}
        workers = [worker("prefill", "prefill", f"{block}.1", c0, budget=max(args.prefill_budget, args.input_tokens),
                          **spec),
                   worker("decode", "decode", f"{block}.2", c1, budget=args.colocated_budget, **spec),
                   worker("colocated-a", "colocated", f"{block}.3", c0, budget=args.colocated_budget, **spec),
                   worker("colocated-b", "colocated", f"{block}.4", c1, budget=args.colocated_budget, **spec)]
        extra = [b for b in dict.fromkeys(args.colocated_budgets) if b != args.colocated_budget]
        for i, budget in enumerate(extra):
            workers += [worker(f"colocated-b{budget}-a", "colocated", f"{block}.{20 + 2 * i}", c0, budget=budget,
                               **spec),
                        worker(f"colocated-b{budget}-b", "colocated", f"{block}.{21 + 2 * i}", c1, budget=budget,
                               **spec)]
        procs += workers
        for proc in workers if caps else ():
            caps.cap(proc)
        wait_ready(workers)
        routers = [router("router-disagg", f"{block}.10", args.model,
                          ["--prefill-endpoints", workers[0].url, "--decode-endpoints", workers[1].url],
                          logdir, harness),
                   router("router-coloc", f"{block}.11", args.model,
                          ["--colocated-endpoints", f"{workers[2].url},{workers[3].url}"], logdir, harness)]
        routers += [router(f"router-coloc-b{budget}", f"{block}.{12 + i}", args.model,
                           ["--colocated-endpoints", f"{workers[4 + 2 * i].url},{workers[5 + 2 * i].url}"], logdir,
                           harness)
                    for i, budget in enumerate(extra)]
        procs += routers
        wait_ready(routers)
        urls = {"disaggregated": routers[0].url, "colocated": routers[1].url}
        urls |= {f"colocated-b{budget}": routers[2 + i].url for i, budget in enumerate(extra)}
        system_procs = {name: SystemProcs({w.name: w.popen.pid for w in workers[2 * i:2 * i + 2]},
                                          routers[i].popen.pid) for i, name in enumerate(urls)}
        def resplit(prefill_share: float) -> str:
            assert caps is not None  # made whenever the split is measured
            prefill, decode = pd_shares(2 * share, prefill_share)
            caps.cap(workers[0], prefill)
            caps.cap(workers[1], decode)
            return (f"prefill {prefill:g} core : decode {decode:g} core (cgroup caps; {2 * share:g} cores of worker "
                    f"compute, as the colocated pair's)")

        result = asyncio.run(measure(args, urls, workers[2].url, system_procs,
                                     resplit if args.pd_split == "measured" else None))
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(15)
        if caps:
            caps.release()
    result.update({
        "benchmark": "disagg_vs_colocated", "quick": args.quick, "model": args.model,
        "regime": args.regime, "colocated_budget": args.colocated_budget,
        "colocated_budgets": {"colocated": args.colocated_budget,
                              **{f"colocated-b{b}": b for b in args.colocated_budgets if b != args.colocated_budget}},
        "workload": {"input_tokens": args.input_tokens, "output_tokens": args.output_tokens,
                     "requests_per_rate": f"rate x {args.point_seconds:g} s, in [{args.min_requests}, "
                                          f"{args.max_requests}]",
                     "repeats": args.repeats, "arrivals": "Poisson"},
        "setup": {"cores": [c0, c1], "pinning": "taskset, 1 torch thread per worker",
                  "prefill_budget": max(args.prefill_budget, args.input_tokens),
                  "disaggregated": "prefill on core A, decode on core B",
                  "colocated": "one colocated worker on each core (per budget)",
                  "routers_and_loadgen": f"pinned to cores {harness}" if harness else
                  "unpinned, on the workers' two cores (no third core): see each rate's worker_busy and "
                  "harness_share", "worker_dtype": args.dtype,
                  "worker_cpu_share": share if caps is None else
                  f"{share:g} of a core each (cgroup CPU bandwidth, {caps.period_us} us period)"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg(),
                    "note": load_note(load_start, os.getloadavg(), os.cpu_count() or 1)},
        "wall_s": time.monotonic() - started,
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "disagg_vs_colocated" + ("" if args.regime == "distserve" else f"-{args.regime}") + \
        ("" if args.dtype == "auto" else f"-{args.dtype}") + ("" if args.pd_split == "equal" else "-split") + \
        ("-quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{stem}.png")
    g = {n: (s["goodput_rps"], s["goodput_interpolated"]["rps"]) for n, s in result["systems"].items()}
    print(f"goodput at {args.target:.0%} (tested, interpolated): {g}; best colocated {result['best_colocated']}; "
          f"ratio {result['goodput_ratio_disagg_over_colocated']} (interpolated "
          f"{result['goodput_ratio_interpolated']}); "
          f"router adds {result['router_overhead']['added_p50_ms']:.2f} ms p50; "
          f"wrote {RESULTS / stem}.json/.png")


if __name__ == "__main__":
    main()
