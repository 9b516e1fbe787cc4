"""Chart, manifests, RBAC and kubectl-plugin tests (a package, so its conftest does not shadow tests/conftest)."""
