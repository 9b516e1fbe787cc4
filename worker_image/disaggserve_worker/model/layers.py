"""The sublayers of a Llama-family decoder layer: RMSNorm, attention over a paged KV cache, MLP.

Attention and MLP take `parts`/`rank` so one class builds both the whole sublayer and one
tensor-parallel shard of it (`parts` heads-groups / intermediate slices, `rank` picks which):
a shard is the same computation on fewer heads or columns, so the engine's single attention
path, and its equality with the uncached reference, holds for every shard by construction.
Output biases (o_proj, down_proj) live only in rank 0, so summing the shards' partial
outputs adds them exactly once.

Q/K/V and gate/up run as one matmul each (`FusedLinear`): on first use their weights are
concatenated into one tensor and the checkpoint-named parameters become views into it, so
checkpoints still load by name, tensor-parallel sharding still slices the named
projections (each shard fuses its own slices), and no weight is stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from disaggserve_worker.model import cpu_kernels
from disaggserve_worker.model.batch import BatchLayout, DecodeGroups
from disaggserve_worker.model.config import ModelConfig
from disaggserve_worker.model.packed_linear import linear
from disaggserve_worker.model.rope import apply_rotary

# Gathered keys + values per decode group on a CPU (`BatchLayout.decode_groups`): small enough
# to stay near the cache between the gather and the attention that reads it, and far under
# glibc's 32 MiB mmap ceiling. Measured at batch 8-64 of 1-2k-token contexts: 2-16 MiB alike
# (8 MiB best by a little); one group of the whole batch was 2-5x slower.
CPU_DECODE_GROUP_BYTES = 8 << 20
# A CPU MLP runs a step's rows in chunks whose fused gate/up output is at most this many bytes,
# under glibc's highest mmap threshold (32 MiB). Why: glibc serves a larger allocation with a fresh
# mmap, which the kernel faults in and zeroes page by page every time it is made, and which CPU
# time counts: medium-llama's gate/up output of a 2048-token prefill step is 46 MB.
CPU_MLP_CHUNK_BYTES = 30 << 20


@dataclass
class StepInputs:
    """One forward step's layout and rotary tables, on one device (each device gets its copy)."""

    layout: BatchLayout
    cos: torch.Tensor
    sin: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.usable(x, self.weight) and (lib := cpu_kernels.kernel()) is not None:
            return cpu_kernels.rms_norm(lib, x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one call instead of seven ops (on a CPU it still runs them); fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32 like the reference implementation; bf16 variance loses too much.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """The residual add, then this norm: `x += delta` in place (None: nothing to add), and the
        norm of the sum. One C pass on a CPU instead of an add, its allocation and the norm."""
        if delta is None:
            return self(x)
        if cpu_kernels.usable(x, delta, self.weight) and (lib := cpu_kernels.kernel()) is not None:
            return cpu_kernels.add_rms_norm(lib, x, delta, self.weight, self.eps)
        return self(x.add_(delta))


class FusedLinear:
    """One matmul for several `nn.Linear`s that read the same input (outputs concatenated)."""

    def __init__(self, *linears: nn.Linear):
        self.linears = linears
        self.sizes = [int(lin.out_features) for lin in linears]
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._ptrs: list[tuple[int, int]] = []

    def _fuse(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([lin.weight.detach() for lin in self.linears])
            biases = [lin.bias for lin in self.linears]
            bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
            start = 0
            for lin, size in zip(self.linears, self.sizes, strict=True):
                lin.weight.data = weight[start:start + size]
                if bias is not None:
                    lin.bias.data = bias[start:start + size]
                start += size
        self._weight, self._bias = weight, bias
        self._ptrs = self._current()

    def _current(self) -> list[tuple[int, int]]:
        """Each named weight's storage and version. The version too: a checkpoint loaded in place
        writes through the named parameters, whose version counters are their own (not the fused
        tensor's), so only theirs tells that the fused weight, and oneDNN's packed copy of it
        (`packed_linear.packed`, keyed by the fused tensor's version), are stale."""
        # `_parameters[...]`, not `.weight`: nn.Module.__getattr__ costs more than the check.
        return [(w.data_ptr(), w._version) for w in (lin._parameters["weight"] for lin in self.linears)]  # type: ignore[union-attr]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fused(x).split(self.sizes, dim=-1))

    @property
    def fused_weight(self) -> torch.Tensor:
        """The concatenated weight (fused on first use: `fused`)."""
        if self._weight is None:
            self._fuse()
        assert self._weight is not None
        return self._weight

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated outputs, (..., sum of sizes)."""
        # Re-fuse if a parameter was replaced (moved to a device, reloaded into new storage) or
        # written in place.
        if self._weight is None or self._current() != self._ptrs:
            self._fuse()
        return linear(x, self._weight, self._bias)  # type: ignore[arg-type]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, parts: int = 1, rank: int = 0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads // parts, config.kv_heads // parts, config.dim_per_head)
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        # Llama's `attention_bias` covers o_proj too; Qwen2 biases only q/k/v.
        self.o_proj = nn.Linear(self.heads * self.head_dim, h,
                                bias=bias and config.model_type != "qwen2" and rank == 0)
        self.qkv_proj = FusedLinear(self.q_proj, self.k_proj, self.v_proj)  # not a module: no new names

    def _qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated Q and K and V, (T, heads, D) each, of the fused projection's rows."""
        # Q and K are adjacent in the fused output: one rotary over both heads' sets (its six ops
        # ran twice per layer before).
        t, qk_heads = qkv.shape[0], self.heads + self.kv_heads
        if cpu_kernels.usable(qkv, cos, sin) and (lib := cpu_kernels.kernel()) is not None:
            cpu_kernels.rotary_(lib, qkv, qk_heads, self.head_dim, cos, sin)
            qk = qkv[:, :qk_heads * self.head_dim].view(t, qk_heads, self.head_dim)
        else:
            qk = apply_rotary(qkv[:, :qk_heads * self.head_dim].view(t, qk_heads, self.head_dim), cos, sin)
        v = qkv[:, qk_heads * self.head_dim:].view(t, self.kv_heads, self.head_dim)
        # Contiguous again: strided Q/K slowed the prefill kernels more than the copy costs.
        return qk[:, :self.heads].contiguous(), qk[:, self.heads:].contiguous(), v

    def forward_step(self, x: torch.Tensor, step: StepInputs, layer_cache: torch.Tensor) -> torch.Tensor:
        """x: (T, hidden) packed; layer_cache: (2, slots, kv_heads, head_dim), written in place."""
        layout = step.layout
        qkv = self.qkv_proj.fused(x)
        if (cpu_kernels.supports(qkv, layer_cache) and cpu_kernels.usable(qkv, step.cos, step.sin)
                and layout.write_slots.is_contiguous() and (lib := cpu_kernels.kernel()) is not None):
            # Rotary, the query copy and the K/V writes to the pool in one C call; attention then
            # reads keys and values from the pool (the kernels' paths), so no k and v are made.
            q = cpu_kernels.rotary_cache(lib, qkv, self.heads, self.kv_heads, self.head_dim, step.cos, step.sin,
                                         layer_cache, layout.write_slots)
            return linear(self._attention(q, None, None, layout, layer_cache), self.o_proj.weight, self.o_proj.bias)
        q, k, v = self._qkv(qkv, step.cos, step.sin)
        k, v = k.to(layer_cache.dtype), v.to(layer_cache.dtype)
        # index_copy_/index_select, not advanced indexing: several times faster on CPU.
        layer_cache[0].index_copy_(0, layout.write_slots, k)
        layer_cache[1].index_copy_(0, layout.write_slots, v)
        return linear(self._attention(q, k, v, layout, layer_cache), self.o_proj.weight, self.o_proj.bias)

    def _attention(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layout: BatchLayout,
                   layer_cache: torch.Tensor) -> torch.Tensor:
        """(T, H * D) attention output of the step's packed queries (K/V already in the pool;
        `k`, `v`: this step's own, which only the fresh-prompt path reads, or None)."""
        t = q.shape[0]
        if layout.parts is not None:  # a mixed step: its decode rows and its prompt chunks apart
            decode, prompts = layout.parts
            d = decode.num_seqs
            if k is None or v is None:
                return torch.cat([self._attention(q[:d], None, None, decode, layer_cache),
                                  self._attention(q[d:], None, None, prompts, layer_cache)])
            return torch.cat([self._attention(q[:d], k[:d], v[:d], decode, layer_cache),
                              self._attention(q[d:], k[d:], v[d:], prompts, layer_cache)])
        if layout.max_query == 1:  # pure decode: one query per sequence, no padding to undo
            if (layout.span_starts is not None and layout.span_ends is not None
                    and cpu_kernels.supports(q, layer_cache) and (kernel := cpu_kernels.kernel()) is not None):
                return cpu_kernels.decode(kernel, q, layer_cache, layout.context_slots, layout.span_starts,
                                            layout.span_ends).reshape(t, -1)
            groups = None
            if layer_cache.device.type == "cpu":
                token_bytes = 2 * self.kv_heads * self.head_dim * layer_cache.element_size()
                groups = layout.decode_groups(max(1, CPU_DECODE_GROUP_BYTES // token_bytes))
            if groups is not None:
                return self._grouped_decode(q, layer_cache, groups)
            out = self._attend(q, layer_cache, layout.context_slots.reshape(-1), layout.num_seqs, layout.attn_mask)
            return out.reshape(t, -1)
        if (layout.spans is not None and cpu_kernels.supports(q, layer_cache)
                and (kernel := cpu_kernels.kernel()) is not None):
            return cpu_kernels.prompt(kernel, q, layer_cache, layout.context_slots, layout.spans,
                                      layout.window).reshape(t, -1)
        if layout.fresh and k is not None and v is not None:
            return self._attend_fresh(q, k, v, layout).reshape(t, -1)
        batch, context = layout.context_slots.shape
        keys, values = self._gather(layer_cache, layout.context_slots.reshape(-1), batch, context)
        padded = q.new_zeros(layout.num_seqs, layout.max_query, self.heads, self.head_dim)
        padded[layout.seq_index, layout.q_index] = q
        out = F.scaled_dot_product_attention(padded.transpose(1, 2), keys, values,
                                             attn_mask=layout.attn_mask, enable_gqa=True)
        return out.transpose(1, 2)[layout.seq_index, layout.q_index].reshape(t, -1)  # (T, H * D)

    def _attend_fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        """Prompts with nothing cached attend only to this step's own tokens: causal attention on
        the step's K/V (what was just written to the pool), with no gather from the pool and no
        explicit mask, so the kernel skips the masked upper half instead of computing and masking
        it (on a CPU that half was ~55 % of a 1024-token prompt's attention). Padded rows of
        shorter prompts attend padding and are dropped; their real rows only see real keys."""
        if layout.num_seqs == 1:
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            return out[0].transpose(0, 1)
        shape = (layout.num_seqs, layout.max_query)
        padded = [t.new_zeros(*shape, t.shape[1], t.shape[2]) for t in (q, k, v)]
        for dst, src in zip(padded, (q, k, v), strict=True):
            dst[layout.seq_index, layout.q_index] = src
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in padded), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)[layout.seq_index, layout.q_index]

    def _gather(self, layer_cache: torch.Tensor, flat_slots: torch.Tensor, batch: int, context: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `batch` padded contexts, (B, KVH, K, D) each, in one gather."""
        kv = layer_cache.index_select(1, flat_slots).view(2, batch, context, self.kv_heads, self.head_dim)
        return kv[0].transpose(1, 2), kv[1].transpose(1, 2)

    def _attend(self, q: torch.Tensor, layer_cache: torch.Tensor, flat_slots: torch.Tensor, batch: int,
                mask: torch.Tensor) -> torch.Tensor:
        """One query per sequence, q (B, H, D), over its gathered context: (B, H, D).

        The query heads that share a KV head are that head's query rows, (B, KVH, H/KVH, D), so the
        kernel reads each gathered key once per KV head. `enable_gqa` instead expands K and V to
        every query head; on a CPU that made a 32-sequence decode step's attention 4.7x slower
        (7.1 vs 1.5 ms a layer at 150-token contexts)."""
        keys, values = self._gather(layer_cache, flat_slots, batch, mask.shape[-1])
        grouped = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask).view(
            batch, self.heads, self.head_dim)

    def _grouped_decode(self, q: torch.Tensor, layer_cache: torch.Tensor, groups: DecodeGroups) -> torch.Tensor:
        outs = [self._attend(q.index_select(0, g.rows), layer_cache, g.context_slots,
                             int(g.rows.numel()), g.attn_mask).reshape(int(g.rows.numel()), -1)
                for g in groups.groups]
        return torch.cat(outs).index_select(0, groups.inverse)

    def forward_reference(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          window: int | None) -> torch.Tensor:
        q, k, v = self._qkv(self.qkv_proj.fused(x), cos, sin)
        t = x.shape[0]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if window is not None:
            mask &= ~torch.ones_like(mask).tril(-window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
        return linear(out[0].transpose(0, 1).reshape(t, -1), self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, parts: int = 1, rank: int = 0):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size // parts, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias and rank == 0)
        self.gate_up_proj = FusedLinear(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """On a CPU, a prefill step's rows in chunks whose gate/up output stays within
        CPU_MLP_CHUNK_BYTES (each row's result does not depend on the others)."""
        rows = int(x.shape[0]) if x.dim() == 2 else 0
        if rows > 1 and x.device.type == "cpu":
            per = CPU_MLP_CHUNK_BYTES // (sum(self.gate_up_proj.sizes) * x.element_size())
            per = per // 64 * 64 if per >= 64 else max(1, per)  # whole blocks of the GEMM's rows
            if rows > per:
                return torch.cat([self._rows(x[i:i + per]) for i in range(0, rows, per)])
        return self._rows(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.fused(x)
        if cpu_kernels.usable(gate_up) and (lib := cpu_kernels.kernel()) is not None:
            return linear(cpu_kernels.silu_mul(lib, gate_up), self.down_proj.weight, self.down_proj.bias)
        gate, up = gate_up.split(self.gate_up_proj.sizes, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj.weight, self.down_proj.bias)
