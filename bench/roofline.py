"""Roofline profile vs the measured A100 profiles: how far the estimate is from a measurement.

Run: `.venv/bin/python bench/roofline.py` → bench/results/roofline.json.

For DistServe's measured A100 OPT-13B and OPT-66B tables (the built-in profiles), the roofline
estimate (`planner/roofline.py`) is evaluated at the same points the calibration uses: one-prompt
prefill batches of 128–2048 tokens and decode steps at batch 1–256 with 512 tokens of context
each, for every tensor size both have. Reported: median and max relative error of prefill and
decode step times, (a) with the factors fitted on both profiles (what the planner uses) and (b)
leave-one-model-out (fitted on the other model only), which says how well it carries to a model
it was not fitted on. Pure arithmetic: machine load does not matter.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from disaggserve.planner.gpus import GPU_PRODUCTS
from disaggserve.planner.profile import builtin_profiles
from disaggserve.planner.roofline import (
    CALIBRATION_PROFILES,
    Calibration,
    calibration,
    estimated_profile,
    fit_calibration,
    measured_samples,
)

RESULTS = Path(__file__).parent / "results" / "roofline.json"


def errors(stem: str, product: str, cal: Calibration) -> dict:
    measured = builtin_profiles()[stem]
    assert measured.model_facts is not None
    facts = measured.model_facts.to_facts()
    est = estimated_profile(
        measured.model, facts, product, GPU_PRODUCTS[product], tensor_sizes=(1, 2, 3, 4, 8), cal=cal
    )
    out: dict = {"prefill": [], "decode": [], "per_tensor": {}}
    for e in measured.entries:
        if est.entry(e.tensor) is None:
            continue
        mp, md = measured_samples(measured, e.tensor)
        ep, ed = measured_samples(est, e.tensor)
        pe = [abs(x - y) / y for x, y in zip(ep, mp, strict=True)]
        de = [abs(x[1] - y[1]) / y[1] for x, y in zip(ed, md, strict=True)]
        out["prefill"] += pe
        out["decode"] += de
        out["per_tensor"][e.tensor] = {
            "prefill_median_pct": round(100 * statistics.median(pe), 1),
            "decode_median_pct": round(100 * statistics.median(de), 1),
            "decode_max_pct": round(100 * max(de), 1),
        }
    return out


def summary(errs: list[float]) -> dict:
    return {"median_pct": round(100 * statistics.median(errs), 1), "max_pct": round(100 * max(errs), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"result JSON (default {RESULTS})")
    out = parser.parse_args().out
    result: dict = {"calibrated_on": [s for s, _ in CALIBRATION_PROFILES], "fitted_on_both": {}, "leave_one_out": {}}
    all_p, all_d = [], []
    for stem, product in CALIBRATION_PROFILES:
        e = errors(stem, product, calibration())
        all_p += e["prefill"]
        all_d += e["decode"]
        result["fitted_on_both"][stem] = {
            "prefill": summary(e["prefill"]),
            "decode": summary(e["decode"]),
            "per_tensor": e["per_tensor"],
        }
        others = tuple(x for x in CALIBRATION_PROFILES if x[0] != stem)
        loo = errors(stem, product, fit_calibration(others))
        result["leave_one_out"][stem] = {"prefill": summary(loo["prefill"]), "decode": summary(loo["decode"])}
    result["overall"] = {"prefill": summary(all_p), "decode": summary(all_d)}
    result["goal"] = "median error <= 15 % for prefill and decode step times"
    result["met"] = result["overall"]["prefill"]["median_pct"] <= 15 and result["overall"]["decode"]["median_pct"] <= 15
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["overall"]), json.dumps(result["leave_one_out"]))


if __name__ == "__main__":
    main()
