"""What a KV transfer moves and where it lands: the wire layout, limits, and pool views.

On the wire a layer is full-head K then V, token-major: (2, tokens, KV heads, head_dim) in the
model dtype, whatever either side's tensor-parallel size. A single-shard CPU pool stores a
layer as (2, slots, KV heads, head_dim), so the bytes of one block of consecutive slots are
one contiguous region of it: both ends hand those regions to the socket directly
(`slot_runs`, `layer_regions`), with no gather on send and no scatter copy on receive. Pools
split over tensor shards or on a GPU go through a staging tensor and `KVPool.read/write`.
"""

from __future__ import annotations

import array
import ctypes
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from disaggserve_worker.model.kv_pool import KVPool

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
LayerSink = Callable[[int, torch.Tensor], None]


@dataclass
class KVLayout:
    """What the receiver expects: a mismatch (other model, other dtype) is not retryable.

    `max_tokens` (the model's context length) bounds what a peer may announce, so the largest
    frame a receiver ever accepts is one layer of one request at the model's full context.
    """

    dtype: torch.dtype
    layers: int
    kv_heads: int
    head_dim: int
    on_gpu: bool = False
    max_tokens: int = 32768

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.kv_heads * self.head_dim * self.dtype.itemsize

    def layer_bytes(self, tokens: int) -> int:
        return 2 * tokens * self.token_bytes

    @property
    def max_request_bytes(self) -> int:
        """KV bytes of one request at the model's full context: the most one pull may move."""
        return self.layers * self.layer_bytes(self.max_tokens)


@dataclass
class TransferStats:
    bytes: int
    seconds: float
    tokens: int


def layout_of(engine: object) -> KVLayout:
    """The layout an engine's pool receives (`engine` is an `Engine`; typed loosely so this
    module does not import the engine)."""
    model = engine.model  # type: ignore[attr-defined]
    c = model.config
    return KVLayout(model.dtype, c.num_hidden_layers, c.kv_heads, c.dim_per_head,
                    on_gpu=engine.kv_pool.is_cuda,  # type: ignore[attr-defined]
                    max_tokens=engine.config.max_model_len)  # type: ignore[attr-defined]


def block_runs(blocks: Sequence[int], block_size: int, tokens: int) -> list[tuple[int, int]]:
    """`slot_runs` of the first `tokens` slots of a block table (`BlockAllocator.slot_table`), from
    the block ids alone: a few list operations per block instead of array work per slot. On a KV
    thread woken from idle, `slot_runs` took 0.2-0.4 ms of a ~2 ms 1 MB pull (bench/kv_transfer.py)."""
    if not 0 <= tokens <= len(blocks) * block_size:
        raise ValueError(f"{tokens} tokens do not fit {len(blocks)} blocks of {block_size}")
    runs: list[list[int]] = []
    left = tokens
    for block in blocks:
        if left <= 0:
            break
        n = min(block_size, left)
        start = block * block_size
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += n
        else:
            runs.append([start, n])
        left -= n
    return [(start, n) for start, n in runs]


def slot_runs(slots: torch.Tensor) -> list[tuple[int, int]]:
    """(first slot, length) of each run of consecutive slots, in order.

    With numpy rather than torch ops: it runs on every pull on both ends, and for a few hundred
    slots torch's per-op overhead made it ~100 µs of a ~1 ms transfer."""
    flat = slots.reshape(-1).cpu().numpy()
    if flat.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*starts[1:], int(flat.size)]
    return [(int(flat[s]), e - s) for s, e in zip(starts, ends, strict=True)]


def direct(pool: KVPool) -> bool:
    """Whether the pool's layers can be read and written by the socket in place."""
    return all(len(shards) == 1 and shards[0].device.type == "cpu" and shards[0].is_contiguous()
               for shards in pool.layers)


def _flat_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


class PoolRegions:
    """Byte views of a direct pool's layers, made once per pool (`regions_of`: the pool's tensors
    never move, and making them costs ~40 µs, a noticeable share of a 1 MB pull)."""

    def __init__(self, pool: KVPool):
        # No reference back to `pool`: `regions_of` keys on it weakly.
        self._views = [_flat_bytes(shards[0]) for shards in pool.layers]
        # Each layer's address, for the native receive (`kv.native`), which fills regions itself.
        self.bases = (ctypes.c_void_p * len(pool.layers))(*[shards[0].data_ptr() for shards in pool.layers])
        first = pool.layers[0][0]
        self.slots = int(first.shape[1])
        self.token_bytes = int(first.shape[2] * first.shape[3] * first.element_size())

    def layer_regions(self, layer: int, runs: list[tuple[int, int]]) -> list[memoryview]:
        """The K then V regions of `runs` in layer `layer`: the wire order of its frame."""
        view, tb = self._views[layer], self.token_bytes
        out = []
        for kv in (0, 1):
            base = kv * self.slots
            out.extend(view[(base + s) * tb:(base + s + n) * tb] for s, n in runs)
        return out


_REGIONS: weakref.WeakKeyDictionary[KVPool, PoolRegions] = weakref.WeakKeyDictionary()
_REGIONS_LOCK = threading.Lock()
_LAST: tuple[weakref.ref[KVPool], PoolRegions | None] | None = None  # the pool last asked about


def regions_of(pool: KVPool) -> PoolRegions | None:
    """The pool's byte views, shared by every transfer; None when it is not written in place.
    The pool last asked about is answered without the lock and the weak mapping: a decode worker
    asks for its one pool on every pull, before the REQUEST goes out, on a vCPU woken cold
    (where the lock and `WeakKeyDictionary.get` took tens of microseconds)."""
    global _LAST
    last = _LAST
    if last is not None and last[0]() is pool:
        return last[1]
    with _REGIONS_LOCK:
        regions = _REGIONS.get(pool)
        if regions is None and direct(pool):
            regions = _REGIONS[pool] = PoolRegions(pool)
        _LAST = weakref.ref(pool, _forget), regions
        return regions


def _forget(ref: weakref.ref[KVPool]) -> None:
    """The last pool asked about is gone: drop its views, which would keep its memory alive."""
    global _LAST
    last = _LAST
    if last is not None and last[0] is ref:
        _LAST = None


class PoolSink:
    """Where a pull writes: reserved slots of a receiver's pool.

    `targets` gives the pool's own memory for the socket to fill (direct pools); otherwise
    the transport stages a layer and calls the sink, which writes through `KVPool.write`.
    """

    def __init__(self, pool: KVPool, slots: torch.Tensor, blocks: Sequence[int] | None = None,
                 block_size: int = 0):
        self.pool = pool
        self._slots = slots  # flattened on first use: nothing in a direct pull needs them
        self._blocks = (list(blocks), block_size) if blocks is not None else None  # runs by `block_runs`
        self._regions = regions_of(pool)
        self._runs: tuple[int, list[tuple[int, int]]] | None = None

    @property
    def capacity(self) -> int:
        return len(self._blocks[0]) * self._blocks[1] if self._blocks else int(self._slots.numel())

    @property
    def slots(self) -> torch.Tensor:
        return self._slots.reshape(-1).cpu()

    @property
    def direct(self) -> bool:
        return self._regions is not None

    @property
    def regions(self) -> PoolRegions | None:
        return self._regions

    def blocks_for_native(self) -> tuple[array.array[int], int]:
        """The reservation as (block ids, block size) in the int64 array the native receive reads
        (`kv.native`); a sink made from slots alone gives each slot as a block of one."""
        if self._blocks is not None:
            return array.array("q", self._blocks[0]), self._blocks[1]
        return array.array("q", self.slots.to(torch.int64).tolist()), 1

    def targets(self, layer: int, tokens: int) -> list[memoryview]:
        """The pool memory of the first `tokens` reserved slots in layer `layer`, in wire order."""
        if self._regions is None:
            raise ValueError("this pool is not written in place (sharded or on a GPU)")
        if self._runs is None or self._runs[0] != tokens:
            runs = block_runs(*self._blocks, tokens) if self._blocks else slot_runs(self.slots[:tokens])
            self._runs = (tokens, runs)
        return self._regions.layer_regions(layer, self._runs[1])

    def __call__(self, layer: int, tensor: torch.Tensor) -> None:
        tokens = int(tensor.shape[1])
        self.pool.write(layer, self.slots[:tokens], tensor)


def pool_sink(engine: object, reservation: object) -> PoolSink:
    """Write pulled (full-head) layers straight into a reservation's slots of the receiver's pool
    (`engine` an `Engine`, `reservation` its `Reservation`: typed loosely so this module does not
    import the engine)."""
    return PoolSink(engine.kv_pool, reservation.slot_table, reservation.blocks,  # type: ignore[attr-defined]
                    engine.allocator.block_size)  # type: ignore[attr-defined]
