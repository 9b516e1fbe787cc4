"""How many KV-cache token slots a worker gets when `--kv-cache-tokens` is not given."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

GPU_FREE_FRACTION = 0.85
CPU_AVAILABLE_FRACTION = 0.10
CPU_MAX_TOKENS = 131_072


def auto_kv_cache_tokens(bytes_per_token: Mapping[torch.device, int]) -> int:
    """Slots that fit the memory free *after* the weights are loaded.

    `bytes_per_token`: what one slot costs on each device (`LlamaForCausalLM.kv_bytes_per_token`:
    a pipeline stage's layers, each shard holding KV heads / T of them), so every device
    of every stage and shard is asked and the tightest one decides.
    GPU: a fixed share of what CUDA reports free (activations and the allocator need the rest).
    CPU: a tenth of available RAM, capped, so a laptop run does not swap.
    """
    devices = list(bytes_per_token)
    total = sum(bytes_per_token.values())
    if devices[0].type == "cuda":
        tokens = min(int(torch.cuda.mem_get_info(d)[0] * GPU_FREE_FRACTION) // bytes_per_token[d]
                     for d in devices)
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        tokens = min(int(available * CPU_AVAILABLE_FRACTION) // total, CPU_MAX_TOKENS)
    if tokens < 256:
        raise MemoryError(f"only {tokens} KV-cache tokens fit in free {devices[0].type} memory "
                          f"({total} bytes per token over {len(devices)} device(s)); free memory or "
                          "pass --kv-cache-tokens")
    return tokens
