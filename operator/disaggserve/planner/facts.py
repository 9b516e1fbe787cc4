"""Model architecture facts the planner needs: what divides what, and what fits in memory.

Tensor parallelism splits attention heads (and KV heads), pipeline parallelism splits layers,
and an instance must hold its share of the weights plus room for KV cache. The facts come
from `spec.model.facts`, else a profile's `model_facts`, else the table below (published
architectures), in that order: what the user wrote wins. The bytes per weight and KV element
follow `spec.model.dtype` when the user chose one (`with_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from disaggserve.api.spec import ModelFacts, ModelSpec

GIB = 1024**3
# Bytes per element of each dtype `spec.model.dtype` can name (auto: whatever the facts say).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Share of GPU memory the engine may use (the rest is CUDA context, activations, fragmentation);
# vLLM's default gpu_memory_utilization is the same number.
MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class Facts:
    layers: int
    attention_heads: int
    kv_heads: int
    hidden_size: int
    parameters: int
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> int:
        return self.parameters * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 · layers · kv_heads · head_dim · bytes (docs/planner-method.md)."""
        head_dim = self.hidden_size // self.attention_heads
        return 2 * self.layers * self.kv_heads * head_dim * self.dtype_bytes

    def kv_capacity_tokens(self, tensor: int, pipeline: int, gpu_memory_bytes: float) -> int:
        """Tokens of KV cache an instance can hold after its weights (0 or less: does not fit)."""
        gpus = tensor * pipeline
        free = gpus * gpu_memory_bytes * MEMORY_UTILIZATION - self.weight_bytes
        return int(free // self.kv_bytes_per_token) if free > 0 else 0

    def divisibility_problem(self, tensor: int, pipeline: int) -> str | None:
        if self.attention_heads % tensor or self.kv_heads % tensor:
            return (
                f"tensor size {tensor} does not divide the {self.attention_heads} attention heads"
                f" / {self.kv_heads} KV heads"
            )
        if self.layers % pipeline:
            return f"pipeline size {pipeline} does not divide the {self.layers} layers"
        return None


# Published architectures (model cards / papers). Parameters are counts, fp16 weights.
BUILTIN_FACTS: dict[str, Facts] = {
    # OPT: Zhang et al. 2022, table 1; heads/hidden as in docs/planner-method.md.
    "opt-13b": Facts(layers=40, attention_heads=40, kv_heads=40, hidden_size=5120, parameters=12_853_000_000),
    "opt-66b": Facts(layers=64, attention_heads=72, kv_heads=72, hidden_size=9216, parameters=65_700_000_000),
    "opt-175b": Facts(layers=96, attention_heads=96, kv_heads=96, hidden_size=12288, parameters=175_000_000_000),
    # Llama 3 model card (8B: GQA with 8 KV heads; 70B: 80 layers, 64 heads, 8 KV heads).
    "meta-llama-3-8b": Facts(layers=32, attention_heads=32, kv_heads=8, hidden_size=4096, parameters=8_030_000_000),
    "meta-llama-3-8b-instruct": Facts(
        layers=32, attention_heads=32, kv_heads=8, hidden_size=4096, parameters=8_030_000_000
    ),
    "llama-3-8b": Facts(layers=32, attention_heads=32, kv_heads=8, hidden_size=4096, parameters=8_030_000_000),
    "meta-llama-3-70b": Facts(layers=80, attention_heads=64, kv_heads=8, hidden_size=8192, parameters=70_550_000_000),
    "llama-3-70b": Facts(layers=80, attention_heads=64, kv_heads=8, hidden_size=8192, parameters=70_550_000_000),
}


def from_spec(facts: ModelFacts) -> Facts:
    return Facts(
        layers=facts.layers,
        attention_heads=facts.attention_heads,
        kv_heads=facts.kv_heads or facts.attention_heads,
        hidden_size=facts.hidden_size,
        parameters=facts.parameters,
        dtype_bytes=facts.dtype_bytes,
    )


def builtin_facts(model_name: str) -> Facts | None:
    return BUILTIN_FACTS.get(model_name.rsplit("/", 1)[-1].lower())


def with_dtype(facts: Facts, model: ModelSpec) -> Facts:
    """`facts` with the bytes per element of the dtype the workers will run (`spec.model.dtype`).

    Why: the workers get that dtype, so weights and KV cache take its bytes: planning float32
    with the facts' default of 2 bytes would count half the memory each instance needs and fit
    caches that do not fit. A `dtypeBytes` the user wrote in `spec.model.facts` still wins: a
    quantized checkpoint's weights are narrower than the dtype it computes in."""
    chosen = DTYPE_BYTES.get(model.dtype)
    if chosen is None or (model.facts is not None and "dtype_bytes" in model.facts.model_fields_set):
        return facts
    return replace(facts, dtype_bytes=chosen)
