"""Running one generation on the workers, surviving worker faults.

Disaggregated: prefill worker (`/internal/prefill`) → first token + KV handle → decode worker
(`/internal/decode`, pulls the KV cache) → the remaining tokens as an NDJSON stream. Colocated:
one `/internal/generate` stream.

A worker that refuses, dies or stalls is excluded for this request and the attempt re-runs on
another pair. When tokens were already handed to the client, the new attempt starts from the prompt
plus those tokens (a recompute), so greedy decoding continues exactly where it broke and sampling
continues from the same text. Only when every attempt fails does the caller get an `UpstreamError`,
which it reports to the client as a retryable error; a stream is never silently cut short.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..contract import PATH_DECODE, PATH_GENERATE, PATH_PREFILL, PATH_RELEASE
from . import vllm_flow  # it imports this module's names only inside its functions
from .errors import UpstreamError
from .metrics import RouterMetrics
from .pool import NoWorkerAvailable, Worker, WorkerPool

log = logging.getLogger(__name__)
# json.loads on bytes first sniffs their encoding: 40 % of parsing one small token event.
_decode_json = json.JSONDecoder().decode
# A token event as the built-in worker writes it (`json.dumps` of `TokenEvent.wire()`) when it is
# neither the last one nor carries logprobs: most lines of a stream. The router needs only the id
# from it, read without parsing the JSON; any other line is parsed in full.
_PLAIN_HEAD = b'{"token_id": '
_PLAIN_TAIL = b', "finish_reason": null}'


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    # vLLM's other sampling keys for the workers (top_k, min_tokens, penalties, logit_bias, logprobs...).
    extras: dict[str, Any] = field(default_factory=dict)
    skip_special_tokens: bool = True


@dataclass(slots=True)
class Token:
    """One generated token; `token_id` is None only for a bare end-of-stream marker."""

    token_id: int | None
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


@dataclass
class Timeouts:
    connect_s: float = 5.0
    prefill_s: float = 120.0  # a whole prefill, queueing included
    token_s: float = 30.0  # longest silence between two streamed tokens


class WorkerFault(Exception):
    """An attempt failed because of one worker; `blame` says whether to sit it out for a while."""

    def __init__(self, worker: Worker, reason: str, message: str, *, blame: bool = True,
                 retryable: bool = True, exclude: bool = True) -> None:
        super().__init__(f"{worker.role} worker {worker.url}: {message}")
        self.worker = worker
        self.reason = reason
        self.blame = blame
        self.retryable = retryable
        self.exclude = exclude


class Dispatcher:
    def __init__(self, pool: WorkerPool, session: aiohttp.ClientSession, metrics: RouterMetrics, *,
                 max_attempts: int = 3, timeouts: Timeouts | None = None, engine: str = "builtin",
                 model_name: str = "") -> None:
        self.pool = pool
        self.engine = engine  # builtin: our worker API; vllm: vLLM's OpenAI API (router/vllm_flow.py)
        self.model_name = model_name
        self.session = session
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.timeouts = timeouts or Timeouts()
        self._releases: set[asyncio.Task[None]] = set()  # held caches being freed (kept referenced)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Token]:
        """Yields the tokens of `req` one by one (see `generate_batches`)."""
        async with aclosing(self.generate_batches(req)) as batches:
            async for batch in batches:
                for token in batch:
                    yield token

    async def generate_batches(self, req: GenerationRequest) -> AsyncIterator[list[Token]]:
        """Yields the tokens of `req` in batches, the last token with a finish_reason; raises
        UpstreamError.

        A batch holds the tokens that arrived from the worker together (one read of its stream):
        one step through this chain of generators and one write to the client per batch instead of
        per token, which is what the router's CPU per streamed token mostly went to when it fell
        behind its workers.

        A worker that refuses before doing any work (busy, draining) costs no attempt: it is only
        excluded. While the operator scales down, several workers drain at once and, having nothing
        left in flight, look the least loaded until the next load poll: three of them used up a
        request's three attempts although a serving worker stood beside them. Exclusion bounds
        those refusals by the number of workers."""
        generated: list[int] = []
        excluded: set[str] = set()
        errors: list[str] = []
        attempt = 0
        refusals = 0
        while attempt < self.max_attempts:
            remaining = req.max_tokens - len(generated)
            if remaining <= 0:  # the stream broke right after its last token
                yield [Token(None, "length")]
                return
            try:
                async with aclosing(self._one_attempt(req, generated, attempt + refusals, excluded)) as batches:
                    async for batch in batches:
                        generated.extend(token.token_id for token in batch)  # type: ignore[misc]
                        yield batch
                        if batch[-1].finish_reason is not None:
                            return
            except WorkerFault as fault:
                errors.append(str(fault))
                if fault.exclude:
                    excluded.add(fault.worker.url)
                if fault.blame:
                    fault.worker.mark_failed()
                if not fault.retryable:
                    raise UpstreamError(str(fault), retryable=False,
                                        client_fault=fault.reason == "worker_refused") from None
                if fault.reason == "worker_busy" and fault.exclude and refusals < len(self.pool.workers):
                    refusals += 1
                else:
                    attempt += 1
                if attempt == self.max_attempts:
                    log.warning("request %s attempt %d failed (%s); no attempts left", req.request_id,
                                attempt, fault)
                    break
                self.metrics.retries.labels(reason=fault.reason).inc()
                if generated:
                    self.metrics.resumed.inc()
                log.warning("request %s attempt %d failed (%s); %s", req.request_id, attempt, fault,
                            f"resuming after {len(generated)} tokens" if generated else "retrying")
            except NoWorkerAvailable as exc:
                errors.append(str(exc))
                break
        raise UpstreamError(
            f"the request could not be completed after {len(errors)} attempt(s): " + "; ".join(errors))

    def _one_attempt(self, req: GenerationRequest, generated: list[int], attempt: int,
                     excluded: set[str]) -> AsyncIterator[list[Token]]:
        """One try of `req`: the worker's own stream where nothing needs to wrap it (colocated),
        so each batch climbs one generator fewer on its way to the client."""
        if self.engine == "vllm":
            return vllm_flow.attempt(self, req, generated, attempt, excluded)
        context = req.prompt_ids + generated
        body = {
            "request_id": req.request_id if attempt == 0 else f"{req.request_id}-retry{attempt}",
            "prompt_token_ids": context,
            "sampling": self._sampling(req, req.max_tokens - len(generated)),
        }
        if self.pool.mode == "colocated":
            return self._stream(self.pool.pick_colocated(excluded), PATH_GENERATE, body, len(context))
        return self._disaggregated(req, generated, excluded, body, context)

    async def _disaggregated(self, req: GenerationRequest, generated: list[int], excluded: set[str],
                             body: dict[str, Any], context: list[int]) -> AsyncIterator[list[Token]]:
        """Prefill on one worker, then the decode worker's stream; frees the held cache if no
        decode worker pulled it."""
        if self.pool.mode is None:
            raise NoWorkerAvailable("no workers are known to the router (check discovery)")
        if not self.pool.has_available("decode", excluded):  # no point computing a prefill nobody pulls
            raise NoWorkerAvailable(self.pool.why_none("decode", excluded))
        prefill = self.pool.pick_prefill(excluded)
        first = await self._prefill(prefill, body, len(context))
        pulled = False
        try:
            yield [Token(int(first["first_token_id"]), first.get("finish_reason"), first.get("logprobs"))]
            if first.get("finish_reason") is not None:
                return
            decode = self.pool.pick_decode(len(context) + req.max_tokens - len(generated), prefill.unit, excluded)
            kv = first["kv"]
            bodies = [{**body, "first_token_id": int(first["first_token_id"]), "kv": kv}]
            if isinstance(kv, dict) and "shm" in kv:
                # A decode worker of an earlier version (during a rolling upgrade) refuses the
                # shared-memory location it does not know; it pulls the same cache without it.
                bodies.append({**bodies[0], "kv": {k: v for k, v in kv.items() if k != "shm"}})
            for i, decode_body in enumerate(bodies):
                try:
                    async with aclosing(self._stream(decode, PATH_DECODE, decode_body, 0, prefill=prefill)) as stream:
                        async for batch in stream:
                            pulled = True  # a decode worker pulls the cache before its first token
                            yield batch
                    break
                except WorkerFault as fault:
                    if pulled or i + 1 == len(bodies) or fault.reason != "worker_refused" or "kv.shm" not in str(fault):
                        raise
                    log.info("decode worker %s does not know kv.shm (an earlier version); pulling without it",
                             decode.url)
        finally:
            # Given up between prefill and decode (the client left, no decode worker took it, the
            # decode refused): the cache would stay held until its TTL. Releasing one a decode
            # worker did pull is a no-op.
            if not pulled and isinstance(first.get("kv"), dict) and first["kv"].get("handle"):
                self._release(prefill, str(first["kv"]["handle"]))

    def _release(self, worker: Worker, handle: str) -> None:
        """Ask a prefill worker to free a held cache, without waiting (also from a cancelled
        request); a failure only leaves the cache to its TTL."""
        async def post() -> None:
            try:
                async with self.session.post(worker.url + PATH_RELEASE, json={"handle": handle},
                                             timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("could not release held cache %s on %s (%s); it expires by itself", handle,
                         worker.url, _describe(exc))

        task = asyncio.get_running_loop().create_task(post())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    @staticmethod
    def _sampling(req: GenerationRequest, max_tokens: int) -> dict[str, Any]:
        sampling: dict[str, Any] = {
            **req.extras, "max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p}
        if "min_tokens" in sampling:  # a resume already produced some of them
            sampling["min_tokens"] = max(0, min(sampling["min_tokens"] - (req.max_tokens - max_tokens), max_tokens))
        if req.seed is not None:
            sampling["seed"] = req.seed
        if req.ignore_eos:
            sampling["ignore_eos"] = True
        if req.stop:  # the router cuts the text itself; the worker stopping too saves its compute
            sampling["stop"] = req.stop
        return sampling

    async def _prefill(self, worker: Worker, body: dict[str, Any], tokens: int) -> dict[str, Any]:
        """The prefill call, finished even if this request is given up meanwhile (the client
        left): the worker would still hold the cache it produced, which nobody would pull or
        release, until its TTL (a guidellm sweep's cancellations left a draining prefill worker
        waiting 45 s for one). Its answer then releases that cache."""
        call = asyncio.ensure_future(self._post_prefill(worker, body, tokens))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._release_answer(worker, done))
            raise

    def _release_answer(self, worker: Worker, done: asyncio.Future[dict[str, Any]]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        kv = done.result().get("kv")
        if isinstance(kv, dict) and kv.get("handle"):
            self._release(worker, str(kv["handle"]))

    async def _post_prefill(self, worker: Worker, body: dict[str, Any], tokens: int) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeouts.prefill_s, connect=self.timeouts.connect_s)
        worker.inflight_requests += 1
        worker.inflight_tokens += tokens
        try:
            async with self.session.post(worker.url + PATH_PREFILL, json=body, timeout=timeout) as resp:
                await _check_status(worker, resp)
                result = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WorkerFault(worker, "prefill_unreachable", _describe(exc)) from None
        finally:
            worker.inflight_requests -= 1
            worker.inflight_tokens -= tokens
        if not isinstance(result, dict) or "first_token_id" not in result or "kv" not in result:
            raise WorkerFault(worker, "prefill_bad_reply", f"reply lacks first_token_id/kv: {result!r:.200}")
        return result

    async def _stream(self, worker: Worker, path: str, body: dict[str, Any], tokens: int,
                      prefill: Worker | None = None) -> AsyncIterator[list[Token]]:
        """A worker's NDJSON token stream, one batch per read: every complete line that had arrived."""
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect_s,
                                        sock_read=self.timeouts.token_s)
        worker.inflight_requests += 1
        worker.inflight_tokens += tokens
        finished = False
        try:
            async with self.session.post(worker.url + path, json=body, timeout=timeout) as resp:
                await _check_status(worker, resp)
                pending = b""
                async for chunk in resp.content.iter_any():
                    lines = (pending + chunk if pending else chunk).split(b"\n")
                    pending = lines.pop()  # an incomplete line waits for the rest of it
                    batch, fault = _parse_events(lines, worker, prefill)
                    if batch:
                        if tokens:  # colocated: the prompt is done once the first token arrives
                            worker.inflight_tokens -= tokens
                            tokens = 0
                        yield batch
                        if batch[-1].finish_reason is not None:
                            finished = True
                            return
                    if fault is not None:
                        raise fault
                batch, fault = _parse_events([pending], worker, prefill)  # a last line without "\n"
                if batch:
                    yield batch
                    if batch[-1].finish_reason is not None:
                        finished = True
                        return
                if fault is not None:
                    raise fault
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            raise WorkerFault(worker, "stream_broken", _describe(exc)) from None
        finally:
            worker.inflight_requests -= 1
            worker.inflight_tokens -= tokens
        if not finished:
            raise WorkerFault(worker, "stream_broken", "the stream ended without a finish_reason")


def _parse_events(lines: list[bytes], worker: Worker, prefill: Worker | None) -> tuple[list[Token], WorkerFault | None]:
    """The tokens of a worker's NDJSON lines, up to the first finish; and the fault that cut them
    short (an error event, a line that does not parse), which the caller raises only after handing
    on the tokens before it, as it would have one line at a time."""
    batch: list[Token] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            if line.startswith(_PLAIN_HEAD) and line.endswith(_PLAIN_TAIL):
                batch.append(Token(int(line[len(_PLAIN_HEAD):line.index(b",", len(_PLAIN_HEAD))])))
                continue
            event = _decode_json(line.decode())
            if "error" in event:
                return batch, _stream_error(worker, event["error"], prefill)
            finish = event.get("finish_reason")
            batch.append(Token(int(event["token_id"]), finish, event.get("logprobs")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # UnicodeDecodeError is a ValueError
            return batch, WorkerFault(worker, "stream_broken", _describe(exc))
        if finish is not None:
            break
    return batch, None


async def _check_status(worker: Worker, resp: aiohttp.ClientResponse) -> None:
    if resp.status == 200:
        return
    text = (await resp.text())[:300]
    if resp.status in (401, 403):  # the token (or a KV signature) was refused: a deployment fault
        raise WorkerFault(worker, "worker_auth", f"refused the router's credentials ({resp.status}): {text} "
                          "(router and workers must get the same DISAGGSERVE_WORKER_TOKEN)",
                          blame=False, retryable=False)
    if resp.status in (429, 503):  # busy or draining: try another, no blame
        if resp.status == 503 and _error_type(text) == "draining":
            # Every request, not only this one, should pass it by until a load poll says otherwise.
            worker.draining = True
        raise WorkerFault(worker, "worker_busy", f"answered {resp.status}: {text}", blame=False)
    if 400 <= resp.status < 500:  # the worker judged the request itself wrong: another would too
        raise WorkerFault(worker, "worker_refused", f"refused the request ({resp.status}): {text}",
                          blame=False, retryable=False)
    raise WorkerFault(worker, "worker_error", f"answered {resp.status}: {text}")


def _error_type(text: str) -> str | None:
    """The `error.type` of a worker's JSON error body (`server.app.error_body`), if it is one."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("type")) if isinstance(error, dict) else None


def _stream_error(worker: Worker, error: Any, prefill: Worker | None) -> WorkerFault:
    error = error if isinstance(error, dict) else {"message": str(error)}
    kind = str(error.get("type", "error"))
    message = f"{kind}: {error.get('message', '')}"
    if kind == "kv_unavailable" and prefill is not None:
        # The KV cache could not be pulled: the prefill side lost it; blame that one, not decode.
        return WorkerFault(prefill, "kv_unavailable", message, blame=False, exclude=False)
    return WorkerFault(worker, kind, message, blame=kind != "overloaded",
                       retryable=bool(error.get("retryable", True)))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
