"""The error a model that cannot be loaded or placed raises (its own module so the model code,
which the loader imports, can raise it too)."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with what to fix."""
