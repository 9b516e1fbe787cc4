"""End to end at temperature 1: speculation inside the engine leaves the output law unchanged.

top_k = 3 makes the tiny model's vocabulary effectively three tokens per step, so a few
hundred requests pin down the joint law of tokens 1–3 (27 cells). Token 1 comes from
prefill; with max_tokens 3 and k capped at 1 by what each request can still emit, token 2 is
a verified proposal (or the residual draw after a rejection) and token 3 the bonus draw or
the next step's token. The expected law is computed exactly from the uncached reference
forward with the same filtering.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from chi_square import chi_square, critical_value
from speculation_harness import make_engine, make_speculator, record_steps

from disaggserve_worker.engine.sampling import SamplingParams, filter_logits
from disaggserve_worker.model.loader import LoadedModel
from engine_harness import run_requests

REQUESTS = 600
PARAMS = dict(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)


def _law(tiny: LoadedModel, prompt: list[int]) -> dict[tuple[int, int, int], float]:
    params = SamplingParams(**PARAMS)  # type: ignore[arg-type]

    def dist(ids: list[int]) -> torch.Tensor:
        return torch.softmax(filter_logits(tiny.model.reference_logits(torch.tensor(ids))[-1], params), -1)

    law: dict[tuple[int, int, int], float] = {}
    p1 = dist(prompt)
    for a in torch.nonzero(p1).flatten().tolist():
        p2 = dist([*prompt, a])
        for b in torch.nonzero(p2).flatten().tolist():
            p3 = dist([*prompt, a, b])
            for c in torch.nonzero(p3).flatten().tolist():
                law[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    return law


def _lookup_friendly_prompt(tiny: LoadedModel) -> list[int]:
    """A prompt holding each possible first token followed by the target's likely next token,
    so n-gram proposals always exist and are sometimes accepted (both sampler branches run).
    Prepending pairs shifts the law, so iterate until every first token of the final prompt
    is covered (a few rounds for the tiny model)."""
    base = tiny.tokenizer.encode("to be or not to be").ids
    params = SamplingParams(**PARAMS)  # type: ignore[arg-type]

    def support(ids: list[int]) -> list[int]:
        row = filter_logits(tiny.model.reference_logits(torch.tensor(ids))[-1], params)
        return torch.nonzero(row > float("-inf")).flatten().tolist()

    follow: dict[int, int] = {}
    prompt = base
    for _ in range(10):
        firsts = support(prompt)
        if all(a in follow for a in firsts):
            return prompt
        for a in firsts:
            follow.setdefault(a, int(tiny.model.reference_logits(torch.tensor([*prompt, a]))[-1].argmax()))
        prompt = [*(t for a, b in follow.items() for t in (a, b)), *base]
    raise AssertionError("no lookup-friendly prompt found; the tiny model changed")


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
async def test_speculative_sampling_matches_the_target_law(tiny: LoadedModel, tiny_draft: LoadedModel,
                                                           proposer: str) -> None:
    prompt = _lookup_friendly_prompt(tiny)
    law = _law(tiny, prompt)
    spec = make_speculator(tiny, tiny_draft, "fixed", proposer)
    engine = make_engine(tiny, spec, kv=REQUESTS * 64)
    steps = record_steps(spec)
    try:
        requests = [(prompt, SamplingParams(seed=1000 + i, **PARAMS)) for i in range(REQUESTS)]  # type: ignore[arg-type]
        outputs = await run_requests(engine, requests)
    finally:
        engine.stop()
    proposed = sum(sum(step.proposed) for step in steps)
    accepted = sum(sum(step.accepted) for step in steps)
    counts = Counter(tuple(o) for o in outputs)
    assert set(counts) <= set(law), f"tokens outside the top-3 support: {set(counts) - set(law)}"
    cells = list(itertools.chain(law))
    stat, df = chi_square([counts.get(c, 0) for c in cells], [law[c] * REQUESTS for c in cells])
    assert stat < critical_value(df), f"chi-square {stat:.1f} over {df} df exceeds {critical_value(df):.1f}"
    # The check must have gone through both branches of the sampler.
    assert proposed >= REQUESTS // 2, f"only {proposed} proposals: speculation barely ran"
    assert accepted < proposed, f"accepted {accepted} of {proposed}: the rejection branch never ran"
    if proposer == "ngram":  # the random-weight draft is almost never right; the lookup often is
        assert accepted > 0, "the acceptance branch never ran"
