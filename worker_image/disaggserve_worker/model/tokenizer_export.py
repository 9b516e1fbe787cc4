"""A model's tokenizer written out as a Hugging Face tokenizer folder.

Benchmark clients (guidellm, `vllm bench serve`, inference-perf) count tokens with
`transformers.AutoTokenizer.from_pretrained(DIR)`; the built-in models build their tokenizer at run
time, so this writes the very same one to files: `tokenizer.json` (byte-for-byte the tokenizer the
router and workers use), `tokenizer_config.json` (special tokens, context length, and the chat
template the router applies, so a client's chat prompt counts match the server's) and
`special_tokens_map.json`. For a checkpoint folder it copies what the folder has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from disaggserve_worker.model.builtin_configs import builtin_config
from disaggserve_worker.model.builtin_tokenizer import BOS, EOS, UNK
from disaggserve_worker.model.errors import ModelLoadError
from disaggserve_worker.model.source import load_tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_hf_tokenizer(model: str, out: Path) -> list[Path]:
    """Write the tokenizer of `model` (a --model value) into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    if not model.startswith("builtin:"):
        folder = Path(model)
        if not (folder / "tokenizer.json").exists():
            raise ModelLoadError(f"{model} is not a checkpoint folder with a tokenizer.json; nothing to export")
        written = []
        for name in FILES:
            if (folder / name).exists():
                shutil.copyfile(folder / name, out / name)
                written.append(out / name)
        return written
    from disaggserve_worker.router.chat_template import PLAIN_TEMPLATE

    config = builtin_config(model.removeprefix("builtin:"))  # raises for an unknown name
    tokenizer = load_tokenizer(model)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": config.max_position_embeddings,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": PLAIN_TEMPLATE,
    }
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [out / name for name in FILES]
