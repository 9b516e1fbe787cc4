"""GPU products the planner can estimate for before anyone profiles them.

Numbers are the vendors' data-sheet peaks for dense fp16/bf16 tensor math (no sparsity), HBM
(or GDDR) bandwidth, and the per-GPU bandwidth to the other GPUs of the node in one direction
(NVLink/Infinity Fabric where the product has it, PCIe otherwise). They are *peaks*: the
roofline module multiplies them by efficiency factors calibrated on measured profiles, so a
data-sheet number that is optimistic by the same factor on every product does no harm.

Products are matched on the value of the node label `nvidia.com/gpu.product` (what
`spec.hardware.gpuProduct` holds), e.g. `NVIDIA-H100-80GB-HBM3`, `NVIDIA-A100-SXM4-40GB`,
`NVIDIA-L40S`, and on AMD's `AMD-Instinct-MI300X` spelling; see `find_gpu`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuProduct:
    name: str
    dense_tflops: float  # fp16/bf16 tensor cores, dense
    hbm_tb_s: float  # memory bandwidth, TB/s
    link_gb_s: float  # to the node's other GPUs, one direction, GB/s
    memory_gib: float
    link: str  # "nvlink", "pcie", "infinity-fabric"

    @property
    def peak_flops(self) -> float:
        return self.dense_tflops * 1e12

    @property
    def hbm_bytes_s(self) -> float:
        return self.hbm_tb_s * 1e12

    @property
    def link_bytes_s(self) -> float:
        return self.link_gb_s * 1e9


# Data sheets: NVIDIA A100 (2021), H100 (2023), H200 (2024), B200/DGX B200 (2024), L40S, L4,
# AWS G5 (A10G), AMD Instinct MI300X (2023). Link: NVLink 3 = 300 GB/s per direction,
# NVLink 4 = 450, NVLink 5 = 900; PCIe 4 x16 = 32, PCIe 5 x16 = 64; MI300X: 7 × 64 GB/s.
GPU_PRODUCTS: dict[str, GpuProduct] = {
    p.name: p
    for p in (
        GpuProduct("A100-SXM4-40GB", 312, 1.555, 300, 40, "nvlink"),
        GpuProduct("A100-SXM4-80GB", 312, 2.039, 300, 80, "nvlink"),
        GpuProduct("A100-PCIe-40GB", 312, 1.555, 32, 40, "pcie"),
        GpuProduct("A100-PCIe-80GB", 312, 1.935, 32, 80, "pcie"),
        GpuProduct("H100-SXM-80GB", 989, 3.35, 450, 80, "nvlink"),
        GpuProduct("H100-PCIe-80GB", 756, 2.0, 64, 80, "pcie"),
        GpuProduct("H200-141GB", 989, 4.8, 450, 141, "nvlink"),
        GpuProduct("B200-180GB", 2250, 8.0, 900, 180, "nvlink"),
        GpuProduct("L40S-48GB", 362, 0.864, 32, 48, "pcie"),
        GpuProduct("L4-24GB", 121, 0.3, 32, 24, "pcie"),
        GpuProduct("A10G-24GB", 70, 0.6, 32, 24, "pcie"),
        GpuProduct("MI300X-192GB", 1307, 5.3, 448, 192, "infinity-fabric"),
    )
}

# (pattern on the normalised label, product). First match wins, so the specific spellings
# (PCIe, memory size) come before the generic ones.
_PATTERNS: list[tuple[str, str]] = [
    (r"a100.*(pcie).*40|a100.*40.*pcie", "A100-PCIe-40GB"),
    (r"a100.*pcie|a100.*80.*pcie", "A100-PCIe-80GB"),
    (r"a100.*40", "A100-SXM4-40GB"),
    (r"a100", "A100-SXM4-80GB"),
    (r"h100.*(pcie|nvl)", "H100-PCIe-80GB"),
    (r"h100", "H100-SXM-80GB"),
    (r"h200", "H200-141GB"),
    (r"b200", "B200-180GB"),
    (r"l40s", "L40S-48GB"),
    (r"(^|-)l4($|-)", "L4-24GB"),
    (r"a10g", "A10G-24GB"),
    (r"mi300x", "MI300X-192GB"),
]


def normalise_product(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def find_gpu(label: str | None) -> GpuProduct | None:
    """The table entry for a node label value, or None for a product the table lacks."""
    if not label:
        return None
    norm = normalise_product(label)
    for pattern, name in _PATTERNS:
        if re.search(pattern, norm):
            return GPU_PRODUCTS[name]
    return None


def known_products() -> list[str]:
    return sorted(GPU_PRODUCTS)
