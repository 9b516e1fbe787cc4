"""Goodput controller (SmartSpec): pick how many tokens each request proposes this step.

Goodput of a step = expected tokens the batch generates / predicted time of the step. A
request with acceptance α that proposes k tokens yields E(k) = (1 − α^(k+1)) / (1 − α); the
step costs the target's verification (StepTimeModel over Σctx and batched tokens) plus the
proposer's own steps, against the engine's plain decode step (the model's premium of a
verification step, `StepCoefficients.o/p`, is what proposals have to earn first). Why per
request: E's marginal gain of the j-th proposed token is α^j, so with a cost linear in
batched tokens the best allocation takes proposed tokens in order of α_i^j while each still
raises tokens/second — requests with high acceptance get a long k, poor ones none. The outer
loop over the longest k (K) accounts for a draft model's cost, which grows with K, not with
the sum. At large batches the fixed step cost is shared by many requests, so extra verified
tokens are relatively dearer and k shrinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from disaggserve_worker.speculation.step_time import StepCoefficients, StepTimeModel

ALPHA_CAP = 0.99  # E(k) is finite and marginal gains strictly decrease


@dataclass
class Acceptance:
    """Moving average of per-token acceptance from truncated observations.

    A step that proposed k and accepted a < k saw a successes and 1 failure (later tokens
    were never judged); a = k is k successes. Counting it that way makes accepted/judged an
    unbiased estimate of α, unlike accepted/proposed which undercounts long proposals.
    """

    decay: float = 0.9
    accepted: float = 0.0
    judged: float = 0.0

    def update(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.judged = self.decay * self.judged + accepted + (1 if accepted < proposed else 0)

    def rate(self, prior: float, prior_weight: float = 2.0) -> float:
        return (self.accepted + prior * prior_weight) / (self.judged + prior_weight)


def expected_tokens(alpha: float, k: int) -> float:
    alpha = min(max(alpha, 0.0), ALPHA_CAP)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class Choice:
    ks: list[int]
    goodput: float  # predicted tokens/second of the chosen allocation
    baseline: float  # predicted tokens/second with no speculation


@dataclass
class GoodputController:
    num_speculative_tokens: int
    verify: StepTimeModel
    draft: StepTimeModel | None = None  # None: proposals cost nothing (n-gram)
    bias: float = 0.05
    global_acceptance: Acceptance = field(default_factory=lambda: Acceptance(decay=0.98))
    initial_alpha: float = 0.5

    def alpha(self, own: Acceptance | None = None) -> float:
        g = self.global_acceptance.rate(self.initial_alpha)
        return g if own is None else own.rate(g)

    def observe(self, own: Acceptance | None, proposed: int, accepted: int) -> None:
        self.global_acceptance.update(proposed, accepted)
        if own is not None:
            own.update(proposed, accepted)

    def _draft_time(self, longest: int, proposing: int, catch_up: int) -> float:
        if self.draft is None or longest == 0:
            return 0.0
        # One catch-up step over the tokens the draft has not seen, then longest−1 single-token steps.
        return (self.draft.time(0, catch_up) + (longest - 1) * self.draft.time(0, proposing))

    def choose(self, contexts: list[int], alphas: list[float], caps: list[int], extra: float = 0.0) -> Choice:
        """k per request (≤ caps[i]: what the request can still use, or what the proposer has).
        `extra`: seconds a speculative step costs beyond its own forward (the engine's second
        forward for prompt chunks, which a plain step fuses)."""
        baseline, verify_time, c, longest_cap, may = self._bounded(contexts, alphas, caps, extra)
        best = Choice([0] * len(contexts), baseline, baseline)
        if not may:
            return best
        return self._search(best, alphas, caps, longest_cap, verify_time, c)

    def may_speculate(self, contexts: list[int], alphas: list[float], caps: list[int], extra: float = 0.0) -> bool:
        """Whether `choose` could pick any k > 0, from its bound alone (`_may_beat`), without the
        exact search. Why: the n-gram speculator asks first with every request's best case, only
        to skip the look-ups when even that says no; when it says maybe, the look-ups and a second
        ask decide, so the first ask's exact search (a sort of batch x K gains) was wasted: ~30 %
        of the speculator's work per step at a batch of 30 on non-repetitive text."""
        return self._bounded(contexts, alphas, caps, extra)[4]

    def _bounded(self, contexts: list[int], alphas: list[float], caps: list[int], extra: float
                 ) -> tuple[float, float, float, int, bool]:
        """The plain step's goodput, the verification step's time, the price of a proposed token,
        the longest usable k, and whether any allocation may beat the plain step."""
        batch = len(contexts)
        ctx = float(sum(contexts))
        # Both steps as measured at this batch size lately (`StepTimeModel.correction`), each proposed
        # token priced like the rest of the verification step it joins.
        c = self.verify.coefficients.c * self.verify.correction(batch, verified=batch)
        base_time = self.verify.time(ctx, batch)  # the plain step
        baseline = batch / base_time
        verify_time = self.verify.time(ctx, batch, verified=batch) + extra
        longest_cap = min(max(caps, default=0), self.num_speculative_tokens)
        may = self._may_beat(baseline, verify_time, batch, alphas, caps, longest_cap, c)
        return baseline, verify_time, c, longest_cap, may

    def _may_beat(self, baseline: float, verify_time: float, batch: int, alphas: list[float], caps: list[int],
                  longest_cap: int, c: float) -> bool:
        """Whether any allocation could beat the plain step, from an upper bound on its goodput.
        n proposed tokens cost at least n·c more than the verification step and yield at most
        S(n) = min(n·max α, G), G = Σᵢ Σⱼ αᵢʲ (every gain there is): goodput ≤ (batch + S(n)) /
        (verify time + n·c). Up to n* = G / max α that is a ratio of two linear functions of n
        (monotone), beyond it it falls: the bound is its value at 0 or at n*.
        Why: the exact search sorts batch × K gains every step (0.22 ms at a batch of 100, ~2 % of
        a CPU step); on text that n-grams do not predict the bound already says no."""
        if not batch or longest_cap <= 0:
            return False
        if c <= 0 or verify_time <= 0:
            return True  # a fit this odd bounds nothing: search
        top, every = 0.0, 0.0
        for alpha, cap in zip(alphas, caps, strict=True):
            a, m = min(max(alpha, 0.0), ALPHA_CAP), min(cap, longest_cap)
            if a > 0 and m > 0:
                every += a * (1 - a ** m) / (1 - a)  # α + α² + … + αᵐ
                top = max(top, a)
        if top <= 0:
            return batch / verify_time > baseline * (1 + self.bias)
        bound = max(batch / verify_time, (batch + every) / (verify_time + every / top * c))
        return bound > baseline * (1 + self.bias)

    def _search(self, best: Choice, alphas: list[float], caps: list[int], longest_cap: int, verify_time: float,
                c: float) -> Choice:
        """The exact allocation (see the module's doc); `best` is the plain step's choice."""
        batch, baseline = len(alphas), best.baseline
        # Without a draft model proposals cost nothing per `longest`, so the allocation allowed the
        # longest k is the best of them all: one pass instead of K (at a batch of 100 and K = 4 the
        # passes were ~1 ms of a ~40 ms CPU step, twice a step).
        for longest in range(1 if self.draft is not None else longest_cap, longest_cap + 1):
            gains = sorted(((min(max(alphas[i], 0.0), ALPHA_CAP) ** j, i, j) for i in range(batch)
                            for j in range(1, min(longest, caps[i]) + 1)), key=lambda g: (-g[0], g[2], g[1]))
            ks = [0] * batch
            tokens, time = float(batch), verify_time
            for gain, i, j in gains:
                if j != ks[i] + 1:
                    continue  # equal gains may arrive out of order; take prefixes only
                if gain * time <= c * tokens:  # adding it would not raise tokens/time
                    break
                tokens += gain
                time += c
                ks[i] = j
            if self.draft is not None and max(ks) < longest:
                continue  # a shorter `longest` already covers this allocation without its draft cost
            proposing = sum(1 for k in ks if k > 0)
            total = time + self._draft_time(longest, proposing, proposing)
            goodput = tokens / total
            if goodput > best.goodput and goodput > baseline * (1 + self.bias):
                best = Choice(ks, goodput, baseline)
        return best

    @staticmethod
    def default_seed() -> StepCoefficients:
        """Seed for an unprofiled worker: a fixed cost that dominates a small batch (true of
        memory-bound decode on GPUs and of Python overhead on CPUs); the fit takes over fast."""
        return StepCoefficients(a=0.01, b=1e-8, c=2e-4)
