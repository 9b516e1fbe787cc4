"""The router's adapter for vLLM workers: vLLM's own prefill/decode request flow.

Disaggregated, as vLLM's disaggregated proxy example (`toy_proxy_server.py`) drives it:

1. the prefill server gets the prompt with `max_tokens: 1` and
   `kv_transfer_params: {"do_remote_decode": true}`; it computes the KV cache, keeps the blocks
   for the decode side and answers with the `kv_transfer_params` that locate them (engine id,
   block ids, host, port of its NIXL side channel);
2. the decode server gets the original request plus those `kv_transfer_params`; its KV connector
   pulls the blocks and it streams every token (the prefill's one sampled token is discarded, so
   seeded sampling gives the same text as a single server would).

Colocated: the request goes to one plain vLLM server. Prompts travel as token ids (the router
tokenized them with the checkpoint's own tokenizer, as for the built-in worker) and
`return_token_ids` brings the generated ids back, so the router's detokenizer, stop strings,
retries and mid-stream resume (a new attempt on prompt + tokens already sent) work unchanged.

Auth: vLLM pods get the DisaggServe's worker token as `VLLM_API_KEY`, so `/v1` calls carry it as
a bearer token (vLLM leaves `/health` and `/metrics` open, as the built-in worker does).

Load: vLLM has no `/internal/load`; `fetch_load` reads its Prometheus gauges
(`vllm:num_requests_running`, `vllm:num_requests_waiting`) into the pool's load fields.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp

from ..auth import worker_token
from .pool import NoWorkerAvailable, Worker

if TYPE_CHECKING:
    from .dispatch import Dispatcher, GenerationRequest, Token

log = logging.getLogger(__name__)

PATH_COMPLETIONS = "/v1/completions"
PATH_METRICS = "/metrics"
_GAUGE = re.compile(r"^(vllm:[a-z_]+)(\{[^}]*\})?\s+([-+0-9.eEinfaN]+)\s*$")


def _body(dispatcher: Dispatcher, req: GenerationRequest, context: list[int], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": dispatcher.model_name,
        "prompt": context,
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "return_token_ids": True,
        # The router detokenizes and cuts at stop strings itself (a closed stream aborts the request
        # in vLLM), so vLLM needs no text at all.
        "skip_special_tokens": False,
    }
    if req.seed is not None:
        body["seed"] = req.seed
    if req.ignore_eos:
        body["ignore_eos"] = True
    return body


async def attempt(dispatcher: Dispatcher, req: GenerationRequest, generated: list[int], attempt_no: int,
                  excluded: set[str]) -> AsyncIterator[list[Token]]:
    """One try of `req` on vLLM workers, in batches of tokens (one per event); raises
    `WorkerFault` (retried by the dispatcher)."""
    context = req.prompt_ids + generated
    remaining = req.max_tokens - len(generated)
    body = _body(dispatcher, req, context, remaining)
    request_id = req.request_id if attempt_no == 0 else f"{req.request_id}-retry{attempt_no}"
    headers = {"X-Request-Id": request_id}
    if token := worker_token():  # vLLM pods take the worker token as their API key (VLLM_API_KEY)
        headers["Authorization"] = f"Bearer {token}"
    mode = dispatcher.pool.mode
    if mode == "colocated":
        worker = dispatcher.pool.pick_colocated(excluded)
        async for batch in _stream(dispatcher, worker, {**body, "stream": True}, headers, len(context)):
            yield batch
        return
    if mode is None:
        raise NoWorkerAvailable("no workers are known to the router (check discovery)")
    if not dispatcher.pool.has_available("decode", excluded):
        raise NoWorkerAvailable(dispatcher.pool.why_none("decode", excluded))
    prefill = dispatcher.pool.pick_prefill(excluded)
    params = await _prefill(dispatcher, prefill, body, headers, len(context))
    decode = dispatcher.pool.pick_decode(len(context) + remaining, prefill.unit, excluded)
    decode_body = {**body, "stream": True}
    if params:
        decode_body["kv_transfer_params"] = params
    async for batch in _stream(dispatcher, decode, decode_body, headers, 0, prefill=prefill):
        yield batch


async def _prefill(dispatcher: Dispatcher, worker: Worker, body: dict[str, Any], headers: dict[str, str],
                   tokens: int) -> dict[str, Any] | None:
    """Runs the prompt on `worker`, returns the `kv_transfer_params` the decode request carries."""
    from .dispatch import WorkerFault, _check_status, _describe

    prefill_body = {
        **body,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    timeouts = dispatcher.timeouts
    timeout = aiohttp.ClientTimeout(total=timeouts.prefill_s, connect=timeouts.connect_s)
    worker.inflight_requests += 1
    worker.inflight_tokens += tokens
    try:
        async with dispatcher.session.post(worker.url + PATH_COMPLETIONS, json=prefill_body, headers=headers,
                                           timeout=timeout) as resp:
            await _check_status(worker, resp)
            result = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise WorkerFault(worker, "prefill_unreachable", _describe(exc)) from None
    finally:
        worker.inflight_requests -= 1
        worker.inflight_tokens -= tokens
    if not isinstance(result, dict) or not result.get("choices"):
        raise WorkerFault(worker, "prefill_bad_reply", f"reply lacks choices: {result!r:.200}")
    params = result.get("kv_transfer_params")
    return params if isinstance(params, dict) else None


async def _stream(dispatcher: Dispatcher, worker: Worker, body: dict[str, Any], headers: dict[str, str],
                  tokens: int, prefill: Worker | None = None) -> AsyncIterator[list[Token]]:
    """Streams vLLM's server-sent events as `Token`s (one per generated id), a batch per event."""
    from .dispatch import Token, WorkerFault, _check_status, _describe

    timeouts = dispatcher.timeouts
    timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect_s, sock_read=timeouts.token_s)
    worker.inflight_requests += 1
    worker.inflight_tokens += tokens
    finished = False
    try:
        async with dispatcher.session.post(worker.url + PATH_COMPLETIONS, json=body, headers=headers,
                                           timeout=timeout) as resp:
            await _check_status(worker, resp)
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event or event.get("object") == "error":
                    error = event.get("error", event)
                    raise WorkerFault(worker, "stream_error", f"{error!r:.300}",
                                      blame=prefill is None)
                for choice in event.get("choices") or []:
                    ids = [int(t) for t in choice.get("token_ids") or []]
                    finish = choice.get("finish_reason")
                    if tokens and ids:  # the prompt is done once the first token arrives
                        worker.inflight_tokens -= tokens
                        tokens = 0
                    if ids:
                        yield [Token(token_id, finish if i == len(ids) - 1 else None)
                               for i, token_id in enumerate(ids)]
                    if finish is not None:
                        if not ids:  # a bare end marker
                            yield [Token(None, finish)]
                        finished = True
                        return
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise WorkerFault(worker, "stream_broken", _describe(exc)) from None
    finally:
        worker.inflight_requests -= 1
        worker.inflight_tokens -= tokens
    if not finished:
        raise WorkerFault(worker, "stream_broken", "the stream ended without a finish_reason")


def parse_load(text: str) -> dict[str, Any]:
    """vLLM's Prometheus text → the pool's load fields (summed over label sets, e.g. engines)."""
    gauges: dict[str, float] = {}
    for line in text.splitlines():
        match = _GAUGE.match(line)
        if match:
            gauges[match.group(1)] = gauges.get(match.group(1), 0.0) + float(match.group(3))
    if "vllm:num_requests_running" not in gauges:
        raise ValueError("no vllm:num_requests_running gauge in /metrics (is this a vLLM server?)")
    return {
        "running": int(gauges["vllm:num_requests_running"]),
        # The pool ranks prefill workers by queued tokens; vLLM exposes queued requests only.
        "queued_tokens": int(gauges.get("vllm:num_requests_waiting", 0)),
        "draining": False,
    }


async def fetch_load(session: aiohttp.ClientSession, worker: Worker, timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
    async with session.get(worker.url + PATH_METRICS, timeout=timeout) as resp:
        resp.raise_for_status()
        return parse_load(await resp.text())
