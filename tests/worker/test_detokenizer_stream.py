"""IncrementalDetokenizer gives the same text whether tokenizers' Rust `DecodeStream` runs its
window or the Python one does: same deltas per token, same stop cuts, same flush."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from disaggserve_worker.engine.detokenizer import IncrementalDetokenizer
from disaggserve_worker.model.source import load_tokenizer

TEXTS = ["héllo wörld ✓ 日本語 and 🎉 emoji", "  two  spaces\n\ttab and a newline\n", "The end. The end, or not?"]


def _sentencepiece_like() -> Tokenizer:
    """A Llama-style tokenizer: Metaspace words, byte fallback for what the vocabulary lacks."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁the", "▁end", "T", "he", "▁The", "▁or", "▁not", "?", ".", ",", "▁h", "llo", "é", "w"]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer


def _run(tokenizer: Tokenizer, prompt: list[int], ids: list[int], stop: list[str], *, rust: bool,
         skip: bool = True, initial: list[int] | None = None) -> list[tuple[str, bool]]:
    detok = IncrementalDetokenizer(tokenizer, prompt, stop, initial_ids=initial, skip_special_tokens=skip)
    if not rust:
        detok._stream = None
    out = []
    for token in ids:
        out.append(detok.add(token))
        if out[-1][1]:
            return out
    return [*out, (detok.flush(), False)]


@pytest.mark.parametrize("make", [lambda: load_tokenizer("builtin:tiny-llama"), _sentencepiece_like])
def test_rust_and_python_windows_give_the_same_deltas(make) -> None:
    tokenizer = make()
    prompt = tokenizer.encode("Prompt: ", add_special_tokens=False).ids
    rng = random.Random(7)
    cases = [tokenizer.encode(text, add_special_tokens=False).ids for text in TEXTS]
    # Random ids: byte tokens that split characters, special tokens, what no text encodes to.
    cases += [[rng.randrange(tokenizer.get_vocab_size()) for _ in range(60)] for _ in range(20)]
    for ids in cases:
        for stop in ([], ["The end"], ["o"]):
            for skip in (True, False):
                rust = _run(tokenizer, prompt, ids, stop, rust=True, skip=skip)
                assert rust == _run(tokenizer, prompt, ids, stop, rust=False, skip=skip), (ids, stop, skip)
        split = len(ids) // 2
        assert _run(tokenizer, prompt, ids[split:], [], rust=True, initial=ids[:split]) == \
            _run(tokenizer, prompt, ids[split:], [], rust=False, initial=ids[:split])


def test_the_rust_window_is_what_runs_where_it_exists() -> None:
    tokenizer = load_tokenizer("builtin:tiny-llama")
    detok = IncrementalDetokenizer(tokenizer, [5, 6], [])
    assert detok._stream is not None
    text = "".join(detok.add(t)[0] for t in tokenizer.encode(" a short text", add_special_tokens=False).ids)
    assert detok._stream is not None and text + detok.flush() == " a short text"
