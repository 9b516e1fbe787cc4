"""Pure builders: spec + plan -> the Kubernetes objects the operator owns (docs/architecture.md §3)."""

from disaggserve.resources.children import Owner, RenderError, build_children

__all__ = ["Owner", "RenderError", "build_children"]
