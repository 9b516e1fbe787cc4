"""Pure arithmetic over Prometheus samples: counter increases and histogram quantiles.

Used by the direct-scrape source (the operator keeps its own window when no Prometheus is
configured); the formulas are Prometheus's own, so both sources agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Router outcomes that say nothing about serving latency (the client's own fault).
NOT_SERVED = frozenset({"client_error", "unauthorized", "cancelled"})


def increase(old: float | None, new: float) -> float:
    """Counter increase between two samples; a drop means the process restarted (reset)."""
    if old is None or new < old:
        return new
    return new - old


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts {upper edge: count}.

    Linear interpolation inside the bucket that holds the rank; the +Inf bucket returns the
    highest finite edge. None when the histogram is empty.
    """
    edges = sorted(buckets)
    if not edges:
        return None
    total = buckets[edges[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_edge, lower_count = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if math.isinf(edge):
                return lower_edge
            if count == lower_count:
                return edge
            return lower_edge + (edge - lower_edge) * (rank - lower_count) / (count - lower_count)
        lower_edge, lower_count = edge, count
    return edges[-1] if not math.isinf(edges[-1]) else lower_edge


def share_at_or_below(threshold: float, buckets: Mapping[float, float]) -> float | None:
    """Share of observations <= threshold; exact when the threshold is a bucket edge."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    total = buckets[edges[-1]]
    below = max((buckets[e] for e in edges if e <= threshold), default=0.0)
    return below / total


def bucket_increase(old: Mapping[float, float] | None, new: Mapping[float, float]) -> dict[float, float]:
    reset = old is not None and any(new.get(e, 0.0) < old.get(e, 0.0) for e in new)
    return {e: increase(None if old is None or reset else old.get(e), v) for e, v in new.items()}


def sum_buckets(histograms: Sequence[Mapping[float, float]]) -> dict[float, float]:
    out: dict[float, float] = {}
    for h in histograms:
        for edge, count in h.items():
            out[edge] = out.get(edge, 0.0) + count
    return out
