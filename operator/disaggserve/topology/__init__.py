"""Cluster topology from Node objects: GPU pools, bandwidth domains, placement mode. Pure code."""

from disaggserve.topology.nodes import (
    DEFAULT_CROSS_NODE_GBPS,
    DEFAULT_INTRA_NODE_GBPS,
    HIGH_AFFINITY_MIN_GBPS,
    GpuNode,
    Topology,
    TopologyError,
    build_topology,
    choose_placement,
    exclusion_reason,
    hardware_only,
    parse_cluster,
    parse_node,
    synthetic_nodes,
)

__all__ = [
    "DEFAULT_CROSS_NODE_GBPS",
    "DEFAULT_INTRA_NODE_GBPS",
    "HIGH_AFFINITY_MIN_GBPS",
    "GpuNode",
    "Topology",
    "TopologyError",
    "build_topology",
    "choose_placement",
    "exclusion_reason",
    "hardware_only",
    "parse_cluster",
    "parse_node",
    "synthetic_nodes",
]
