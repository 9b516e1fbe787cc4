"""Where batching prefill stops paying: measured savings against the planner's L_m, in one run.

The planner batches a disaggregated prefill worker only up to L_m, derived from the latency
profile's fit (`operator/disaggserve/planner/batching.py`: the batch size where the fixed cost,
what batching saves, is 5 % of a batch). This bench holds that derivation against the device: it
times prefill batches of one and of two prompts of each length with the worker's own profiler
(layout build + forward + sampling, thread CPU time on one thread), reports what batching two
prompts saves at each length, fits the profile's prefill coefficients on the same samples, and
writes the L_m and budget the planner derives from them beside the measured knee (the smallest
two-prompt batch from which on batching saves at most the planner's fixed-cost share). One sweep
is noisy on a shared host (two 1024-token prompts saved 0.2 % in one sweep and 6.6 % in the next,
minutes apart), so the sweep runs `--rounds` times: times are medians over rounds, and the L_m of
each round's fit is reported beside the median fit's.

Writes bench/results/prefill_knee-<model>-<dtype>.json. About 7 s a round on one core for
small-llama; run it under the host's bench lock and pinned (`taskset -c 1`) so neighbours do not
time-share the core.

    .venv/bin/python bench/prefill_knee.py [--model builtin:small-llama] [--dtype bfloat16] [--repeats 5] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from disaggserve.planner.batching import FIXED_COST_SHARE, prefill_token_budget, saturation_tokens
from disaggserve.planner.profile import Coefficients, PhaseLatency, parse_profile, phase_latency
from disaggserve_worker.model.loader import load_model
from disaggserve_worker.profile.run import FULL, Sweep, profile_model

ROOT = Path(__file__).resolve().parent.parent
# Decode shapes the profiler needs to fit its decode entry; this bench reads only prefill.
DECODE = [(b, c) for b in (1, 2, 4, 8) for c in (64, 256)]


def savings(measured: dict[tuple[int, int], float]) -> list[dict[str, Any]]:
    """What batching two prompts of each length saves against running them one by one."""
    rows = []
    for length in sorted({n for _, n in measured}):
        if (1, length) in measured and (2, length) in measured:
            one, two = measured[(1, length)], measured[(2, length)]
            rows.append({"length": length, "batch_tokens": 2 * length, "one_ms": round(one, 3),
                         "two_ms": round(two, 3), "saving": round(1 - two / (2 * one), 4)})
    return rows


def measured_knee(rows: list[dict[str, Any]], share: float = FIXED_COST_SHARE) -> int | None:
    """Tokens of the smallest two-prompt batch from which on batching saves at most `share`."""
    knee = None
    for row in reversed(rows):
        if row["saving"] > share:
            break
        knee = row["batch_tokens"]
    return knee


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per shape in one round (median)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="whole sweeps; times are the median over rounds, L_m is reported per round too")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_before = list(os.getloadavg())
    loaded = load_model(args.model, "cpu", args.dtype, tensor=1)
    sweep = Sweep(prefill=FULL.prefill, decode=DECODE, repeats=args.repeats)
    per_round: list[dict[tuple[int, int], float]] = []
    fits: list[dict[str, float]] = []
    l_ms: list[float] = []
    budgets: list[int] = []
    for _ in range(args.rounds):
        doc = profile_model(loaded, sweep, Console(stderr=True)).profile
        per_round.append({(m["batch"], m["length"]): m["ms"] for m in doc["measurements"] if m["phase"] == "prefill"})
        lat = phase_latency(parse_profile(doc), 1, 1)
        assert lat is not None
        fits.append(doc["entries"][0]["prefill"])
        l_ms.append(round(saturation_tokens(lat)))
        budgets.append(prefill_token_budget(lat))
    measured = {shape: statistics.median(r[shape] for r in per_round) for shape in per_round[0]}
    rows = savings(measured)
    median_fit = {k: statistics.median(f[k] for f in fits) for k in ("a", "b", "c")}
    name = args.model.removeprefix("builtin:")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    out = {
        "benchmark": "prefill_knee",
        "model": args.model,
        "dtype": args.dtype,
        "threads": 1,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "two_prompt_savings": rows,
        "two_prompt_savings_note": "from the median over rounds of each shape's time",
        "fixed_cost_share": FIXED_COST_SHARE,
        "measured_knee_tokens": measured_knee(rows),
        "prefill_fit": median_fit,
        "prefill_fit_note": "median of each coefficient over the rounds' fits",
        "planner_l_m_tokens": round(saturation_tokens(lat_from(median_fit))),
        "planner_budget_tokens": prefill_token_budget(lat_from(median_fit)),
        "planner_l_m_tokens_per_round": l_ms,
        "planner_budget_tokens_per_round": budgets,
        "prefill_fit_per_round": fits,
        "prefill_ms_median": [{"batch": b, "length": n, "ms": round(ms, 3)} for (b, n), ms in sorted(measured.items())],
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "git": commit.stdout.strip(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"prefill_knee-{name}-{args.dtype}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(f"two {row['length']}-token prompts batched save {row['saving']:.1%}")
    print(f"measured knee {out['measured_knee_tokens']} tokens; planner L_m {out['planner_l_m_tokens']} "
          f"(rounds {min(l_ms)}-{max(l_ms)}), budget {out['planner_budget_tokens']}; wrote {path}")


def lat_from(fit: dict[str, float]) -> PhaseLatency:
    """A one-device latency with these prefill coefficients (what L_m reads)."""
    zero = Coefficients(a=0, b=0, c=0)
    return PhaseLatency(tensor=1, pipeline=1, prefill=Coefficients(**fit), decode_small=zero, decode_large=zero,
                        decode_batch_threshold=1, stage_overhead_ms=0.0)


if __name__ == "__main__":
    main()
