"""Every kind of bad request gets a 4xx in OpenAI's error shape that names the problem, reaches no
worker, and leaves the router serving the next good request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from router_harness import SERVED, RunningRouter, WorkerProcess, router_config, start_router

pytestmark = pytest.mark.slow

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
JS = "application/json"
GOOD = {"model": SERVED, "prompt": "Hello", "max_tokens": 3}
CHAT_GOOD = {"model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

# (name, method, path, body (dict → JSON, bytes → raw), content type, status, param or words in message)
CASES: list[tuple[str, str, str, Any, str, int, str]] = [
    ("bad json", "POST", COMPLETIONS, b'{"model": "tiny", "prompt": ', JS, 400, "not valid JSON"),
    ("body not an object", "POST", COMPLETIONS, b"[1, 2]", JS, 400, "JSON object"),
    ("missing model", "POST", COMPLETIONS, {"prompt": "x"}, JS, 400, "model"),
    ("unknown model", "POST", COMPLETIONS, {**GOOD, "model": "gpt-9"}, JS, 404, "model"),
    ("missing prompt", "POST", COMPLETIONS, {"model": SERVED}, JS, 400, "prompt"),
    ("missing messages", "POST", CHAT, {"model": SERVED}, JS, 400, "messages"),
    ("prompt wrong type", "POST", COMPLETIONS, {**GOOD, "prompt": 42}, JS, 400, "prompt"),
    ("temperature as string", "POST", COMPLETIONS, {**GOOD, "temperature": "hot"}, JS, 400,
     "temperature"),
    ("temperature out of range", "POST", COMPLETIONS, {**GOOD, "temperature": 2.5}, JS, 400,
     "temperature"),
    ("top_p zero", "POST", COMPLETIONS, {**GOOD, "top_p": 0}, JS, 400, "top_p"),
    ("top_p above one", "POST", CHAT, {**CHAT_GOOD, "top_p": 1.5}, JS, 400, "top_p"),
    ("max_tokens zero", "POST", COMPLETIONS, {**GOOD, "max_tokens": 0}, JS, 400, "max_tokens"),
    ("max_tokens negative", "POST", CHAT, {**CHAT_GOOD, "max_tokens": -5}, JS, 400,
     "max_tokens"),
    ("n above the limit", "POST", COMPLETIONS, {**GOOD, "n": 129}, JS, 400, "n"),
    ("stop wrong type", "POST", COMPLETIONS, {**GOOD, "stop": 7}, JS, 400, "stop"),
    ("too many stops", "POST", COMPLETIONS, {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, JS,
     400, "stop"),
    ("empty stop", "POST", CHAT, {**CHAT_GOOD, "stop": [""]}, JS, 400, "stop"),
    ("logprobs out of range", "POST", COMPLETIONS, {**GOOD, "logprobs": 21}, JS, 400,
     "logprobs"),
    ("chat logprobs wrong type", "POST", CHAT, {**CHAT_GOOD, "logprobs": "yes"}, JS, 400,
     "logprobs"),
    ("unknown role", "POST", CHAT, {**CHAT_GOOD, "messages": [{"role": "wizard", "content": "x"}]},
     JS, 400, "messages"),
    ("empty messages", "POST", CHAT, {**CHAT_GOOD, "messages": []}, JS, 400, "messages"),
    ("message without content", "POST", CHAT, {**CHAT_GOOD, "messages": [{"role": "user"}]},
     JS, 400, "messages"),
    ("beam search", "POST", COMPLETIONS, {**GOOD, "use_beam_search": True}, JS, 400,
     "use_beam_search"),
    ("stream_options without stream", "POST", COMPLETIONS,
     {**GOOD, "stream_options": {"include_usage": True}},
     JS, 400, "stream_options"),
    ("prompt over the context", "POST", COMPLETIONS, {**GOOD, "prompt": "hello " * 3000, "max_tokens": 16},
     JS, 400, "context length"),
    ("max_tokens over the context", "POST", COMPLETIONS, {**GOOD, "max_tokens": 100_000}, JS,
     400, "context length"),
    ("token id outside vocabulary", "POST", COMPLETIONS, {**GOOD, "prompt": [1, 2, 10**6]},
     JS, 400, "prompt"),
    ("empty prompt in a batch", "POST", COMPLETIONS, {**GOOD, "prompt": [[1, 2], []]}, JS, 400, "prompt"),
    ("wrong content type", "POST", COMPLETIONS, b"model=tiny", "application/x-www-form-urlencoded", 415,
     "Content-Type"),
    ("body too large", "POST", COMPLETIONS, b"{" + b" " * 70_000 + b"}", JS, 413, "larger"),
    ("unknown path", "POST", "/v1/embeddings", GOOD, JS, 404, "Unknown path"),
    ("wrong method", "GET", COMPLETIONS, None, JS, 405, "not allowed"),
]


@pytest.fixture
async def strict_router(disagg_workers: list[WorkerProcess]) -> Any:
    running = await start_router(router_config(disagg_workers, max_body_bytes=65_536))
    yield running
    await running.runner.cleanup()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_bad_request_then_good(strict_router: RunningRouter, case: tuple[Any, ...]) -> None:
    _name, method, path, body, ctype, status, hint = case
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.request(method, strict_router.url + path, data=data,
                                headers={"Content-Type": ctype}) as resp:
            assert resp.status == status, await resp.text()
            error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert hint in error["message"] or error["param"] == hint, error
        async with http.post(strict_router.url + COMPLETIONS, json=GOOD) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["usage"]["completion_tokens"] >= 1
    metrics = strict_router.router.metrics.render().decode()
    if path.startswith("/v1/"):
        assert 'disaggserve_requests_total{status="client_error"} 1.0' in metrics
    assert 'disaggserve_requests_total{status="ok"} 1.0' in metrics
    assert len(CASES) >= 15


async def test_api_key_from_file(disagg_workers: list[WorkerProcess], tmp_path: Path) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text("first-key\nsecond-key\n")
    running = await start_router(router_config(disagg_workers, api_key_file=keys))
    try:
        for key, ok in (("wrong", False), ("second-key", True)):
            api = openai.AsyncOpenAI(base_url=running.base_url, api_key=key, max_retries=0)
            if ok:
                done = await api.completions.create(model=SERVED, prompt="Hi", max_tokens=2)
                assert done.usage is not None
            else:
                with pytest.raises(openai.AuthenticationError) as info:
                    await api.completions.create(model=SERVED, prompt="Hi", max_tokens=2)
                assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        async with aiohttp.ClientSession() as http, http.get(running.url + "/v1/models") as resp:
            assert resp.status == 401  # no header at all
        keys.write_text("rotated-key\n")  # a Secret update reaches the mounted file
        api = openai.AsyncOpenAI(base_url=running.base_url, api_key="rotated-key", max_retries=0)
        assert (await api.models.list()).data[0].id == SERVED
        async with aiohttp.ClientSession() as http, http.get(running.url + "/healthz") as resp:
            assert resp.status == 200  # probes need no key
    finally:
        await running.runner.cleanup()
