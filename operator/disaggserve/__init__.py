"""DisaggServe control plane: the operator, planner and resource builders (no torch here)."""

__version__ = "0.1.0"
