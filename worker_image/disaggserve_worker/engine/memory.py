"""How many KV-cache token slots a worker gets when `--kv-cache-tokens` is not given."""

from __future__ import annotations

import os

import torch

from disaggserve_worker.model.config import ModelConfig

GPU_FREE_FRACTION = 0.85
CPU_AVAILABLE_FRACTION = 0.10
CPU_MAX_TOKENS = 131_072


def auto_kv_cache_tokens(config: ModelConfig, dtype: torch.dtype,
                         layer_devices: list[torch.device]) -> int:
    """Slots that fit the memory free *after* the weights are loaded.

    GPU: a fixed share of what CUDA reports free (activations and the allocator need the rest),
    on every pipeline stage for the layers it holds; the tightest stage decides.
    CPU: a tenth of available RAM, capped, so a laptop run does not swap.
    """
    per_token = config.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size())
    if layer_devices[0].type == "cuda":
        per_layer = per_token // config.num_hidden_layers
        tokens = min(int(torch.cuda.mem_get_info(d)[0] * GPU_FREE_FRACTION)
                     // (per_layer * layer_devices.count(d)) for d in set(layer_devices))
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        tokens = min(int(available * CPU_AVAILABLE_FRACTION) // per_token, CPU_MAX_TOKENS)
    if tokens < 256:
        raise MemoryError(f"only {tokens} KV-cache tokens fit in free {layer_devices[0].type} memory "
                          f"({per_token} bytes per token); free memory or pass --kv-cache-tokens")
    return tokens
