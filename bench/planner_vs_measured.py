"""How well the planner predicts this machine: profile the model with the worker's own
`profile` command, predict the attainment-vs-rate curve of 1 prefill + 1 decode worker with the
planner's simulator, measure the real curve on real workers with the same Poisson load
generator as the data-plane benchmark, and report the gap per rate (percentage points).

Workers are pinned one per core (as in bench/disagg_vs_colocated.py). SLOs are set from the
profile itself (TTFT = 4x a prompt's prefill time, TPOT = 3x an unloaded decode step), so the
curve crosses the attainment target inside the tested rates.

    python bench/planner_vs_measured.py [--quick] [--out bench/results/planner_vs_measured.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from disagg_vs_colocated import router, wait_ready, worker
from disaggserve.api import parse_spec
from disaggserve.planner.deployment import Deployment
from disaggserve.planner.inputs import build_search
from disaggserve.planner.search import Shape
from loadgen import run_poisson, summarize

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:small-llama"
INPUT, OUTPUT = 256, 32


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
    subprocess.run(
        cmd, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_py_env()}, stdout=subprocess.DEVNULL
    )
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _py_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "VIRTUAL_ENV", "HOME"))}


def spec_for(rate: float, ttft_ms: float, tpot_ms: float) -> Any:
    return parse_spec(
        {
            "model": {"name": "small-llama", "source": {"builtin": "small-llama"}},
            "slo": {"ttftMs": ttft_ms, "tpotMs": tpot_ms, "attainment": 0.9},
            "workload": {"requestRate": rate, "inputTokens": INPUT, "outputTokens": OUTPUT},
            "hardware": {"device": "cpu", "gpusPerNode": 2},
        }
    )


def predict(doc: dict[str, Any], rate: float, ttft_ms: float, tpot_ms: float) -> dict[str, float]:
    setup = build_search(spec_for(rate, ttft_ms, tpot_ms), profile=doc)
    dep = Deployment(Shape(1, 1), 1, Shape(1, 1), 1, 1, setup.topology.intra_gbps)
    result = dep.simulate(setup.searcher, rate)
    return {
        "attainment": result.attainment(ttft_ms, tpot_ms),
        "ttft_p90_ms": result.ttft_p(),
        "tpot_p90_ms": result.tpot_p(),
    }


async def measure(url: str, rate: float, n: int, ttft_ms: float, tpot_ms: float) -> dict[str, Any]:
    results = await run_poisson(url, "bench", rate=rate, num_requests=n, input_tokens=INPUT, output_tokens=OUTPUT)
    s = summarize(results, ttft_ms / 1000, tpot_ms / 1000)
    return {
        "attainment": s["attainment"],
        "ttft_p90_ms": s["ttft_ms"]["p90"],
        "tpot_p90_ms": s["tpot_ms"]["p90"],
        "failed": s["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_vs_measured.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        doc = profile(logdir / "profile.json", args.quick)
        entry = doc["entries"][0]
        prefill_ms = entry["prefill"]["a"] + entry["prefill"]["b"] * INPUT + entry["prefill"]["c"] * INPUT**2
        step_ms = entry["decode_small"]["a"] + entry["decode_small"]["b"] * INPUT + entry["decode_small"]["c"]
        ttft_ms, tpot_ms = 4 * prefill_ms, 3 * step_ms
        procs = [
            worker("prefill", "prefill", "127.61.0.1", 0, MODEL, logdir),
            worker("decode", "decode", "127.61.0.2", 1, MODEL, logdir),
        ]
        procs.append(
            router(
                "router",
                "127.61.0.3",
                MODEL,
                ["--prefill-endpoints", "http://127.61.0.1:8100", "--decode-endpoints", "http://127.61.0.2:8100"],
                logdir,
            )
        )
        try:
            wait_ready(procs)
            capacity = 1000 / prefill_ms  # the prefill worker alone, requests/s
            fractions = [0.2, 0.5, 0.8] if args.quick else [0.2, 0.4, 0.6, 0.8, 0.9, 1.0]
            rows = []
            for f in fractions:
                rate = round(capacity * f, 3)
                n = max(30, int(rate * (10 if args.quick else 25)))
                measured = asyncio.run(measure(procs[2].url, rate, n, ttft_ms, tpot_ms))
                predicted = predict(doc, rate, ttft_ms, tpot_ms)
                gap = 100 * (predicted["attainment"] - measured["attainment"])
                rows.append(
                    {
                        "rate": rate,
                        "load": f,
                        "requests": n,
                        "predicted": predicted,
                        "measured": measured,
                        "gap_pp": round(gap, 1),
                    }
                )
                print(
                    f"rate {rate:6.2f} rps ({f:.0%}): predicted {predicted['attainment']:.3f}, "
                    f"measured {measured['attainment']:.3f}, gap {gap:+.1f} pp",
                    flush=True,
                )
        finally:
            for p in procs:
                p.popen.terminate()
            for p in procs:
                p.popen.wait(30)
    report = {
        "benchmark": "planner_vs_measured",
        "model": MODEL,
        "input_tokens": INPUT,
        "output_tokens": OUTPUT,
        "slo": {"ttft_ms": round(ttft_ms, 2), "tpot_ms": round(tpot_ms, 2)},
        "profile_fit": {k: doc["entries"][0][k] for k in ("prefill", "decode_small")},
        "rows": rows,
        "max_abs_gap_pp": max(abs(r["gap_pp"]) for r in rows),
        "median_abs_gap_pp": sorted(abs(r["gap_pp"]) for r in rows)[len(rows) // 2],
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("slo", "max_abs_gap_pp", "median_abs_gap_pp", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
