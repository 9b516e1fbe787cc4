"""A Llama-family decoder (Llama, Mistral, Qwen2) in plain torch.

Module names mirror Hugging Face's `LlamaForCausalLM` so checkpoints load with a plain
`load_state_dict`. Two forward paths share every weight: `forward_step` reads and writes a
paged KV pool (what the engine runs) and `reference_logits` is the textbook uncached causal
forward that tests hold the engine against.

`place` spreads the model over a grid of local devices: pipeline stages (rows) take
contiguous, near-equal runs of layers, and within a stage each layer's attention and MLP are
tensor-sharded over the row's devices (`tensor_parallel`). The hidden state hops from stage
to stage on each row's first device, and each layer's KV cache lives with its shards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.config import ModelConfig
from disaggserve_worker.model.kv_pool import KVPool
from disaggserve_worker.model.layers import MLP, Attention, FusedLinear, RMSNorm, StepInputs
from disaggserve_worker.model.packed_linear import linear
from disaggserve_worker.model.rope import Rotary
from disaggserve_worker.model.tensor_parallel import ShardedAttention, ShardedMLP, check_divisible


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # Sharded by `LlamaForCausalLM.place` when its stage has more than one device.
        self.self_attn: Attention | ShardedAttention = Attention(config)
        self.mlp: MLP | ShardedMLP = MLP(config)
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
        # Per layer, the devices of its tensor shards (home first); None: all on `device`.
        self.layer_devices: list[tuple[torch.device, ...]] | None = None
        self.tensor_parallel = 1
        self.pipeline_parallel = 1
        self._placed_devices: list[torch.device] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first pipeline stage's first device."""
        return self.model.embed_tokens.weight.device

    @property
    def devices(self) -> list[torch.device]:
        """Every device the model computes on, in first-use order (read on every engine step,
        so a placed model answers from the list `place` made)."""
        if self._placed_devices is not None:
            return self._placed_devices
        return list(dict.fromkeys([self.device, self.lm_head.weight.device]))

    def place(self, grid: list[list[torch.device]]) -> LlamaForCausalLM:
        """Spread over `grid[stage][shard]`: len(grid) pipeline stages of near-equal contiguous
        layers, each layer tensor-sharded over its stage's len(grid[0]) devices.

        The grid may repeat a device (all `cpu` in tests): the sharded math is then exercised
        on one device. Sharding is one-way (the full weights are dropped), so place a freshly
        loaded model.
        """
        layers = self.config.num_hidden_layers
        if not 1 <= len(grid) <= layers:
            raise ValueError(f"pipeline size {len(grid)} must be between 1 and the layer count {layers}")
        tensor = len(grid[0])
        if tensor < 1 or any(len(row) != tensor for row in grid):
            raise ValueError(f"every pipeline stage needs the same number (>= 1) of tensor devices; "
                             f"got {[len(row) for row in grid]}")
        check_divisible(self.config, tensor)
        if self.tensor_parallel > 1:
            raise ValueError("this model is already tensor-sharded; place a freshly loaded model")
        first, last = grid[0][0], grid[-1][0]
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        self.model.embed_tokens.to(first)
        self.layer_devices = [tuple(grid[i * len(grid) // layers]) for i in range(layers)]
        for layer, devices in zip(self.model.layers, self.layer_devices, strict=True):
            if tensor == 1:
                layer.to(devices[0])
                continue
            layer.input_layernorm.to(devices[0])
            layer.post_attention_layernorm.to(devices[0])
            assert isinstance(layer.self_attn, Attention) and isinstance(layer.mlp, MLP)
            layer.self_attn = ShardedAttention(layer.self_attn, self.config, list(devices))
            layer.mlp = ShardedMLP(layer.mlp, self.config, list(devices))
        self.model.norm.to(last)
        if tied and first != last:  # one tensor cannot live on two devices: the head gets a copy
            self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.detach().to(last),
                                               requires_grad=False)
        else:
            self.lm_head.to(last)
        self.tensor_parallel, self.pipeline_parallel = tensor, len(grid)
        self._placed_devices = list(dict.fromkeys(d for row in grid for d in row))
        return self

    def _layer_devices(self, index: int) -> tuple[torch.device, ...]:
        return self.layer_devices[index] if self.layer_devices else (self.device,)

    def projections(self) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
        """Every projection a forward step runs, as (call on the packed input rows, its weight):
        the fused ones (QKV, gate/up) as fused, the other `nn.Linear`s alone (`packed_linear.warm`)."""
        fused: list[FusedLinear] = [value for module in self.modules() for value in vars(module).values()
                                    if isinstance(value, FusedLinear)]
        inside = {id(lin) for group in fused for lin in group.linears}
        calls: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = []
        calls.extend((group.fused, group.fused_weight) for group in fused)
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in inside:
                calls.append((lambda x, m=module: linear(x, m.weight, m.bias), module.weight))
        return calls

    def new_kv_pool(self, slots: int) -> KVPool:
        """Per layer, (2, slots, kv_heads/T, head_dim) per shard on that shard's device, model dtype."""
        c = self.config
        heads = c.kv_heads // self.tensor_parallel
        return KVPool([[torch.zeros(2, slots, heads, c.dim_per_head, dtype=self.dtype, device=device)
                        for device in self._layer_devices(i)] for i in range(c.num_hidden_layers)])

    def kv_bytes_per_token(self) -> dict[torch.device, int]:
        """KV-cache bytes one token slot costs on each device (what sizes the pool per device)."""
        c = self.config
        shard = 2 * (c.kv_heads // self.tensor_parallel) * c.dim_per_head * self.dtype.itemsize
        out: dict[torch.device, int] = {}
        for i in range(c.num_hidden_layers):
            for device in self._layer_devices(i):
                out[device] = out.get(device, 0) + shard
        return out

    def synchronize(self) -> None:
        """Wait for every CUDA device's queued work, so a timing measures the GPU work itself."""
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    @torch.inference_mode()
    def forward_step(self, input_ids: torch.Tensor, layout: BatchLayout, kv_pool: KVPool,
                     all_logits: bool = False) -> torch.Tensor:
        """Logits of each sequence's last new token (B, vocab), or of every packed token."""
        x = self.model.embed_tokens(input_ids.to(self.device))
        inputs: dict[torch.device, StepInputs] = {}

        def on(device: torch.device) -> StepInputs:  # the step's layout and rotary, once per device
            if device not in inputs:
                here = layout if layout.positions.device == device else layout.to(device)
                limit = max(here.context_lens) if here.context_lens else None  # no read-back of positions
                inputs[device] = StepInputs(here, *self.rotary.cos_sin(here.positions, x.dtype, limit))
            return inputs[device]

        # The residual stream `x` is summed in place; each block's output waits as `delta` until
        # the next norm adds it in the same pass (`RMSNorm.add_forward`).
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self.model.layers):
            devices = self._layer_devices(i)
            caches = kv_pool.layer(i)
            if x.device != devices[0]:  # a pipeline stage boundary: the sum moves, complete
                x = (x if delta is None else x.add_(delta)).to(devices[0])
                delta = None
            h = layer.input_layernorm.add_forward(x, delta)
            if isinstance(layer.self_attn, ShardedAttention):
                delta = layer.self_attn.forward_step(h, [on(d) for d in devices], caches)
            else:
                delta = layer.self_attn.forward_step(h, on(devices[0]), caches[0])
            delta = layer.mlp(layer.post_attention_layernorm.add_forward(x, delta))
        head = self.lm_head.weight.device
        pick = not all_logits and layout.max_query > 1  # one token per sequence: every row is a last one
        if delta is not None and (pick or x.device != head):
            x, delta = x.add_(delta), None
        x = x.to(head)
        if pick:
            x = x[layout.last_index.to(x.device)]
        return linear(self.model.norm.add_forward(x, delta), self.lm_head.weight).float()

    @torch.inference_mode()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Uncached full-sequence forward of one sequence: (T,) ids -> (T, vocab) fp32 logits."""
        x = self.model.embed_tokens(input_ids.to(self.device))
        positions = torch.arange(input_ids.shape[0])
        for i, layer in enumerate(self.model.layers):
            devices = self._layer_devices(i)
            x = x.to(devices[0])
            tables = [self.rotary.cos_sin(positions.to(d), x.dtype, int(input_ids.shape[0])) for d in devices]
            h = layer.input_layernorm(x)
            if isinstance(layer.self_attn, ShardedAttention):
                x = x + layer.self_attn.forward_reference(h, tables, self.sliding_window)
            else:
                x = x + layer.self_attn.forward_reference(h, *tables[0], self.sliding_window)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return linear(self.model.norm(x.to(self.lm_head.weight.device)), self.lm_head.weight).float()
