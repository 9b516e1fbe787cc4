"""Compatibility table: every vLLM request field and endpoint → served (and doing what vLLM does),
or a 400 in OpenAI's format that names the field. Against a router with a real prefill and decode
worker, so each field travels router → prefill → KV pull → decode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from router_harness import SERVED, RunningRouter

pytestmark = pytest.mark.slow

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
BASE = {"model": SERVED, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}
CHAT_BASE = {"model": SERVED, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
             "temperature": 0}
Check = Callable[[dict[str, Any], "Ctx"], Awaitable[None] | None]


class Ctx:
    """What checks need: the router, an HTTP session, and the greedy answer to BASE."""

    def __init__(self, router: RunningRouter, http: aiohttp.ClientSession) -> None:
        self.router = router
        self.http = http
        self.greedy_ids: list[int] = []

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.post(self.router.url + path, json=body) as resp:
            return resp.status, await resp.json()

    async def sse(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.http.post(self.router.url + path, json=body) as resp:
            assert resp.status == 200, await resp.text()
            lines = [line.decode().strip() async for line in resp.content]
        data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(d) for d in data[:-1]]


def _ids(body: dict[str, Any], i: int = 0) -> list[int]:
    return body["choices"][i]["token_ids"]


# ---- served fields: (field, endpoint, extra body, check of the 200 answer) -------------------------------------

def _same_as_greedy(body: dict[str, Any], ctx: Ctx) -> None:
    assert _ids(body) == ctx.greedy_ids


def _n_choices(body: dict[str, Any], ctx: Ctx) -> None:
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(_ids(body, i) == ctx.greedy_ids for i in range(3)), "greedy samples agree"
    assert body["usage"]["completion_tokens"] == 18


def _batched(body: dict[str, Any], ctx: Ctx) -> None:
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert _ids(body, 0) == _ids(body, 1) == ctx.greedy_ids, "prompt 0's two samples"
    assert body["usage"]["completion_tokens"] == 24


def _all_token(token: int) -> Check:
    def check(body: dict[str, Any], ctx: Ctx) -> None:
        assert _ids(body) == [token] * 6
    return check


def _not_all_token(token: int) -> Check:
    def check(body: dict[str, Any], ctx: Ctx) -> None:
        assert token in _ids(body) and _ids(body) != [token] * 6, "the penalty must break the repetition"
    return check


def _within(allowed: list[int]) -> Check:
    def check(body: dict[str, Any], ctx: Ctx) -> None:
        assert set(_ids(body)) <= set(allowed)
    return check


def _stops_at_first(body: dict[str, Any], ctx: Ctx) -> None:
    assert _ids(body) == ctx.greedy_ids[:1] and body["choices"][0]["finish_reason"] == "stop"


def _min_tokens_hold(body: dict[str, Any], ctx: Ctx) -> None:
    ids = _ids(body)
    assert len(ids) >= 3 and ctx.greedy_ids[0] not in ids[:3]


def _prompt_tokens(n: int) -> Check:
    def check(body: dict[str, Any], ctx: Ctx) -> None:
        assert body["usage"]["prompt_tokens"] == n
    return check


def _completion_logprobs(body: dict[str, Any], ctx: Ctx) -> None:
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert len(top) <= 2 and logprob <= 0.0
        assert max(top.values()) == pytest.approx(logprob), "greedy picks the most likely token"
        assert token in top
    assert lp["text_offset"][0] == 0


def _chat_logprobs(body: dict[str, Any], ctx: Ctx) -> None:
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 and isinstance(c["bytes"], list) for c in content)


def _ok(body: dict[str, Any], ctx: Ctx) -> None:
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


X = 77  # a token the bias makes win
SERVED_FIELDS: list[tuple[str, str, dict[str, Any], Check]] = [
    ("unknown field (ignored)", CMPL, {"some_future_field": {"a": 1}}, _same_as_greedy),
    ("metadata", CMPL, {"metadata": {"team": "a"}}, _same_as_greedy),
    ("store", CMPL, {"store": False}, _same_as_greedy),
    ("service_tier", CMPL, {"service_tier": "auto"}, _same_as_greedy),
    ("safety_identifier", CMPL, {"safety_identifier": "user-1"}, _same_as_greedy),
    ("prompt_cache_key", CMPL, {"prompt_cache_key": "k"}, _same_as_greedy),
    ("user", CMPL, {"user": "u"}, _same_as_greedy),
    ("kv_transfer_params", CMPL, {"kv_transfer_params": {"do_remote_decode": False}}, _same_as_greedy),
    ("ignore_eos", CMPL, {"ignore_eos": True}, _same_as_greedy),
    ("skip_special_tokens", CMPL, {"skip_special_tokens": False}, _same_as_greedy),
    ("spaces_between_special_tokens", CMPL, {"spaces_between_special_tokens": True}, _same_as_greedy),
    ("top_k=1 samples greedily", CMPL, {"temperature": 1.0, "top_k": 1, "seed": 3}, _same_as_greedy),
    ("top_p tiny samples greedily", CMPL, {"temperature": 1.0, "top_p": 1e-6, "seed": 3}, _same_as_greedy),
    ("min_p=1 samples greedily", CMPL, {"temperature": 1.0, "min_p": 1.0, "seed": 3}, _same_as_greedy),
    ("best_of = n", CMPL, {"best_of": 1}, _same_as_greedy),
    ("n", CMPL, {"n": 3}, _n_choices),
    ("several prompts", CMPL, {"prompt": ["The quick brown fox", "Hello"], "n": 2}, _batched),
    ("logit_bias", CMPL, {"logit_bias": {str(X): 100}}, _all_token(X)),
    ("presence/frequency penalties", CMPL,
     {"logit_bias": {str(X): 10}, "frequency_penalty": 2.0, "presence_penalty": 2.0}, _not_all_token(X)),
    ("repetition_penalty", CMPL, {"repetition_penalty": 1.3}, _ok),
    ("allowed_token_ids", CMPL, {"allowed_token_ids": [5, 6, 7]}, _within([5, 6, 7])),
    ("stop_token_ids", CMPL, {"stop_token_ids": ["GREEDY0"]}, _stops_at_first),
    ("min_tokens", CMPL, {"stop_token_ids": ["GREEDY0"], "min_tokens": 3}, _min_tokens_hold),
    ("truncate_prompt_tokens", CMPL, {"truncate_prompt_tokens": 2}, _prompt_tokens(2)),
    ("logprobs (completions)", CMPL, {"logprobs": 2}, _completion_logprobs),
    ("logprobs/top_logprobs (chat)", CHAT, {"logprobs": True, "top_logprobs": 3}, _chat_logprobs),
    ("chat_template_kwargs", CHAT, {"chat_template_kwargs": {"enable_thinking": False}}, _ok),
    ("add_generation_prompt", CHAT, {"add_generation_prompt": True}, _ok),
    ("max_completion_tokens", CHAT, {"max_completion_tokens": 4}, _ok),
    ("parallel_tool_calls", CHAT, {"parallel_tool_calls": False}, _ok),
    ("tool_choice none", CHAT, {"tool_choice": "none"}, _ok),
    ("response_format text", CHAT, {"response_format": {"type": "text"}}, _ok),
    ("text content parts", CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}, _ok),
]

# ---- refused fields: (field, endpoint, extra body, param named, words in the message) ----------------------------
REFUSED_FIELDS: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("image_url", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages", "text only"),
    ("input_audio", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "messages", "text only"),
    ("modalities audio", CHAT, {"modalities": ["text", "audio"]}, "modalities", "text only"),
    ("response_format json_object", CHAT, {"response_format": {"type": "json_object"}}, "response_format",
     "structured output"),
    ("tools", CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
    ("use_beam_search", CMPL, {"use_beam_search": True}, "use_beam_search", "beam search"),
    ("guided_json", CMPL, {"guided_json": {"type": "object"}}, "guided_json", "structured outputs"),
    ("structured_outputs", CMPL, {"structured_outputs": {"regex": "a+"}}, "structured_outputs", "structured"),
    ("prompt_logprobs", CMPL, {"prompt_logprobs": 1}, "prompt_logprobs", "prompt logprobs"),
    ("echo with logprobs", CMPL, {"echo": True, "logprobs": 1}, "logprobs", "prompt logprobs"),
    ("suffix", CMPL, {"suffix": "end"}, "suffix", "not supported"),
    ("best_of > n", CMPL, {"best_of": 3}, "best_of", "not supported"),
    ("priority", CMPL, {"priority": 5}, "priority", "priority"),
    ("bad_words", CMPL, {"bad_words": ["fox"]}, "bad_words", "not supported"),
    ("include_stop_str_in_output", CMPL, {"include_stop_str_in_output": True}, "include_stop_str_in_output",
     "not supported"),
    ("chat_template", CHAT, {"chat_template": "{{ messages }}"}, "chat_template", "template"),
    ("logit_bias outside vocab", CMPL, {"logit_bias": {"999999": 1}}, "logit_bias", "token ids"),
    ("top_logprobs above 20", CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs"),
    ("too many choices", CMPL, {"prompt": ["a"] * 65, "n": 2}, "prompt", "at most 128"),
]


@pytest.fixture
async def ctx(disagg_router: RunningRouter) -> Any:
    async with aiohttp.ClientSession() as http:
        c = Ctx(disagg_router, http)
        status, body = await c.post(CMPL, {**BASE, "return_token_ids": True, "ignore_eos": True})
        assert status == 200, body
        c.greedy_ids = _ids(body)
        assert len(c.greedy_ids) == 6
        yield c


def _resolve(extra: dict[str, Any], ctx: Ctx) -> dict[str, Any]:
    """`"GREEDY0"` in a table row stands for the first token of the greedy answer."""
    return json.loads(json.dumps(extra).replace('"GREEDY0"', str(ctx.greedy_ids[0])))


async def test_served_fields(ctx: Ctx) -> None:
    failures = []
    for name, path, extra, check in SERVED_FIELDS:
        base = CHAT_BASE if path == CHAT else BASE
        status, body = await ctx.post(path, {**base, "return_token_ids": True, "ignore_eos": True,
                                             **_resolve(extra, ctx)})
        try:
            assert status == 200, body
            result = check(body, ctx)
            if result is not None:
                await result
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


async def test_refused_fields_name_the_field(ctx: Ctx) -> None:
    failures = []
    for name, path, extra, param, words in REFUSED_FIELDS:
        base = CHAT_BASE if path == CHAT else BASE
        status, body = await ctx.post(path, {**base, **extra})
        error = body.get("error", {}) if isinstance(body, dict) else {}
        ok = (status == 400 and set(error) == {"message", "type", "param", "code"}
              and error["type"] == "invalid_request_error" and error["param"] == param
              and words.lower() in error["message"].lower())
        if not ok:
            failures.append(f"{name}: {status} {body}")
    assert not failures, "\n".join(failures)


async def test_continuous_usage_stats_in_every_chunk(ctx: Ctx) -> None:
    """guidellm always sends stream_options.continuous_usage_stats (vLLM's extension)."""
    chunks = await ctx.sse(CMPL, {**BASE, "stream": True, "ignore_eos": True,
                                  "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    with_choices = [c for c in chunks if c["choices"]]
    counts = [c["usage"]["completion_tokens"] for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in with_choices)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_streamed_n_and_logprobs(ctx: Ctx) -> None:
    chunks = await ctx.sse(CHAT, {**CHAT_BASE, "stream": True, "n": 2, "logprobs": True, "top_logprobs": 1,
                                  "ignore_eos": True})
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert choices[-1]["finish_reason"] == "length"
        assert sum(len((c["logprobs"] or {}).get("content", [])) for c in choices) == 6
    texts = ["".join(c["delta"].get("content", "") for c in by_index[i]) for i in (0, 1)]
    assert texts[0] == texts[1], "greedy choices agree"


async def test_vllm_endpoints(ctx: Ctx, disagg_router: RunningRouter) -> None:
    http, url = ctx.http, disagg_router.url
    for path in ("/health", "/ping"):
        async with http.get(url + path) as resp:
            assert resp.status == 200
    async with http.post(url + "/ping") as resp:
        assert resp.status == 200
    async with http.get(url + "/version") as resp:
        assert resp.status == 200 and (await resp.json())["version"]
    status, tok = await ctx.post("/tokenize", {"model": SERVED, "prompt": "The quick brown fox",
                                               "return_token_strs": True})
    assert status == 200 and tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) > 0
    assert tok["max_model_len"] > 0
    status, chat_tok = await ctx.post("/tokenize", {"messages": CHAT_BASE["messages"]})
    assert status == 200 and chat_tok["count"] > 0
    status, detok = await ctx.post("/detokenize", {"model": SERVED, "tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"] == "The quick brown fox"
    status, err = await ctx.post("/detokenize", {"tokens": [10**7]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = await ctx.post("/tokenize", {"model": "other", "prompt": "x"})
    assert status == 404 and err["error"]["code"] == "model_not_found"
    api = openai.AsyncOpenAI(base_url=disagg_router.base_url, api_key="x", max_retries=0)
    model = await api.models.retrieve(SERVED)
    assert model.id == SERVED and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        await api.models.retrieve("no-such-model")


async def test_vllm_bench_serve_request_format(ctx: Ctx) -> None:
    """The bodies `vllm bench serve` sends (openai-completions and openai-chat backends): streaming,
    include_usage, ignore_eos, fixed output lengths; every token arrives and is counted."""
    completions = {"model": SERVED, "prompt": "The quick brown fox", "temperature": 0.0, "max_tokens": 7,
                   "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
                   "ignore_eos": True}
    chunks = await ctx.sse(CMPL, completions)
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 1
    chat = {"model": SERVED, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
            "temperature": 0.0, "max_completion_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks = await ctx.sse(CHAT, chat)
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"


async def test_unknown_fields_are_logged_at_debug(ctx: Ctx, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="disaggserve_worker.router.schemas"):
        status, _ = await ctx.post(CMPL, {**BASE, "vendor_knob": 1, "another_one": "x"})
    assert status == 200
    assert any("another_one, vendor_knob" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
