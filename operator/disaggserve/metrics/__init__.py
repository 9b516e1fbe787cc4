"""Measured SLO metrics: PromQL over HTTP, or a direct scrape of the routers, into `Observed`."""

from disaggserve.metrics.observed import MetricsUnavailable, Observed

__all__ = ["MetricsUnavailable", "Observed"]
