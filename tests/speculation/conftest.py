"""Fixtures of the speculation tests (shared with the worker tests)."""

from worker_fixtures import reference_greedy, tiny, tiny_draft  # noqa: F401
