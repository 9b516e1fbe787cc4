"""A Llama-family decoder (Llama, Mistral, Qwen2) in plain torch.

Module names mirror Hugging Face's `LlamaForCausalLM` so checkpoints load with a plain
`load_state_dict`. Two forward paths share every weight: `forward_step` reads and writes a
paged KV pool (what the engine runs) and `reference_logits` is the textbook uncached causal
forward that tests hold the engine against.

Pipeline parallelism (`place`) splits the layers into contiguous stages on local devices;
the hidden state hops from stage to stage and each layer's KV cache lives on its stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.config import ModelConfig
from disaggserve_worker.model.rope import Rotary, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation; bf16 variance loses too much.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.kv_heads, config.dim_per_head)
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        # Llama's `attention_bias` covers o_proj too; Qwen2 biases only q/k/v.
        self.o_proj = nn.Linear(self.heads * self.head_dim, h,
                                bias=bias and config.model_type != "qwen2")

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        return q, k, v

    def forward_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     layout: BatchLayout, layer_cache: torch.Tensor) -> torch.Tensor:
        """x: (T, hidden) packed; layer_cache: (2, slots, kv_heads, head_dim), written in place."""
        q, k, v = self._qkv(x, cos, sin)
        # index_copy_/index_select, not advanced indexing: several times faster on CPU.
        layer_cache[0].index_copy_(0, layout.write_slots, k.to(layer_cache.dtype))
        layer_cache[1].index_copy_(0, layout.write_slots, v.to(layer_cache.dtype))
        batch, context = layout.context_slots.shape
        flat = layout.context_slots.reshape(-1)
        keys = layer_cache[0].index_select(0, flat).view(batch, context, self.kv_heads, self.head_dim)
        values = layer_cache[1].index_select(0, flat).view(batch, context, self.kv_heads, self.head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (B, KVH, K, D)
        padded = q.new_zeros(layout.num_seqs, layout.max_query, self.heads, self.head_dim)
        padded[layout.seq_index, layout.q_index] = q
        out = F.scaled_dot_product_attention(padded.transpose(1, 2), keys, values,
                                             attn_mask=layout.attn_mask, enable_gqa=True)
        out = out.transpose(1, 2)[layout.seq_index, layout.q_index]  # (T, H, D)
        return self.o_proj(out.reshape(x.shape[0], -1))

    def forward_reference(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          window: int | None) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        t = x.shape[0]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if window is not None:
            mask &= ~torch.ones_like(mask).tril(-window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
        return self.o_proj(out[0].transpose(0, 1).reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self.sliding_window = config.effective_sliding_window
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.layer_devices: list[torch.device] | None = None  # None: everything on one device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first pipeline stage."""
        return self.model.embed_tokens.weight.device

    def place(self, stage_devices: list[torch.device]) -> LlamaForCausalLM:
        """Split the layers into len(stage_devices) contiguous, near-equal stages."""
        layers = self.config.num_hidden_layers
        if not 1 <= len(stage_devices) <= layers:
            raise ValueError(f"pipeline size {len(stage_devices)} must be between 1 and the layer "
                             f"count {layers}")
        first, last = stage_devices[0], stage_devices[-1]
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        self.model.embed_tokens.to(first)
        self.layer_devices = [stage_devices[i * len(stage_devices) // layers] for i in range(layers)]
        for layer, device in zip(self.model.layers, self.layer_devices, strict=True):
            layer.to(device)
        self.model.norm.to(last)
        if tied and first != last:  # one tensor cannot live on two devices: the head gets a copy
            self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.detach().to(last),
                                               requires_grad=False)
        else:
            self.lm_head.to(last)
        return self

    def _layer_device(self, index: int) -> torch.device:
        return self.layer_devices[index] if self.layer_devices else self.device

    def new_kv_pool(self, slots: int) -> list[torch.Tensor]:
        """Per layer, (2, slots, kv_heads, head_dim) on that layer's device, model dtype."""
        c = self.config
        return [torch.zeros(2, slots, c.kv_heads, c.dim_per_head, dtype=self.dtype,
                            device=self._layer_device(i)) for i in range(c.num_hidden_layers)]

    @torch.inference_mode()
    def forward_step(self, input_ids: torch.Tensor, layout: BatchLayout, kv_pool: list[torch.Tensor],
                     all_logits: bool = False) -> torch.Tensor:
        """Logits of each sequence's last new token (B, vocab), or of every packed token."""
        x = self.model.embed_tokens(input_ids.to(self.device))
        stages: dict[torch.device, tuple[BatchLayout, torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(self.model.layers):
            device = self._layer_device(i)
            if device not in stages:
                here = layout if layout.positions.device == device else layout.to(device)
                stages[device] = (here, *self.rotary.cos_sin(here.positions, x.dtype))
            here, cos, sin = stages[device]
            x = x.to(device)
            x = x + layer.self_attn.forward_step(layer.input_layernorm(x), cos, sin, here, kv_pool[i])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x.to(self.lm_head.weight.device)
        if not all_logits:
            x = x[layout.last_index.to(x.device)]
        return self.lm_head(self.model.norm(x)).float()

    @torch.inference_mode()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Uncached full-sequence forward of one sequence: (T,) ids -> (T, vocab) fp32 logits."""
        x = self.model.embed_tokens(input_ids.to(self.device))
        positions = torch.arange(input_ids.shape[0])
        for i, layer in enumerate(self.model.layers):
            x = x.to(self._layer_device(i))
            cos, sin = self.rotary.cos_sin(positions.to(x.device), x.dtype)
            x = x + layer.self_attn.forward_reference(layer.input_layernorm(x), cos, sin,
                                                      self.sliding_window)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.model.norm(x.to(self.lm_head.weight.device))).float()
