"""Every benchmark script imports and parses its own --help: a bench that no test runs still must
not rot (bench/vllm_disagg_vs_colocated.py imported names bench/disagg_vs_colocated.py had dropped,
and nothing noticed until someone ran it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Scripts, not the libraries beside them (loadgen.py, resident_worker.py): what runs as __main__.
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_imports_and_prints_help(script: Path):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_a_window_is_predicted_on_its_own_arrivals():
    """`planner_vs_measured.predict_window` replays a measured window's arrivals: spread-out
    requests all meet the SLOs, the same requests arriving at once do not."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from planner_vs_measured import predict_window

    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "operator" / "disaggserve" / "data" / "profiles" / "small-llama-cpu.json").read_text())
    spread = predict_window(doc, "colocated", 1.0, [float(i) for i in range(40)], 300.0, 50.0)
    burst = predict_window(doc, "colocated", 1.0, [0.0] * 40, 300.0, 50.0)
    assert spread == 1.0 and burst < 0.5, (spread, burst)


def test_a_window_is_predicted_at_the_speed_its_probes_measured():
    """`planner_vs_measured.speed` is the probes' mean over the start's unloaded medians, and
    `predict_row` predicts each window on the profile scaled by it: at the start's speed as
    calibrated, on a machine running half as fast a rate near capacity loses attainment."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from planner_vs_measured import predict, predict_row, speed

    unloaded = {"ttft_ms": 40.0, "tpot_ms": 5.0}
    assert speed({"ttft_ms": 40.0, "tpot_ms": 5.0}, {"ttft_ms": 60.0, "tpot_ms": 6.0}, unloaded) == [1.25, 1.1]
    root = Path(__file__).resolve().parents[1]
    doc = json.loads((root / "operator" / "disaggserve" / "data" / "profiles" / "small-llama-cpu.json").read_text())
    row = {"rate": 2.0, "speed": [[1.0, 1.0]] * 3}
    base = predict(doc, "colocated", 2.0, 400.0, 60.0)
    assert predict_row(doc, "colocated", row, 400.0, 60.0) == base
    assert predict_row(doc, "colocated", {"rate": 2.0}, 400.0, 60.0) == base  # a run without probes
    slow = predict_row(doc, "colocated", {**row, "speed": [[2.0, 2.0]] * 3}, 400.0, 60.0)
    assert base == 1.0 and slow < 0.9, (slow, base)


def test_a_stored_run_judged_again_reproduces_its_sweep(tmp_path: Path):
    """`disagg_vs_colocated.py --resweep` judges a result file's stored requests at other TPOT SLOs:
    at the SLOs the run itself swept it must give back exactly what the run wrote, and a looser
    SLO never lowers a system's goodput."""
    import json
    import shutil

    result = BENCH / "results" / "disagg_vs_colocated-bfloat16.json"
    copy = tmp_path / result.name
    shutil.copy(result, copy)
    stored = {row["tpot_scale"]: row for row in json.loads(result.read_text())["tpot_slo_sweep"]}
    done = subprocess.run([sys.executable, str(BENCH / "disagg_vs_colocated.py"), "--resweep", str(copy),
                           "--tpot-sweep", "2.0", "3.0", "9.0"], capture_output=True, text=True, timeout=120,
                          cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["tpot_scale"]: row for row in json.loads(copy.read_text())["tpot_slo_sweep"]}
    assert rows[2.0] == stored[2.0] and rows[3.0] == stored[3.0]
    assert all(rows[9.0]["goodput_rps"][name] >= rows[3.0]["goodput_rps"][name] for name in rows[9.0]["goodput_rps"])
    assert copy.with_suffix(".png").stat().st_size > 0


def test_a_run_accounts_where_the_cpu_went():
    """Each tested rate records how busy each worker was and how much CPU the harness (router and
    load generator) took: on a two-core host the harness runs on the workers' cores, and a system
    that leaves a core idle absorbs it for free. The accounting reads real processes' CPU time."""
    import os
    import time

    sys.path.insert(0, str(BENCH))
    import disagg_vs_colocated as bench

    spin = "import time\nend = time.time() + 0.6\nwhile time.time() < end: pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        procs = bench.SystemProcs({"busy": spinner.pid, "idle": os.getpid()}, router=os.getpid())
        before = bench.cpu_snapshot(procs)
        time.sleep(0.5)
        after = bench.cpu_snapshot(procs)
    finally:
        spinner.wait(10)
    use = bench.cpu_use(before, after, cores=2)
    # A spinning process ran most of the window (less where a shared host's other work preempts it);
    # this process slept. Ticks are 10 ms.
    assert use["worker_busy"]["busy"] > max(0.3, use["worker_busy"]["idle"] + 0.2)
    assert use["worker_busy"]["idle"] < 0.2
    assert 0 <= use["harness_share"] < 0.2
    assert set(use["cpu_s"]) == {"busy", "idle", "router", "loadgen"}


def test_a_measured_split_gives_each_phase_its_share_of_the_same_compute():
    """`--pd-split measured`: the disaggregated pair gets the colocated pair's total worker compute,
    split as the per-phase cost asks, but one worker can use one core at most and no phase gets nothing."""
    sys.path.insert(0, str(BENCH))
    import disagg_vs_colocated as bench

    assert bench.pd_shares(1.8, 0.5) == (0.9, 0.9)
    assert bench.pd_shares(1.4, 0.02) == (0.4, 1.0)  # decode-heavy: decode at a whole core, prefill the rest
    assert bench.pd_shares(1.8, 0.9) == (1.0, 0.8)
    assert bench.pd_shares(2.0, 0.3) == (1.0, 1.0)  # uncapped: whole cores, 1:1
    assert bench.pd_shares(0.5, 0.0) == (0.1, 0.4)


def test_engine_step_puts_every_column_in_every_place():
    """`engine_step.order`: over 2 x columns repeats each column takes each place exactly twice and
    follows more than one other, so no column is always the one after vLLM's prefill (the bias
    that made two processes of the same code read 0.91x)."""
    from collections import Counter

    sys.path.insert(0, str(BENCH))
    from engine_step import order

    cols = ["a", "b", "c", "d"]
    places = Counter((col, i) for r in range(2 * len(cols)) for i, col in enumerate(order(cols, r)))  # type: ignore[arg-type]
    assert set(places.values()) == {2} and len(places) == len(cols) ** 2
    before = {col: {order(cols, r)[i - 1] for r in range(2 * len(cols))  # type: ignore[arg-type]
                    for i, c in enumerate(order(cols, r)) if c == col and i > 0} for col in cols}  # type: ignore[arg-type]
    assert all(len(prev) >= 2 for prev in before.values()), before


def test_a_resident_engine_answers_each_metric_it_is_asked_for():
    """`resident_worker.serve`: ready first, then one reply per command line, whatever else the
    process prints to stdout; end of input ends it."""
    code = (
        "import sys; sys.path.insert(0, 'bench'); from resident_worker import serve\n"
        "print('a library talking on stdout')\n"
        "serve({'engine': 'fake'}, lambda kind, batch: (1.0, 100.0 * batch if kind == 'decode' else 7.0),\n"
        "      lambda: {'note': 'x'})\n")
    done = subprocess.run([sys.executable, "-c", code], input="prefill\ndecode 8\n\n", capture_output=True, text=True,
                          timeout=60, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(BENCH))
    import json

    from resident_worker import PREFIX

    replies = [json.loads(line[len(PREFIX):]) for line in done.stdout.splitlines() if line.startswith(PREFIX)]
    assert replies == [{"ready": {"engine": "fake"}}, {"wall": 1.0, "cpu": 7.0, "note": "x"},
                       {"wall": 1.0, "cpu": 800.0, "note": "x"}]
