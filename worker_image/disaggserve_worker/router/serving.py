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


@dataclass(slots=True)
class Piece:
    """Text that became final for one choice, the tokens that made it, and the finish if it ended.

    `completion_tokens` is the choice's token count once this piece is out (vLLM's per-chunk
    `continuous_usage_stats`): a batch's pieces are counted before any of them is sent."""

    index: int
    delta: str
    finish: str | None
    tokens: list[TokenInfo] = field(default_factory=list)
    completion_tokens: int = 0


@dataclass
class ChoiceRun:
    index: int
    prompt_index: int
    gen: GenerationRequest
    detok: IncrementalDetokenizer
    progress: Progress
    tokens: list[TokenInfo] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


def request_usage(runs: list[ChoiceRun]) -> dict[str, int]:
    """vLLM's count: each prompt once, every choice's completion tokens."""
    prompts = {run.prompt_index: len(run.gen.prompt_ids) for run in runs}
    return usage_of(sum(prompts.values()), sum(run.progress.count for run in runs))


async def _pieces(run: ChoiceRun, stream: AsyncIterator[list[Token]],
                  metrics: RouterMetrics) -> AsyncIterator[list[Piece]]:
    """One choice's pieces, a list per batch of tokens (one per token); stops its workers as soon
    as a stop string shows: the tokens of the batch after it are neither counted nor sent, as
    they would not have been read one token at a time."""
    progress, detok, index = run.progress, run.detok, run.index
    async with aclosing(stream) as batches:
        async for batch in batches:
            pieces: list[Piece] = []
            counted = progress.count
            for token in batch:
                delta, stopped, infos = "", False, []
                if token.token_id is not None:
                    progress.add()
                    delta, stopped = detok.add(token.token_id)
                    infos = [TokenInfo(token.token_id, token.logprobs)]
                finish = "stop" if stopped else token.finish_reason
                if finish is not None:
                    progress.finish_reason = finish
                    pieces.append(Piece(index, delta + ("" if stopped else detok.flush()), finish, infos,
                                        progress.count))
                    break
                pieces.append(Piece(index, delta, None, infos, progress.count))
            if progress.count > counted:  # one increment per batch: the counter takes a lock
                metrics.generation_tokens.inc(progress.count - counted)
            yield pieces
            if pieces[-1].finish is not None:
                return


def merged(runs: list[ChoiceRun], dispatcher: Dispatcher, metrics: RouterMetrics) -> AsyncIterator[list[Piece]]:
    """Pieces of every choice in arrival order, in batches; the first failure (after its retries)
    ends them all. One choice's pieces come straight from it, with no generator in between."""
    if len(runs) == 1:
        return _pieces(runs[0], dispatcher.generate_batches(runs[0].gen), metrics)
    return _merged_many(runs, dispatcher, metrics)


async def _merged_many(runs: list[ChoiceRun], dispatcher: Dispatcher,
                       metrics: RouterMetrics) -> AsyncIterator[list[Piece]]:
    queue: asyncio.Queue[list[Piece] | BaseException | None] = asyncio.Queue()

    async def pump(run: ChoiceRun) -> None:
        try:
            async with aclosing(_pieces(run, dispatcher.generate_batches(run.gen), metrics)) as batches:
                async for pieces in batches:
                    await queue.put(pieces)
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


async def respond_whole(runs: list[ChoiceRun], batches: AsyncIterator[list[Piece]], shape: Shape) -> web.Response:
    by_index = {run.index: run for run in runs}
    async for pieces in batches:
        for piece in pieces:
            run = by_index[piece.index]
            run.text.append(piece.delta)
            run.tokens.extend(piece.tokens)
    results = [ChoiceResult(run.index, "".join(run.text), run.progress.finish_reason, run.tokens,
                            run.gen.prompt_ids) for run in runs]
    return web.json_response(shape.full(results, request_usage(runs)))


async def respond_stream(request: web.Request, runs: list[ChoiceRun], batches: AsyncIterator[list[Piece]],
                         shape: Shape, *, include_usage: bool, continuous_usage: bool) -> web.StreamResponse:
    """The SSE answer: one chunk per piece that says something, every chunk of a batch in one write."""
    prompts = {run.index: len(run.gen.prompt_ids) for run in runs}
    # Wait for the first token before answering 200: failures before it become a plain error reply.
    first = await anext(batches)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    for run in runs:
        for chunk in shape.opening(run.index, include_usage, run.gen.prompt_ids):
            await send(chunk)
    with_tokens = shape.logprobs or shape.return_token_ids
    try:
        pieces: list[Piece] | None = first
        while pieces is not None:
            events = [shape.event(piece.index, piece.delta, piece.finish, include_usage, piece.tokens,
                                  usage_of(prompts[piece.index], piece.completion_tokens) if continuous_usage else None)
                      for piece in pieces if piece.delta or piece.finish or (piece.tokens and with_tokens)]
            if events:
                await response.write(b"".join(events))
            pieces = await anext(batches, None)
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
