"""Paged KV-cache bookkeeping: fixed-size blocks of token slots in one preallocated pool.

(The storage — per layer, one tensor per tensor-parallel shard, all indexed by the same slot
numbers — is `model.kv_pool.KVPool`; this module only hands out slots.)

Why paged: the pool is preallocated, so a sequence of any length fits without
fragmentation and without reallocating; a KV transfer writes straight into the receiver's
slots. Why reserve the whole request (prompt + max_tokens) at admission: the engine then
never has to preempt or swap a running sequence when memory runs out mid-decode — admission
is the one place that says "no room", which is also what decode backpressure needs.
"""

from __future__ import annotations

import threading
from collections import deque

import torch


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._lock = threading.Lock()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def try_allocate(self, tokens: int) -> list[int] | None:
        need = self.blocks_for(tokens)
        with self._lock:
            if need > len(self._free):
                return None
            return [self._free.popleft() for _ in range(need)]

    def free(self, blocks: list[int]) -> None:
        with self._lock:
            self._free.extend(blocks)

    def slot_table(self, blocks: list[int], device: torch.device | None = None) -> torch.Tensor:
        """Pool slot of each position the blocks cover, in order."""
        base = torch.tensor(blocks, dtype=torch.long)[:, None] * self.block_size
        return (base + torch.arange(self.block_size)).flatten().to(device or "cpu")
