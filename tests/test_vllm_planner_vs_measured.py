"""bench/vllm_planner_vs_measured.py's own logic, without vLLM: what it starts (the operator's
colocated rendering), which profile sweeps the server can run, how gaps are summarised, and that a
stored run is predicted again from what it stored."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from disaggserve_worker.profile.run import FULL, QUICK  # noqa: E402
from vllm_planner_vs_measured import (  # noqa: E402
    gap_summary,
    render_colocated,
    rescore,
    server_limits,
    sweep_fits,
)


def test_the_server_runs_the_operators_colocated_command_bound_to_one_core():
    argv, env = render_colocated(Path("/models/tiny"), core=1)
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == "/models/tiny"
    assert "--kv-transfer-config" not in argv  # a colocated instance keeps its KV cache
    # off through engine.extraArgs: the unloaded requests repeat prompts, the measured windows do not
    assert argv[-1] == "--no-enable-prefix-caching"
    assert server_limits(argv) == (32, 2048)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the uni executor, no spinning worker process
    assert "VLLM_API_KEY" not in env  # a secret reference in the pod; the local router sends no token


def test_server_limits_reads_the_flags_wherever_they_are():
    assert server_limits(["--max-num-batched-tokens", "512", "--x", "--max-num-seqs", "8"]) == (8, 512)
    with pytest.raises(ValueError):
        server_limits(["--max-num-seqs", "8"])


def test_the_quick_sweep_fits_the_rendered_server_and_the_full_one_does_not():
    seqs, _ = server_limits(render_colocated(Path("/m"), 0)[0])
    assert sweep_fits(QUICK, seqs) == []
    assert sweep_fits(FULL, seqs) == [48, 64, 96, 128, 192, 256]


def _row(gap: float, live: float, uncorrected: float) -> dict[str, float]:
    return {"gap_pp": gap, "gap_live_corrected_pp": live, "gap_uncorrected_pp": uncorrected,
            "gap_without_overheads_pp": uncorrected * 2}


def test_gap_summary_takes_absolute_gaps_per_variant_and_judges_the_goal():
    rows = [_row(-1.0, 2.0, -20.0), _row(2.0, -9.0, 10.0), _row(-4.0, 1.0, 30.0)]
    s = gap_summary(rows)
    assert (s["median_abs_gap_pp"], s["max_abs_gap_pp"]) == (2.0, 4.0)
    assert (s["median_abs_gap_live_corrected_pp"], s["max_abs_gap_live_corrected_pp"]) == (2.0, 9.0)
    assert (s["median_abs_gap_uncorrected_pp"], s["max_abs_gap_uncorrected_pp"]) == (20.0, 30.0)
    assert s["max_abs_gap_without_overheads_pp"] == 60.0
    assert s["goal_met"] is True and s["goal_met_live_corrected"] is False  # max 9 > 8


def test_gap_summary_of_a_run_without_a_knee_meets_nothing():
    s = gap_summary([])
    assert s["median_abs_gap_pp"] is None and s["goal_met"] is False and s["goal_met_live_corrected"] is False


def test_rescore_predicts_the_stored_grid_again(tmp_path: Path):
    """A stored run at a rate far below capacity: the simulator predicts full attainment whatever
    the corrections, so a measured 1.0 scores a 0 pp gap and a measured 0.5 a 50 pp one."""
    doc = json.loads((ROOT / "operator" / "disaggserve" / "data" / "profiles" / "small-llama-cpu.json").read_text())
    rows = [{"fraction_of_knee": f, "rate": 0.05, "measured_median": m} for f, m in ((0.2, 1.0), (1.0, 0.5))]
    rows[0]["per_request"] = [[[20.0 * i, 400.0, 60.0] for i in range(8)]] * 3  # spread out: all meet
    knee = {"rate": 0.05, "requests": 8, "ttft_p50_ms": 400.0, "ttft_p90_ms": 500.0, "tpot_p50_ms": 60.0,
            "tpot_p90_ms": 70.0}
    run = {"profile": doc, "deployment": {
        "slo": {"ttft_ms": 60_000, "tpot_ms": 5_000}, "knee_rps": 0.05, "ramp": [knee], "rows": rows,
        "unloaded": {"ttft_ms": 400.0, "tpot_ms": 60.0, "prefill_stall_ms": 5.0},
        "costs": {"router": {"per_request_ms": 1.0, "per_token_ms": 0.1}}}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    s = rescore(path)
    for infix in ("", "_speed_calibrated", "_live_corrected", "_uncorrected", "_without_overheads"):
        assert (s[f"median_abs_gap{infix}_pp"], s[f"max_abs_gap{infix}_pp"]) == (25.0, 50.0), (infix, s)
    # trace-driven only where windows were stored: the first row, predicted 1.0 as measured
    assert (s["trace_median_abs_gap_pp"], s["trace_max_abs_gap_live_corrected_pp"]) == (0.0, 0.0), s
