"""The built-in models' configurations: their shapes and special tokens, no weights.

Kept apart from `builtin` (which builds the random weights with torch) so the router, which needs
only a built-in model's context length and vocabulary, never imports torch.
"""

from __future__ import annotations

from disaggserve_worker.model.builtin_tokenizer import BOS, EOS, VOCAB_SIZE, builtin_tokenizer
from disaggserve_worker.model.config import ModelConfig

BUILTIN_CONFIGS: dict[str, dict[str, object]] = {
    "tiny-llama": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
    "tiny-llama-draft": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1},
    # Sized so a 512-token prefill takes tens of ms on a laptop-class CPU core pair.
    "small-llama": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 4},
    # The projection shapes of a 1B-class Llama (hidden 2048, head 128, 16 query / 8 KV heads),
    # 8 layers: 377M parameters. For benchmarks: the small models' weights stay in a core's
    # cache, which hides what a real model's projections cost (bench/engine_step.py --model).
    "medium-llama": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
                     "num_attention_heads": 16, "num_key_value_heads": 8},
}


def builtin_config(name: str) -> ModelConfig:
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_CONFIGS)}")
    tokenizer = builtin_tokenizer()
    return ModelConfig(
        model_type="llama", vocab_size=VOCAB_SIZE, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=name == "tiny-llama-draft",
        bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS),
        **BUILTIN_CONFIGS[name],  # type: ignore[arg-type]
    )
