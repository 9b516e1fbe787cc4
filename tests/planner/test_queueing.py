"""The simulator against DistServe's queueing formulas, and the behaviour they predict."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import coeffs, entry, synthetic_profile
from disaggserve.planner import queueing
from disaggserve.planner.profile import phase_latency
from disaggserve.planner.simulator import simulate_prefill
from disaggserve.planner.workload import LengthDistribution, WorkloadModel, sample_requests

FIXED = WorkloadModel(
    rate=1, input=LengthDistribution(kind="fixed", mean=500), output=LengthDistribution(kind="fixed", mean=10)
)
D = 10 + 0.1 * 500  # ms: prefill of one 500-token prompt on tensor size 1 below


@pytest.fixture(scope="module")
def long_sample():
    return sample_requests(FIXED, 20_000, seed=7)


def _profile(speedup: float = 1.3):
    # tensor 2 is `speedup` times faster than tensor 1 for every prompt
    return synthetic_profile(
        [
            entry(1, coeffs(10, 0.1), coeffs(5, 0.0)),
            entry(2, coeffs(10 / speedup, 0.1 / speedup), coeffs(5, 0.0)),
        ],
        layers=2,
    )


def test_zero_load_ttft_is_the_prefill_time(long_sample):
    lat = phase_latency(_profile(), 1, 1)
    res = simulate_prefill(long_sample.head(50), 1e-6, lat, budget_tokens=0)
    assert lat.prefill_ms(500, 500**2) == pytest.approx(D)
    assert np.allclose(res.ttft_ms, D)


@pytest.mark.parametrize("rate_rps", [2, 8, 14])
def test_single_instance_matches_md1(long_sample, rate_rps):
    lat = phase_latency(_profile(), 1, 1)
    sim = simulate_prefill(long_sample, rate_rps, lat, budget_tokens=0).ttft_ms.mean()
    assert sim == pytest.approx(queueing.avg_ttft_single(rate_rps / 1000, D), rel=0.06)


@pytest.mark.parametrize("rate_rps", [5, 20, 25])
def test_two_stage_pipeline_matches_formula(long_sample, rate_rps):
    lat = phase_latency(_profile(), 1, 2)
    sim = simulate_prefill(long_sample, rate_rps, lat, budget_tokens=0).ttft_ms.mean()
    assert sim == pytest.approx(queueing.avg_ttft_pipeline2(rate_rps / 1000, D), rel=0.06)


@pytest.mark.parametrize("rate_rps", [5, 15])
def test_tensor_speedup_matches_formula(long_sample, rate_rps):
    lat = phase_latency(_profile(1.3), 2, 1)
    sim = simulate_prefill(long_sample, rate_rps, lat, budget_tokens=0).ttft_ms.mean()
    assert sim == pytest.approx(queueing.avg_ttft_tensor(rate_rps / 1000, D, 1.3), rel=0.06)


def test_attainment_falls_as_rate_rises(long_sample):
    lat = phase_latency(_profile(), 1, 1)
    sample = long_sample.head(3000)
    attainments = [simulate_prefill(sample, r, lat).attainment(150, 1e9) for r in (2, 10, 14, 17, 25)]
    assert attainments[0] > 0.99
    assert all(a >= b for a, b in itertools.pairwise(attainments))
    assert attainments[-1] < 0.5


def test_tensor_beats_pipeline_at_low_rate_and_loses_at_high_rate(long_sample):
    """Same two GPUs: tensor 2 (speedup 1.3) vs pipeline 2 (stage time D/2)."""
    prof = _profile(1.3)
    tensor, pipeline = phase_latency(prof, 2, 1), phase_latency(prof, 1, 2)

    def mean_ttft(lat, rate):
        return simulate_prefill(long_sample, rate, lat, budget_tokens=0).ttft_ms.mean()

    assert mean_ttft(tensor, 1) < mean_ttft(pipeline, 1)
    assert mean_ttft(tensor, 22) > mean_ttft(pipeline, 22)
    # and the formulas agree on both sides
    assert queueing.avg_ttft_tensor(0.001, D, 1.3) < queueing.avg_ttft_pipeline2(0.001, D)
    assert queueing.avg_ttft_tensor(0.022, D, 1.3) > queueing.avg_ttft_pipeline2(0.022, D)


def test_overload_is_infinite_in_closed_form():
    assert queueing.avg_ttft_single(0.1, 10) == float("inf")
    assert queueing.avg_ttft_replicas(0.1, 10, 2) < float("inf")
