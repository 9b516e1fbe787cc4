"""The JSON bodies and SSE chunks of OpenAI's completion and chat endpoints.

Kept apart from the HTTP handling so the wire shapes clients parse can be read (and changed) in
one place: ids, `object` names, `usage`, the chat stream's opening role chunk, `echo`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from .dispatch import GenerationRequest


class Progress:
    """Counts and times the tokens of one request as they pass to the client."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0
        self.ttft_s: float | None = None
        self.finish_reason: str | None = None

    def add(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started
        self.count += 1


def usage_of(gen: GenerationRequest, progress: Progress) -> dict[str, int]:
    prompt = len(gen.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": progress.count,
            "total_tokens": prompt + progress.count}


class Shape:
    """The JSON shapes of one endpoint (completions vs chat)."""

    def __init__(self, model: str, prefix: str) -> None:
        self.model = model
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def opening(self, include_usage: bool) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: str, finish: str | None, include_usage: bool) -> dict[str, Any]:
        raise NotImplementedError

    def full(self, text: str, finish: str | None, usage: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage}

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    object = ""


class CompletionShape(Shape):
    object = "text_completion"

    def __init__(self, model: str, echo: str = "") -> None:
        super().__init__(model, "cmpl")
        self.echo = echo

    def opening(self, include_usage: bool) -> list[dict[str, Any]]:
        return [self.chunk("", None, include_usage)] if self.echo else []

    def chunk(self, delta: str, finish: str | None, include_usage: bool) -> dict[str, Any]:
        text, self.echo = self.echo + delta, ""
        body = {**self._head(), "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                             "logprobs": None}]}
        return {**body, "usage": None} if include_usage else body

    def full(self, text: str, finish: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "choices": [{"index": 0, "text": self.echo + text, "finish_reason": finish,
                                             "logprobs": None}], "usage": usage}


class ChatShape(Shape):
    object = "chat.completion.chunk"

    def __init__(self, model: str) -> None:
        super().__init__(model, "chatcmpl")

    def opening(self, include_usage: bool) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, None, include_usage)]

    def chunk(self, delta: str, finish: str | None, include_usage: bool) -> dict[str, Any]:
        return self._chunk({"content": delta} if delta else {}, finish, include_usage)

    def _chunk(self, delta: dict[str, Any], finish: str | None, include_usage: bool) -> dict[str, Any]:
        body = {**self._head(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                             "logprobs": None}]}
        return {**body, "usage": None} if include_usage else body

    def full(self, text: str, finish: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(), "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
            "logprobs": None}], "usage": usage}
