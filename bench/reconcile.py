"""Reconcile latency and operator memory: create N DisaggServes at once, time each one from
create to "all its children exist", for N = 1, 10, 100 (repeated; medians), and record the
operator's peak resident memory.

The operator runs as a real `disaggserve operator` subprocess against the local API server
(kmock-based, in this process), exactly as under `disaggserve up`.

    python bench/reconcile.py [--repeats 3] [--sizes 1,10,100] [--baseline-ref REF] [--out ...]

With --baseline-ref, the operator of that git ref (exported with `git archive`, run through
PYTHONPATH) is measured too, interleaved with the current one against the same API server code,
and the report gives both columns and their ratios. Run it under `flock /work/bench.lock`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from disaggserve.local.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
CHILDREN_PER_RESOURCE = 14  # incl. the worker token Secret and the NetworkPolicy
CR_PATH = "/apis/disaggserve.io/v1alpha1/namespaces/{ns}/disaggserves"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def example(name: str, ns: str) -> dict:
    body = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": ns}
    return body


async def one_round(api, url: str, n: int, ns: str) -> list[float]:
    """Create n resources concurrently; return each one's create->children latency (s)."""
    done: dict[str, float] = {}
    started: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def create(i: int) -> None:
            name = f"r{i}"
            started[name] = time.perf_counter()
            r = await client.post(CR_PATH.format(ns=ns), json=example(name, ns))
            r.raise_for_status()

        await asyncio.gather(*(create(i) for i in range(n)))
        deadline = time.perf_counter() + 300
        while len(done) < n and time.perf_counter() < deadline:
            owned: dict[str, int] = {}
            for (_, _, nsp, _), obj in api.store.items():  # one pass; this loop shares the API's event loop
                if nsp == ns:
                    inst = obj["metadata"].get("labels", {}).get("app.kubernetes.io/instance")
                    owned[inst] = owned.get(inst, 0) + 1
            now = time.perf_counter()
            for name, count in owned.items():
                if name in started and name not in done and count >= CHILDREN_PER_RESOURCE:
                    done[name] = now - started[name]
            await asyncio.sleep(0.05)
    if len(done) < n:
        raise RuntimeError(f"only {len(done)}/{n} resources reconciled within 300 s")
    return list(done.values())


def baseline_tree(ref: str) -> Path:
    """The operator's sources at `ref`, exported once (git archive: no worktree to clean up)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    target = Path(tempfile.gettempdir()) / f"disaggserve-baseline-{commit}"
    if not (target / "operator" / "disaggserve").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "operator", "worker_image"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


async def warm_up(api, url: str) -> None:
    """One resource reconciled end to end before the measured round: the operator has started,
    listed what it watches (and filled its indexes) and imported its reconcile path, so the round
    measures reconciles, not start-up."""
    await one_round(api, url, 1, ns="warm-up")


async def measure(n: int, ns: str, env: dict[str, str]) -> dict:
    # A fresh API server and operator per round: each round measures n resources created at
    # once, not n more on top of everything the earlier rounds left behind.
    with tempfile.TemporaryDirectory() as tmp:
        async with LocalCluster(Path(tmp), run_pods=False, operator_env=env) as cluster:
            assert cluster.api is not None and cluster.operator_pid is not None
            await warm_up(cluster.api, cluster.url)
            before = len(cluster.api.audit)
            latencies = await one_round(cluster.api, cluster.url, n, ns=ns)
            calls = collections.Counter(a.verb for a in cluster.api.audit[before:])
            rss = peak_rss_mib(cluster.operator_pid)
    return {
        "p50_s": statistics.median(latencies),
        "max_s": max(latencies),
        "rss_mib": rss,
        "lists": calls["list"],
        "calls": sum(calls.values()),
    }


def summary(rounds: list[dict]) -> dict:
    return {
        "p50_create_to_children_ms": round(statistics.median(x["p50_s"] for x in rounds) * 1000, 1),
        "max_create_to_children_ms": round(statistics.median(x["max_s"] for x in rounds) * 1000, 1),
        "operator_peak_rss_mib": round(statistics.median(x["rss_mib"] for x in rounds), 1),
        "list_calls_during_round": round(statistics.median(x["lists"] for x in rounds)),
        "api_calls_during_round": round(statistics.median(x["calls"] for x in rounds)),
        "rounds_p50_ms": [round(x["p50_s"] * 1000, 1) for x in rounds],
    }


async def main_async(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    variants: dict[str, dict[str, str]] = {f"current ({head})": {}}
    if args.baseline_ref:
        tree = baseline_tree(args.baseline_ref)
        name = f"baseline ({tree.name.rsplit('-', 1)[-1]})"
        variants[name] = {"PYTHONPATH": f"{tree / 'operator'}{os.pathsep}{tree / 'worker_image'}"}
    results = []
    loads: list[float] = []
    for n in sizes:
        rounds: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeats):
            # Interleaved, alternating which goes first: drift in the machine's load hits both alike.
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for v in order:
                loads.append(os.getloadavg()[0])
                rounds[v].append(await measure(n, f"b{n}-{r}", variants[v]))
                x = rounds[v][-1]
                print(
                    f"N={n:4d} round {r} {v:24s}: p50 {x['p50_s'] * 1000:7.1f} ms, max {x['max_s'] * 1000:7.1f} ms, "
                    f"rss {x['rss_mib']:.0f} MiB, {x['lists']} LISTs, load {loads[-1]:.1f}",
                    flush=True,
                )
        row: dict = {"resources": n, "repeats": args.repeats, **{v: summary(rounds[v]) for v in variants}}
        if len(variants) == 2:
            cur, base = (row[v] for v in variants)
            row["current_over_baseline"] = {
                k: round(cur[k] / base[k], 3) if base[k] else None
                for k in ("p50_create_to_children_ms", "max_create_to_children_ms", "operator_peak_rss_mib")
            }
        results.append(row)
    return {
        "benchmark": "reconcile",
        "what": f"time from creating N DisaggServes at once to all {CHILDREN_PER_RESOURCE} children of each "
        "existing; operator peak RSS and API calls during the round; medians over interleaved repeats",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_1m": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "api_server": "disaggserve.local.apiserver (in-process, loopback); operator: `disaggserve operator` subprocess",
        "variants": list(variants),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-ref", help="also run the operator of this git ref, interleaved, for comparison")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reconcile.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
