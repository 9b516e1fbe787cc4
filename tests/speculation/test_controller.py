"""The goodput controller: k from acceptance and step cost, and the online step-time fit."""

from __future__ import annotations

import dataclasses
import random
from statistics import mean
from types import SimpleNamespace

import pytest
from speculation_harness import copy_heavy_prompt, make_engine, make_speculator, record_steps

from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.speculation.controller import Acceptance, Choice, GoodputController, expected_tokens
from disaggserve_worker.speculation.speculator import Speculator
from disaggserve_worker.speculation.step_time import StepCoefficients, StepTimeModel
from engine_harness import run_requests

# GPU-like decode: a fixed cost per step (weights streamed once) and a small cost per token.
TARGET = StepCoefficients(a=0.020, b=2e-8, c=2e-4)
DRAFT = StepCoefficients(a=0.002, b=0.0, c=2e-5)


def _controller(num_speculative_tokens: int = 8, draft: bool = True) -> GoodputController:
    return GoodputController(num_speculative_tokens=num_speculative_tokens, verify=StepTimeModel(TARGET),
                             draft=StepTimeModel(DRAFT) if draft else None)


def _learn(controller: GoodputController, own: Acceptance, rate: float, steps: int = 200) -> None:
    """Feed observations of k=4 proposals accepted token by token with probability `rate`."""
    rng = random.Random(3)
    for _ in range(steps):
        accepted = 0
        while accepted < 4 and rng.random() < rate:
            accepted += 1
        controller.observe(own, 4, accepted)


def test_acceptance_estimate_is_unbiased_for_truncated_observations() -> None:
    controller, own = _controller(), Acceptance(decay=0.999)
    _learn(controller, own, 0.6, steps=3000)
    assert controller.alpha(own) == pytest.approx(0.6, abs=0.03)


def test_random_draft_gets_k_zero() -> None:
    controller, own = _controller(), Acceptance()
    _learn(controller, own, 0.02)
    choice = controller.choose([512], [controller.alpha(own)], [8])
    assert choice.ks == [0]
    assert choice.goodput == choice.baseline


def test_perfect_draft_gets_the_longest_k() -> None:
    controller, own = _controller(), Acceptance()
    _learn(controller, own, 1.0)
    assert controller.alpha(own) > 0.95
    assert controller.choose([512], [controller.alpha(own)], [8]).ks == [8]


def test_larger_batches_speculate_less_at_the_same_acceptance() -> None:
    controller = _controller(draft=False)
    for alpha in (0.5, 0.7, 0.9):
        small = controller.choose([512], [alpha], [8]).ks
        large = controller.choose([512] * 256, [alpha] * 256, [8] * 256).ks
        assert mean(large) < mean(small), (alpha, small, mean(large))
        assert small[0] >= 2


def test_requests_with_better_acceptance_get_longer_proposals() -> None:
    controller = _controller(draft=False)
    ks = controller.choose([512] * 32, [0.95] * 16 + [0.3] * 16, [8] * 32).ks
    assert min(ks[:16]) > max(ks[16:]), ks


def test_caps_bound_each_request() -> None:
    ks = _controller(draft=False).choose([100, 100, 100], [0.99] * 3, [0, 2, 8]).ks
    assert ks[0] == 0 and ks[1] == 2 and ks[2] > 2


def test_bias_keeps_k_zero_when_the_gain_is_marginal() -> None:
    """Find an acceptance where speculation wins by under 5 %: the biased controller stays at 0."""
    controller = _controller(draft=False)
    unbiased = GoodputController(num_speculative_tokens=8, verify=StepTimeModel(TARGET), bias=0.0)
    batch = 128
    for alpha in [i / 100 for i in range(1, 100)]:
        free = unbiased.choose([512] * batch, [alpha] * batch, [8] * batch)
        if free.goodput > free.baseline * 1.001 and free.goodput < free.baseline * 1.04:
            assert controller.choose([512] * batch, [alpha] * batch, [8] * batch).ks == [0] * batch
            return
    pytest.fail("no acceptance with a marginal gain found")


def test_a_verification_step_dearer_than_the_plain_step_must_pay_for_itself() -> None:
    """CPU-like costs: verifying an extra token is nearly free, but a verification step costs 20 %
    more than the engine's plain step (the premium `o`). Judged against itself at k = 0 the
    controller would speculate at low acceptance; with the premium it does not, and at high
    acceptance it still does. A prompt chunk that a speculative step pushes into a second forward
    (`extra`) raises the bar further."""
    cpu = StepCoefficients(a=0.0014, b=1e-8, c=2e-5)
    blind = GoodputController(num_speculative_tokens=4, verify=StepTimeModel(
        StepCoefficients(a=cpu.a * 1.2, b=cpu.b, c=cpu.c)))
    priced = GoodputController(num_speculative_tokens=4, verify=StepTimeModel(
        StepCoefficients(a=cpu.a, b=cpu.b, c=cpu.c, o=cpu.a * 0.2)))
    assert blind.choose([200], [0.2], [4]).ks != [0]  # the mistake this guards against
    assert priced.choose([200], [0.2], [4]).ks == [0]
    assert priced.choose([200], [0.8], [4]).ks[0] >= 2
    alpha = next(a / 100 for a in range(1, 100) if priced.choose([200], [a / 100], [4]).ks != [0])
    assert priced.choose([200], [alpha], [4], extra=cpu.a).ks == [0]


def test_the_fit_separates_the_verification_premium_from_the_shared_forward() -> None:
    """Plain and verification steps of many batch sizes: one fit recovers the forward's costs and
    the premium, so a large batch is judged with the same forward on both sides."""
    true = StepCoefficients(a=0.0015, b=5e-8, c=3e-5, o=2e-4, p=1.5e-5)
    model = StepTimeModel(StepCoefficients(a=0.01, b=0.0, c=1e-5), prior_weight=0.5, refit_every=10_000)
    rng = random.Random(9)
    for _ in range(256):
        batch = rng.randint(1, 64)
        ctx = batch * rng.randint(100, 600)
        verified = batch if rng.random() < 0.5 else 0
        tokens = batch * (1 + rng.randint(1, 4)) if verified else batch
        model.observe(true.time(ctx, tokens, verified) * rng.uniform(0.97, 1.03), ctx, tokens, verified)
    model.refit()
    for batch in (1, 16, 128):
        for verified in (0, batch):
            want = true.time(batch * 400, batch * (3 if verified else 1), verified)
            assert model.time(batch * 400, batch * (3 if verified else 1), verified) == pytest.approx(want, rel=0.1)


def test_without_a_draft_one_pass_finds_what_every_longest_k_finds() -> None:
    """An n-gram controller allocates once, for the longest k; a zero-cost draft model makes the
    controller try every longest k: both must reach the same goodput."""
    rng = random.Random(12)
    free = GoodputController(num_speculative_tokens=6, verify=StepTimeModel(TARGET))
    every = GoodputController(num_speculative_tokens=6, verify=StepTimeModel(TARGET),
                              draft=StepTimeModel(StepCoefficients(a=0.0, b=0.0, c=0.0)))
    for _ in range(200):
        batch = rng.randint(1, 40)
        contexts = [rng.randint(10, 2000) for _ in range(batch)]
        alphas = [rng.random() for _ in range(batch)]
        caps = [rng.randint(0, 6) for _ in range(batch)]
        one, all_ = free.choose(contexts, alphas, caps), every.choose(contexts, alphas, caps)
        assert one.goodput == pytest.approx(all_.goodput, rel=1e-9), (alphas, caps)


def test_the_bound_that_skips_the_search_never_changes_the_choice() -> None:
    """`choose` skips the exact search when an upper bound says no allocation beats the plain step:
    on random batches, acceptances, caps, premiums and draft costs it must pick what the search
    picks, and it must skip on a large batch of poorly predicted text (what the bound is for)."""
    rng = random.Random(7)
    skipped = 0
    for _ in range(2000):
        seed = StepCoefficients(a=rng.uniform(1e-4, 5e-3), b=rng.uniform(0, 1e-6), c=rng.uniform(1e-6, 5e-4),
                                o=rng.uniform(0, 5e-3), p=rng.uniform(0, 5e-4))
        draft = None if rng.random() < 0.5 else StepTimeModel(StepCoefficients(a=rng.uniform(0, 1e-3), b=0.0,
                                                                                  c=rng.uniform(0, 1e-4)))
        controller = GoodputController(num_speculative_tokens=rng.randint(1, 6), verify=StepTimeModel(seed),
                                       draft=draft)
        batch = rng.randint(1, 64)
        contexts = [rng.randint(10, 2000) for _ in range(batch)]
        top = rng.random()
        alphas = [rng.uniform(0, top) for _ in range(batch)]
        caps = [rng.randint(0, 6) for _ in range(batch)]
        chosen = controller.choose(contexts, alphas, caps)
        base = controller.verify.time(sum(contexts), batch)
        plain = Choice([0] * batch, batch / base, batch / base)
        verify_time = controller.verify.time(sum(contexts), batch, verified=batch)
        longest = min(max(caps), controller.num_speculative_tokens)
        searched = controller._search(plain, alphas, caps, longest, verify_time, controller.verify.coefficients.c)
        assert chosen.ks == searched.ks, (seed, alphas, caps)
        skipped += not controller._may_beat(plain.baseline, verify_time, batch, alphas, caps, longest,
                                            controller.verify.coefficients.c)
    assert 200 < skipped < 1800
    big = GoodputController(num_speculative_tokens=4, verify=StepTimeModel(
        StepCoefficients(a=1.2e-3, b=2e-7, c=1.5e-4, o=5e-4, p=1e-4)))
    assert not big._may_beat(100 / big.verify.time(30_000, 100), big.verify.time(30_000, 100, verified=100), 100,
                             [0.3] * 100, [4] * 100, 4, 1.5e-4)


def _loop_seq(name: str = "r") -> SimpleNamespace:
    """A request whose history repeats (5, 6, 7): every lookup finds a 3-gram match."""
    return SimpleNamespace(request_id=name, prompt_ids=[5, 6, 7, 5, 6, 7, 5, 6], tokens=[7], num_cached=9,
                           params=SamplingParams(max_tokens=100))


def _probed(spec: Speculator, batch: list, caps: list[int], extra: float = 0.0) -> bool:
    """One planned step; whether it probed (n-gram probes run no forward: k stays 0)."""
    before = spec._probes
    ks = spec._plan(batch, caps, extra)[0]
    assert not any(ks) or spec._probes == before, "a shadow probe verifies nothing"
    return spec._probes != before


def test_probes_grow_rarer_while_they_keep_saying_no_and_speculation_resets_them(tiny: LoadedModel) -> None:
    """A probe that leaves the controller at k = 0 doubles the wait before the next one, up to 8x
    the configured interval; a step that speculates restores it."""
    spec = informed(make_speculator(tiny, None, "adaptive", "ngram"))
    seq = _loop_seq()
    spec.controller.choose = lambda *a, **k: Choice([0], 1.0, 1.0)  # type: ignore[method-assign]
    spec.controller.may_speculate = lambda *a, **k: False  # type: ignore[method-assign]

    def probes(steps: int) -> list[int]:
        return [i for i in range(steps) if _probed(spec, [seq], [4])]

    every = spec.config.probe_every
    got = probes(40 * every)
    assert got, "no probe at all"
    starts = [-1, *got]
    gaps = [b - a for a, b in zip(starts, got, strict=False)]
    assert gaps[:5] == [every, 2 * every, 4 * every, 8 * every, 8 * every], gaps
    spec.controller.choose = lambda *a, **k: Choice([2], 2.0, 1.0)  # type: ignore[method-assign]
    spec.controller.may_speculate = lambda *a, **k: True  # type: ignore[method-assign]
    spec._no_batch = None  # the cached k = 0 answer came from the controller just replaced
    assert spec._plan([seq], [4], 0.0)[0] == [2]  # speculating resets the interval
    spec.controller.choose = lambda *a, **k: Choice([0], 1.0, 1.0)  # type: ignore[method-assign]
    spec.controller.may_speculate = lambda *a, **k: False  # type: ignore[method-assign]
    assert probes(every)[-1] == every - 1


def test_a_probe_asks_a_few_requests_in_turn(tiny: LoadedModel) -> None:
    """A probe looks up proposals for at most PROBE_REQUESTS requests of the batch, the next ones
    at the next probe (a probe of the whole batch indexed every request at once); a batch that
    small is probed whole. Each keeps its whole proposal (up to its cap) to judge, and no step
    proposes anything to verify."""
    from disaggserve_worker.speculation.speculator import PROBE_REQUESTS

    spec = informed(make_speculator(tiny, None, "adaptive", "ngram"))
    size = PROBE_REQUESTS + 2
    batch = [_loop_seq(f"r{i}") for i in range(size)]
    spec.controller.choose = lambda *a, **k: Choice([0] * len(a[0]), 1.0, 1.0)  # type: ignore[method-assign]
    spec.controller.may_speculate = lambda *a, **k: False  # type: ignore[method-assign]
    asked: list[list[int]] = []
    for _ in range(60 * spec.config.probe_every):
        before = len(spec._shadows)
        assert not any(spec._plan(batch, [4] * size, 0.0)[0])
        if len(spec._shadows) != before:
            asked.append(sorted(batch.index(shadow.seq) for shadow in spec._shadows[before:]))
    assert asked[:3] == [list(range(PROBE_REQUESTS)), [0, 1, 4, 5], [2, 3, 4, 5]], asked
    assert {len(shadow.proposal) for shadow in spec._shadows} == {4}
    assert {shadow.kind for shadow in spec._shadows} == {3}
    small = batch[:PROBE_REQUESTS]
    spec._probe_interval, spec._shadows = 1, []
    assert any(_probed(spec, small, [4] * len(small)) for _ in range(4))
    assert sorted(small.index(shadow.seq) for shadow in spec._shadows) == list(range(len(small)))


def test_a_shadow_probe_is_judged_as_verification_would_judge_it(tiny: LoadedModel) -> None:
    """A probe's proposal is judged on the tokens the request goes on to emit: accepted up to the
    first token they refute (one failure), all of them once it has emitted that many; judged at
    the next step that can, and a request that leaves is judged on what it emitted."""
    spec = informed(make_speculator(tiny, None, "adaptive", "ngram"))
    spec._probe_interval = 10**9
    base = dataclasses.replace(spec.controller.global_acceptance)
    seq, other = _loop_seq("a"), _loop_seq("b")
    spec._shadow([seq, other], [4, 2])
    assert [(sh.proposal, sh.at) for sh in spec._shadows] == [([5, 6, 7, 5], 1), ([5, 6], 1)]
    seq.tokens += [5, 6]  # two confirmed, two not yet emitted: not judged
    spec._judge_shadows()
    assert len(spec._shadows) == 2 and spec.controller.global_acceptance == base
    seq.tokens += [9]  # the third refuted: 2 accepted, 1 failure
    other.tokens += [5, 6]  # both confirmed: 2 accepted
    spec._judge_shadows()
    assert spec._shadows == []
    gain = spec.controller.global_acceptance
    decay = gain.decay
    assert gain.accepted == pytest.approx(decay * (decay * base.accepted + 2) + 2)
    assert gain.judged == pytest.approx(decay * (decay * base.judged + 3) + 2)
    assert spec._requests["a"].acceptance[3].judged == 3 and spec._requests["b"].acceptance[3].accepted == 2
    leaving = _loop_seq("c")
    spec._shadow([leaving], [4])
    leaving.tokens += [5]  # it leaves after one confirmed token: judged 1 of 1
    judged = spec.controller.global_acceptance.judged
    spec.release(leaving)
    assert spec.controller.global_acceptance.judged == pytest.approx(decay * judged + 1)
    assert all(sh.seq is not leaving for sh in spec._shadows) and "c" not in spec._requests


async def test_an_engine_learns_acceptance_from_shadow_probes_without_verifying(tiny: LoadedModel) -> None:
    """Adaptive on a copy-heavy prompt, with speculating priced out: the probes still judge the
    n-gram proposals (the acceptance is learnt), and no step ran a verification forward."""
    spec = make_speculator(tiny, None, "adaptive", "ngram")
    spec.controller.choose = lambda c, *a, **k: Choice([0] * len(c), 1.0, 1.0)  # type: ignore[method-assign]
    spec.controller.may_speculate = lambda *a, **k: False  # type: ignore[method-assign]
    reports = record_steps(spec)
    prompt = await copy_heavy_prompt(tiny)
    engine = make_engine(tiny, spec)
    try:
        await run_requests(engine, [(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))])
    finally:
        engine.stop()
    assert reports and not any(any(r.ks) for r in reports)
    assert spec.controller.global_acceptance.judged > 0
    assert spec._shadows == []


def test_an_engine_that_has_judged_no_proposal_probes_at_once_even_beside_prompt_chunks(tiny: LoadedModel) -> None:
    """Before any proposal was judged the acceptance is the bare prior: every step at k = 0 probes,
    with prompt chunks waiting or not (an engine started under load always has them, and kept
    k = 0 on the prior while its batch grew). Once a proposal was judged, probes wait for their
    interval; the n-gram proposer's do not wait for steps without chunks (they run no forward)."""
    spec = make_speculator(tiny, None, "adaptive", "ngram")
    seq = _loop_seq()
    spec.controller.choose = lambda *a, **k: Choice([0], 1.0, 1.0)  # type: ignore[method-assign]
    spec.controller.may_speculate = lambda *a, **k: False  # type: ignore[method-assign]
    chunks_wait = 1e-3  # the prompt-chunk forward's cost, as `step` passes it when chunks wait
    assert _probed(spec, [seq], [4], chunks_wait), "the first step at k = 0 probes, chunks or not"
    assert _probed(spec, [seq], [4], chunks_wait), "and the next, while nothing is judged"
    informed(spec)
    every = spec.config.probe_every
    got = [i for i in range(3 * every) if _probed(spec, [seq], [4], chunks_wait)]
    assert got and got[0] == every - 1, got


def test_an_uninformed_probe_that_finds_no_proposal_is_repeated_at_the_next_step(tiny: LoadedModel) -> None:
    """A probe that finds no n-gram match judges nothing: the next step at k = 0 probes again (the
    acceptance is still the bare prior), and probes do not grow rarer for it. Once one does propose,
    the interval rules again."""
    spec = make_speculator(tiny, None, "adaptive", "ngram")
    seq = SimpleNamespace(request_id="r", prompt_ids=[5, 6, 7, 8], tokens=[9], num_cached=5,
                          params=SamplingParams(max_tokens=100))
    spec.controller.choose = lambda *a, **k: Choice([0], 1.0, 1.0)  # type: ignore[method-assign]
    spec.controller.may_speculate = lambda *a, **k: False  # type: ignore[method-assign]
    probes = spec._probes
    for _ in range(3):  # no token repeats: nothing to propose, so nothing judged
        assert spec._plan([seq], [4], 1e-3)[0] == [0]
        assert spec._probes == probes + 1, "every k = 0 step probed"
        probes = spec._probes
    assert spec._probe_interval == spec.config.probe_every and not spec._shadows
    seq = _loop_seq("r2")  # the next request's history repeats
    assert spec._plan([seq], [4], 1e-3)[0] == [0]
    assert [sh.proposal for sh in spec._shadows] == [[5, 6, 7, 5]], "a match turned up: the probe keeps it"
    informed(spec)
    every = spec.config.probe_every
    assert not any(_probed(spec, [seq], [4]) for _ in range(every - 1))


def informed(spec: Speculator) -> Speculator:
    """As after a proposal was judged (one of four tokens accepted)."""
    spec.controller.global_acceptance.update(4, 1)
    return spec


def test_a_k_zero_answer_is_reused_only_while_its_inputs_stand(tiny: LoadedModel) -> None:
    """The adaptive speculator asks the controller again when a request joins the batch, the
    step-time fit or (downwards) the prompt-chunk cost change, and at least every REUSE_NO_STEPS + 1
    steps; in between, and when requests only leave, it repeats k = 0 without asking (the ask was
    2-3 % of a CPU decode step)."""
    from disaggserve_worker.speculation.speculator import REUSE_NO_STEPS

    spec = make_speculator(tiny, None, "adaptive", "ngram")
    spec._probe_interval = 10**9  # probes are another test's subject
    asked: list[int] = []

    def may_speculate(contexts: list[int], alphas: list[float], caps: list[int], extra: float = 0.0) -> bool:
        asked.append(len(contexts))
        return False

    spec.controller.may_speculate = may_speculate  # type: ignore[method-assign]

    def seq(name: str) -> SimpleNamespace:
        return SimpleNamespace(request_id=name, prompt_ids=[5, 6, 7], tokens=[8], num_cached=3,
                               params=SamplingParams(max_tokens=100))

    a, b = seq("a"), seq("b")
    for _ in range(2 * (REUSE_NO_STEPS + 1)):
        assert not any(spec._plan([a, b], [4, 4], 0.0)[0])
    assert len(asked) == 2  # once, then again after REUSE_NO_STEPS reuses
    spec._plan([a, b], [4, 4], 0.0)  # the reuses are spent: ask
    spec._plan([a], [4], 0.0)  # a request left: the answer stands
    spec._plan([a, seq("c")], [4, 4], 0.0)  # another joined: ask
    spec._plan([seq("d"), a], [4, 4], 0.0)  # the same size, not the same requests: ask
    assert asked[2:] == [2, 2, 2]
    del asked[-1]
    spec._plan([a, b], [4, 4], 0.001)
    spec._plan([a, b], [4, 4], 0.002)  # a dearer prompt chunk makes speculating no better: reuse
    spec._plan([a, b], [4, 4], 0.0)  # a cheaper one could: ask
    assert len(asked) == 6
    verify = spec.controller.verify
    verify.coefficients = dataclasses.replace(verify.coefficients, a=verify.coefficients.a * 1.01)  # a refit: ask
    spec._plan([a, b], [4, 4], 0.0)
    assert len(asked) == 7
    spec.controller.may_speculate = lambda *a, **k: True  # type: ignore[method-assign]
    spec.controller.choose = lambda *a, **k: Choice([2, 0], 2.0, 1.0)  # type: ignore[method-assign]
    verify.coefficients = dataclasses.replace(verify.coefficients, a=verify.coefficients.a * 1.01)
    assert spec._plan([a, b], [4, 4], 0.0)[0] == [2, 0]


def test_first_asks_that_keep_saying_maybe_are_skipped_for_a_while(tiny: LoadedModel) -> None:
    """After MAYBE_STREAK best-case asks in a row said "maybe", the next SKIP_FIRST_ASKS steps go
    straight to the lookups and the second ask, which still decides every step; then it asks again."""
    from disaggserve_worker.speculation.speculator import MAYBE_STREAK, SKIP_FIRST_ASKS

    spec = informed(make_speculator(tiny, None, "adaptive", "ngram"))
    spec._probe_interval = 10**9
    first: list[int] = []
    second: list[int] = []
    spec.controller.may_speculate = lambda c, *a, **k: first.append(len(c)) or True  # type: ignore[method-assign]

    def choose(contexts: list[int], alphas: list[float], caps: list[int], extra: float = 0.0) -> Choice:
        second.append(len(contexts))
        return Choice([0] * len(contexts), 1.0, 1.0)

    spec.controller.choose = choose  # type: ignore[method-assign]
    seq = _loop_seq()
    steps = MAYBE_STREAK + SKIP_FIRST_ASKS + 1
    for _ in range(steps):
        assert spec._plan([seq], [4], 0.0)[0] == [0]
    assert len(first) == MAYBE_STREAK + 1 and len(second) == steps


def test_a_no_after_lookups_holds_a_few_steps_from_a_batch_of_8(tiny: LoadedModel) -> None:
    """From REUSE_LOOKED_UP_NO_BATCH requests a "no" the lookups led to is reused for the next
    REUSE_LOOKED_UP_NO steps (which then work out no caps either); below it every step looks up."""
    from disaggserve_worker.speculation.speculator import REUSE_LOOKED_UP_NO, REUSE_LOOKED_UP_NO_BATCH

    spec = informed(make_speculator(tiny, None, "adaptive", "ngram"))
    spec._probe_interval = 10**9
    spec.controller.may_speculate = lambda *a, **k: True  # type: ignore[method-assign]
    asked: list[int] = []

    def choose(contexts: list[int], alphas: list[float], caps: list[int], extra: float = 0.0) -> Choice:
        asked.append(len(contexts))
        return Choice([0] * len(contexts), 1.0, 1.0)

    spec.controller.choose = choose  # type: ignore[method-assign]
    capped: list[int] = []
    real_caps = spec._caps
    spec._caps = lambda batch: capped.append(len(batch)) or real_caps(batch)  # type: ignore[method-assign]
    large = [_loop_seq(f"r{i}") for i in range(REUSE_LOOKED_UP_NO_BATCH)]
    rounds = 3
    for _ in range(rounds * (REUSE_LOOKED_UP_NO + 1)):
        assert not any(spec._plan(large, None, 0.0)[0])
    assert len(asked) == rounds and len(capped) == rounds, (asked, capped)
    small = large[:-1]
    asked.clear()
    for _ in range(6):
        assert not any(spec._plan(small, None, 0.0)[0])
    assert len(asked) == 6


def test_may_speculate_is_choose_saying_any_k_without_its_search() -> None:
    """The n-gram speculator's first ask: never "no" where `choose` would speculate."""
    rng = random.Random(11)
    for _ in range(500):
        controller = GoodputController(num_speculative_tokens=4, verify=StepTimeModel(StepCoefficients(
            a=rng.uniform(1e-4, 5e-3), b=rng.uniform(0, 1e-6), c=rng.uniform(1e-6, 5e-4),
            o=rng.uniform(0, 5e-3), p=rng.uniform(0, 5e-4))))
        batch = rng.randint(1, 40)
        contexts = [rng.randint(10, 2000) for _ in range(batch)]
        alphas = [rng.random() for _ in range(batch)]
        caps = [rng.randint(0, 4) for _ in range(batch)]
        if any(controller.choose(contexts, alphas, caps).ks):
            assert controller.may_speculate(contexts, alphas, caps)


def test_the_step_time_model_observes_one_plain_step_in_plain_observe_every(tiny: LoadedModel) -> None:
    from disaggserve_worker.speculation.speculator import PLAIN_OBSERVE_EVERY

    spec = make_speculator(tiny, None, "adaptive", "ngram")
    before = spec.controller.verify.samples
    for _ in range(3 * PLAIN_OBSERVE_EVERY):
        spec.observe_plain(0.003, 100, 2)
    assert spec.controller.verify.samples == before + 3


def test_expected_tokens_formula() -> None:
    assert expected_tokens(0.5, 0) == 1
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.0, 5) == 1


def test_step_time_fit_recovers_coefficients_from_noisy_steps() -> None:
    true = StepCoefficients(a=0.004, b=1e-7, c=5e-4)
    model = StepTimeModel(StepCoefficients(a=0.02, b=0.0, c=1e-5), refit_every=1000)
    rng = random.Random(5)
    for _ in range(256):
        batch = rng.randint(1, 32)
        tokens = batch * rng.randint(1, 5)
        ctx = batch * rng.randint(50, 2000)
        model.observe(true.time(ctx, tokens) * rng.uniform(0.95, 1.05), ctx, tokens)
    model.refit()
    got = model.coefficients
    assert got.a == pytest.approx(true.a, rel=0.2)
    assert got.c == pytest.approx(true.c, rel=0.2)
    assert got.b == pytest.approx(true.b, rel=0.5)


async def test_adaptive_on_the_engine_skips_a_random_draft(tiny: LoadedModel,
                                                          tiny_draft: LoadedModel) -> None:
    spec = make_speculator(tiny, tiny_draft, "adaptive", "draft")
    engine = make_engine(tiny, spec)
    steps = record_steps(spec)
    try:
        rng = random.Random(2)
        prompts = [[rng.randrange(3, 512) for _ in range(16)] for _ in range(4)]
        await run_requests(engine, [(p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
                                    for p in prompts])
    finally:
        engine.stop()
    assert spec.controller.alpha() < 0.3
    # The engine timed its plain decode steps for the controller, beside the verification steps.
    assert 0 < spec.controller.verify.plain_samples < spec.controller.verify.samples
    ks = [k for step in steps for k in step.ks]
    late = ks[len(ks) // 2:]
    assert sum(1 for k in late if k) <= len(late) * 0.15, f"speculated too often with a random draft: {late}"


async def test_adaptive_on_the_engine_speculates_far_on_copy_heavy_prompts(tiny: LoadedModel) -> None:
    prompt = await copy_heavy_prompt(tiny)
    spec = make_speculator(tiny, None, "adaptive", "ngram", num_speculative_tokens=6)
    engine = make_engine(tiny, spec)
    steps = record_steps(spec)
    try:
        await run_requests(engine, [(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))])
    finally:
        engine.stop()
    assert spec.controller.alpha() > 0.8
    ks = [max(step.ks) for step in steps]
    assert mean(ks) >= 3, ks


def test_step_time_fit_stays_non_negative_without_distorting_the_rest() -> None:
    """No context cost at all: b comes out near 0 (the prior holds it a little) and a, c right."""
    true = StepCoefficients(a=0.003, b=0.0, c=2e-4)
    model = StepTimeModel(StepCoefficients(a=0.01, b=1e-6, c=1e-5), refit_every=1000)
    rng = random.Random(6)
    for _ in range(256):
        batch = rng.randint(1, 64)
        tokens = batch * rng.randint(1, 5)
        model.observe(true.time(0, tokens) * rng.uniform(0.97, 1.03), batch * rng.randint(100, 400), tokens)
    model.refit()
    got = model.coefficients
    assert min(got.a, got.b, got.c) >= 0
    assert got.b * 64 * 400 < 0.2 * true.time(0, 64), "context cost should be small"
    assert got.c == pytest.approx(true.c, rel=0.2)
    assert got.a == pytest.approx(true.a, rel=0.3)


def _bent(true: StepCoefficients, ctx: float, tokens: int, verified: int) -> float:
    """A device the linear model cannot fit at every batch size: one-request plain steps run 20 %
    under the line and one-request verification steps 20 % over it (what the CPU engine did)."""
    seconds = true.time(ctx, tokens, verified)
    batch = verified or tokens
    if batch == 1:
        seconds *= 1.2 if verified else 0.8
    return seconds


def test_the_fit_s_miss_at_one_batch_size_is_corrected_from_measured_steps() -> None:
    true = StepCoefficients(a=0.0015, b=5e-8, c=3e-5, o=2e-4, p=1.5e-5)
    model = StepTimeModel(true, refit_every=64)
    rng = random.Random(4)
    for _ in range(400):
        batch = rng.choice([1, 1, 2, 4, 8, 16])
        verified = batch if rng.random() < 0.3 else 0
        tokens = batch * (1 + rng.randint(1, 4)) if verified else batch
        ctx = batch * 300
        model.observe(_bent(true, ctx, tokens, verified) * rng.uniform(0.98, 1.02), ctx, tokens, verified)
    for tokens, verified in ((1, 0), (5, 1)):
        want = _bent(true, 300, tokens, verified)
        assert model.coefficients.time(300, tokens, verified) != pytest.approx(want, rel=0.08)  # the line misses
        assert model.time(300, tokens, verified) == pytest.approx(want, rel=0.04)
    assert model.time(4 * 300, 4) == pytest.approx(true.time(4 * 300, 4), rel=0.08)  # the rest stays near the line


def test_a_controller_corrected_by_measured_steps_stops_speculating_where_it_loses() -> None:
    """Priced by the line, a one-request verification step looks 30 % cheaper next to the plain step
    than it is, and an acceptance of 0.3 seems to pay; measured, it does not (the x0.3 cell of
    bench/speculation.py on non-repetitive text). At a high acceptance it still speculates."""
    true = StepCoefficients(a=0.0015, b=1e-8, c=2e-5, o=2e-4, p=2e-5)
    controller = GoodputController(num_speculative_tokens=4, verify=StepTimeModel(true, refit_every=1 << 30))
    assert controller.choose([300], [0.3], [4]).ks != [0]  # the mistake this guards against
    for _ in range(30):
        controller.verify.observe(_bent(true, 300, 1, 0), 300, 1)
        controller.verify.observe(_bent(true, 305, 5, 1), 305, 5, verified=1)
    assert controller.choose([300], [0.3], [4]).ks == [0]
    assert controller.choose([300], [0.9], [4]).ks[0] >= 2
    assert controller.choose([300] * 4, [0.3] * 4, [4] * 4).ks != [0] * 4  # other sizes: the line's price


def test_a_correction_outlives_the_window_that_measured_it() -> None:
    """Verification steps stop once the controller learns they lose; the plain steps after them
    refit the line and push them out of the window, but not their correction."""
    true = StepCoefficients(a=0.0015, b=1e-8, c=2e-5, o=2e-4, p=2e-5)
    model = StepTimeModel(StepCoefficients(a=0.003, b=0.0, c=1e-5), window=64, refit_every=16)
    for _ in range(10):
        model.observe(_bent(true, 305, 5, 1), 305, 5, verified=1)
    for i in range(200):
        batch = 1 + i % 8
        model.observe(_bent(true, batch * 300, batch, 0), batch * 300, batch)
    assert all(row[2] == 0 for row in model._rows)
    assert model.time(305, 5, verified=1) == pytest.approx(_bent(true, 305, 5, 1), rel=0.1)


def test_acceptance_is_learnt_per_n_gram_length_and_is_each_request_s_prior(tiny: LoadedModel) -> None:
    """Chance 1-gram matches rejected, 3-gram loops accepted: a new request trusts a 3-gram match
    and not a 1-gram one, from the first step (one estimate for both would price them alike)."""
    spec = make_speculator(tiny, None, "adaptive", "ngram")
    seen = spec._state(SimpleNamespace(request_id="seen"))  # type: ignore[arg-type]
    for _ in range(40):
        spec._observe(seen, 1, 4, 0)
        spec._observe(seen, 3, 4, 4)
    fresh = spec._state(SimpleNamespace(request_id="fresh"))  # type: ignore[arg-type]
    priors = spec._kind_priors()
    assert spec._alpha(fresh, 1, priors) < 0.15
    assert spec._alpha(fresh, 3, priors) > 0.85
    assert spec._alpha(fresh, 2, priors) == pytest.approx(spec.controller.alpha())  # no 2-gram seen: the global one
    cpu = StepCoefficients(a=0.004, b=1e-8, c=4e-5, o=6e-4, p=4e-4)
    spec.controller.verify = StepTimeModel(cpu)
    assert spec.controller.choose([300], [spec._alpha(fresh, 1, priors)], [4]).ks == [0]
    assert spec.controller.choose([300], [spec._alpha(fresh, 3, priors)], [4]).ks[0] >= 3
