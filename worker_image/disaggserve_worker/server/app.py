"""The worker's HTTP server (aiohttp): the internal protocol of `disaggserve_worker.contract`.

Handlers only translate HTTP to engine calls: validation (pydantic, 4xx with a message that
names the field), admission waits, KV pulls, and NDJSON streaming of engine events. A client
that goes away aborts its request so its cache is freed at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from disaggserve_worker import contract
from disaggserve_worker.auth import (
    ENV_WORKER_TOKEN,
    HEADER_WORKER_TOKEN,
    sign,
    signature_matches,
    token_matches,
    worker_token,
)
from disaggserve_worker.engine.engine import Engine, Reservation
from disaggserve_worker.engine.types import RequestError, RequestStream, TokenEvent
from disaggserve_worker.kv.framing import KVTransferError
from disaggserve_worker.kv.transport import KVServer, KVTransport, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.server.schemas import DecodeRequest, PromptRequest, ReleaseRequest
from disaggserve_worker.server.worker_metrics import RequestTimer, WorkerMetrics

log = logging.getLogger(__name__)
Body = TypeVar("Body", bound=BaseModel)
NDJSON = "application/x-ndjson"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What a kubelet and a metrics scraper call: answered without the token (they do not hold it).
OPEN_PATHS = frozenset({contract.PATH_HEALTH, contract.PATH_READY, contract.PATH_METRICS})


@dataclass
class ServerConfig:
    role: str
    host: str = "127.0.0.1"
    port: int = contract.WORKER_PORT
    kv_port: int = contract.KV_PORT
    advertise_host: str | None = None
    model_name: str = "model"
    admission_timeout_s: float = 30.0
    admission_poll_s: float = 0.005
    # The DisaggServe's shared secret (`disaggserve_worker.auth`); None: trust the network.
    token: str | None = field(default_factory=worker_token)


def error_body(kind: str, message: str, retryable: bool) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "retryable": retryable}}


def json_error(status: int, kind: str, message: str, retryable: bool = False) -> web.Response:
    return web.json_response(error_body(kind, message, retryable), status=status)


def unauthorized() -> web.Response:
    """401 in OpenAI's error shape (message/type/param/code), plus this protocol's `retryable`."""
    return web.json_response({"error": {
        "message": f"This worker serves only its own DisaggServe: send the worker token in the "
                   f"{HEADER_WORKER_TOKEN} header (the router and the operator do).",
        "type": "invalid_request_error", "param": None, "code": "invalid_worker_token", "retryable": False}},
        status=401)


class WorkerServer:
    def __init__(self, engine: Engine, config: ServerConfig, metrics: WorkerMetrics,
                 transport: KVTransport | None = None):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.transport: KVTransport = transport or TcpKVTransport(token=config.token)  # proves it on the KV port
        self.kv_layout = layout_of(engine)  # what every pull expects (made once: it walks the model)
        self.draining = False
        self.inflight = 0
        self.admitting = 0  # decode requests waiting for KV-cache room (vllm:num_requests_waiting)
        metrics.bind(kv_capacity_tokens=engine.allocator.capacity_tokens, block_size=engine.allocator.block_size,
                     extra_waiting=lambda: self.admitting)
        self.kv_server: KVServer | None = None
        self.port = config.port
        self._runner: web.AppRunner | None = None
        if config.token is None:
            log.warning("no %s set: this worker accepts internal calls from anyone who can reach it",
                        ENV_WORKER_TOKEN)
        self.app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._auth_middleware])
        self.app.add_routes([
            web.get(contract.PATH_HEALTH, self.healthz),
            web.get(contract.PATH_READY, self.readyz),
            web.get(contract.PATH_METRICS, self.metrics_handler),
            web.get(contract.PATH_LOAD, self.load),
            web.post(contract.PATH_DRAIN, self.drain),
            web.post(contract.PATH_PREFILL, self.prefill),
            web.post(contract.PATH_DECODE, self.decode),
            web.post(contract.PATH_GENERATE, self.generate),
            web.post(contract.PATH_RELEASE, self.release),
        ])

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def kv_address(self) -> str:
        host = self.config.advertise_host or self.config.host
        port = self.kv_server.port if self.kv_server else self.config.kv_port
        return f"{host}:{port}"

    async def start_engine(self) -> None:
        """Start the engine thread and, on a prefill worker, the KV port."""
        self.engine.start()
        if self.config.role == "prefill":
            self.kv_server = KVServer(self.engine, on_sent=self.metrics.observe_transfer, token=self.config.token)
            await self.kv_server.start(self.config.host, self.config.kv_port)

    async def start(self) -> None:
        await self.start_engine()
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.host, self.config.port).start()
        self.port = int(self._runner.addresses[0][1])  # the real one when asked for port 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.kv_server is not None:
            await self.kv_server.stop()
        await asyncio.to_thread(self.engine.stop)

    def is_idle(self) -> bool:
        return self.inflight == 0 and self.engine.idle and self.engine.held_count == 0

    async def drain_and_wait(self, grace_s: float) -> bool:
        """Stop admitting and wait (bounded) until in-flight work and held caches are gone."""
        self.draining = True
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.is_idle():
                return True
            await asyncio.sleep(0.05)
        return self.is_idle()

    # ---- helpers -------------------------------------------------------------------------------
    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Only holders of this DisaggServe's token reach the internal endpoints (before any body is read)."""
        if request.path not in OPEN_PATHS and not token_matches(self.config.token,
                                                               request.headers.get(HEADER_WORKER_TOKEN)):
            self.metrics.request("unauthorized")
            return unauthorized()
        return await handler(request)

    async def _parse(self, request: web.Request, model: type[Body]) -> Body:
        try:
            raw = await request.json()
        except (ValueError, RecursionError) as error:  # RecursionError: JSON nested too deeply
            raise web.HTTPBadRequest(text=json.dumps(error_body(
                "invalid_json", f"request body is not JSON: {error!r:.200}", False)),
                content_type="application/json") from None
        try:
            return model.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                 for e in error.errors())
            raise web.HTTPBadRequest(text=json.dumps(error_body("invalid_request", problems, False)),
                                     content_type="application/json") from None

    def _refuse(self, role: str) -> web.Response | None:
        if self.config.role != role:
            return json_error(409, "wrong_role", f"this is a {self.config.role} worker; it does not serve "
                              f"the {role} endpoint (check the router's worker discovery)")
        if self.draining:
            return json_error(503, "draining", "worker is draining; send new requests elsewhere", True)
        return None

    async def _pump(self, response: web.StreamResponse, stream: RequestStream, timer: RequestTimer) -> None:
        """Forward engine events as NDJSON; a vanished client aborts the request."""
        try:
            async for event in stream:
                if event.token_id is not None:
                    timer.token()
                await response.write((json.dumps(event.wire()) + "\n").encode())
                if event.error is not None:
                    self.metrics.request("error")
                    timer.finish("abort")
                elif event.finish_reason is not None:
                    self.metrics.request("finished")
                    timer.finish(event.finish_reason)
        except (ConnectionError, asyncio.CancelledError) as exc:
            self.engine.abort(stream.request_id)
            self.metrics.request("aborted")
            timer.finish("abort")
            if isinstance(exc, asyncio.CancelledError):
                raise
            # The router hung up (its client left): an abort, counted above, not a server error
            # for aiohttp to log with a traceback; it finishes the response quietly.

    async def _reserve(self, body: DecodeRequest) -> Reservation | None:
        """Wait for cache room (decode backpressure): pull only once the whole request fits."""
        deadline = time.monotonic() + self.config.admission_timeout_s
        self.admitting += 1
        try:
            while True:
                reservation = self.engine.reserve(body.prompt_token_ids, body.sampling)
                if reservation is not None or time.monotonic() >= deadline or self.draining:
                    return reservation
                await asyncio.sleep(self.config.admission_poll_s)
        finally:
            self.admitting -= 1

    # ---- endpoints -------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        alive = self.engine.alive
        return web.json_response({"status": "ok" if alive else "engine stopped"},
                                 status=200 if alive else 500)

    async def readyz(self, request: web.Request) -> web.Response:
        alive = self.engine.alive
        ready = alive and not self.draining
        return web.json_response({"ready": ready, "draining": self.draining}, status=200 if ready else 503)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def load(self, request: web.Request) -> web.Response:
        return web.json_response({"role": self.config.role, "model": self.config.model_name,
                                  "draining": self.draining, **self.engine.load()})

    async def release(self, request: web.Request) -> web.Response:
        """The router gave up a request between its prefill and its decode (the client left, no
        decode worker took it): free its held cache now rather than at its TTL."""
        body = await self._parse(request, ReleaseRequest)
        return web.json_response({"released": self.engine.release_held(body.handle)})

    async def drain(self, request: web.Request) -> web.Response:
        self.draining = True
        return web.json_response({"draining": True, **self.engine.load()})

    async def prefill(self, request: web.Request) -> web.Response:
        if (refused := self._refuse("prefill")) is not None:
            return refused
        body = await self._parse(request, PromptRequest)
        timer = self.metrics.timer(len(body.prompt_token_ids))
        stream = RequestStream(body.request_id, asyncio.get_running_loop())
        self.inflight += 1
        try:
            try:
                self.engine.submit(body.request_id, body.prompt_token_ids, body.sampling, stream)
            except RequestError as error:
                return json_error(400, "invalid_request", str(error))
            try:
                event: TokenEvent = await stream.queue.get()
            except asyncio.CancelledError:
                self.engine.abort(body.request_id)
                timer.finish("abort")
                raise
            if event.error is not None:
                self.metrics.request("error")
                timer.finish("abort")
                status = 503 if event.error["retryable"] else 500
                return web.json_response({"error": event.error}, status=status)
            kv = None
            if event.kv_handle is not None:
                per_token = self.engine.model.config.kv_bytes_per_token(self.engine.model.dtype.itemsize)
                kv = {"address": self.kv_address, "handle": event.kv_handle,
                      "bytes": per_token * len(body.prompt_token_ids)}
                if self.config.token is not None:  # peers of this DisaggServe pull only from us
                    kv["signature"] = sign(self.config.token, self.kv_address, event.kv_handle)
                if event.kv_shared is not None:
                    kv["shm"] = event.kv_shared
            else:
                self.metrics.request("finished")
            timer.token()
            # Handing the cache to decode ends the request here, as a vLLM prefill instance's
            # max_tokens=1 request ends with "length".
            timer.finish(event.finish_reason or "length")
            return web.json_response({
                "request_id": body.request_id, "first_token_id": event.token_id, "text": event.text,
                "finish_reason": event.finish_reason, "prompt_tokens": len(body.prompt_token_ids), "kv": kv,
                **({"logprobs": event.logprobs} if event.logprobs is not None else {})})
        finally:
            self.inflight -= 1

    async def decode(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse("decode")) is not None:
            return refused
        body = await self._parse(request, DecodeRequest)
        timer = self.metrics.timer(len(body.prompt_token_ids))
        try:
            self.engine.check_request(body.prompt_token_ids, body.sampling)
        except RequestError as error:
            return json_error(400, "invalid_request", str(error))
        if body.sampling.max_tokens < 2:
            return json_error(400, "invalid_request", "sampling.max_tokens must be at least 2 on a decode "
                              "worker: the first token came from prefill (finish there when max_tokens is 1)")
        if not 0 <= body.first_token_id < self.engine.model.config.vocab_size:
            return json_error(400, "invalid_request", f"first_token_id {body.first_token_id} is outside "
                              f"the vocabulary [0, {self.engine.model.config.vocab_size})")
        if self.config.token is not None and not signature_matches(
                self.config.token, body.kv.signature, body.kv.address, body.kv.handle):
            # Never connect to an address a prefill worker of this DisaggServe did not vouch for.
            return json_error(403, "kv_untrusted", f"kv.address {body.kv.address!r} is not vouched for by a "
                              "prefill worker of this DisaggServe (kv.signature missing or wrong)")
        self.inflight += 1
        try:
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            await response.prepare(request)
            reservation = await self._reserve(body)
            if reservation is None:
                self.metrics.request("overloaded")
                timer.finish("abort")
                need = len(body.prompt_token_ids) + body.sampling.max_tokens
                await response.write((json.dumps(error_body(
                    "overloaded", f"no KV-cache room for {need} tokens within "
                    f"{self.config.admission_timeout_s:g} s", True)) + "\n").encode())
                return response
            try:
                stats = await self.transport.pull(body.kv.address, body.kv.handle, body.request_id,
                                                  self.kv_layout, pool_sink(self.engine, reservation),
                                                  shared=body.kv.shm)
            except KVTransferError as error:
                self.engine.cancel_reservation(reservation)
                self.metrics.request("kv_failed")
                timer.finish("abort")
                await response.write((json.dumps({"error": error.wire()}) + "\n").encode())
                return response
            except BaseException:
                self.engine.cancel_reservation(reservation)
                raise
            self.metrics.observe_transfer(stats.bytes, stats.seconds)
            stream = RequestStream(body.request_id, asyncio.get_running_loop())
            self.engine.submit_decode(body.request_id, body.prompt_token_ids, body.first_token_id,
                                      body.sampling, reservation, stream)
            with contextlib.suppress(ConnectionError):
                await self._pump(response, stream, timer)
            return response
        finally:
            self.inflight -= 1

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refuse("colocated")) is not None:
            return refused
        body = await self._parse(request, PromptRequest)
        timer = self.metrics.timer(len(body.prompt_token_ids))
        stream = RequestStream(body.request_id, asyncio.get_running_loop())
        try:
            self.engine.submit(body.request_id, body.prompt_token_ids, body.sampling, stream)
        except RequestError as error:
            return json_error(400, "invalid_request", str(error))
        self.inflight += 1
        try:
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                await self._pump(response, stream, timer)
            return response
        finally:
            self.inflight -= 1
