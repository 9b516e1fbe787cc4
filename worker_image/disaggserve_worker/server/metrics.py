"""Prometheus helpers shared by the worker and the router.

Latency histograms need a bucket edge exactly at each SLO threshold: the autoscaler and the
status reporter compute "share of requests under the SLO" from bucket counts, and without an
edge at the threshold that share can only be interpolated.
"""

from __future__ import annotations

from collections.abc import Iterable

# Log-spaced edges from 1 ms to 60 s cover a tiny CPU model and a 70B model alike.
BASE_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)


def slo_buckets(*thresholds_s: float | Iterable[float | None] | None,
                base: Iterable[float] = BASE_BUCKETS_S) -> list[float]:
    """Histogram bucket edges (seconds): `base` plus every given SLO threshold, sorted, unique.

    Thresholds may be given one by one (`slo_buckets(ttft, tpot)`) or as a list
    (`slo_buckets([ttft, tpot])`). Thresholds that are None or not positive are skipped, so
    callers can pass optional SLOs as is.
    """
    edges = {round(float(b), 9) for b in base}
    flat: list[float | None] = []
    for item in thresholds_s:
        if isinstance(item, Iterable):
            flat.extend(item)
        else:
            flat.append(item)
    for threshold in flat:
        if threshold is not None and threshold > 0:
            edges.add(round(float(threshold), 9))
    return sorted(edges)
