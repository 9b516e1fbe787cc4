"""What an engine puts into a worker pod, behind one small interface.

`resources/workers.py` builds the StatefulSet, Service, placement, resources and security around
whatever engine runs inside; an engine renderer says only what differs between engines: the
container's image, command line, ports, env, probes, extra volumes, metrics endpoint, how long a
pod may take to drain, and which ports its headless Service names. Adding an engine is one module
here and one entry in `engines.renderer_for`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from disaggserve.api.plan import Plan, Role
from disaggserve.api.spec import DisaggServeSpec


@dataclass
class WorkerContainer:
    """The engine-specific parts of one worker pod."""

    image: str
    pull_policy: str
    command: list[str]
    args: list[str]
    ports: list[dict[str, Any]]
    probes: dict[str, Any]
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    metrics_port: int = 0
    metrics_path: str = "/metrics"
    grace_seconds: int = 60


class EngineRenderer(Protocol):
    """One serving engine (`spec.engine.kind`)."""

    kind: str

    def worker(
        self, spec: DisaggServeSpec, plan: Plan, name: str, namespace: str, phase: Role, unit: int | None
    ) -> WorkerContainer:
        """The container of a `phase` worker pod of resource `name`."""
        ...

    def service_ports(self, spec: DisaggServeSpec) -> list[dict[str, Any]]:
        """Ports of the headless Service over one phase's pods."""
        ...

    def network_objects(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The worker Secret and NetworkPolicy (resources/security.py), opened where the engine's own
        transport needs more than the contract's ports."""
        ...
