"""Read GPU nodes the way NVIDIA GPU feature discovery labels them, and summarise the cluster.

The planner needs four facts from a cluster: how many GPUs a node has free (an instance is
one pod on one node), how much memory a GPU has, how fast the KV cache moves inside a node
and between nodes. The first three come from standard labels and `status.allocatable`;
interconnect speed has no standard label, so DisaggServe reads its own, documented here:

- `disaggserve.io/cross-node-gbps` — node-to-node bandwidth in Gbit/s (label or annotation)
- `disaggserve.io/intra-node-gbps` — GPU-to-GPU bandwidth inside the node (NVLink), Gbit/s
- `disaggserve.io/rack` — optional rack name, reported as a bandwidth domain inside a zone

Missing cross-node bandwidth falls back to `spec.hardware.crossNodeGbps`, then to 25 Gbit/s
(the commodity Ethernet of the DistServe testbed: the safe guess, since assuming a fast
network that is not there ships gigabytes of KV cache over a slow link). Placement `auto`
picks high node-affinity at or above 100 Gbit/s (HDR InfiniBand / RoCE class, where a
1 GB KV cache moves in ≈ 80 ms) and low node-affinity below it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from disaggserve.api.spec import Hardware

LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
LABEL_GPU_COUNT = "nvidia.com/gpu.count"
LABEL_GPU_MEMORY_MIB = "nvidia.com/gpu.memory"
RESOURCE_GPU = "nvidia.com/gpu"
LABEL_ZONE = "topology.kubernetes.io/zone"
LABEL_RACK = "disaggserve.io/rack"
KEY_CROSS_GBPS = "disaggserve.io/cross-node-gbps"
KEY_INTRA_GBPS = "disaggserve.io/intra-node-gbps"

DEFAULT_CROSS_NODE_GBPS = 25.0
# NVLink 3 (A100): 300 GB/s each way.
DEFAULT_INTRA_NODE_GBPS = 2400.0
HIGH_AFFINITY_MIN_GBPS = 100.0
MIB = 1024**2
GIB = 1024**3


class TopologyError(ValueError):
    """Node objects or a cluster description that cannot be read."""


@dataclass(frozen=True)
class GpuNode:
    name: str
    product: str | None
    gpus: int  # allocatable nvidia.com/gpu
    memory_mib: int | None
    zone: str | None = None
    rack: str | None = None
    cross_gbps: float | None = None
    intra_gbps: float | None = None
    schedulable: bool = True
    taints: tuple[tuple[str, str | None, str], ...] = ()  # (key, value, effect)
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


def _float(value: Any, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TopologyError(f"{where}: expected a number, got {value!r}") from None
    if out <= 0:
        raise TopologyError(f"{where}: must be positive, got {value!r}")
    return out


def _int(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value))
    except ValueError:
        raise TopologyError(f"{where}: expected an integer, got {value!r}") from None


def parse_node(obj: dict[str, Any]) -> GpuNode:
    """A Node object (dict as the API returns it) → GpuNode. Nodes without GPUs get gpus=0."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or "<unnamed>"
    labels = dict(meta.get("labels") or {})
    annotations = meta.get("annotations") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    allocatable = status.get("allocatable") or {}
    gpus = _int(allocatable.get(RESOURCE_GPU), f"node {name} status.allocatable[{RESOURCE_GPU}]")
    if gpus is None:
        gpus = _int(labels.get(LABEL_GPU_COUNT), f"node {name} label {LABEL_GPU_COUNT}") or 0

    def bw(key: str) -> float | None:
        return _float(labels.get(key, annotations.get(key)), f"node {name} {key}")

    taints = tuple((t.get("key", ""), t.get("value"), t.get("effect", "")) for t in spec.get("taints") or [])
    return GpuNode(
        name=name,
        product=labels.get(LABEL_GPU_PRODUCT),
        gpus=gpus,
        memory_mib=_int(labels.get(LABEL_GPU_MEMORY_MIB), f"node {name} label {LABEL_GPU_MEMORY_MIB}"),
        zone=labels.get(LABEL_ZONE),
        rack=labels.get(LABEL_RACK),
        cross_gbps=bw(KEY_CROSS_GBPS),
        intra_gbps=bw(KEY_INTRA_GBPS),
        schedulable=not spec.get("unschedulable", False),
        taints=taints,
        labels=labels,
    )


def _tolerated(taint: tuple[str, str | None, str], hardware: Hardware) -> bool:
    key, value, effect = taint
    if effect == "PreferNoSchedule":
        return True
    for tol in hardware.tolerations:
        if tol.effect not in (None, effect):
            continue
        if tol.operator == "Exists" and tol.key in (None, key):
            return True
        if tol.key == key and (tol.value or None) == (value or None):
            return True
    return False


def exclusion_reason(node: GpuNode, hardware: Hardware) -> str | None:
    """Why pods of this resource cannot run on the node, or None."""
    if not node.schedulable:
        return "cordoned (spec.unschedulable)"
    if node.gpus <= 0:
        return "no allocatable nvidia.com/gpu"
    if hardware.gpu_product and node.product != hardware.gpu_product:
        return f"GPU product {node.product!r} is not {hardware.gpu_product!r}"
    for key, value in hardware.node_selector.items():
        if node.labels.get(key) != value:
            return f"nodeSelector {key}={value} does not match"
    for taint in node.taints:
        if not _tolerated(taint, hardware):
            return f"taint {taint[0]}:{taint[2]} not tolerated"
    return None


@dataclass(frozen=True)
class Topology:
    """The GPU pool a resource may use and the links between its nodes."""

    nodes: tuple[GpuNode, ...]
    free: tuple[int, ...]  # free GPUs per node, same order
    gpus_per_node: int
    gpu_memory_bytes: float
    cross_gbps: float
    intra_gbps: float
    bandwidth_source: str
    domains: dict[str, tuple[str, ...]]
    excluded: dict[str, str]

    @property
    def free_total(self) -> int:
        return sum(self.free)


def build_topology(objects: list[dict[str, Any]], hardware: Hardware, used: dict[str, int] | None = None) -> Topology:
    """GPU pool for `hardware` from Node objects; `used` = GPUs already requested per node by
    pods that are not ours (the caller lists pods; this module cannot)."""
    used = used or {}
    eligible: list[GpuNode] = []
    excluded: dict[str, str] = {}
    for obj in objects:
        node = parse_node(obj)
        reason = exclusion_reason(node, hardware)
        if reason:
            excluded[node.name] = reason
        else:
            eligible.append(node)
    free = tuple(max(n.gpus - int(used.get(n.name, 0)), 0) for n in eligible)
    memories = [n.memory_mib for n in eligible if n.memory_mib]
    memory = min(memories) * MIB if memories else hardware.gpu_memory_gib * GIB
    crosses = [n.cross_gbps for n in eligible if n.cross_gbps]
    if crosses:
        cross, source = min(crosses), f"node label/annotation {KEY_CROSS_GBPS}"
    elif hardware.cross_node_gbps:
        cross, source = hardware.cross_node_gbps, "spec.hardware.crossNodeGbps"
    else:
        cross, source = DEFAULT_CROSS_NODE_GBPS, "default (no label, no spec.hardware.crossNodeGbps)"
    intras = [n.intra_gbps for n in eligible if n.intra_gbps]
    domains: dict[str, list[str]] = defaultdict(list)
    for n in eligible:
        domains["/".join(p for p in (n.zone or "default", n.rack) if p)].append(n.name)
    return Topology(
        nodes=tuple(eligible),
        free=free,
        gpus_per_node=min(max((n.gpus for n in eligible), default=hardware.gpus_per_node), 64),
        gpu_memory_bytes=float(memory),
        cross_gbps=float(cross),
        intra_gbps=float(min(intras)) if intras else DEFAULT_INTRA_NODE_GBPS,
        bandwidth_source=source,
        domains={k: tuple(v) for k, v in domains.items()},
        excluded=excluded,
    )


def hardware_only(hardware: Hardware) -> Topology:
    """No cluster view: plan on the spec's hardware, capacity unbounded (only maxGpus)."""
    cross = hardware.cross_node_gbps or DEFAULT_CROSS_NODE_GBPS
    source = "spec.hardware.crossNodeGbps" if hardware.cross_node_gbps else "default"
    return Topology(
        nodes=(),
        free=(),
        gpus_per_node=hardware.gpus_per_node,
        gpu_memory_bytes=hardware.gpu_memory_gib * GIB,
        cross_gbps=float(cross),
        intra_gbps=DEFAULT_INTRA_NODE_GBPS,
        bandwidth_source=source,
        domains={},
        excluded={},
    )


def choose_placement(requested: str, cross_gbps: float) -> tuple[str, str]:
    """(placement, why). `auto` compares cross-node bandwidth with HIGH_AFFINITY_MIN_GBPS."""
    if requested in ("high-affinity", "low-affinity"):
        return requested, f"{requested} as requested in spec.placement"
    if cross_gbps >= HIGH_AFFINITY_MIN_GBPS:
        return "high-affinity", (
            f"auto: cross-node {cross_gbps:g} Gbps ≥ {HIGH_AFFINITY_MIN_GBPS:g} Gbps, KV cache may cross nodes"
        )
    return "low-affinity", (
        f"auto: cross-node {cross_gbps:g} Gbps < {HIGH_AFFINITY_MIN_GBPS:g} Gbps, KV cache stays inside a node"
    )


_CLUSTER = re.compile(r"^(\d+)x(\d+)$")


def parse_cluster(text: str) -> tuple[int, int]:
    """`NODESxGPUS` (e.g. 4x8) → (4, 8)."""
    m = _CLUSTER.match(text.strip().lower())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise TopologyError(f"--cluster {text!r}: expected NODESxGPUS with positive integers, e.g. 4x8")
    return int(m.group(1)), int(m.group(2))


def synthetic_nodes(
    count: int, gpus: int, *, product: str | None, memory_gib: float, cross_gbps: float | None = None
) -> list[dict[str, Any]]:
    """Node objects for a described cluster (`--cluster 4x8`), labelled as GPU discovery would."""
    out = []
    for i in range(count):
        labels = {LABEL_GPU_COUNT: str(gpus), LABEL_GPU_MEMORY_MIB: str(int(memory_gib * 1024))}
        if product:
            labels[LABEL_GPU_PRODUCT] = product
        if cross_gbps:
            labels[KEY_CROSS_GBPS] = f"{cross_gbps:g}"
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": f"node-{i}", "labels": labels},
                "spec": {},
                "status": {"allocatable": {RESOURCE_GPU: str(gpus)}},
            }
        )
    return out
