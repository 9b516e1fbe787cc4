"""Incremental detokenisation with stop strings.

Text is re-decoded from the token ids (plus a few prompt tokens, so tokenizers that drop a
leading space see the right context) and only the new characters are emitted. Characters
that could still turn into a stop string, or an incomplete UTF-8 sequence (U+FFFD at the
end), are held back until they are settled, so a stop string never leaks to the client.
"""

from __future__ import annotations

from tokenizers import Tokenizer

PROMPT_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str],
                 initial_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.prefix = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_text = tokenizer.decode(self.prefix) if self.prefix else ""
        self.stop = stop
        self.ids: list[int] = list(initial_ids or [])
        self.emitted = len(self.text()) if self.ids else 0
        self.stopped = False

    def text(self) -> str:
        full = self.tokenizer.decode(self.prefix + self.ids)
        return full[len(self.prefix_text):] if full.startswith(self.prefix_text) else \
            self.tokenizer.decode(self.ids)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new text to emit, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = self.text()
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
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        delta = text[self.emitted:safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        """The held-back tail, once the sequence has finished without a stop string."""
        if self.stopped:
            return ""
        text = self.text()
        delta = text[self.emitted:]
        self.emitted = len(text)
        return delta
