"""The router's HTTP face: OpenAI-compatible endpoints, health, metrics, auth and draining.

Everything a client can get wrong is refused here, before any worker is touched, with OpenAI's
error shape; everything a worker can get wrong is the dispatcher's business. A streamed answer
starts (HTTP 200) only once the first token exists, so a request that no worker can serve still
gets a plain 503 instead of a stream that opens and then fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..auth import auth_headers, worker_token
from ..contract import PATH_HEALTH, PATH_METRICS, PATH_READY
from ..engine.detokenizer import IncrementalDetokenizer
from .admission import Admission
from .auth import ApiKeys
from .config import RouterConfig
from .dispatch import Dispatcher, GenerationRequest, Timeouts
from .errors import APIError, UpstreamError, error_body, invalid
from .metrics import RouterMetrics
from .model_info import ModelInfo
from .pool import LoadPoller, WorkerPool
from .responses import ChatShape, CompletionShape, Progress, Shape
from .schemas import MAX_N, ChatCompletionRequest, CompletionRequest, parse_request
from .serving import ChoiceRun, merged, request_usage, respond_stream, respond_whole
from .vllm_endpoints import register_vllm_endpoints

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set once a request's outcome is counted in disaggserve_requests_total, so it is counted once.
COUNTED = web.RequestKey("disaggserve_counted", bool)


class Router:
    """State shared by the handlers of one router process."""

    def __init__(self, config: RouterConfig, model: ModelInfo, pool: WorkerPool) -> None:
        self.config = config
        self.model = model
        self.pool = pool
        self.metrics = RouterMetrics(
            config.ttft_slo_ms / 1000 if config.ttft_slo_ms else None,
            config.tpot_slo_ms / 1000 if config.tpot_slo_ms else None)
        self.keys = ApiKeys(config.api_key_file)
        self.draining = False  # SIGTERM seen: readyz false, every response closes its connection
        self.refusing = False  # the accept window after SIGTERM is over: new requests get 503
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.session: aiohttp.ClientSession | None = None
        self.dispatcher: Dispatcher | None = None
        self.admission = Admission(pool, per_worker=config.max_inflight_per_worker,
                                   max_queued=config.max_queued, timeout_s=config.queue_timeout_s)
        self._background: list[asyncio.Task[None]] = []
        self._loops: list[Callable[[], Awaitable[None]]] = []

    # ---- lifecycle -------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes,
                              middlewares=[self._errors_middleware, self._guard_middleware])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get(PATH_HEALTH, self.healthz)
        app.router.add_get(PATH_READY, self.readyz)
        app.router.add_get(PATH_METRICS, self.metrics_endpoint)
        register_vllm_endpoints(app, self)  # /health, /ping, /version, /tokenize, /detokenize, /v1/models/{id}
        app.on_response_prepare.append(self._close_when_draining)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    def add_background(self, factory: Callable[[], Awaitable[None]]) -> None:
        """Discovery and other loops that live as long as the app; started on startup."""
        self._loops.append(factory)

    async def _start(self, app: web.Application) -> None:
        # Every call to a worker (load polls, prefill, decode) carries this DisaggServe's token.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             headers=auth_headers(worker_token()))
        self.dispatcher = Dispatcher(
            self.pool, self.session, self.metrics, max_attempts=self.config.max_attempts,
            timeouts=Timeouts(prefill_s=self.config.prefill_timeout_s, token_s=self.config.token_timeout_s),
            engine=self.config.engine, model_name=self.model.name)
        poller = LoadPoller(self.pool, self.session, self.config.poll_interval_s, engine=self.config.engine)
        for factory in [poller.run, self.admission.run, *self._loops]:
            self._background.append(asyncio.create_task(_logged(factory)))

    async def _stop(self, app: web.Application) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def _close_when_draining(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.draining:
            # Both: force_close makes the server close after this response, and the header (which
            # aiohttp has already computed when this hook runs) tells the client not to reuse it.
            response.force_close()
            response.headers["Connection"] = "close"

    async def drain(self) -> None:
        """SIGTERM: readyz turns false, new requests are still served for `drain_accept_s`, then
        refused; the rest finish.

        Endpoints drop a terminating pod asynchronously (kube-proxy, a gateway, the local proxy
        each a little later), and a client's kept-alive connection keeps reaching this process
        regardless: refusing at once failed requests in a router rollout under load. During the
        window every response carries Connection: close, so kept-alive clients reconnect to a
        replica that is staying; after it, a refusal says when to retry."""
        self.draining = True
        log.info("draining: %d request(s) in flight; serving new ones for %.0f s", self.inflight,
                 self.config.drain_accept_s)
        if self.config.drain_accept_s > 0:
            await asyncio.sleep(self.config.drain_accept_s)
        self.refusing = True
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: %d request(s) still in flight are cut off", self.inflight)

    # ---- middlewares -----------------------------------------------------------------------------

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure leaves as an OpenAI error body, aiohttp's own 404/405/413 included."""
        try:
            return await handler(request)
        except APIError as exc:
            if request.path.startswith("/v1/") and not request.get(COUNTED):
                self.metrics.requests.labels(status="client_error" if exc.status < 500 else "rejected").inc()
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if request.path.startswith("/v1/") and not request.get(COUNTED):
                self.metrics.requests.labels(status="client_error").inc()
            message = {
                404: f"Unknown path {request.path!r}. This server serves POST /v1/completions, "
                     "POST /v1/chat/completions, GET /v1/models, POST /tokenize and POST /detokenize.",
                405: f"Method {request.method} is not allowed on {request.path}.",
                413: f"The request body is larger than the {self.config.max_body_bytes} bytes allowed.",
            }.get(exc.status, exc.reason)
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return web.json_response(error_body(message, code=str(exc.status)), status=exc.status,
                                     headers=headers)

    @web.middleware
    async def _guard_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            try:
                self.keys.check(request.headers.get("Authorization"))
            except APIError:
                self.metrics.requests.labels(status="unauthorized").inc()
                request[COUNTED] = True
                raise
            if self.refusing and request.method == "POST":
                self.metrics.requests.labels(status="rejected_draining").inc()
                request[COUNTED] = True
                raise APIError(503, "The router is shutting down; retry the request (another replica "
                               "will take it).", type_="server_error", code="draining",
                               headers={"Retry-After": "1"})
        return await handler(request)

    # ---- plain endpoints -------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        # Ready while not draining, workers or not: requests wait in the queue (bounded) while
        # workers restart, where an unready router would make its Service reset connections.
        ready = not self.draining
        body = {"ready": ready, "draining": self.draining, "mode": self.pool.mode,
                "workers_ready": self.pool.ready(), "queued": self.admission.queued,
                "workers": {role: sum(w.available for w in self.pool.of_role(role))
                            for role in ("prefill", "decode", "colocated")}}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        for role in ("prefill", "decode", "colocated"):
            self.metrics.workers.labels(role=role).set(len(self.pool.of_role(role)))
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self.model_card()]})

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model.name, "object": "model", "created": 0, "owned_by": "disaggserve",
                "root": self.config.model, "parent": None, "max_model_len": self.model.max_model_len}

    # ---- generation endpoints --------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = parse_request(CompletionRequest, await self.json_body(request))
        self._check_model(req.model)
        inputs = req.prompt_inputs()
        if len(inputs) * req.choices > MAX_N:  # each choice is a generation on the workers
            raise invalid(f"{len(inputs)} prompts x n={req.choices} asks for {len(inputs) * req.choices} "
                          f"choices; at most {MAX_N} per request. Split the batch.", "prompt")
        prompts: list[tuple[list[int], str]] = []
        for prompt in inputs:
            if isinstance(prompt, str):
                prompts.append((self.model.encode(prompt), prompt))
                continue
            bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
            if bad:
                raise invalid(f"prompt token ids must be in [0, {self.model.vocab_size}); got {bad[:5]}.",
                              "prompt")
            prompts.append((list(prompt), self.model.decode(list(prompt))))
        gens = [self._generation(req, ids, req.max_tokens, i) for ids, _ in prompts for i in range(req.choices)]
        echo = {k: prompts[k // req.choices][1] for k in range(len(gens))} if req.echo else None
        shape = CompletionShape(self.model.name, self.model.token_text, echo, logprobs=req.logprobs is not None,
                                return_token_ids=bool(req.return_token_ids))
        return await self._serve(request, req, gens, shape)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req: ChatCompletionRequest = parse_request(ChatCompletionRequest, await self.json_body(request))
        self._check_model(req.model)
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
        text = self.model.chat_template.render(messages, add_generation_prompt=req.add_generation_prompt,
                                               **(req.chat_template_kwargs or {}))
        prompt_ids = self.model.encode(text)
        gens = [self._generation(req, prompt_ids, req.requested_max_tokens, i) for i in range(req.choices)]
        shape = ChatShape(self.model.name, self.model.token_text, logprobs=bool(req.logprobs),
                          return_token_ids=bool(req.return_token_ids))
        return await self._serve(request, req, gens, shape)

    def _check_model(self, name: str) -> None:
        if name != self.model.name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves "
                           f"{self.model.name!r} (see GET /v1/models).", param="model",
                           code="model_not_found")

    def _generation(self, req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
                    max_tokens: int | None, choice: int = 0) -> GenerationRequest:
        limit = self.model.max_model_len
        if req.truncate_prompt_tokens is not None:
            prompt_ids = prompt_ids[-req.truncate_prompt_tokens:]
        if not prompt_ids:
            raise invalid("the prompt is empty after tokenization; send at least one token.", "prompt")
        if max_tokens is None:
            max_tokens = limit - len(prompt_ids)
        if len(prompt_ids) + max_tokens > limit:
            raise invalid(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for "
                "the completion). Please reduce the prompt or max_tokens.",
                "messages" if isinstance(req, ChatCompletionRequest) else "prompt", "context_length_exceeded")
        if max_tokens < 1:
            raise invalid(f"the prompt ({len(prompt_ids)} tokens) leaves no room to generate in the "
                          f"{limit}-token context.", "messages", "context_length_exceeded")
        # Several samples of one prompt with one seed must still differ: choice i samples with seed + i.
        seed = None if req.seed is None else (req.seed + choice) % 2**63
        return GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), seed=seed, ignore_eos=req.ignore_eos,
            stop=req.stop_list(), extras=req.sampling_extras(self.model.vocab_size),
            skip_special_tokens=req.skip_special_tokens)

    async def _serve(self, request: web.Request, req: CompletionRequest | ChatCompletionRequest,
                     gens: list[GenerationRequest], shape: Shape) -> web.StreamResponse:
        assert self.dispatcher is not None
        started = time.monotonic()
        request[COUNTED] = True  # the outcome is counted below, whatever it is
        self._begin()
        status = "upstream_error"
        admitted = False
        try:
            await self._admit()  # one slot per request, however many choices it asks for
            admitted = True
            runs = [ChoiceRun(i, i // req.choices, gen,
                              IncrementalDetokenizer(self.model.tokenizer, gen.prompt_ids, gen.stop,
                                                     skip_special_tokens=gen.skip_special_tokens),
                              Progress(started)) for i, gen in enumerate(gens)]
            async with aclosing(merged(runs, self.dispatcher, self.metrics)) as pieces:
                if req.stream:
                    response = await respond_stream(request, runs, pieces, shape, include_usage=req.include_usage,
                                                    continuous_usage=req.continuous_usage)
                else:
                    response = await respond_whole(runs, pieces, shape)
            finished = all(run.progress.finish_reason for run in runs)
            status = "ok" if finished else "upstream_error"
            if finished:  # one request, however many choices: its first token and its last
                ttfts = [run.progress.ttft_s for run in runs if run.progress.ttft_s is not None]
                self.metrics.observe_finished(ttft_s=min(ttfts, default=0.0), e2e_s=time.monotonic() - started,
                                              output_tokens=max(run.progress.count for run in runs))
                self.metrics.prompt_tokens.inc(request_usage(runs)["prompt_tokens"])
            return response
        except UpstreamError as exc:
            raise exc.api_error() from None
        except APIError as exc:
            if not admitted:  # shed by the queue: 429 overloaded, or 503 no_workers
                status = "shed" if exc.status == 429 else "no_workers"
            raise
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except ConnectionResetError:
            # The client hung up while its stream was written: counted as cancelled, not a server
            # error for aiohttp to log with a traceback. This reply never reaches anyone.
            status = "cancelled"
            return web.Response(status=499)
        finally:
            if admitted:
                self.admission.release(finished=status == "ok")
            self.metrics.requests.labels(status=status).inc()
            self._end()

    async def _admit(self) -> None:
        """A slot on the workers, after the bounded queue (`admission`); raises 429/503 when shed."""
        self.metrics.queued.inc()
        try:
            await self.admission.acquire()
        finally:
            self.metrics.queued.dec()

    async def json_body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {request.content_type!r}.",
                           code="unsupported_media_type")
        try:  # a body that trickles in (or never completes) must not hold a connection forever
            async with asyncio.timeout(self.config.body_timeout_s):
                raw = await request.read()  # raises 413 past client_max_size
        except TimeoutError:
            raise APIError(408, f"The request body did not arrive within {self.config.body_timeout_s:g} s.",
                           code="request_timeout") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"The request body is not valid JSON: {exc}. Send a JSON object.",
                          code="invalid_json") from None
        except RecursionError:
            raise invalid("The request body nests JSON too deeply to parse. Send a flatter JSON object.",
                          code="invalid_json") from None

    def _begin(self) -> None:
        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight.inc()

    def _end(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.dec()
        if self.inflight == 0:
            self._idle.set()


async def _logged(factory: Callable[[], Awaitable[None]]) -> None:
    """Background loops must not die quietly: log, then keep the failure visible in the task."""
    try:
        await factory()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("router background task %s failed", getattr(factory, "__qualname__", factory))
        raise
