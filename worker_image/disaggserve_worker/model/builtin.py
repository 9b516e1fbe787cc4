"""Built-in random-weight models, so the whole system runs on a CPU with no files.

Weights come from a fixed seed, so every process (prefill, decode, router tests) builds the
same model. Initial scales are chosen so logits are clearly peaked: greedy decoding then
does not hinge on near-ties that fp32 rounding could flip between batched and reference paths.
Their shapes are in `builtin_configs`, which needs no torch.
"""

from __future__ import annotations

import math

import torch

from disaggserve_worker.model.builtin_configs import builtin_config
from disaggserve_worker.model.llama import LlamaForCausalLM

SEED = 20240601


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
