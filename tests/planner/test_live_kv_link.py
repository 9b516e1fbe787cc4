"""The KV link as the decode workers' own pulls measure it: read from their metrics (as exported by
the real worker), windowed like the routers' metrics, and planned with instead of the profile's."""

from __future__ import annotations

import pytest

from disaggserve.api import parse_spec
from disaggserve.api.plan import Plan
from disaggserve.metrics.observed import KvTransfers, Observed
from disaggserve.metrics.scrape import ScrapeWindow, parse_kv_metrics
from disaggserve.planner.profile import KvLink
from disaggserve.planner.replan import MIN_KV_TRANSFERS, live_link, recommend
from helpers import example, worker_kv_metrics


def test_a_decode_workers_pulls_are_read_from_its_metrics_and_a_prefill_workers_sends_are_not():
    sample = parse_kv_metrics(worker_kv_metrics("decode", [(1_000_000, 0.002), (3_000_000, 0.004)]), at=1.0)
    assert (sample.transfers, sample.bytes, sample.seconds) == (2, 4_000_000, pytest.approx(0.006))
    assert parse_kv_metrics(worker_kv_metrics("prefill", [(1_000_000, 0.002)]), at=1.0).transfers == 0


def test_the_window_sums_pulls_over_decode_pods_and_survives_a_restart():
    window: ScrapeWindow = ScrapeWindow(window_seconds=60, stale_after=30)
    assert window.kv_transfers(now=0) is None
    window.add("d0", parse_kv_metrics(worker_kv_metrics("decode", [(10, 1.0)] * 5), at=0))
    window.add("d0", parse_kv_metrics(worker_kv_metrics("decode", [(10, 1.0)] * 25), at=30))
    window.add("d1", parse_kv_metrics(worker_kv_metrics("decode", [(10, 1.0)] * 50), at=0))
    window.add("d1", parse_kv_metrics(worker_kv_metrics("decode", [(10, 1.0)] * 4), at=30))  # restarted
    kv = window.kv_transfers(now=31)
    assert kv is not None and (kv.transfers, kv.bytes, kv.seconds) == (20 + 4, 240, pytest.approx(24.0))
    idle: ScrapeWindow = ScrapeWindow(window_seconds=60, stale_after=30)
    idle.add("d0", parse_kv_metrics(worker_kv_metrics("decode", []), at=0))
    idle.add("d0", parse_kv_metrics(worker_kv_metrics("decode", []), at=30))
    assert idle.kv_transfers(now=31) is None  # no pull: nothing learnt about the link


def observed(kv: KvTransfers | None) -> Observed:
    return Observed(source="scrape", window_seconds=30, requests=120, request_rate=4.0, mean_input_tokens=512,
                    mean_output_tokens=16, kv=kv)


def test_the_live_link_keeps_the_profiles_latency_and_reads_the_rest_as_bandwidth():
    pulls = KvTransfers(transfers=100, bytes=100 * 1_000_000, seconds=100 * 0.003)  # 1 MB in 3 ms
    alone = live_link(observed(pulls), None)
    assert alone is not None and (alone.gbps, alone.latency_ms) == (pytest.approx(8e6 / 0.003 / 1e9), 0.0)
    # 1 ms of it is the profile's per-transfer latency: 1 MB in the other 2 ms is 4 Gbit/s
    assert live_link(observed(pulls), KvLink(gbps=100, latency_ms=1.0)) == KvLink(gbps=4.0, latency_ms=1.0)
    # a mean pull shorter than the profile's latency: that latency was not this path's
    assert live_link(observed(pulls), KvLink(gbps=100, latency_ms=5.0)).latency_ms == 0.0
    few = KvTransfers(transfers=MIN_KV_TRANSFERS - 1, bytes=1e6, seconds=0.01)
    assert live_link(observed(few), None) is None
    assert live_link(observed(None), None) is None


def test_a_slow_live_link_asks_for_more_decode_instances():
    body = example()
    body["spec"].pop("parallelism")
    body["spec"]["workload"] = {"requestRate": 4, "inputTokens": 512, "outputTokens": 16}
    body["spec"]["autoscaling"] = {"enabled": True, "maxReplicas": {"prefill": 8, "decode": 8}}
    spec = parse_spec(body["spec"])
    plan = Plan.model_validate({"placement": "high-affinity", "prefill": {"tensor": 1, "replicas": 1},
                                "decode": {"tensor": 1, "replicas": 1}})
    fast = recommend(spec, plan, observed(KvTransfers(transfers=100, bytes=100 * 2e6, seconds=100 * 0.002)),
                     correct=False)
    slow = recommend(spec, plan, observed(KvTransfers(transfers=100, bytes=100 * 2e6, seconds=100 * 0.5)),
                     correct=False)
    assert fast.kv_link is not None and fast.kv_link.gbps == pytest.approx(8.0)
    assert "KV link 8 Gbit/s + 0 ms measured live" in fast.profile_source
    # 2 MB pulls at 0.032 Gbit/s: one decode instance's link cannot take 4 pulls a second
    assert (fast.decode, slow.decode) == (1, 2)
