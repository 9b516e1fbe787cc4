"""The paged KV pool's storage: per layer, one tensor per tensor-parallel shard.

Layer i's cache is split by KV heads over the devices of its shards (shard r holds KV heads
r*KVH/T..(r+1)*KVH/T-1, the ones its attention heads read), each a (2, slots, KVH/T, head_dim)
tensor; with T = 1 that is the single full-head tensor the engine always had.

Everything outside the model that moves KV (the TCP transport, tests) goes through `read` and
`write`, which speak full-head tensors (2, tokens, KVH, head_dim): the wire format does not
depend on T, so a tensor-2 prefill worker hands off to a tensor-1 decode worker and back.
With T = 1 they are the plain index_select / index_copy_ they replace — no extra copies.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(self, layers: list[list[torch.Tensor]]):
        if not layers or any(not shards for shards in layers):
            raise ValueError("a KV pool needs at least one layer with at least one shard")
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> list[torch.Tensor]:
        """Layer `index`'s shard tensors, in shard order."""
        return self.layers[index]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][0].dtype

    @property
    def is_cuda(self) -> bool:
        return self.layers[0][0].is_cuda

    @property
    def kv_heads(self) -> int:
        return sum(int(shard.shape[2]) for shard in self.layers[0])

    @property
    def head_dim(self) -> int:
        return int(self.layers[0][0].shape[3])

    def read(self, layer: int, slots: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """(2, len(slots), KVH, head_dim) of `slots`, on `device` (default: the first shard's)."""
        shards = self.layers[layer]
        device = device or shards[0].device
        # Never non_blocking into host memory: the caller would read it before the copy lands.
        async_copy = device.type != "cpu"
        parts = [shard.index_select(1, slots.to(shard.device)).to(device, non_blocking=async_copy)
                 for shard in shards]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store full-head `values` (2, len(slots), KVH, head_dim) into `slots`, head slices to shards."""
        shards = self.layers[layer]
        start = 0
        for shard in shards:
            heads = int(shard.shape[2])
            part = values if len(shards) == 1 else values[:, :, start:start + heads]
            shard.index_copy_(1, slots.to(shard.device), part.to(shard.device))
            start += heads
