"""Turning the token streams of one request's choices into an OpenAI answer, streamed or whole.

A request has one choice per (prompt, n) pair: `n` samples of each prompt of a batched completion.
Each choice is its own generation on the workers (its own dispatch, retries and resumes); their
pieces are merged in arrival order, each tagged with its choice `index`, as vLLM streams them. A
streamed answer starts (HTTP 200) only once the first token of any choice exists, so a request that
no worker can serve still gets a plain error reply instead of a stream that opens and then fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..engine.detokenizer import IncrementalDetokenizer
from .dispatch import Dispatcher, GenerationRequest, Token
from .errors import UpstreamError
from .metrics import RouterMetrics
from .responses import ChoiceResult, Progress, Shape, TokenInfo, usage_of


@dataclass
class Piece:
    """Text that became final for one choice, the tokens that made it, and the finish if it ended."""

    index: int
    delta: str
    finish: str | None
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class ChoiceRun:
    index: int
    prompt_index: int
    gen: GenerationRequest
    detok: IncrementalDetokenizer
    progress: Progress
    tokens: list[TokenInfo] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    @property
    def usage(self) -> dict[str, int]:
        return usage_of(len(self.gen.prompt_ids), self.progress.count)


def request_usage(runs: list[ChoiceRun]) -> dict[str, int]:
    """vLLM's count: each prompt once, every choice's completion tokens."""
    prompts = {run.prompt_index: len(run.gen.prompt_ids) for run in runs}
    return usage_of(sum(prompts.values()), sum(run.progress.count for run in runs))


async def _pieces(run: ChoiceRun, stream: AsyncIterator[Token], metrics: RouterMetrics) -> AsyncIterator[Piece]:
    """One choice's pieces; stops its workers as soon as a stop string shows."""
    async with aclosing(stream) as tokens:
        async for token in tokens:
            delta, stopped, infos = "", False, []
            if token.token_id is not None:
                run.progress.add(token.token_id)
                metrics.generation_tokens.inc()
                delta, stopped = run.detok.add(token.token_id)
                infos = [TokenInfo(token.token_id, token.logprobs)]
            finish = "stop" if stopped else token.finish_reason
            if finish is not None:
                run.progress.finish_reason = finish
                yield Piece(run.index, delta + ("" if stopped else run.detok.flush()), finish, infos)
                return
            yield Piece(run.index, delta, None, infos)


async def merged(runs: list[ChoiceRun], dispatcher: Dispatcher, metrics: RouterMetrics) -> AsyncIterator[Piece]:
    """Pieces of every choice in arrival order; the first failure (after its retries) ends them all."""
    if len(runs) == 1:
        async with aclosing(_pieces(runs[0], dispatcher.generate(runs[0].gen), metrics)) as one:
            async for piece in one:
                yield piece
        return
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(run: ChoiceRun) -> None:
        try:
            async with aclosing(_pieces(run, dispatcher.generate(run.gen), metrics)) as pieces:
                async for piece in pieces:
                    await queue.put(piece)
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(run)) for run in runs]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def respond_whole(runs: list[ChoiceRun], pieces: AsyncIterator[Piece], shape: Shape) -> web.Response:
    by_index = {run.index: run for run in runs}
    async for piece in pieces:
        run = by_index[piece.index]
        run.text.append(piece.delta)
        run.tokens.extend(piece.tokens)
    results = [ChoiceResult(run.index, "".join(run.text), run.progress.finish_reason, run.tokens,
                            run.gen.prompt_ids) for run in runs]
    return web.json_response(shape.full(results, request_usage(runs)))


async def respond_stream(request: web.Request, runs: list[ChoiceRun], pieces: AsyncIterator[Piece], shape: Shape,
                         *, include_usage: bool, continuous_usage: bool) -> web.StreamResponse:
    by_index = {run.index: run for run in runs}
    # Wait for the first token before answering 200: failures before it become a plain error reply.
    first = await anext(pieces)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    for run in runs:
        for chunk in shape.opening(run.index, include_usage, run.gen.prompt_ids):
            await send(chunk)
    try:
        piece: Piece | None = first
        while piece is not None:
            if piece.delta or piece.finish or (piece.tokens and (shape.logprobs or shape.return_token_ids)):
                usage = by_index[piece.index].usage if continuous_usage else None
                await send(shape.chunk(piece.index, piece.delta, piece.finish, include_usage, piece.tokens, usage))
            piece = await anext(pieces, None)
    except UpstreamError as exc:
        # Headers are gone: the error travels in the stream, as OpenAI's API does, and no [DONE]
        # follows, so no client can take the partial answer for a complete one.
        await send(exc.api_error().body())
        await response.write_eof()
        return response
    if include_usage:
        await send(shape.usage_chunk(request_usage(runs)))
    await send("[DONE]")
    await response.write_eof()
    return response
