"""Why no plan exists: errors that name the limiting number and what to change."""

from __future__ import annotations

from disaggserve.planner.errors import PlanningError
from disaggserve.planner.facts import MEMORY_UTILIZATION
from disaggserve.planner.search import Searcher
from disaggserve.topology import Topology


def explain_no_shape(s: Searcher, topo: Topology) -> PlanningError:
    sizes = s.profile.tensor_sizes()
    usable = [t for t in sizes if t <= topo.gpus_per_node]
    if not usable:
        return PlanningError(
            "ProfileMissing",
            f"the profile has tensor sizes {sizes} but nodes have "
            f"{topo.gpus_per_node} GPUs; profile smaller tensor sizes",
        )
    gib = 1024**3
    per_gpu = topo.gpu_memory_bytes * MEMORY_UTILIZATION / gib
    largest = topo.gpus_per_node
    return PlanningError(
        "ModelTooLarge",
        f"weights of {s.facts.weight_bytes / gib:.0f} GiB plus KV room for a {s.need_tokens}-token request "
        f"({s.need_tokens * s.facts.kv_bytes_per_token / gib:.1f} GiB) do not fit any instance: "
        f"the largest is one node's {largest} GPUs × {per_gpu:.0f} GiB usable = "
        f"{largest * per_gpu:.0f} GiB; use nodes with more or larger GPUs, or a quantised model",
    )


def explain_unreachable(s: Searcher, gbps: float) -> PlanningError | None:
    q = round(s.slo.attainment * 100)
    shapes = s.shapes()
    if not any(s.prefill_reachable(x) for x in shapes):
        shape, ms = s.fastest_prefill()
        return PlanningError(
            "SLOUnattainable",
            f"TTFT {s.slo.ttft_ms:g} ms is below the fastest prefill of "
            f"this model on this GPU, {ms:.0f} ms at tensor size {shape.tensor} (p{q} of prompt "
            "lengths, no queueing); raise slo.ttftMs or lower slo.attainment",
        )
    if not any(s.decode_reachable(x, gbps) for x in shapes):
        shape, ms = s.fastest_decode(gbps)
        return PlanningError(
            "SLOUnattainable",
            f"TPOT {s.slo.tpot_ms:g} ms is below the fastest decode of this "
            f"model on this GPU, {ms:.0f} ms per token at tensor size {shape.tensor} (p{q}, "
            f"batch 1, KV transfer at {gbps:g} Gbps included); raise slo.tpotMs",
        )
    return None
