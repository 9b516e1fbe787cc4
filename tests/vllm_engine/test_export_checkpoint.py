"""The built-in model written as a Hugging Face checkpoint is the same model, loadable by others.

vLLM serves this folder in the vLLM tests and under `disaggserve up`; here `transformers` (an
independent Llama implementation) loads it and must compute the built-in worker's logits, and the
tokenizer must be the built-in one.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from disaggserve.local.checkpoints import prepare_for_local
from disaggserve_worker.model.builtin import builtin_model
from disaggserve_worker.model.builtin_tokenizer import builtin_tokenizer
from disaggserve_worker.model.export import export_builtin


def test_transformers_computes_the_builtin_logits_from_the_exported_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = export_builtin("tiny-llama", tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    ours = builtin_model("tiny-llama")
    ids = builtin_tokenizer().encode("The quick brown fox jumps", add_special_tokens=False).ids
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
        mine = ours.reference_logits(torch.tensor(ids))
    mine = mine[0] if mine.dim() == 3 else mine
    assert theirs.argmax(-1).tolist() == mine.argmax(-1).tolist()
    assert torch.allclose(theirs, mine, atol=1e-3, rtol=1e-3)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert fast("The quick brown fox jumps", add_special_tokens=False)["input_ids"] == ids


def test_export_is_reused_and_prepare_points_the_resource_at_it(tmp_path):
    first = export_builtin("tiny-llama", tmp_path / "models" / "tiny-llama")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert export_builtin("tiny-llama", first) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # a complete folder is not rewritten
    resource = tmp_path / "r.yaml"
    resource.write_text(yaml.safe_dump({
        "apiVersion": "disaggserve.io/v1alpha1", "kind": "DisaggServe", "metadata": {"name": "x"},
        "spec": {"engine": {"kind": "vllm"}, "model": {"name": "m", "source": {"builtin": "tiny-llama"}}}}))
    prepared = yaml.safe_load(prepare_for_local(resource, tmp_path).read_text())
    assert prepared["spec"]["model"]["source"] == {"path": str(first.resolve())}
    builtin_engine = tmp_path / "b.yaml"
    builtin_engine.write_text(resource.read_text().replace("kind: vllm", "kind: builtin"))
    assert prepare_for_local(builtin_engine, tmp_path) == builtin_engine  # the built-in worker runs builtin models
