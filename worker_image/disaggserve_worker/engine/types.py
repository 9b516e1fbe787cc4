"""What the engine hands back to asyncio, and the request-level errors it reports."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenEvent:
    token_id: int | None
    text: str
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # {"type", "message", "retryable"}
    kv_handle: str | None = None  # prefill role: where the held cache can be pulled from
    logprobs: dict[str, Any] | None = None  # {"logprob", "top": [[id, logprob], ...]} when asked for
    kv_shared: dict[str, Any] | None = None  # prefill role, shared pool: {segment, lease, runs}

    def wire(self) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        body = {"token_id": self.token_id, "text": self.text, "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        return body


class RequestError(ValueError):
    """A request the engine refuses as given (maps to HTTP 4xx)."""


def push_many(events: list[tuple[RequestStream, TokenEvent]]) -> None:
    """Thread-safe: deliver a batch of events (in order) with one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]] = {}
    for stream, event in events:
        by_loop.setdefault(stream.loop, []).append((stream.queue, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:
            pass  # the event loop is closed: the server and with it every consumer are gone


def _deliver(items: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


@dataclass
class RequestStream:
    """Events of one request, produced by the engine thread and consumed on the event loop."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)

    def push(self, event: TokenEvent) -> None:
        """Thread-safe: called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: the server and with it every consumer are gone

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason is not None or event.error is not None:
                return
