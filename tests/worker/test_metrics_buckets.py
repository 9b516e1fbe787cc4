"""SLO thresholds become histogram edges, however the caller passes them."""

from __future__ import annotations

from disaggserve_worker.server.metrics import BASE_BUCKETS_S, slo_buckets


def test_thresholds_become_edges_as_args_or_list() -> None:
    assert slo_buckets(0.123, None, 0.0456) == slo_buckets([0.123, None, 0.0456])
    edges = slo_buckets([0.123, 0.0456])
    assert 0.123 in edges and 0.0456 in edges and edges == sorted(set(edges))
    assert slo_buckets() == sorted(BASE_BUCKETS_S)
    assert slo_buckets(-1.0, 0.0, None) == sorted(BASE_BUCKETS_S), "non-positive SLOs are ignored"
    assert slo_buckets(0.25) == sorted(BASE_BUCKETS_S), "an SLO already on an edge adds nothing"
