"""A `--model` value's tokenizer and config, read without torch (all a router needs).

Accepted values (the worker contract): `builtin:<name>`, a checkpoint folder path (config.json,
*.safetensors — sharded via model.safetensors.index.json — and tokenizer.json), or
`hf:org/name[@revision]` (downloaded with `huggingface_hub` when it is installed; the revision, a
commit hash, tag or branch, pins what every worker gets). The weights are `loader`'s (torch).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer

from disaggserve_worker.model.builtin_configs import BUILTIN_CONFIGS, builtin_config
from disaggserve_worker.model.builtin_tokenizer import builtin_tokenizer
from disaggserve_worker.model.config import ModelConfig
from disaggserve_worker.model.errors import ModelLoadError

log = logging.getLogger(__name__)

__all__ = ["builtin_name", "download_hf", "load_config", "load_tokenizer", "read_config", "split_hf"]


def builtin_name(model: str) -> str:
    """The `<name>` of a `builtin:<name>` value, refused unless it is a built-in model."""
    name = model.removeprefix("builtin:")
    if name not in BUILTIN_CONFIGS:
        raise ModelLoadError(f"unknown built-in model {model!r}; choose one of "
                             + ", ".join(f"builtin:{n}" for n in BUILTIN_CONFIGS))
    return name


def split_hf(spec: str) -> tuple[str, str | None]:
    """`org/name@revision` -> (repo, revision); no `@`: the repository's current main (unpinned)."""
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def download_hf(spec: str, patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> Path:
    repo, revision = split_hf(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ModelLoadError(f"--model hf:{spec} needs the huggingface_hub package; install it or "
                             "mount the checkpoint and pass its folder path") from error
    if revision is None:
        log.warning("--model hf:%s is not pinned to a revision: each worker downloads whatever main is "
                    "now; pin one with hf:%s@<commit>", repo, repo)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns)))
    except Exception as error:  # the hub raises many types; all mean "could not fetch"
        raise ModelLoadError(f"could not download {repo!r} from the Hugging Face hub: {error}") from error


def read_config(folder: Path) -> ModelConfig:
    """A checkpoint folder's config.json, checked (what this decoder can build)."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder} has no config.json; point --model at a checkpoint folder")
    try:
        return ModelConfig.model_validate(json.loads(config_path.read_text()))
    except ValueError as error:
        raise ModelLoadError(f"{config_path}: {error}") from error


def load_tokenizer(model: str) -> Tokenizer:
    """Only the tokenizer of a `--model` value (what a router needs)."""
    if model.startswith("builtin:"):
        builtin_name(model)
        return builtin_tokenizer()
    folder = download_hf(model[3:]) if model.startswith("hf:") else Path(model)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(f"{folder} has no tokenizer.json (the fast-tokenizer file); "
                             "save one with transformers' tokenizer.save_pretrained")
    return Tokenizer.from_file(str(path))


def load_config(model: str) -> ModelConfig:
    """Only the config of a `--model` value, no weights: the KV layout (layers, KV heads, head
    size) and context length are all a tool that moves KV caches but runs no forward pass needs
    (`profile-link`), and reading weights would cost a large model's load time and memory."""
    if model.startswith("builtin:"):
        return builtin_config(builtin_name(model))
    folder = download_hf(model[3:], patterns=("*.json",)) if model.startswith("hf:") else Path(model)
    if not folder.is_dir():
        raise ModelLoadError(f"--model {model!r} is neither builtin:<name>, hf:<org/name> nor an "
                             "existing checkpoint folder")
    return read_config(folder)
