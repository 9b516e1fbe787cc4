"""Write a built-in model as a Hugging Face checkpoint folder, for engines that load only those.

vLLM cannot run `builtin:tiny-llama` and no model hub is reachable where the tests run, so
`disaggserve up` (and the vLLM tests) materialise the built-in model as a folder vLLM loads:
`config.json` (LlamaForCausalLM), `model.safetensors` with the same fixed-seed weights under the
Hugging Face parameter names, and the byte-level BPE tokenizer as `tokenizer.json`. Both engines
then serve the very same weights and tokenizer, and the logits keep the clear peaks the built-in
weights were scaled for, so greedy outputs do not depend on fp rounding differences between them.

The folder is written to a temporary name and renamed into place, so concurrent callers (two
test sessions, an interrupted `up`) never see half a checkpoint; an existing complete folder is
reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from disaggserve_worker.model.builtin import builtin_model
from disaggserve_worker.model.builtin_configs import builtin_config
from disaggserve_worker.model.builtin_tokenizer import BOS, EOS, UNK, builtin_tokenizer

MARKER = "disaggserve-export.json"
FORMAT_VERSION = 1


def hf_config(name: str) -> dict[str, object]:
    c = builtin_config(name)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32",
    }


def export_builtin(name: str, out: Path) -> Path:
    """`out` holds built-in model `name` as a checkpoint folder (written once, then reused)."""
    out = Path(out)
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == {"model": name, "version": FORMAT_VERSION}:
        return out
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model = builtin_model(name)
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if hf_config(name)["tie_word_embeddings"]:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(name), indent=2))
        config = builtin_config(name)
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
        )
        builtin_tokenizer().save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "model_max_length": config.max_position_embeddings,
            "add_bos_token": False,
            "add_eos_token": False,
        }, indent=2))
        (tmp / MARKER).write_text(json.dumps({"model": name, "version": FORMAT_VERSION}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
