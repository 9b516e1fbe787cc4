"""Reconcile latency and operator memory: create N DisaggServes at once, time each one from
create to "all its children exist", for N = 1, 10, 100 (repeated; medians), and record the
operator's peak resident memory.

The operator runs as a real `disaggserve operator` subprocess against the local API server
(kmock-based, in this process), exactly as under `disaggserve up`.

    python bench/reconcile.py [--repeats 3] [--sizes 1,10,100] [--out bench/results/reconcile.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
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


async def main_async(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    peak_rss = 0.0
    for n in sizes:
        rounds = []
        for r in range(args.repeats):
            # A fresh API server and operator per round: each round measures n resources created at
            # once, not n more on top of everything the earlier rounds left behind.
            with tempfile.TemporaryDirectory() as tmp:
                async with LocalCluster(Path(tmp), run_pods=False) as cluster:
                    assert cluster.api is not None and cluster.operator_pid is not None
                    await asyncio.sleep(3)  # operator start-up (imports, login, first list/watch)
                    latencies = await one_round(cluster.api, cluster.url, n, ns=f"b{n}-{r}")
                    peak_rss = max(peak_rss, peak_rss_mib(cluster.operator_pid))
            rounds.append({"p50_s": statistics.median(latencies), "max_s": max(latencies)})
            print(
                f"N={n:4d} round {r}: p50 {rounds[-1]['p50_s'] * 1000:7.1f} ms, "
                f"max {rounds[-1]['max_s'] * 1000:7.1f} ms",
                flush=True,
            )
        results.append(
            {
                "resources": n,
                "p50_create_to_children_ms": round(statistics.median(x["p50_s"] for x in rounds) * 1000, 1),
                "max_create_to_children_ms": round(statistics.median(x["max_s"] for x in rounds) * 1000, 1),
                "repeats": args.repeats,
            }
        )
    return {
        "benchmark": "reconcile",
        "what": "time from creating N DisaggServes at once to all 14 children of each existing; medians over repeats",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "api_server": "disaggserve.local.apiserver (in-process, loopback); operator: `disaggserve operator` subprocess",
        "results": results,
        "operator_peak_rss_mib": round(peak_rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reconcile.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
