"""Incremental detokenisation with stop strings, linear in the output length.

Each new token is decoded together with a short window of the tokens before it (the way
vLLM and Hugging Face's streamers do), so byte-level merges and leading-space rules see
their context without re-decoding the whole output every step. A window that ends in an
incomplete UTF-8 sequence (U+FFFD) stays pending until the next token completes it.
Characters that could still become a stop string are held back too, so a stop string
never leaks to the client.

tokenizers' `DecodeStream`, primed with the context tokens (`DecodeStream(ids=...)`, tokenizers
0.22+, the floor in pyproject.toml), runs that same window in Rust: one call per token instead of
two decodes and the slicing around them, which was a quarter of the router's CPU per streamed
token. The offsets here follow it step for step, so a step it refuses (a window that does not
extend its prefix) and the final flush still take the Python window, on the same state.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

PROMPT_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str],
                 initial_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])  # context, never emitted
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # settled text of the generated tokens
        self.emitted = 0
        self.stopped = False
        # Primed with the context, so the first token's leading space decodes as in the whole text.
        self._stream: DecodeStream | None = DecodeStream(ids=self.ids, skip_special_tokens=skip_special_tokens)
        for token in initial_ids or []:
            self._append(token)
        self.emitted = len(self.text)  # initial tokens were sent by someone else (the prefill worker)

    def _decode_window(self, final: bool) -> None:
        skip = self.skip_special_tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=skip)
        window = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=skip)
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):
            self.text += window[len(prefix):] if window.startswith(prefix) else window
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def _append(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self._stream is not None:
            try:
                new = self._stream.step(self.tokenizer, token_id)
            except Exception:  # its InvalidPrefix has no type of its own in Python
                self._stream = None  # its state is no longer ours: the Python window from here on
            else:
                if new is not None:  # the window moved on exactly as _decode_window moves it
                    self.text += new
                    self.prefix_offset = self.read_offset
                    self.read_offset = len(self.ids)
                return
        self._decode_window(final=False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new text to emit, whether a stop string was reached)."""
        self._append(token_id)
        text = self.text
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                delta = text[self.emitted:end] if end > self.emitted else ""
                self.emitted = max(self.emitted, end)
                self.stopped = True
                return delta, True
        safe = len(text)
        for s in self.stop:
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        delta = text[self.emitted:safe]
        self.emitted = safe
        return delta, False

    def settled(self) -> str:
        """All text settled so far (what a prefill worker sends with the first token)."""
        self.emitted = len(self.text)
        return self.text

    def flush(self) -> str:
        """The held-back tail, once the sequence has finished without a stop string."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):
            self._decode_window(final=True)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
