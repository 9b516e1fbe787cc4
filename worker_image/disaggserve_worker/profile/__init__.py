"""Latency profiling: sweep the engine's forward passes and fit the DistServe iteration model."""
