"""Helpers of the speculation tests: a speculator and engine over the tiny models, request runner."""

from __future__ import annotations

import asyncio

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.spec.config import SpeculationConfig
from disaggserve_worker.spec.draft import DraftProposer
from disaggserve_worker.spec.speculator import Speculator


def make_speculator(tiny: LoadedModel, draft: LoadedModel | None, mode: str, proposer: str,
                    max_tokens: int = 4, kv: int = 4096) -> Speculator:
    config = SpeculationConfig(mode=mode, proposer=proposer, max_tokens=max_tokens,  # type: ignore[arg-type]
                               draft_model="builtin:test" if proposer == "draft" else None)
    proposer_model = DraftProposer(draft.model, kv, 16) if proposer == "draft" and draft else None
    return Speculator(config, tiny.model, proposer_model)


def make_engine(tiny: LoadedModel, speculator: Speculator | None, role: str = "colocated",
                kv: int = 4096) -> Engine:
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role=role, kv_cache_tokens=kv, max_model_len=1024), speculator=speculator)
    engine.start()
    return engine


async def run_requests(engine: Engine, requests: list[tuple[list[int], SamplingParams]],
                       stagger_s: float = 0.0) -> list[list[int]]:
    """Submit (staggered, so later ones join a running batch) and collect every token id."""
    loop = asyncio.get_running_loop()

    async def collect(stream: RequestStream) -> list[int]:
        out = []
        async for event in stream:
            assert event.error is None, event.error
            out.append(event.token_id)
        return out  # type: ignore[return-value]

    tasks = []
    for i, (prompt, params) in enumerate(requests):
        stream = RequestStream(f"r{i}", loop)
        engine.submit(f"r{i}", prompt, params, stream)
        tasks.append(asyncio.ensure_future(collect(stream)))
        if stagger_s:
            await asyncio.sleep(stagger_s)
    return list(await asyncio.gather(*tasks))
