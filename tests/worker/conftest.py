"""Fixtures of the worker tests (shared with the speculation tests)."""

from worker_fixtures import reference_greedy, tiny, tiny_draft  # noqa: F401
