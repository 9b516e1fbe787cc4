"""Counter increases, histogram quantiles and the scrape window (the no-Prometheus path)."""

from __future__ import annotations

import math

import pytest

from disaggserve.metrics import MetricsUnavailable
from disaggserve.metrics.scrape import ScrapeWindow, parse_router_metrics
from disaggserve.metrics.series import histogram_quantile, increase, share_at_or_below

INF = math.inf


def test_increase_handles_resets():
    assert increase(5, 8) == 3
    assert increase(None, 4) == 4
    assert increase(10, 3) == 3, "a restarted process starts from zero"


def test_histogram_quantile_matches_prometheus_interpolation():
    buckets = {0.1: 50.0, 0.2: 90.0, 0.5: 100.0, INF: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.99, {1.0: 0.0, INF: 10.0}) == 1.0, "+Inf bucket returns the highest edge"
    assert histogram_quantile(0.5, {1.0: 0.0, INF: 0.0}) is None
    assert share_at_or_below(0.2, buckets) == pytest.approx(0.9)


def router_text(ok: int, slo_met: int, ttft: dict[str, int], status_extra: str = "") -> str:
    lines = [
        "# TYPE disaggserve_requests_total counter",
        f'disaggserve_requests_total{{status="ok"}} {ok}',
        f'disaggserve_requests_total{{status="client_error"}} 7{status_extra}',
        "# TYPE disaggserve_slo_met_total counter",
        f"disaggserve_slo_met_total {slo_met}",
        "# TYPE disaggserve_prompt_tokens_total counter",
        f"disaggserve_prompt_tokens_total {ok * 100}",
        "# TYPE disaggserve_generation_tokens_total counter",
        f"disaggserve_generation_tokens_total {ok * 20}",
        "# TYPE disaggserve_ttft_seconds histogram",
    ]
    cumulative = 0
    for le, n in ttft.items():
        cumulative += n
        lines.append(f'disaggserve_ttft_seconds_bucket{{le="{le}"}} {cumulative}')
    lines.append(f"disaggserve_ttft_seconds_count {cumulative}")
    return "\n".join(lines) + "\n"


def test_scrape_window_sums_pods_and_survives_a_restart():
    window = ScrapeWindow(window_seconds=60, stale_after=10)
    window.add("a", parse_router_metrics(router_text(10, 9, {"0.1": 10, "0.5": 0, "+Inf": 0}), at=0))
    window.add("a", parse_router_metrics(router_text(40, 30, {"0.1": 30, "0.5": 10, "+Inf": 0}), at=30))
    window.add("b", parse_router_metrics(router_text(100, 100, {"0.1": 100, "0.5": 0, "+Inf": 0}), at=0))
    window.add("b", parse_router_metrics(router_text(20, 20, {"0.1": 20, "0.5": 0, "+Inf": 0}), at=30))  # reset
    obs = window.observe(now=31, slo_ttft_s=0.1)
    assert obs.requests == 30 + 20
    assert obs.request_rate == pytest.approx(50 / 30)
    assert obs.attainment == pytest.approx((21 + 20) / 50)
    assert obs.mean_input_tokens == pytest.approx(100)
    assert obs.mean_output_tokens == pytest.approx(20)
    assert obs.ttft_within_slo == pytest.approx((20 + 20) / 50)
    assert 100 < obs.ttft_p90_ms <= 500


def test_stale_or_thin_data_is_unavailable():
    window = ScrapeWindow(window_seconds=60, stale_after=10)
    with pytest.raises(MetricsUnavailable):
        window.observe(now=0)
    window.add("a", parse_router_metrics(router_text(1, 1, {"+Inf": 1}), at=0))
    with pytest.raises(MetricsUnavailable, match="fewer than two"):
        window.observe(now=1)
    window.add("a", parse_router_metrics(router_text(2, 2, {"+Inf": 2}), at=5))
    assert window.observe(now=6).requests == 1
    with pytest.raises(MetricsUnavailable, match="recently"):
        window.observe(now=100)
