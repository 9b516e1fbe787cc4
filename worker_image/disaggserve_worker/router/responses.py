"""The JSON bodies and SSE chunks of OpenAI's completion and chat endpoints.

Kept apart from the HTTP handling so the wire shapes clients parse can be read (and changed) in
one place: ids, `object` names, `usage` (also vLLM's per-chunk `continuous_usage_stats`), the chat
stream's opening role chunk, `echo`, several choices (`n`, batched prompts) told apart by `index`,
logprobs in each endpoint's own format, and vLLM's `return_token_ids`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # what json.dumps does to a str (ensure_ascii)
from typing import Any


@dataclass(slots=True)
class TokenInfo:
    """One generated token as the router saw it: its id and, when asked for, its logprobs."""

    token_id: int
    logprobs: dict[str, Any] | None = None  # {"logprob", "top": [[id, logprob], ...]} from the worker


class Progress:
    """Counts and times the tokens of one choice as they pass to the client."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0
        self.ttft_s: float | None = None
        self.finish_reason: str | None = None

    def add(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started
        self.count += 1


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChoiceResult:
    index: int
    text: str
    finish_reason: str | None
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)


class Shape:
    """The JSON shapes of one endpoint (completions vs chat)."""

    object = ""

    def __init__(self, model: str, prefix: str, token_text: Callable[[int], str], *,
                 logprobs: bool = False, return_token_ids: bool = False) -> None:
        self.model = model
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.token_text = token_text
        self.logprobs = logprobs
        self.return_token_ids = return_token_ids

    def opening(self, index: int, include_usage: bool, prompt_ids: list[int]) -> list[dict[str, Any]]:
        return []

    def chunk(self, index: int, delta: str, finish: str | None, include_usage: bool,
              tokens: list[TokenInfo], usage: dict[str, int] | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def event(self, index: int, delta: str, finish: str | None, include_usage: bool,
              tokens: list[TokenInfo], usage: dict[str, int] | None = None) -> bytes:
        """`chunk` as one SSE event, byte for byte what compact `json.dumps` of it gives.

        Most chunks of a stream differ only in their text: those are filled into a template
        encoded once per request (`_plain`), which spares building and encoding the dict per
        token; any chunk with more in it (logprobs, token ids, usage, echo) takes `chunk`."""
        if usage is None and not self.logprobs and not self.return_token_ids:
            plain = self._plain(index, delta, finish, include_usage)
            if plain is not None:
                return plain.encode()
        data = json.dumps(self.chunk(index, delta, finish, include_usage, tokens, usage), separators=(",", ":"))
        return f"data: {data}\n\n".encode()

    def _plain(self, index: int, delta: str, finish: str | None, include_usage: bool) -> str | None:
        """The SSE event of a chunk with nothing but text and finish_reason, or None where this
        endpoint's chunk holds more."""
        return None

    def _template(self) -> str:
        """The SSE event of a chunk up to its choice's index, encoded once."""
        head = json.dumps(self._head(), separators=(",", ":"))[:-1]
        return f'data: {head},"choices":[{{"index":'

    def full(self, choices: list[ChoiceResult], usage: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage}

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    def _finish(self, body: dict[str, Any], include_usage: bool, usage: dict[str, int] | None) -> dict[str, Any]:
        if usage is not None:
            return {**body, "usage": usage}
        return {**body, "usage": None} if include_usage else body

    def _extras(self, choice: dict[str, Any], tokens: list[TokenInfo], prompt_ids: list[int] | None) -> dict[str, Any]:
        if self.return_token_ids:
            choice["token_ids"] = [t.token_id for t in tokens]
            if prompt_ids is not None:
                choice["prompt_token_ids"] = prompt_ids
        return choice

    def _top(self, info: TokenInfo) -> list[tuple[str, float]]:
        return [(self.token_text(int(i)), float(lp)) for i, lp in (info.logprobs or {}).get("top", [])]


_USAGE_NULL = ',"usage":null'


class CompletionShape(Shape):
    object = "text_completion"

    def __init__(self, model: str, token_text: Callable[[int], str], echo: dict[int, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, "cmpl", token_text, **kwargs)
        self.echo = dict(echo or {})
        self._offsets: dict[int, int] = {}
        self._event_head = self._template()

    def opening(self, index: int, include_usage: bool, prompt_ids: list[int]) -> list[dict[str, Any]]:
        return [self.chunk(index, "", None, include_usage, [])] if self.echo.get(index) else []

    def _plain(self, index: int, delta: str, finish: str | None, include_usage: bool) -> str | None:
        if index in self.echo:  # the first chunk of an echoed choice carries the prompt
            return None
        return (f'{self._event_head}{index},"text":{encode_basestring_ascii(delta)},"finish_reason":'
                f'{"null" if finish is None else encode_basestring_ascii(finish)},"logprobs":null}}]'
                f'{_USAGE_NULL if include_usage else ""}}}\n\n')

    def chunk(self, index: int, delta: str, finish: str | None, include_usage: bool,
              tokens: list[TokenInfo], usage: dict[str, int] | None = None) -> dict[str, Any]:
        text = self.echo.pop(index, "") + delta
        choice = self._extras({"index": index, "text": text, "finish_reason": finish,
                               "logprobs": self._logprobs(index, tokens)}, tokens, None)
        return self._finish({**self._head(), "choices": [choice]}, include_usage, usage)

    def full(self, choices: list[ChoiceResult], usage: dict[str, int]) -> dict[str, Any]:
        out = []
        for c in choices:
            echo = self.echo.pop(c.index, "")
            out.append(self._extras({"index": c.index, "text": echo + c.text, "finish_reason": c.finish_reason,
                                     "logprobs": self._logprobs(c.index, c.tokens)}, c.tokens, c.prompt_ids))
        return {**self._head(), "choices": out, "usage": usage}

    def _logprobs(self, index: int, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        block: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self._offsets.get(index, 0)
        for info in tokens:
            text = self.token_text(info.token_id)
            block["tokens"].append(text)
            block["token_logprobs"].append((info.logprobs or {}).get("logprob"))
            block["top_logprobs"].append(dict(self._top(info)))
            block["text_offset"].append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return block


class ChatShape(Shape):
    object = "chat.completion.chunk"

    def __init__(self, model: str, token_text: Callable[[int], str], **kwargs: Any) -> None:
        super().__init__(model, "chatcmpl", token_text, **kwargs)
        self._event_head = self._template()

    def _plain(self, index: int, delta: str, finish: str | None, include_usage: bool) -> str | None:
        content = f'{{"content":{encode_basestring_ascii(delta)}}}' if delta else "{}"
        return (f'{self._event_head}{index},"delta":{content},"finish_reason":'
                f'{"null" if finish is None else encode_basestring_ascii(finish)},"logprobs":null}}]'
                f'{_USAGE_NULL if include_usage else ""}}}\n\n')

    def opening(self, index: int, include_usage: bool, prompt_ids: list[int]) -> list[dict[str, Any]]:
        chunk = self._chunk(index, {"role": "assistant", "content": ""}, None, include_usage, [], None)
        if self.return_token_ids:
            chunk["choices"][0]["prompt_token_ids"] = prompt_ids
        return [chunk]

    def chunk(self, index: int, delta: str, finish: str | None, include_usage: bool,
              tokens: list[TokenInfo], usage: dict[str, int] | None = None) -> dict[str, Any]:
        return self._chunk(index, {"content": delta} if delta else {}, finish, include_usage, tokens, usage)

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None, include_usage: bool,
               tokens: list[TokenInfo], usage: dict[str, int] | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": self._logprobs(tokens)}
        if self.return_token_ids and tokens:
            choice["token_ids"] = [t.token_id for t in tokens]
        return self._finish({**self._head(), "choices": [choice]}, include_usage, usage)

    def full(self, choices: list[ChoiceResult], usage: dict[str, int]) -> dict[str, Any]:
        out = [self._extras({"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": self._logprobs(c.tokens)},
                            c.tokens, c.prompt_ids) for c in choices]
        return {**self._head(), "object": "chat.completion", "choices": out, "usage": usage}

    def _logprobs(self, tokens: list[TokenInfo]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = []
        for info in tokens:
            text = self.token_text(info.token_id)
            content.append({
                "token": text, "logprob": (info.logprobs or {}).get("logprob"), "bytes": list(text.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in self._top(info)],
            })
        return {"content": content}
