"""The planner's one failure type, shared by the hook, the search and the CLI."""

from __future__ import annotations


class PlanningError(Exception):
    """No deployable plan; `reason` is a condition reason, the message says what to change.

    Reasons: ProfileMissing, ProfileInvalid, ModelFactsMissing, ModelTooLarge, SLOUnattainable,
    NoCapacity.
    """

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)
