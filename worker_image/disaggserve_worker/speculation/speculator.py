"""One speculative decode step for the engine's running batch.

The engine calls `step(batch)` instead of its plain decode forward and gets back, per
sequence, the tokens to emit (one or more). Everything happens in one batched target
forward: sequence i brings its last token plus k_i proposed tokens (k_i may differ, and be
0), so speculation lives inside continuous batching with no extra target passes.

KV cache: the target writes K/V for all 1 + k_i positions; only the accepted prefix stays
meaningful. The engine advances `num_cached` by the tokens it emits, which leaves the
rejected positions beyond it, to be overwritten by the next step — the rollback is that the
cache length never counts them. The reservation of prompt + max_tokens slots made at
admission covers every position written, because k_i is capped by what the request can
still emit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from disaggserve_worker.engine.kv_cache import BlockAllocator
from disaggserve_worker.engine.sampling import SamplingParams, filter_logits
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.kv_pool import KVPool
from disaggserve_worker.model.llama import LlamaForCausalLM
from disaggserve_worker.speculation.config import SpeculationConfig
from disaggserve_worker.speculation.controller import Acceptance, GoodputController
from disaggserve_worker.speculation.draft import DraftProposer, DraftRequest
from disaggserve_worker.speculation.metrics import SpecMetrics
from disaggserve_worker.speculation.ngram import NgramIndex
from disaggserve_worker.speculation.rejection import verify_greedy, verify_sampled
from disaggserve_worker.speculation.step_time import StepCoefficients, StepTimeModel

log = logging.getLogger(__name__)

PROBE_BACKOFF = 8  # probes grow at most this much rarer than `probe_every` while k stays 0
PROBE_REQUESTS = 4  # the most requests one probe asks for a proposal (see `_plan`)
# Steps a "k = 0 everywhere" decision is reused for while its inputs stand (see `_settled_no`).
REUSE_NO_STEPS = 8
# After MAYBE_STREAK first asks in a row said "maybe", the next SKIP_FIRST_ASKS steps skip it (`_plan`).
MAYBE_STREAK = 4
SKIP_FIRST_ASKS = 16
# From REUSE_LOOKED_UP_NO_BATCH requests a "no" after lookups holds for the next REUSE_LOOKED_UP_NO steps.
REUSE_LOOKED_UP_NO_BATCH = 8
REUSE_LOOKED_UP_NO = 3
PLAIN_OBSERVE_EVERY = 4  # plain decode steps per one the step-time model observes (`observe_plain`)


class SpecSequence(Protocol):
    """What the speculator reads of an engine sequence (engine.Sequence satisfies it)."""

    request_id: str
    prompt_ids: list[int]
    tokens: list[int]
    num_cached: int
    slot_table: torch.Tensor | None
    params: SamplingParams
    generator: torch.Generator


@dataclass
class _RequestState:
    # This request's acceptance by the kind of proposal (`_kind`): the n-gram length matched, 0 for a
    # draft model's proposals.
    acceptance: dict[int, Acceptance] = field(default_factory=dict)
    ngrams: NgramIndex | None = None  # the n-gram proposer's index of this request's history


@dataclass
class _Shadow:
    """A probe's n-gram proposal, judged against the tokens the request's plain steps emit."""

    seq: SpecSequence
    state: _RequestState
    kind: int  # the n-gram length matched
    at: int  # len(seq.tokens) when proposed: the proposal predicts tokens[at:at + len(proposal)]
    proposal: list[int]


@dataclass
class StepReport:
    """What the last step did (tests and the bench read it; metrics get the same)."""

    ks: list[int]
    proposed: list[int]
    accepted: list[int]
    seconds: float


class Speculator:
    def __init__(self, config: SpeculationConfig, model: LlamaForCausalLM, draft: DraftProposer | None = None,
                 metrics: SpecMetrics | None = None, seed: StepCoefficients | None = None,
                 draft_seed: StepCoefficients | None = None):
        if not config.enabled:
            raise ValueError("a Speculator needs speculation mode fixed or adaptive")
        if config.proposer == "draft" and draft is None:
            raise ValueError("the draft proposer needs a loaded draft model")
        self.config = config
        self.model = model
        self.draft = draft if config.proposer == "draft" else None
        self.ngram = config.proposer == "ngram"
        self.metrics = metrics
        self.controller = GoodputController(
            num_speculative_tokens=config.num_speculative_tokens,
            verify=StepTimeModel(seed or GoodputController.default_seed()),
            draft=(StepTimeModel(draft_seed or StepCoefficients(a=0.005, b=0.0, c=1e-4))
                   if self.draft is not None else None),
            bias=config.bias)
        self._requests: dict[str, _RequestState] = {}
        # Acceptance by kind of proposal over every request: each request's prior for that kind.
        # Why by n-gram length: a match of the last token alone is mostly chance, one of the last
        # three mostly a loop the text repeats. Measured on the bench's non-repetitive prompts
        # (small-llama greedy, k = 4): 1-gram matches were accepted at 0.39 per judged token,
        # 2-grams 0.69, 3-grams 0.80; one estimate for all of them (~0.45) priced the 1-grams too
        # high (speculated where it lost) and the loops too low (missed where it won).
        self._by_kind: dict[int, Acceptance] = {}
        self._kinds = (range(config.ngram_min, config.ngram_max + 1) if self.ngram else range(1))
        self._matched: list[int] = []  # each request's kind in the last lookups (0: nothing found)
        self._zero_steps = 0
        self._plain_steps = 0  # plain decode steps the engine reported (`observe_plain`)
        # Steps of k = 0 between probes: doubled (up to PROBE_BACKOFF x the configured interval)
        # after each probe that did not lead to speculating, back to the configured one as soon as
        # a step speculates. Why: a draft model's probe is a verification step (it was of the whole
        # batch at k = 1: on non-repetitive text at overload the probes every 16 steps were ~5 % of
        # the engine's CPU), for an acceptance estimate that kept saying no; an n-gram probe costs
        # only its lookups (`_shadow`), but those too are not free near capacity.
        self._probe_interval = config.probe_every
        self._probed = False
        self._probes = 0  # requests probed so far: where in the batch the next probe starts
        # The n-gram proposer's probes: proposals made at k = 0 steps, not verified by a forward of
        # their own but judged against the tokens the request then emits (`_judge_shadows`).
        self._shadows: list[_Shadow] = []
        # The last "k = 0 everywhere" decision of the adaptive controller: the batch it was made
        # for, the step-time fit and the prompt-chunk cost it assumed, and the steps left to reuse it.
        self._no_batch: list[SpecSequence] | None = None
        self._no_fit: StepCoefficients | None = None
        self._no_extra = 0.0
        self._no_left = 0
        self._maybes = 0  # first asks in a row that said "maybe" (`_first_ask`)
        self._skip_first_asks = 0  # steps left that go straight to the lookups
        # Billing a speculative step (see `finish_step`): when it started costing what a plain step
        # would not, the seconds inside it that are not the step's (n-gram indexes built for requests
        # speculating for the first time), and the step's shape; set until the engine has emitted.
        self._bill_from = 0.0
        self._unbilled = 0.0
        self._pending: tuple[float, float, float, int, int, float] | None = None
        self.kv_pool: KVPool | None = None
        self.max_model_len = 1 << 30
        self.sync: Callable[[], None] = lambda: None
        self.last: StepReport | None = None

    def attach(self, kv_pool: KVPool, max_model_len: int, sync: Callable[[], None],
               allocator: BlockAllocator | None = None) -> None:
        """Called by the engine once its KV pool exists (before it serves anything)."""
        self.kv_pool, self.max_model_len, self.sync = kv_pool, max_model_len, sync
        if self.draft is not None:
            self.draft.sync = sync
        if allocator is not None and self.config.mode == "adaptive":
            self.calibrate(allocator)

    def calibrate(self, allocator: BlockAllocator, repeats: int = 2) -> None:
        """Seed the step-time models from a few real steps (a micro profile in the planner's form)
        on scratch slots of the idle pool: the plain decode step (k = 0 everywhere) and the
        verification step, each timed from its layout to its tokens.

        Why: online, the controller mostly repeats the same k, so measured steps alone barely
        tell the per-token cost from the fixed cost; a seed measured on this device with k
        varied on purpose does, and the online fit then tracks drift from it.
        """
        k = self.config.num_speculative_tokens
        shapes = [(1, 64, 0), (1, 64, 1), (1, 64, k), (8, 64, 0), (8, 64, 1), (8, 64, k), (8, 256, 0),
                  (8, 256, 1), (1, 256, 0), (1, 256, k), (4, 128, 0)]
        span = 256 + k + 1
        blocks = allocator.try_allocate(8 * span)
        if blocks is None:
            log.info("no scratch KV room to calibrate speculation; using the default step-time seed")
            return
        device = self.model.device
        try:
            table = allocator.slot_table(blocks, device)
            fit = StepTimeModel(self.controller.verify.seed, prior_weight=0.5, refit_every=1 << 30)
            for rep in range(repeats + 1):
                for batch, ctx, extra in shapes:
                    start = time.perf_counter()
                    tables = [table[i * span:(i + 1) * span] for i in range(batch)]
                    layout = BatchLayout.build([extra + 1] * batch, [ctx] * batch, tables, device,
                                               self.model.sliding_window)
                    ids = torch.zeros(batch * (extra + 1), dtype=torch.long, device=device)
                    logits = self.model.forward_step(ids, layout, self.kv_pool,  # type: ignore[arg-type]
                                                     all_logits=extra > 0)
                    logits.argmax(dim=-1).tolist()
                    if rep:  # the first round warms up kernels and caches
                        fit.observe(time.perf_counter() - start, batch * (ctx + extra + 1), batch * (extra + 1),
                                    verified=batch if extra else 0)
            fit.refit()
        finally:
            allocator.free(blocks)
        self.controller.verify = StepTimeModel(fit.coefficients, prior_weight=16.0)
        # The calibration's misses by batch size too: a fresh engine's first requests run alone,
        # where the fit's line misses a one-request step most (see `step_time`).
        self.controller.verify.adopt_residuals(fit)
        log.info("speculation step-time seed measured: %s", fit.coefficients)

    def observe_plain(self, seconds: float, context_tokens: int, batch: int) -> None:
        """A plain decode step the engine ran (k = 0 everywhere, no prompt chunk beside it), timed
        from its layout to its tokens: what speculation has to beat. Every PLAIN_OBSERVE_EVERY-th
        is kept: plain steps are most steps, and fitting each (its refit every 64 observations, ~2 ms)
        cost ~30 us a step, ~1 % of a small model's CPU step, which at x4 load became latency."""
        self._plain_steps += 1
        if self._plain_steps % PLAIN_OBSERVE_EVERY == 0:
            self.controller.verify.observe(seconds, context_tokens, batch)

    def release(self, seq: SpecSequence) -> None:
        """The sequence left the engine (finished, aborted, failed): judge its probes on the tokens it
        emitted, drop its state and draft cache."""
        if self._shadows:
            self._judge_shadows(leaving=seq)
        self._requests.pop(seq.request_id, None)
        if self.draft is not None:
            self.draft.release(id(seq))

    def _state(self, seq: SpecSequence) -> _RequestState:
        state = self._requests.get(seq.request_id)
        if state is None:  # not setdefault: that built a state per request per step (~1 µs each)
            state = self._requests[seq.request_id] = _RequestState()
        return state

    # ---- choosing k ---------------------------------------------------------------------------
    def _caps(self, batch: list[SpecSequence]) -> list[int]:
        """Tokens each request can still use: k + 1 emitted tokens must fit max_tokens and the model."""
        return [max(0, min(self.config.num_speculative_tokens, s.params.max_tokens - len(s.tokens) - 1,
                           self.max_model_len - len(s.prompt_ids) - len(s.tokens) - 1)) for s in batch]

    def _kind_priors(self) -> dict[int, float]:
        """Each kind's acceptance over every request (the global estimate before any of that kind)."""
        prior = self.controller.alpha()
        return {kind: (self._by_kind[kind].rate(prior) if kind in self._by_kind else prior) for kind in self._kinds}

    @staticmethod
    def _alpha(state: _RequestState, kind: int, priors: dict[int, float]) -> float:
        own = state.acceptance.get(kind)
        return priors[kind] if own is None else own.rate(priors[kind])

    def _observe(self, state: _RequestState, kind: int, proposed: int, accepted: int) -> None:
        own = state.acceptance.get(kind)
        if own is None:
            own = state.acceptance[kind] = Acceptance()
        self.controller.observe(own, proposed, accepted)
        every = self._by_kind.get(kind)
        if every is None:
            every = self._by_kind[kind] = Acceptance(decay=self.controller.global_acceptance.decay)
        every.update(proposed, accepted)

    def _lookups(self, batch: list[SpecSequence], caps: list[int]) -> list[list[int]]:
        lookups: list[list[int]] = []
        self._matched = matched = []
        for seq, cap in zip(batch, caps, strict=True):
            if not cap:
                lookups.append([])
                matched.append(0)
                continue
            state = self._state(seq)
            if state.ngrams is None:  # once per request: not this step's cost (`finish_step`)
                built = time.perf_counter()
                state.ngrams = NgramIndex(self.config.ngram_min, self.config.ngram_max)
                state.ngrams.sync(seq.prompt_ids, seq.tokens)
                self._unbilled += time.perf_counter() - built
            else:
                state.ngrams.sync(seq.prompt_ids, seq.tokens)
            lookups.append(state.ngrams.propose(cap))
            matched.append(state.ngrams.matched)
        return lookups

    def _plan(self, batch: list[SpecSequence], caps: list[int] | None, extra: float
              ) -> tuple[list[int], list[list[int]]]:
        """k per request, and the n-gram lookups (n-gram proposer) bounding them. `caps`: what each
        request can still use (`_caps`), None to work it out only if this step needs it (a reused
        "no" without a probe does not: at a batch of 17 that was a fifth of such a step's cost)."""
        self._bill_from, self._unbilled = time.perf_counter(), 0.0
        if self.config.mode == "fixed":
            caps = self._caps(batch) if caps is None else caps
            lookups = self._lookups(batch, caps) if self.ngram else []
            return ([len(f) for f in lookups] if lookups else list(caps)), lookups
        priors: dict[int, float] = {}
        contexts: list[int] = []
        if self._settled_no(batch, extra):
            ks: list[int] = []
        else:
            caps = self._caps(batch) if caps is None else caps
            priors = self._kind_priors()
            contexts = [s.num_cached + 1 for s in batch]
            if self.ngram and self._skip_first_asks > 0:
                # The first ask kept saying "maybe": straight to the lookups and the second ask, which
                # decide alone (the first is a relaxation of the second: it never says "no" where the
                # second would not). Why: near capacity on non-repetitive text every step's best case
                # (a 3-gram match for every request) says maybe, and that ask was a third of the
                # speculator's ~290 us a step at a batch of 19.
                self._skip_first_asks -= 1
                ks = [1] * len(batch)  # "maybe": only whether any k > 0 is read below
            else:
                ks = self._first_ask(batch, caps, extra, priors, contexts)
            if not any(ks):
                self._no_batch, self._no_fit, self._no_extra = batch, self.controller.verify.coefficients, extra
                self._no_left = REUSE_NO_STEPS
        probe = False
        if not any(ks):
            # Acceptance is learnt only from judged proposals: probe now and then, or a pessimistic
            # estimate would never be corrected.
            if self._probed:  # the last probe did not change the answer: probe less often
                self._probe_interval = min(2 * self._probe_interval, PROBE_BACKOFF * self.config.probe_every)
                self._probed = False
            self._zero_steps += 1
            # The n-gram proposer's probes run no forward (`_shadow`). A draft model's probe is a
            # verification step, which beside prompt chunks (`extra`: a speculative step leaves them
            # a forward of their own) costs that forward too: it waits for a step without them.
            # Except while no proposal has ever been judged: α is then the bare prior, which decides
            # nothing, so every step at k = 0 probes, chunks or not, until a probe finds a proposal
            # to judge (one that finds none costs only the look-ups, learns nothing, and does not
            # make probes rarer). Why: an engine started under load (a fresh pod, a scale-up)
            # always has chunks waiting; it kept k = 0 on the prior while its batch grew to ~70
            # before learning copy-heavy acceptance was 0.95, and that run was 1.06x the best fixed
            # policy's mean latency at x4 (bench/speculation.py, CPU clock). Probing only the first
            # k = 0 step was not enough: on a copy-heavy prompt whose first two positions had no
            # n-gram match, a slow host's step-time fit then said k = 0 for the rest of the request.
            uninformed = not self.controller.global_acceptance.judged
            due = self._zero_steps >= self._probe_interval or uninformed
            probe = due and (uninformed or not extra or self.ngram)
            if not probe:
                return ks, []
            self._probed = not uninformed
            # At most PROBE_REQUESTS requests, in turn, propose (n-gram: all they could use, judged
            # in shadow; a draft model: one token each, verified). Why not the whole
            # batch: that built the n-gram index of every request not yet speculating (~0.4 ms each
            # for a 400-token prompt) and verified them all; at batches of 10-16 on non-repetitive
            # text a probe cost 1.75-2x a plain step (bench/speculation.py, CPU clock), and the
            # probes alone made adaptive 0.5-1 % more engine CPU than speculation off at overload,
            # 3-6 % more latency once the queue amplified it. The
            # acceptance by kind of match, which every request's estimate starts from, learns from
            # any request's proposals; a small batch is still probed whole.
            caps = self._caps(batch) if caps is None else caps
            first = self._probes % len(batch)
            asked = {(first + j) % len(batch) for j in range(min(PROBE_REQUESTS, len(batch)))}
            self._probes += len(asked)
            if self.ngram:
                self._zero_steps = 0
                self._shadow(batch, [c if i in asked else 0 for i, c in enumerate(caps)])
                return ks or [0] * len(batch), []
            caps = [min(1, c) if i in asked else 0 for i, c in enumerate(caps)]
        else:
            self._probe_interval, self._probed = self.config.probe_every, False
        self._zero_steps = 0
        if not self.ngram:
            return (caps if probe else ks), []
        self._bill_from, self._unbilled = time.perf_counter(), 0.0  # the lookups are speculation's cost
        assert caps is not None
        lookups = self._lookups(batch, caps)
        found = [len(f) for f in lookups]
        alphas = [self._alpha(self._state(seq), kind, priors) if kind else 0.0
                  for seq, kind in zip(batch, self._matched, strict=True)]
        ks = self.controller.choose(contexts, alphas, found, extra).ks
        if not any(ks) and len(batch) >= REUSE_LOOKED_UP_NO_BATCH:
            # Near capacity on text n-grams do not predict, this answer is the usual one and the
            # lookups and asks behind it were most of the speculator's cost per step; the next
            # steps reuse it (`_settled_no`). Not below a batch of 8: a copy-heavy request with a
            # momentary miss held its small batch at k = 0 (at 8 steps of reuse that cost
            # copy-heavy x1 / x2 4-5 % in bench/speculation.py); a few steps at 8 or more cost little.
            # Nor longer after a run of them: holds of 1, 3, 7, then 8 steps after the 2nd-5th
            # "no" in a row at any batch halved the asks on non-repetitive text, but copy-heavy
            # misses come in runs too (a span the prompt does not hold): its mean k fell from
            # 3.38-3.43 to 2.97-3.36 and x4 read 1.07 of fixed k = 4 (bench/speculation.py).
            self._no_batch, self._no_fit, self._no_extra = batch, self.controller.verify.coefficients, extra
            self._no_left = REUSE_LOOKED_UP_NO
        return ks, lookups

    def _shadow(self, batch: list[SpecSequence], caps: list[int]) -> None:
        """Probe without a forward: look up the asked requests' proposals (as long as they could be
        used) and keep them to judge against the tokens the plain steps emit (`_judge_shadows`).
        Why not verify them: a probe was a verification step of its own, 1.5-3x a plain step on
        the CPU; on non-repetitive text at a held batch of 5 the probes made adaptive 5 % more
        engine CPU than speculation off. Judging against the emitted tokens is the verification's
        outcome without its cost: a greedy request accepts exactly the proposed prefix its own
        greedy tokens repeat, and a sampled one accepts a proposed token with the probability the
        target gives it, which is the chance the token it samples is that one (the n-gram proposer
        is deterministic), each next token conditioned on the accepted prefix alike."""
        for seq, cap, found, kind in zip(batch, caps, self._lookups(batch, caps), self._matched, strict=True):
            if found and cap:
                self._shadows.append(_Shadow(seq, self._state(seq), kind, len(seq.tokens), found))

    def _judge_shadows(self, leaving: SpecSequence | None = None) -> None:
        """Judge each probe whose request has emitted as many tokens as it proposed, or has already
        refuted it; `leaving`'s probes on whatever it emitted before it left."""
        kept: list[_Shadow] = []
        judged = False
        for shadow in self._shadows:
            seen = shadow.seq.tokens[shadow.at:shadow.at + len(shadow.proposal)]
            ok = 0
            while ok < len(seen) and seen[ok] == shadow.proposal[ok]:
                ok += 1
            if ok < len(seen) or len(seen) == len(shadow.proposal) or (shadow.seq is leaving and seen):
                self._observe(shadow.state, shadow.kind, len(seen) if ok == len(seen) else len(shadow.proposal), ok)
                judged = True
            elif shadow.seq is not leaving:
                kept.append(shadow)
        self._shadows = kept
        if judged:
            self._no_batch = None  # the acceptance the last "k = 0" answer rested on moved

    def _first_ask(self, batch: list[SpecSequence], caps: list[int], extra: float, priors: dict[int, float],
                   contexts: list[int]) -> list[int]:
        """The controller's answer before any lookup, each request as if its best kind of proposal
        turned up: "k = 0 everywhere" then holds whatever they find, and the lookups (the
        proposer's whole cost) can be skipped. For the n-gram proposer the bound suffices (all 1
        stands for "maybe"): when it says maybe, the lookups and the second ask decide."""
        fresh = max(priors.values())  # a request with no judged proposal of its own
        kinds = self._kinds
        alphas = [max(self._alpha(state, kind, priors) for kind in kinds) if state.acceptance else fresh
                  for state in map(self._state, batch)]
        if not self.ngram:
            return self.controller.choose(contexts, alphas, caps, extra).ks
        if self.controller.may_speculate(contexts, alphas, caps, extra):
            self._maybes += 1
            if self._maybes >= MAYBE_STREAK:
                self._maybes, self._skip_first_asks = 0, SKIP_FIRST_ASKS
            return [1] * len(batch)
        self._maybes = 0
        return [0] * len(batch)

    def _settled_no(self, batch: list[SpecSequence], extra: float) -> bool:
        """Whether the last "k = 0 everywhere" answer still holds, so the controller need not be
        asked again. It does while the batch is the same requests, or fewer of them (`_only_left`;
        their acceptance only changes on a step that speculates or a judged probe, which forget
        the answer), the step-time fit is the one it was
        made with, the prompt-chunk cost is no lower, for `REUSE_NO_STEPS` steps. Caps only fall
        with the same requests, and a lower cap never makes speculating pay; contexts grow by a
        token a step, which moves the plain and the verification step alike (b·Σctx).
        Why: asking costs ~25-35 µs a step inside the engine (state look-ups, the bound, the
        choice), 2-3 % of a one-request CPU decode step, and on text that n-grams do not predict
        the answer is the same step after step; that overhead, amplified by queueing, was most
        of what made adaptive slower than speculation off there."""
        held = self._no_batch
        if self._no_left <= 0 or held is None:
            return False
        if (self.controller.verify.coefficients is not self._no_fit or extra < self._no_extra
                or (batch != held and not self._only_left(batch, held))):
            self._no_batch = None
            return False
        self._no_left -= 1
        return True

    @staticmethod
    def _only_left(batch: list[SpecSequence], held: list[SpecSequence]) -> bool:
        """Whether `batch` is `held` less the requests that finished since (the engine keeps its
        running order). Why the answer may stand then: a request that leaves takes its proposals
        with it and moves a step's cost by about 1/batch, within the controller's margin for the
        few steps an answer is reused; a request that joins brings proposals nobody asked about.
        At overload the batch changed every 2-3 steps, by a departure about half the time, and
        each change re-ran the look-ups and the controller (~120-150 us a step at batches of 10-15
        on non-repetitive text): two in three steps asked again where an answer was to reuse."""
        if len(batch) >= len(held):
            return False
        rows = iter(held)
        return all(any(seq is row for row in rows) for seq in batch)

    # ---- the step -----------------------------------------------------------------------------
    def step(self, batch: list[SpecSequence], split: bool = False) -> list[list[int]] | None:
        """Each sequence's emitted tokens (accepted proposal + the target's token), or None when no
        sequence gets a proposal this step: nothing ran, the engine decodes the batch in its plain
        fused step (the step is still reported and counted, with k = 0 everywhere).
        `split`: prompt chunks wait, which a speculative step leaves to a second forward of their
        own (a plain step fuses them), so speculating costs that forward's fixed part too."""
        assert self.kv_pool is not None, "attach() the engine's KV pool first"
        if self._pending is not None:  # the caller never said it emitted: bill the forward alone
            *_, verify_seconds_only = self._pending
            self._bill(verify_seconds_only)
        if self._shadows:
            self._judge_shadows()
        extra = self.controller.verify.coefficients.a if split else 0.0
        ks, lookups = self._plan(batch, None, extra)
        if not any(ks):
            zeros = [0] * len(batch)
            self.last = StepReport(ks=zeros, proposed=zeros, accepted=zeros, seconds=0.0)
            if self.metrics is not None:
                self.metrics.observe_step(zeros, 0, 0, len(batch), len(batch), 0.0, self.controller.alpha())
            return None
        self._no_batch = None  # this step's observations change the acceptance the answer rested on
        start = time.perf_counter()
        proposals: list[list[int]]
        draft_probs: list[torch.Tensor | None]
        histories = [s.prompt_ids + s.tokens for s in batch] if self.draft is not None else []
        if self.ngram:
            proposals = ([found[:k] for found, k in zip(lookups, ks, strict=True)] if lookups
                         else [[] for _ in batch])
            draft_probs = [None] * len(batch)
        else:
            assert self.draft is not None and self.controller.draft is not None
            draft_model = self.controller.draft
            made = self.draft.propose(
                [DraftRequest(id(s), h, k, len(s.prompt_ids) + s.params.max_tokens, s.params, s.generator)
                 for s, h, k in zip(batch, histories, ks, strict=True)],
                observe=lambda sec, _ctx, n: draft_model.observe(sec, 0, n))
            proposals = [p.tokens for p in made]
            draft_probs = [p.probs for p in made]
        propose_seconds = time.perf_counter() - start
        verify_start = time.perf_counter()
        emitted, verify_seconds = self._verify(batch, proposals, draft_probs)
        accepted = [len(e) - 1 for e in emitted]
        for i, (seq, proposal, n_ok) in enumerate(zip(batch, proposals, accepted, strict=True)):
            if proposal:
                self._observe(self._state(seq), self._matched[i] if self.ngram else 0, len(proposal), n_ok)
            if self.draft is not None:
                self.draft.rollback(id(seq), len(histories[i]) + n_ok)
        tokens = sum(len(p) + 1 for p in proposals)
        # Billed when the engine has emitted the tokens (`finish_step`), as it times a plain step.
        self._pending = (verify_start if self.draft is not None else self._bill_from,
                         self._unbilled if self.draft is None else 0.0,
                         float(sum(s.num_cached for s in batch) + tokens), tokens, len(batch),
                         time.perf_counter() - verify_start)
        proposed = [len(p) for p in proposals]
        self.last = StepReport(ks=[len(p) for p in proposals], proposed=proposed, accepted=accepted,
                               seconds=propose_seconds + verify_seconds)
        if self.metrics is not None:
            self.metrics.observe_step(self.last.ks, sum(proposed), sum(accepted), sum(map(len, emitted)),
                                      len(batch), self.last.seconds, self.controller.alpha())
        return emitted

    def finish_step(self) -> None:
        """The engine has emitted the last speculative step's tokens: bill the step to the step-time
        model, from the n-gram lookups (a draft model's steps are modelled apart, `controller.draft`)
        to the tokens emitted, as the engine times a plain step from its layout to its emitted
        tokens (`observe_plain`). Less the n-gram indexes built for requests that speculate for the
        first time (once a request: ~0.4 ms for a 400-token prompt when the index was a dict of
        n-grams, a few us packed), which billed to a probe of a
        large batch made it look far dearer than it is.
        Why the lookups and the emitting: both are paid for speculating (a verification step emits
        1 + accepted tokens a request, each detokenised); billed from the forward alone, the steps
        were modelled 7-13 % cheaper than measured (non-repetitive prompts at batches of 1-4), and
        the controller kept taking steps that lost to the plain one."""
        if self._pending is None:
            return
        self._bill(time.perf_counter() - self._pending[0] - self._pending[1])

    def _bill(self, seconds: float) -> None:
        assert self._pending is not None
        _, _, context, tokens, verified, _ = self._pending
        self._pending = None
        self.controller.verify.observe(seconds, int(context), tokens, verified=verified)

    def _verify(self, batch: list[SpecSequence], proposals: list[list[int]],
                draft_probs: list[torch.Tensor | None]) -> tuple[list[list[int]], float]:
        """One target forward over every sequence's last token + proposal; accept per sequence.
        The sequences without a proposal go first: the layout then attends them apart, as the rows
        of a decode step (`BatchLayout.parts`: one query each, the batched decode kernel), and only
        the proposing ones take the many-query path. Why: in engine order a verification step of
        20 sequences, 3 of them proposing, ran every row through the many-query path and cost
        2-3x a plain step, so a probe or a sparse speculation at a large batch (n-gram matches on
        non-repetitive text) cost more than it could win."""
        device = self.model.device
        order = sorted(range(len(batch)), key=lambda i: bool(proposals[i]))  # stable: no proposal first
        new = [[batch[i].tokens[-1], *proposals[i]] for i in order]
        ids = torch.tensor([t for row in new for t in row], dtype=torch.long, device=device)
        layout = BatchLayout.build([len(r) for r in new], [batch[i].num_cached for i in order],
                                   [batch[i].slot_table for i in order],  # type: ignore[misc]
                                   device, self.model.sliding_window)
        start = time.perf_counter()
        logits = self.model.forward_step(ids, layout, self.kv_pool, all_logits=True)  # type: ignore[arg-type]
        self.sync()
        seconds = time.perf_counter() - start
        argmax: list[int] = logits.argmax(dim=-1).tolist()  # one device sync for every greedy row
        emitted: list[list[int]] = [[] for _ in batch]
        lo = 0
        for i, row in zip(order, new, strict=True):
            seq, proposal, hi = batch[i], proposals[i], lo + len(row)
            if seq.params.temperature == 0.0:
                emitted[i] = verify_greedy(argmax[lo:hi], proposal)
            else:
                rows = logits[lo:hi].float().cpu()
                probs = torch.stack([torch.softmax(filter_logits(r, seq.params), dim=-1) for r in rows])
                emitted[i] = verify_sampled(probs, proposal, draft_probs[i], seq.generator)
            lo = hi
        return emitted, seconds
