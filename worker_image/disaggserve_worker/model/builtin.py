"""Built-in random-weight models, so the whole system runs on a CPU with no files.

Weights come from a fixed seed, so every process (prefill, decode, router tests) builds the
same model. Initial scales are chosen so logits are clearly peaked: greedy decoding then
does not hinge on near-ties that fp32 rounding could flip between batched and reference paths.
"""

from __future__ import annotations

import math

import torch

from disaggserve_worker.model.builtin_tokenizer import BOS, EOS, VOCAB_SIZE, builtin_tokenizer
from disaggserve_worker.model.config import ModelConfig
from disaggserve_worker.model.llama import LlamaForCausalLM

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
SEED = 20240601


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


def builtin_model(name: str) -> LlamaForCausalLM:
    """Random weights from `SEED` (plus the name, so draft and target differ), built on CPU in fp32."""
    config = builtin_config(name)
    generator = torch.Generator().manual_seed(SEED + sum(map(ord, name)))
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.fill_(1.0)
            elif pname.endswith("embed_tokens.weight"):
                param.normal_(0.0, 1.0, generator=generator)
            elif pname == "lm_head.weight":
                param.normal_(0.0, 3.0 / math.sqrt(param.shape[1]), generator=generator)
            elif param.dim() == 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=generator)
            else:
                param.zero_()
    return model.eval()
