"""Node objects → GPU pool, bandwidth and placement mode."""

from __future__ import annotations

import pytest

from disaggserve.api.spec import Hardware
from disaggserve.topology import (
    DEFAULT_CROSS_NODE_GBPS,
    TopologyError,
    build_topology,
    choose_placement,
    parse_cluster,
    parse_node,
)

H100 = "NVIDIA-H100-80GB-HBM3"


def node(
    name: str,
    gpus: int = 8,
    *,
    product: str = H100,
    labels: dict | None = None,
    annotations: dict | None = None,
    taints: list | None = None,
    unschedulable: bool = False,
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.memory": "81559",
                **(labels or {}),
            },
            "annotations": annotations or {},
        },
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64"}},
    }


def hw(**kw) -> Hardware:
    return Hardware(gpuProduct=H100, **kw)


def test_parse_node_reads_gpu_discovery_labels():
    n = parse_node(
        node("a", 4, labels={"topology.kubernetes.io/zone": "z1", "disaggserve.io/cross-node-gbps": "400"})
    )
    assert (n.name, n.gpus, n.product, n.memory_mib, n.zone, n.cross_gbps) == (
        "a",
        4,
        H100,
        81559,
        "z1",
        400.0,
    )


def test_pool_excludes_cordoned_tainted_wrong_product_and_unselected_nodes():
    objs = [
        node("ok"),
        node("cordoned", unschedulable=True),
        node("tainted", taints=[{"key": "dedicated", "value": "infer", "effect": "NoSchedule"}]),
        node("a100", product="NVIDIA-A100-SXM4-80GB"),
        node("cpu", 0),
    ]
    topo = build_topology(objs, hw())
    assert [n.name for n in topo.nodes] == ["ok"]
    assert set(topo.excluded) == {"cordoned", "tainted", "a100", "cpu"}
    assert "taint dedicated:NoSchedule" in topo.excluded["tainted"]
    tolerant = hw(
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "infer", "effect": "NoSchedule"}]
    )
    assert "tainted" in [n.name for n in build_topology(objs, tolerant).nodes]
    selected = hw(nodeSelector={"pool": "serving"})
    assert build_topology([node("x", labels={"pool": "batch"})], selected).nodes == ()


def test_free_gpus_subtract_used_and_memory_comes_from_labels():
    topo = build_topology([node("a"), node("b", 4)], hw(), used={"a": 6})
    assert topo.free == (2, 4)
    assert topo.gpus_per_node == 8
    assert topo.gpu_memory_bytes == 81559 * 1024**2


def test_cross_node_bandwidth_label_then_spec_then_default():
    slow = node("a", annotations={"disaggserve.io/cross-node-gbps": "50"})
    fast = node("b", labels={"disaggserve.io/cross-node-gbps": "400"})
    topo = build_topology([slow, fast], hw(crossNodeGbps=800))
    assert topo.cross_gbps == 50  # the slower end bounds the link
    assert build_topology([node("c")], hw(crossNodeGbps=800)).cross_gbps == 800
    assert build_topology([node("c")], hw()).cross_gbps == DEFAULT_CROSS_NODE_GBPS


def test_domains_group_nodes_by_zone_and_rack():
    objs = [
        node("a", labels={"topology.kubernetes.io/zone": "z1", "disaggserve.io/rack": "r1"}),
        node("b", labels={"topology.kubernetes.io/zone": "z1", "disaggserve.io/rack": "r1"}),
        node("c", labels={"topology.kubernetes.io/zone": "z2"}),
    ]
    assert build_topology(objs, hw()).domains == {"z1/r1": ("a", "b"), "z2": ("c",)}


def test_auto_placement_threshold():
    assert choose_placement("auto", 100)[0] == "high-affinity"
    assert choose_placement("auto", 99)[0] == "low-affinity"
    assert choose_placement("low-affinity", 1000)[0] == "low-affinity"


def test_bad_labels_and_cluster_strings_are_named():
    with pytest.raises(TopologyError, match="cross-node-gbps"):
        parse_node(node("a", labels={"disaggserve.io/cross-node-gbps": "fast"}))
    assert parse_cluster("4x8") == (4, 8)
    for bad in ("4", "x8", "0x8", "4*8"):
        with pytest.raises(TopologyError, match="NODESxGPUS"):
            parse_cluster(bad)
