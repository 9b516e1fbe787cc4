"""Fixtures for the router tests (the machinery lives in `router_harness`)."""

from router_harness import disagg_router, disagg_workers

__all__ = ["disagg_router", "disagg_workers"]
