"""Linear layers with bfloat16 weights on the CPU through oneDNN's prepacked weights.

Why: `F.linear` on bfloat16 CPU tensors re-lays the weight out for the AMX/AVX-512 kernels on
every call. On this project's bench host (AMX) a 256 x 1024 projection of one token took 48 µs
that way against 28 µs in float32, which made a bfloat16 decode step slower than a float32 one,
while oneDNN with the weight packed once (`torch.ops.mkldnn._reorder_linear_weight`, the path
PyTorch's own inductor CPU backend takes) takes 25 µs, and 35 against 134 µs for 32 tokens. The
result is the same bits (checked in tests/worker/test_packed_linear.py).

One or two bfloat16 rows (a decode step at batch 1-2) skip oneDNN altogether: its ~20 µs of
set-up per call is most of such a projection, and the C kernel's few-row tiles
(`cpu_kernels.small_linear`, bfloat16 pairs summed in float) take 5-11 µs for the same
small-llama projections (1.7-3.1x). From four rows on oneDNN (AMX) is as fast or faster. In
float32 MKL's own small-row path is as fast as the kernel, so float32 stays with it. The kernel
sums in another order than oneDNN, so these rows are not oneDNN's bits, only its values within
float rounding.

The packed copy is kept beside the checkpoint's weight (it is an opaque layout other code cannot
read), so bfloat16 weights take twice their memory on the CPU. `DISAGGSERVE_CPU_PACKED_WEIGHTS`:
`auto` (default: where oneDNN has bfloat16 support), `off`.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from disaggserve_worker import switches
from disaggserve_worker.model import cpu_kernels

ENV_MODE = "DISAGGSERVE_CPU_PACKED_WEIGHTS"
MODES = ("auto", "off")
SMALL_ROWS = {torch.bfloat16: 2}  # rows up to which `linear` uses the C kernel, by dtype
BATCH_HINT = 32  # the row count oneDNN packs for: decode batches; prefill rows run as fast as unpacked

_lock = threading.Lock()
_packed: dict[int, tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor]] = {}
_usable: bool | None = None


def usable() -> bool:
    """Whether bfloat16 CPU projections go through packed weights here (decided once)."""
    global _usable
    if _usable is None:
        ops = torch.ops.mkldnn
        _usable = (switches.choice(ENV_MODE, MODES) == "auto" and torch.backends.mkldnn.is_available()
                   and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")
                   and bool(ops._is_mkldnn_bf16_supported()))
    return _usable


def packed(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-packed copy of `weight`, made on first use and again if the weight was replaced
    or changed in place (its storage or version moved)."""
    key = id(weight)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight.data_ptr() and entry[2] == weight._version:
        return entry[3]
    with _lock, torch.inference_mode(False), torch.no_grad():
        made = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)
        _packed[key] = (weakref.ref(weight, lambda _ref, key=key: _packed.pop(key, None)), weight.data_ptr(),
                        weight._version, made)
    return made


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: through the C kernel for a few bfloat16 rows on the CPU, the
    packed weight for more."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= SMALL_ROWS.get(x.dtype, 0)
            and (lib := cpu_kernels.kernel()) is not None and cpu_kernels.linear_supports(x, weight, bias)):
        return cpu_kernels.small_linear(lib, x, weight, bias)
    if weight.dtype is torch.bfloat16 and x.dtype is torch.bfloat16 and x.device.type == "cpu" and usable():
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)
