"""What the router needs to know about the served model: tokenizer, chat template, context length.

The router tokenizes with the very loader the workers use (same `--model` value, same image), so
the token counts it validates and reports are the ones the workers compute on. It imports only the
torch-free halves of the model package (`model.source`, `model.builtin_configs`): the router runs
no model, and torch would cost it seconds of start-up (tests/router/test_no_torch.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..model.builtin_configs import builtin_config
from ..model.errors import ModelLoadError
from ..model.source import load_tokenizer
from .chat_template import ChatTemplate


@dataclass
class ModelInfo:
    name: str  # what clients send as "model"
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    max_model_len: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (how logprobs name tokens)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def load_model_info(model: str, served_name: str, max_model_len: int | None = None) -> ModelInfo:
    tokenizer = load_tokenizer(model)
    config, tokenizer_config = _configs(model)
    limit = int(config.get("max_position_embeddings", 2048))
    if max_model_len is not None:
        if max_model_len < 1:
            raise ModelLoadError(f"--max-model-len must be positive, got {max_model_len}")
        limit = min(limit, max_model_len) if "max_position_embeddings" in config else max_model_len
    template = ChatTemplate(
        tokenizer_config.get("chat_template") if isinstance(tokenizer_config.get("chat_template"), str)
        else None,
        bos_token=_token_text(tokenizer_config.get("bos_token")),
        eos_token=_token_text(tokenizer_config.get("eos_token")),
    )
    return ModelInfo(served_name, tokenizer, template, limit,
                     int(config.get("vocab_size", tokenizer.get_vocab_size())))


def _configs(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.json and tokenizer_config.json of a checkpoint folder; the built-ins have neither."""
    if model.startswith("builtin:"):
        return builtin_config(model.removeprefix("builtin:")).model_dump(), {}
    folder = Path(model)
    if not folder.is_dir():  # hf:<repo>: the loader fetched the tokenizer; read what we can
        return {}, {}
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        found.append(json.loads(path.read_text()) if path.exists() else {})
    return found[0], found[1]


def _token_text(token: Any) -> str:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""
