"""`disaggserve-worker tokenizer --out DIR` writes a Hugging Face tokenizer folder that counts tokens
exactly as the server does, so benchmark clients (guidellm, vllm bench serve) can use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disaggserve_worker.cli import main
from disaggserve_worker.model.builtin_tokenizer import builtin_tokenizer
from disaggserve_worker.router.model_info import load_model_info

TEXTS = ["Hello, world!", "  leading spaces and ünïcödé ✓", "def main(): return 0\n\tTabs", "", "</s> literal"]


def test_cli_writes_a_folder_transformers_loads_and_agrees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "tok"
    assert main(["tokenizer", "--model", "builtin:tiny-llama", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert str(out / "tokenizer.json") in capsys.readouterr().out
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = builtin_tokenizer()
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    assert hf.eos_token_id == ours.token_to_id("</s>") and hf.bos_token_id == ours.token_to_id("<s>")
    assert hf.model_max_length == json.loads((out / "tokenizer_config.json").read_text())["model_max_length"]
    # The chat prompt a client counts is the one the router builds.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    router_prompt = load_model_info("builtin:tiny-llama", "tiny").chat_template.render(messages)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == router_prompt


def test_unknown_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenizer", "--model", "builtin:nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["tokenizer", "--model", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_checkpoint_folder_is_copied(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    assert main(["tokenizer", "--out", str(src)]) == 0  # any folder with tokenizer files
    out = tmp_path / "copy"
    assert main(["tokenizer", "--model", str(src), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
