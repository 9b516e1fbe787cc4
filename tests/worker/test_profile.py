"""Profiling: the quick sweep writes a planner-readable JSON whose fit predicts what it measured."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from disaggserve_worker.cli import main
from disaggserve_worker.profile.fit import fit_relative_nonnegative


def test_fit_recovers_known_coefficients_and_stays_non_negative() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 2048, size=40).astype(float)
    features = np.stack([np.ones_like(lengths), lengths, lengths**2], axis=1)
    truth = np.array([18.1, 0.1019, 7.1e-6])  # DistServe's OPT-13B prefill coefficients
    times = features @ truth * rng.normal(1.0, 0.002, size=40)
    coef = fit_relative_nonnegative(features, times)
    assert np.allclose(coef, truth, rtol=0.1)
    # A pure line measured with noise must not get a negative quadratic term.
    line = features[:, :2] @ np.array([5.0, 0.01])
    bent = line * (1 - 1e-7 * lengths**2)  # slightly concave: unconstrained LSQ wants c < 0
    assert np.all(fit_relative_nonnegative(features, bent) >= 0)
    with pytest.raises(ValueError, match="positive"):
        fit_relative_nonnegative(features, np.zeros(40))


def test_quick_profile_writes_a_valid_profile(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", "builtin:tiny-llama", "--device", "cpu", "--quick",
                 "--out", str(out), "--threads", "1"]) == 0
    profile = json.loads(out.read_text())
    assert profile["model"] == "tiny-llama" and profile["gpu"] == "cpu" and profile["dtype"] == "float32"
    assert profile["source"].startswith("disaggserve-worker profile, ")
    assert profile["model_facts"] == {"layers": 4, "attention_heads": 4, "kv_heads": 2, "hidden_size": 128,
                                      "parameters": profile["model_facts"]["parameters"], "dtype_bytes": 4}
    (entry,) = profile["entries"]
    assert entry["tensor"] == 1 and entry["pipeline"] == 1 and entry["decode_batch_threshold"] >= 1
    for key in ("prefill", "decode_small", "decode_large"):
        assert set(entry[key]) == {"a", "b", "c"} and all(v >= 0 for v in entry[key].values())
    assert entry["prefill"]["b"] > 0, "prefill time grows with prompt tokens"
    points = profile["measurements"]
    errors = [abs(p["predicted_ms"] - p["ms"]) / p["ms"] for p in points]
    # A shared CPU is noisy; the fit must still describe the bulk of what it measured.
    assert float(np.median(errors)) < 0.35
    longest = max((p for p in points if p["phase"] == "prefill"), key=lambda p: p["batch"] * p["length"])
    shortest = min((p for p in points if p["phase"] == "prefill"), key=lambda p: p["batch"] * p["length"])
    assert longest["predicted_ms"] > shortest["predicted_ms"]


def test_profile_has_an_entry_per_tensor_size_for_the_planner(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from disaggserve_worker.model.loader import load_model
    from disaggserve_worker.profile.run import Sweep, merge, profile_model

    sweep = Sweep(prefill=[(1, 8), (1, 16), (2, 16)], decode=[(1, 8), (2, 8), (4, 16)], repeats=1)
    results = []
    for size in (1, 2):
        loaded = load_model("builtin:tiny-llama", device="cpu")
        loaded.model.place([[torch.device("cpu")] * size])  # the sharded math, on one CPU
        results.append(profile_model(loaded, sweep))
    profile = merge(results)
    assert [(e["tensor"], e["pipeline"]) for e in profile["entries"]] == [(1, 1), (2, 1)]
    assert {m["tensor"] for m in profile["measurements"]} == {1, 2}
    assert len(profile["measurements"]) == 2 * (len(sweep.prefill) + len(sweep.decode))

    # On a CPU there are no devices to shard over: refused before anything is measured.
    out = tmp_path / "p.json"
    assert main(["profile", "--model", "builtin:tiny-llama", "--device", "cpu", "--tensor-sizes", "1,2",
                 "--out", str(out)]) == 2
    assert "with --device cpu use --tensor-sizes 1" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["profile", "--model", "builtin:tiny-llama", "--tensor-sizes", "3", "--out", str(out)])
    assert "tensor sizes must be among 1, 2, 4, 8" in capsys.readouterr().err


def test_profile_sizes_default_to_what_the_machine_runs() -> None:
    from disaggserve_worker.profile.run import auto_tensor_sizes

    assert auto_tensor_sizes("cpu") == [1]


def test_decode_fit_splits_at_the_knee_and_reports_misses() -> None:
    from disaggserve_worker.profile.fit import Sample, coefficients, fit_entry, fit_problems

    samples = [Sample("prefill", 1, n, 2.0 + 0.01 * n) for n in (16, 64, 256)]
    for batch in (1, 2, 4, 8, 12, 16, 24, 32):
        for ctx in (64, 256):
            samples.append(Sample("decode", batch, ctx, 2.0 if batch < 8 else 2.0 + 0.3 * (batch - 6)))
    entry = fit_entry(samples)
    assert entry["decode_batch_threshold"] == 8
    assert fit_problems(samples, entry) == []
    # one straight line through all decode samples (the old fixed-95 split below batch 95) misses
    line = coefficients([s for s in samples if s.phase == "decode"])
    one_line = dict(entry, decode_small=line, decode_large=line, decode_batch_threshold=95)
    assert any(p.startswith("decode batch") for p in fit_problems(samples, one_line))


def test_profile_records_wall_and_cpu_time_and_fits_cpu_time_on_one_thread(tmp_path: Path) -> None:
    import torch

    from disaggserve_worker.model.loader import load_model
    from disaggserve_worker.profile.run import Sweep, profile_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep = Sweep(prefill=[(1, 8), (1, 16), (2, 16)], decode=[(1, 8), (2, 8), (4, 16), (8, 16)], repeats=1)
        result = profile_model(load_model("builtin:tiny-llama", device="cpu"), sweep)
    finally:
        torch.set_num_threads(threads)
    assert "fitted on thread CPU time" in result.profile["source"]
    for m in result.profile["measurements"]:
        assert m["wall_ms"] > 0 and m["cpu_ms"] > 0 and m["ms"] == m["cpu_ms"]
    # decode contexts are mixed around the nominal one, so the recorded mean is near it
    decode = [m for m in result.profile["measurements"] if m["phase"] == "decode"]
    assert all(4 <= m["length"] <= 26 for m in decode)


def test_overheads_separate_per_request_from_per_token_costs() -> None:
    from disaggserve_worker.profile.overheads import Run, solve_costs

    # outside the forward passes: 20 ms per request + 0.5 ms per token, on top of the forwards
    short = Run(requests=10, tokens=2, cpu_ms=10 * (20 + 0.5 * 2) + 300, forward_ms=300)
    long = Run(requests=10, tokens=24, cpu_ms=10 * (20 + 0.5 * 24) + 900, forward_ms=900)
    assert solve_costs(short, long) == {"per_request_ms": 20.0, "per_token_ms": 0.5}
    # a process whose CPU the forwards explain entirely costs nothing extra (never negative)
    assert solve_costs(Run(5, 2, 100, 120), Run(5, 10, 100, 150)) == {"per_request_ms": 0.0, "per_token_ms": 0.0}


def test_a_concurrent_run_with_counted_steps_separates_per_iteration_from_per_token_cost() -> None:
    from disaggserve_worker.profile.overheads import Run, solve_costs

    def outside(requests: int, tokens: int, steps: int) -> float:
        return requests * 20 + requests * tokens * 0.5 + steps * 1.5

    # sequential: one iteration per token; concurrent (8 at once): 8 tokens per iteration
    runs = [Run(10, 2, outside(10, 2, 20) + 300, 300, steps=20),
            Run(10, 24, outside(10, 24, 240) + 900, 900, steps=240),
            Run(8, 24, outside(8, 24, 24) + 400, 400, steps=24)]
    costs = solve_costs(*runs)
    assert costs == pytest.approx({"per_request_ms": 20, "per_token_ms": 0.5, "per_step_ms": 1.5}, abs=1e-3)
    # sequential runs alone cannot tell them apart: all of it reads as per token
    uncounted = [dataclasses.replace(r, steps=0) for r in runs[:2]]
    assert solve_costs(*uncounted) == {"per_request_ms": 20.0, "per_token_ms": 2.0}


def test_the_kv_link_is_fitted_from_two_sizes() -> None:
    from disaggserve_worker.profile.overheads import fit_link

    # 1 ms latency + 1 GB/s (8 Gbps)
    link = fit_link([(10**6, 0.002), (10**7, 0.011), (10**6, 0.002), (10**7, 0.011)])
    assert link == {"gbps": 8.0, "latency_ms": 1.0}
    with pytest.raises(ValueError):
        fit_link([(10**6, 0.002)])


def test_the_prefill_stall_is_read_from_the_spread_of_unloaded_ttfts() -> None:
    import math

    import numpy as np

    from disaggserve_worker.profile.overheads import overheads_section, prefill_stall_ms

    # 40 ms of work plus an exponential stall of mean 12 ms: recovered within sampling error
    ttfts = list(40 + np.random.default_rng(1).exponential(12.0, 4000))
    assert prefill_stall_ms(ttfts) == pytest.approx(12.0, rel=0.1)
    assert prefill_stall_ms([40.0] * 10) == 0.0  # no spread, no stall
    assert prefill_stall_ms([40.0, 40.0, 40.0, 40.0, 40 + 10 * math.log(5) * 2.5]) > 0
    with pytest.raises(ValueError, match="at least 5"):
        prefill_stall_ms([40.0, 41.0])
    assert overheads_section({}, None, 3.5) == {"prefill_stall_ms": 3.5}
    assert overheads_section({}, None) == {}


def test_process_cpu_time_grows_with_work() -> None:
    import os

    from disaggserve_worker.profile.overheads import process_cpu_ms

    before = process_cpu_ms(os.getpid())
    deadline = __import__("time").process_time() + 0.05
    while __import__("time").process_time() < deadline:
        pass
    assert process_cpu_ms(os.getpid()) - before >= 30


def test_decode_shapes_keep_their_median_over_shuffled_passes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One slow moment of the host hits one pass of a shape, not its record; passes run in new orders."""
    from disaggserve_worker.model.loader import load_model
    from disaggserve_worker.profile import run

    calls: dict[tuple[int, ...], int] = {}
    order: list[tuple[int, ...]] = []

    def scripted(loaded, pool, slots, news, pasts, repeats, rng):  # type: ignore[no-untyped-def]
        if max(news) > 1:  # prefill
            return 10.0, 10.0
        key = tuple(pasts)
        calls[key] = calls.get(key, 0) + 1
        order.append(key)
        ms = [1.0 + len(pasts), 50.0 + len(pasts), 2.0 + len(pasts), 1.5 + len(pasts)][calls[key] - 1]
        return ms, ms

    monkeypatch.setattr(run, "_time_step", scripted)
    decode = [(1, 8), (2, 8), (4, 16), (8, 16), (12, 16)]
    sweep = run.Sweep(prefill=[(1, 8), (1, 16), (2, 16)], decode=decode, repeats=1, passes=3)
    result = run.profile_model(load_model("builtin:tiny-llama", device="cpu"), sweep)
    measured = {m["batch"]: m["wall_ms"] for m in result.profile["measurements"] if m["phase"] == "decode"}
    # call 1 is the untimed warm-up for one shape; every shape's record is the median of its passes
    assert all(count in (3, 4) for count in calls.values()) and sum(calls.values()) == 3 * len(decode) + 1
    assert all(measured[b] <= 2.0 + b for b, _ in decode), measured  # the 50 ms pass is outvoted
    passes = [order[1 + i * len(decode):1 + (i + 1) * len(decode)] for i in range(3)]
    assert len({tuple(p) for p in passes}) > 1  # a new order each pass
