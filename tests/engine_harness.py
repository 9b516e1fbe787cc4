"""Drive real engines in tests: start one, run requests through it colocated, or hand each
request from a prefill engine to a decode engine over the real TCP KV transport.

Shared by the worker and speculation tests so that every equality test ("same greedy tokens
as the reference") exercises the engine the same way.
"""

from __future__ import annotations

import asyncio

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, TransferStats, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.speculation.speculator import Speculator

Requests = list[tuple[list[int], SamplingParams]]

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog and keeps running", "a",
         "Kubernetes runs containers in pods; an operator watches custom resources."]
OUTPUT_LENGTHS = [7, 12, 3, 9]


def greedy_requests(model: LoadedModel) -> Requests:
    """Prompts of mixed lengths (one a single token) with mixed greedy output lengths."""
    return [(model.tokenizer.encode(text).ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            for text, n in zip(TEXTS, OUTPUT_LENGTHS, strict=True)]


def start_engine(model: LoadedModel, role: str = "colocated", *, kv: int = 1024, budget: int = 2048,
                 max_model_len: int | None = None, speculator: Speculator | None = None,
                 start: bool = True) -> Engine:
    """An engine over `model`; with `start=False` its thread is never started (the caller drives
    it with `run_iteration`)."""
    config = EngineConfig(role=role, kv_cache_tokens=kv, max_batch_tokens=budget,
                          **({"max_model_len": max_model_len} if max_model_len else {}))
    engine = Engine(model.model, model.tokenizer, model.eos_token_ids, config, speculator=speculator)
    if start:
        engine.start()
    return engine


def record_plans(engine: Engine) -> list[tuple[int, int]]:
    """(decode rows, prompt-chunk tokens) of every forward the engine's runner executes, in order."""
    plans: list[tuple[int, int]] = []
    real = engine.runner.execute

    def spy(plan):  # type: ignore[no-untyped-def]
        plans.append((len(plan.decode), sum(n for _, n in plan.prefill)))
        return real(plan)

    engine.runner.execute = spy  # type: ignore[method-assign]
    return plans


async def collect(stream: RequestStream) -> list[int]:
    """Every token id of a stream; an error event fails the test where it happened."""
    out = []
    async for event in stream:
        assert event.error is None, event.error
        out.append(event.token_id)
    return out  # type: ignore[return-value]


async def run_requests(engine: Engine, requests: Requests, stagger_s: float = 0.0) -> list[list[int]]:
    """Submit (staggered, so later ones join a running batch) and collect every token id."""
    loop = asyncio.get_running_loop()
    tasks = []
    for i, (prompt, params) in enumerate(requests):
        stream = RequestStream(f"r{i}", loop)
        engine.submit(f"r{i}", prompt, params, stream)
        tasks.append(asyncio.ensure_future(collect(stream)))
        if stagger_s:
            await asyncio.sleep(stagger_s)
    return list(await asyncio.gather(*tasks))


async def run_disaggregated(prefill: Engine, decode: Engine, requests: Requests, host: str
                            ) -> tuple[list[list[int]], list[TransferStats]]:
    """Each request: prefill, reserve room on decode, pull the KV over TCP from `host`, decode.

    Returns every request's tokens (the first from prefill) and its KV pull's stats. The
    engines stay running: the caller stops them (and checks what they hold) afterwards.
    """
    loop = asyncio.get_running_loop()
    server = KVServer(prefill)
    await server.start(host, 0)
    transport = TcpKVTransport(frame_timeout=5)

    async def one(i: int, prompt: list[int], params: SamplingParams) -> tuple[list[int], TransferStats]:
        first_stream = RequestStream(f"r{i}", loop)
        prefill.submit(f"r{i}", prompt, params, first_stream)
        first = await first_stream.queue.get()
        assert first.error is None, first.error
        reservation = decode.reserve(prompt, params)
        assert first.kv_handle is not None and reservation is not None
        stats = await transport.pull(f"{host}:{server.port}", first.kv_handle, f"r{i}", layout_of(decode),
                                     pool_sink(decode, reservation))
        rest = RequestStream(f"r{i}", loop)
        decode.submit_decode(f"r{i}", prompt, first.token_id, params, reservation, rest)  # type: ignore[arg-type]
        return [first.token_id, *await collect(rest)], stats  # type: ignore[list-item]

    try:
        results = await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(requests)))
    finally:
        transport.close()
        await server.stop()
    return [tokens for tokens, _ in results], [stats for _, stats in results]
