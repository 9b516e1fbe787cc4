"""Helpers of the speculation tests: a speculator and engine over the tiny models, copy-heavy prompts."""

from __future__ import annotations

from disaggserve_worker.engine.engine import Engine
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.speculation.config import SpeculationConfig
from disaggserve_worker.speculation.draft import DraftProposer
from disaggserve_worker.speculation.speculator import Speculator, StepReport
from engine_harness import run_requests, start_engine


def make_speculator(tiny: LoadedModel, draft: LoadedModel | None, mode: str, proposer: str,
                    num_speculative_tokens: int = 4, kv: int = 4096) -> Speculator:
    config = SpeculationConfig(mode=mode, proposer=proposer, num_speculative_tokens=num_speculative_tokens,  # type: ignore[arg-type]
                               draft_model="builtin:test" if proposer == "draft" else None)
    proposer_model = DraftProposer(draft.model, kv, 16) if proposer == "draft" and draft else None
    return Speculator(config, tiny.model, proposer_model)


def record_steps(spec: Speculator) -> list[StepReport]:
    """Every step's report, in order: wraps step() so tests see what each decode step did."""
    reports: list[StepReport] = []
    real = spec.step

    def step(batch, **options):  # type: ignore[no-untyped-def]
        out = real(batch, **options)
        assert spec.last is not None
        reports.append(spec.last)
        return out

    spec.step = step  # type: ignore[method-assign]
    return reports


def make_engine(tiny: LoadedModel, speculator: Speculator | None, role: str = "colocated",
                kv: int = 4096) -> Engine:
    return start_engine(tiny, role, kv=kv, max_model_len=1024, speculator=speculator)


def ngram_acceptance(prompt: list[int], continuation: list[int], k: int = 4, n_min: int = 1,
                     n_max: int = 3) -> float:
    """Share of n-gram proposals a greedy target would accept on this known continuation."""
    from disaggserve_worker.speculation.ngram import NgramProposer

    proposer, history, i, proposed, accepted = NgramProposer(n_min, n_max), list(prompt), 0, 0, 0
    while i < len(continuation):
        ok = 0
        for token in proposer.propose(history, k):
            if i + ok < len(continuation) and continuation[i + ok] == token:
                ok += 1
            else:
                proposed += 1  # the rejected one was judged too
                break
        proposed, accepted = proposed + ok, accepted + ok
        history += continuation[i:i + ok + 1]
        i += ok + 1
    return accepted / max(proposed, 1)


async def copy_heavy_prompt(model: LoadedModel, seeds: int = 8, length: int = 256, window: int = 48,
                            min_acceptance: float = 0.85) -> list[int]:
    """A prompt whose greedy continuation repeats spans of itself (random-weight models copy
    nothing from context, but their long greedy runs fall into loops): run greedy from random
    seeds, and cut where n-gram acceptance over the next `window` tokens is measured high."""
    import random

    rng = random.Random(3)
    starts = [[rng.randrange(3, model.config.vocab_size) for _ in range(16)] for _ in range(seeds)]
    engine = make_engine(model, None, kv=seeds * (length + 64))
    try:
        greedy = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)
        runs = await run_requests(engine, [(s, greedy) for s in starts])
    finally:
        engine.stop()
    best = max(((ngram_acceptance(s + r[:cut], r[cut:cut + window]), s + r[:cut])
                for s, r in zip(starts, runs, strict=True) for cut in range(32, length - window, 16)),
               key=lambda pair: pair[0])
    assert best[0] >= min_acceptance, f"no copy-heavy prompt found (best acceptance {best[0]:.2f})"
    return best[1]
