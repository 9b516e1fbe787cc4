"""DisaggServe data plane: the torch worker (prefill, decode, colocated) and the router."""

__version__ = "0.1.0"
