"""Checkpoints written with transformers load into our decoder and give the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from disaggserve_worker.model.batch import BatchLayout  # noqa: E402
from disaggserve_worker.model.builtin_tokenizer import builtin_tokenizer  # noqa: E402
from disaggserve_worker.model.loader import ModelLoadError, load_model  # noqa: E402

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _write(tmp_path: Path, hf_model: torch.nn.Module, shard: str | None = None) -> Path:
    with torch.no_grad():  # larger weights than HF's init so differences would show
        gen = torch.Generator().manual_seed(1)
        for param in hf_model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
    folder = tmp_path / "ckpt"
    if shard:
        hf_model.save_pretrained(folder, max_shard_size=shard)
    else:
        hf_model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(builtin_tokenizer().to_str())
    return folder


def _compare(folder: Path, hf_model: torch.nn.Module, length: int = 40, tensor: int = 1) -> None:
    ours = load_model(str(folder), device="cpu")
    if tensor > 1:  # shards on one CPU: the split weights and biases must still give HF's logits
        ours.model.place([[torch.device("cpu")] * tensor])
    ids = torch.randint(0, 512, (length,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf_model.eval()(ids[None]).logits[0].float()
    got = ours.model.reference_logits(ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    # The paged path (what the engine runs) agrees too, in two chunks.
    pool = ours.model.new_kv_pool(64)
    table = torch.arange(64)
    first = BatchLayout.build([15], [0], [table], torch.device("cpu"), ours.model.sliding_window)
    ours.model.forward_step(ids[:15], first, pool)
    rest = BatchLayout.build([length - 15], [15], [table], torch.device("cpu"), ours.model.sliding_window)
    paged = ours.model.forward_step(ids[15:], rest, pool, all_logits=True)
    assert torch.allclose(paged, expected[15:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_checkpoint_matches_transformers(tmp_path: Path, tied: bool) -> None:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied))
    _compare(_write(tmp_path, hf), hf)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    folder = _write(tmp_path, hf, shard="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert (folder / "model.safetensors.index.json").exists()
    _compare(folder, hf)


def test_qwen2_checkpoint_with_biases_matches_transformers(tmp_path: Path) -> None:
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    _compare(_write(tmp_path, hf), hf)


@pytest.mark.parametrize("family", ["llama-biases", "qwen2"])
def test_tensor_sharded_checkpoint_matches_transformers(tmp_path: Path, family: str) -> None:
    """o_proj/down_proj biases are added once (not once per shard); q/k/v biases split by heads."""
    if family == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, attention_bias=True,
                                                                    mlp_bias=True))
        assert hf.model.layers[0].self_attn.o_proj.bias is not None
        assert hf.model.layers[0].mlp.down_proj.bias is not None
    _compare(_write(tmp_path, hf), hf, tensor=2)


def test_mistral_checkpoint_with_sliding_window_matches_transformers(tmp_path: Path) -> None:
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=8))
    _compare(_write(tmp_path, hf), hf, length=30)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_rope_scaling_variants_match_transformers(tmp_path: Path, scaling: dict[str, object]) -> None:
    config = transformers.LlamaConfig(**{**SMALL, "max_position_embeddings": 32}, rope_scaling=scaling)
    hf = transformers.LlamaForCausalLM(config)
    # 40 positions > 32 exercises dynamic NTK's growth past the trained length.
    folder = _write(tmp_path, hf)
    ours = load_model(str(folder), device="cpu")
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf.eval()(ids[None]).logits[0]
    assert torch.allclose(ours.model.reference_logits(ids), expected, atol=1e-4, rtol=1e-4)


def test_loader_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither builtin"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="unknown built-in"):
        load_model("builtin:huge-llama", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_builtin_models_are_deterministic_and_distinct() -> None:
    a = load_model("builtin:tiny-llama", device="cpu").model
    b = load_model("builtin:tiny-llama", device="cpu").model
    draft = load_model("builtin:tiny-llama-draft", device="cpu")
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert draft.model.config.hidden_size < a.config.hidden_size
    assert draft.tokenizer.to_str() == load_model("builtin:tiny-llama", device="cpu").tokenizer.to_str()
    text = "Hello, disaggregated world! ünïcode ✓"
    tokenizer = draft.tokenizer
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_hf_model_without_huggingface_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now fails
    with pytest.raises(ModelLoadError, match="needs the huggingface_hub package"):
        load_model("hf:meta-llama/Llama-3.2-1B", device="cpu")
