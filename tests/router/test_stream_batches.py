"""The router's streaming fast path: tokens that arrive together travel as one batch, and the SSE
chunks of plain text come from a template. What clients receive must not change: these tests hold
the batched path to what one token at a time gave (chunk bytes, counts, stop strings, faults)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest

from disaggserve_worker.engine.detokenizer import IncrementalDetokenizer
from disaggserve_worker.engine.types import TokenEvent
from disaggserve_worker.model.source import load_tokenizer
from disaggserve_worker.router.dispatch import GenerationRequest, Token, WorkerFault, _parse_events
from disaggserve_worker.router.metrics import RouterMetrics
from disaggserve_worker.router.pool import Worker
from disaggserve_worker.router.responses import ChatShape, CompletionShape, Progress, Shape, TokenInfo
from disaggserve_worker.router.serving import ChoiceRun, _pieces

DELTAS = ["", "hello", " world", 'quote " and \\ back', "new\nline\ttab", "é ü 漢字 🙂", "\u2028", "\x00\x1f"]


def _reference(shape: Shape, *args: object) -> bytes:
    data = json.dumps(shape.chunk(*args), separators=(",", ":"))  # type: ignore[arg-type]
    return f"data: {data}\n\n".encode()


@pytest.mark.parametrize("make", [
    lambda: ChatShape('mo"del-é', str),
    lambda: CompletionShape("tiny", str),
])
def test_a_plain_chunk_from_the_template_is_the_bytes_json_dumps_gives(make):
    shape = make()
    for delta in DELTAS:
        for finish in (None, "stop", "length"):
            for include_usage in (False, True):
                for index in (0, 3, 17):
                    args = (index, delta, finish, include_usage, [TokenInfo(5)])
                    assert shape.event(*args) == _reference(shape, *args)


def test_chunks_with_more_than_text_take_the_full_shape():
    info = [TokenInfo(7, {"logprob": -0.5, "top": [[7, -0.5], [8, -1.5]]})]
    logprobs, twin = (CompletionShape("tiny", lambda i: f"<{i}>", logprobs=True) for _ in range(2))
    twin.id, twin.created = logprobs.id, logprobs.created  # text offsets move per chunk: one call each
    assert logprobs.event(0, "a", None, False, info) == _reference(twin, 0, "a", None, False, info)
    assert b'"text_offset":[3]' in logprobs.event(0, "b", None, False, info)  # after "<7>"
    ids = ChatShape("tiny", str, return_token_ids=True)
    assert ids.event(1, "x", None, True, info) == _reference(ids, 1, "x", None, True, info)
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    chat = ChatShape("tiny", str)
    assert chat.event(0, "x", None, True, info, usage) == _reference(chat, 0, "x", None, True, info, usage)
    assert b'"usage":{"prompt_tokens":3' in chat.event(0, "x", None, True, info, usage)


def test_the_first_chunk_of_an_echoed_choice_carries_the_prompt():
    shape = CompletionShape("tiny", str, echo={0: "Say: "})
    assert json.loads(shape.event(0, "hi", None, False, [])[6:])["choices"][0]["text"] == "Say: hi"
    assert json.loads(shape.event(0, "!", None, False, [])[6:])["choices"][0]["text"] == "!"


WORKER = Worker("http://127.0.0.1:1", "decode")


def _line(**event: object) -> bytes:
    return json.dumps(event).encode()


def test_worker_lines_read_without_json_give_what_parsing_them_gives():
    # Exactly the bytes a built-in worker writes (server.app: json.dumps(event.wire()) + "\n").
    events = [TokenEvent(7, "plain"), TokenEvent(8, 'x", "finish_reason": null}'), TokenEvent(9, "é\n"),
              TokenEvent(10, "", "length"), TokenEvent(11, "a", None, logprobs={"logprob": -1.0, "top": []}),
              TokenEvent(12, "b", "stop", logprobs={"logprob": -0.5, "top": [[12, -0.5]]})]
    lines = [json.dumps(event.wire()).encode() for event in events]
    parsed = [_parse_events([line], WORKER, None)[0] for line in lines]
    assert [[(t.token_id, t.finish_reason, t.logprobs) for t in batch] for batch in parsed] == \
        [[(e.token_id, e.finish_reason, e.logprobs)] for e in events]
    batch, fault = _parse_events([b'{"token_id": nope, "text": "", "finish_reason": null}'], WORKER, None)
    assert batch == [] and isinstance(fault, WorkerFault) and fault.reason == "stream_broken"


def test_the_lines_of_one_read_become_one_batch_up_to_the_finish():
    lines = [_line(token_id=1, text="a", finish_reason=None), b"", _line(token_id=2, text="b", finish_reason="stop"),
             _line(token_id=3, text="c", finish_reason=None)]
    batch, fault = _parse_events(lines, WORKER, None)
    assert [(t.token_id, t.finish_reason) for t in batch] == [(1, None), (2, "stop")] and fault is None


def test_tokens_before_an_error_event_are_handed_on_before_the_fault():
    lines = [_line(token_id=1, text="a", finish_reason=None),
             _line(error={"type": "engine_error", "message": "boom", "retryable": True}),
             _line(token_id=2, text="b", finish_reason=None)]
    batch, fault = _parse_events(lines, WORKER, None)
    assert [t.token_id for t in batch] == [1]
    assert isinstance(fault, WorkerFault) and fault.reason == "engine_error"


def test_a_line_that_does_not_parse_breaks_the_stream_after_the_tokens_before_it():
    batch, fault = _parse_events([_line(token_id=4, text="", finish_reason=None), b"{not json"], WORKER, None)
    assert [t.token_id for t in batch] == [4]
    assert isinstance(fault, WorkerFault) and fault.reason == "stream_broken"


async def _batches(*batches: list[Token]) -> AsyncIterator[list[Token]]:
    for batch in batches:
        yield batch


def _run(tokenizer, prompt: list[int], stop: list[str]) -> ChoiceRun:
    gen = GenerationRequest("r", prompt, max_tokens=64, stop=stop)
    return ChoiceRun(0, 0, gen, IncrementalDetokenizer(tokenizer, prompt, stop), Progress(time.monotonic()))


async def test_a_batch_gives_the_pieces_one_token_at_a_time_gave_and_stops_where_they_stopped():
    tokenizer = load_tokenizer("builtin:tiny-llama")
    prompt = tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    ids = tokenizer.encode(" there was a router that streamed tokens. The end, or not", add_special_tokens=False).ids
    stop = ["The end"]

    one_by_one = _run(tokenizer, prompt, stop)
    single = [p async for batch in _pieces(one_by_one, _batches(*[[Token(i)] for i in ids]), RouterMetrics(None, None))
              for p in batch]
    batched = _run(tokenizer, prompt, stop)
    metrics = RouterMetrics(None, None)
    two_reads = _batches([Token(i) for i in ids[:5]], [Token(i) for i in ids[5:]])
    together = [p async for batch in _pieces(batched, two_reads, metrics) for p in batch]
    assert [(p.delta, p.finish, p.completion_tokens) for p in together] == \
        [(p.delta, p.finish, p.completion_tokens) for p in single]
    assert together[-1].finish == "stop" and "The end" not in "".join(p.delta for p in together)
    assert batched.progress.count == one_by_one.progress.count < len(ids)  # tokens after the stop are not counted
    assert [p.completion_tokens for p in together] == list(range(1, batched.progress.count + 1))
    assert metrics.generation_tokens._value.get() == batched.progress.count
