"""Model configuration parsed from a Hugging Face `config.json` (Llama, Mistral, Qwen2 styles).

Only the fields the decoder needs are kept; unknown fields are ignored so that configs
written by newer `transformers` versions still load. Fields that would change the maths
in a way this implementation does not support are refused with a message, never ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class RopeScaling(BaseModel):
    """Rotary scaling parameters; `rope_type` picks how the inverse frequencies change."""

    model_config = ConfigDict(extra="ignore")

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


class ModelConfig(BaseModel):
    """What the decoder needs to build itself; names follow `config.json`."""

    model_config = ConfigDict(extra="ignore")

    model_type: str = "llama"
    vocab_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    head_dim: int | None = Field(None, ge=1)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    sliding_window: int | None = None
    use_sliding_window: bool = False

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """Accept both rope layouts: `rope_theta` + `rope_scaling` (transformers 4.x) and
        `rope_parameters` (transformers 5.x), and Qwen2's always-on q/k/v biases."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        params = data.pop("rope_parameters", None)
        if isinstance(params, dict):
            if "rope_theta" in params:
                data.setdefault("rope_theta", params["rope_theta"])
            if params.get("rope_type", params.get("type", "default")) != "default":
                data.setdefault("rope_scaling", params)
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict) and "rope_type" not in scaling and "type" in scaling:
            data["rope_scaling"] = {**scaling, "rope_type": scaling["type"]}
        if data.get("model_type") == "qwen2":
            data["attention_bias"] = True
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; this worker serves "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} style checkpoints")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; only 'silu' (SwiGLU)")
        if self.rope_scaling and self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_scaling.rope_type!r} is not supported; "
                             f"expected one of {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is absent")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def effective_sliding_window(self) -> int | None:
        """Mistral sets `sliding_window` on every layer; Qwen2 only when `use_sliding_window`."""
        if self.sliding_window is None:
            return None
        if self.model_type == "qwen2" and not self.use_sliding_window:
            return None
        return self.sliding_window

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Cache bytes one token takes over all layers (K and V)."""
        return 2 * self.num_hidden_layers * self.kv_heads * self.dim_per_head * dtype_bytes

    def parameter_count(self) -> int:
        """Parameters implied by the shapes (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.dim_per_head
        q = self.num_attention_heads * d
        kv = self.kv_heads * d
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        return self.num_hidden_layers * per_layer + h + embed * (1 if self.tie_word_embeddings else 2)
