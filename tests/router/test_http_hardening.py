"""What a careless or hostile client can send below the JSON level (issue 11, item 8): every answer
is an OpenAI error body, nothing hangs, and the router keeps serving.

No worker is needed: the router is started with endpoints nobody listens on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from router_harness import SERVED, RunningRouter, start_router

from disaggserve_worker.router.config import RouterConfig

NOWHERE = {"prefill_endpoints": ["http://127.0.0.9:9"], "decode_endpoints": ["http://127.0.0.9:10"]}


def config(**overrides: object) -> RouterConfig:
    values: dict[str, object] = dict(model="builtin:tiny-llama", model_name=SERVED, host="127.0.0.1", port=0,
                                     queue_timeout_s=0.2, body_timeout_s=0.5, **NOWHERE)
    values.update(overrides)
    return RouterConfig.model_validate(values)


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[RunningRouter]:
    keys = tmp_path / "keys"
    keys.write_text("sk-one\nsk-two\n")
    running = await start_router(config(api_key_file=keys))
    try:
        yield running
    finally:
        await running.runner.cleanup()


async def raw_exchange(router: RunningRouter, data: bytes, *, then_wait: bool = True) -> tuple[int, dict]:
    """Send raw bytes; return the status and JSON body of the reply."""
    host, port = router.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
            length = int(headers.get("Content-Length", "0"))
            body = await reader.readexactly(length) if length else await reader.read()
        assert headers["Content-Type"].startswith("application/json"), head
        return status, json.loads(body)
    finally:
        writer.close()


def is_openai_error(body: dict) -> bool:
    return isinstance(body.get("error"), dict) and {"message", "type", "param", "code"} <= set(body["error"])


MALFORMED = [
    ("oversized request line", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("oversized header", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 400),
    ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Type: application/json\r\nAuthorization: Bearer sk-one\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    ("garbage request line", b"\x16\x03\x01 not http at all\r\n\r\n", 400),
]


@pytest.mark.parametrize(("data", "status"), [(d, s) for _, d, s in MALFORMED], ids=[n for n, _, _ in MALFORMED])
async def test_http_parser_refusals_are_openai_errors(router: RunningRouter, data: bytes, status: int) -> None:
    got, body = await raw_exchange(router, data)
    assert got == status and is_openai_error(body), body
    await still_serving(router)


async def test_deeply_nested_json_is_a_400_not_a_500(router: RunningRouter) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-one"}
    async with aiohttp.ClientSession() as http, \
            http.post(router.base_url + "/completions", data=nested, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 400 and body["error"]["code"] == "invalid_json", body
        assert "nests JSON too deeply" in body["error"]["message"]
    await still_serving(router)


async def test_a_body_that_never_finishes_is_timed_out(router: RunningRouter) -> None:
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer sk-one\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
    status, body = await raw_exchange(router, request)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    await still_serving(router)


@pytest.mark.parametrize("header", ["Bearer sk-one", "bearer sk-two", "BEARER  sk-one ", "Bearer\tsk-one"])
async def test_auth_scheme_is_case_insensitive(router: RunningRouter, header: str) -> None:
    async with aiohttp.ClientSession() as http, \
            http.get(router.base_url + "/models", headers={"Authorization": header}) as resp:
        if "\t" in header:  # not a space after the scheme: refused, in OpenAI's shape
            assert resp.status == 401 and is_openai_error(await resp.json())
        else:
            assert resp.status == 200, await resp.text()


async def test_unreadable_key_file_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-one\n")
    running = await start_router(config(api_key_file=keys))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(running.base_url + "/models", headers={"Authorization": "Bearer sk-one"}) as r:
                assert r.status == 200
            keys.unlink()  # a Secret re-mount in progress: the keys read before still hold
            async with http.get(running.base_url + "/models", headers={"Authorization": "Bearer sk-one"}) as r:
                assert r.status == 200
        fresh = await start_router(config(api_key_file=tmp_path / "other"))  # never readable
    except ValueError as exc:  # refused at start-up by the config
        assert "does not exist" in str(exc)
    else:  # pragma: no cover - start-up should have refused
        await fresh.runner.cleanup()
        raise AssertionError("a router started with a missing key file")
    finally:
        await running.runner.cleanup()


async def test_without_workers_the_router_stays_ready_and_answers_503_with_retry_after(
        router: RunningRouter) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(router.url + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["workers_ready"] is False
        async with http.post(router.base_url + "/completions", json={"model": SERVED, "prompt": "x"},
                             headers={"Authorization": "Bearer sk-one"}) as resp:
            body = await resp.json()
            assert resp.status == 503 and body["error"]["code"] == "no_workers", body
            assert int(resp.headers["Retry-After"]) >= 1


async def still_serving(router: RunningRouter) -> None:
    async with aiohttp.ClientSession() as http, \
            http.get(router.base_url + "/models", headers={"Authorization": "Bearer sk-one"}) as resp:
        assert resp.status == 200
