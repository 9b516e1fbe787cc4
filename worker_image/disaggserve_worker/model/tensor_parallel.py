"""Tensor parallelism inside one process: a decoder layer's attention and MLP split over T devices.

Megatron-style: q/k/v_proj and gate/up_proj are split by output rows (whole heads, whole
intermediate slices), o_proj and down_proj by input columns, so each shard computes a
*partial* of the sublayer's output from the full hidden state with no communication in
between. The partials are summed on the stage's first ("home") device — the all-reduce — and
the residual stream, norms, embedding and lm_head stay unsharded there; the next sublayer's
normalised input is copied back out to every shard device.

Why one process and no process group / NCCL: the engine, its paged KV pool, the speculator and
the KV transport stay exactly as they are for one GPU (one Python thread drives every device),
and CUDA launches are asynchronous, so the shards' kernels still overlap across GPUs; the
device-to-device copies are enqueued without blocking the host. What it costs: every shard's
kernels are launched from the same thread, so launch overhead grows with T and dominates at
small decode batches, and the reduction is T-1 peer copies plus adds instead of one NCCL
all-reduce. Multi-process NCCL with CUDA graphs is the follow-up when that overhead matters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from disaggserve_worker.model.config import ModelConfig
from disaggserve_worker.model.errors import ModelLoadError
from disaggserve_worker.model.layers import MLP, Attention, StepInputs


def check_divisible(config: ModelConfig, tensor: int) -> None:
    """Heads and intermediate size must split evenly: a shard holds whole heads (and whole KV
    heads, so each query head's KV head lives on its own device)."""
    sizes = {"attention heads": config.num_attention_heads, "KV heads": config.kv_heads,
             "intermediate size": config.intermediate_size}
    if all(size % tensor == 0 for size in sizes.values()):
        return
    common = math.gcd(*sizes.values())
    working = [str(t) for t in range(1, min(common, 64) + 1) if common % t == 0]
    raise ModelLoadError(
        f"tensor parallel size {tensor} does not divide the model's "
        + ", ".join(f"{size} {label}" for label, size in sizes.items())
        + f"; sizes that divide all three: {', '.join(working)} (set the phase's tensor size to one "
        "of them that the operator accepts: 1, 2, 4 or 8)")


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A shard's own contiguous storage: the full weight it was cut from can then be freed."""
    return t.to(device, copy=True).contiguous()


def _split_rows(linear: nn.Linear, parts: int, rank: int, device: torch.device, prefix: str
                ) -> dict[str, torch.Tensor]:
    rows = linear.out_features // parts
    out = {f"{prefix}.weight": _copy(linear.weight[rank * rows:(rank + 1) * rows], device)}
    if linear.bias is not None:
        out[f"{prefix}.bias"] = _copy(linear.bias[rank * rows:(rank + 1) * rows], device)
    return out


def _split_columns(linear: nn.Linear, parts: int, rank: int, device: torch.device, prefix: str
                   ) -> dict[str, torch.Tensor]:
    cols = linear.in_features // parts
    out = {f"{prefix}.weight": _copy(linear.weight[:, rank * cols:(rank + 1) * cols], device)}
    if linear.bias is not None and rank == 0:  # added once, by the first shard
        out[f"{prefix}.bias"] = _copy(linear.bias, device)
    return out


def _shard(module: type[Attention] | type[MLP], full: nn.Module, config: ModelConfig,
           devices: list[torch.device], rows: tuple[str, ...], columns: tuple[str, ...]) -> nn.ModuleList:
    """One `module` per device, built from `full`'s weights: `rows` projections split by output,
    `columns` projections by input."""
    parts, shards = len(devices), []
    for rank, device in enumerate(devices):
        state: dict[str, torch.Tensor] = {}
        for name in rows:
            state.update(_split_rows(getattr(full, name), parts, rank, device, name))
        for name in columns:
            state.update(_split_columns(getattr(full, name), parts, rank, device, name))
        with torch.device("meta"):
            shard = module(config, parts, rank)
        shard.load_state_dict(state, assign=True, strict=True)
        shards.append(shard.requires_grad_(False))
    return nn.ModuleList(shards)


def _reduce(partials: list[torch.Tensor], home: torch.device) -> torch.Tensor:
    """Sum the shards' partial outputs on the home device (the first partial is already there)."""
    out = partials[0]
    for partial in partials[1:]:
        # Peer copies are ordered against both devices' streams by torch; non_blocking keeps the
        # host free to launch the next shard's kernels meanwhile.
        out = out + partial.to(home, non_blocking=True)
    return out


class ShardedAttention(nn.Module):
    """Attention over `devices`, shard r holding heads r*H/T.. and KV heads r*KVH/T.. (GQA groups
    stay whole: query head h reads KV head h // (H/KVH), which falls in the same shard)."""

    def __init__(self, full: Attention, config: ModelConfig, devices: list[torch.device]):
        super().__init__()
        self.shards = _shard(Attention, full, config, devices, ("q_proj", "k_proj", "v_proj"), ("o_proj",))
        self.devices = list(devices)

    def forward_step(self, x: torch.Tensor, steps: list[StepInputs], caches: list[torch.Tensor]
                     ) -> torch.Tensor:
        """x on the home device; steps and caches: one per shard, on that shard's device."""
        partials = [shard.forward_step(x.to(device, non_blocking=True), step, cache)
                    for shard, device, step, cache in zip(self.shards, self.devices, steps, caches,
                                                          strict=True)]
        return _reduce(partials, x.device)

    def forward_reference(self, x: torch.Tensor, tables: list[tuple[torch.Tensor, torch.Tensor]],
                          window: int | None) -> torch.Tensor:
        partials = [shard.forward_reference(x.to(device, non_blocking=True), cos, sin, window)
                    for shard, device, (cos, sin) in zip(self.shards, self.devices, tables, strict=True)]
        return _reduce(partials, x.device)


class ShardedMLP(nn.Module):
    """The gated MLP over `devices`, shard r holding intermediate columns r*I/T..(r+1)*I/T."""

    def __init__(self, full: MLP, config: ModelConfig, devices: list[torch.device]):
        super().__init__()
        self.shards = _shard(MLP, full, config, devices, ("gate_proj", "up_proj"), ("down_proj",))
        self.devices = list(devices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partials = [shard(x.to(device, non_blocking=True))
                    for shard, device in zip(self.shards, self.devices, strict=True)]
        return _reduce(partials, x.device)
