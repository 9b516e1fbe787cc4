"""Online model of a forward step's time: T = a + b·Σctx + c·(batched tokens) [+ o + p·sequences].

The same form as the planner's decode profile (DistServe), so a measured profile can seed
it; measured steps then refit it (ridge regression pulled towards the seed). The pull
matters: the adaptive controller mostly runs few k values, so the data alone rarely
separates the per-token cost from the fixed cost; the prior keeps the fit sane until
they vary enough.

The bracket is the premium of a verification step over the engine's plain decode step (o per
step, p per sequence verified), fitted from both kinds of step in one model. Why one model: a
verification step is not a plain step with more tokens (it plans, builds a ragged layout, runs
the many-query attention path, keeps every row's logits and verifies each row in Python: ~20 %
over a one-request plain step on the CPU engine), yet the two share their forward. Fitted to
verification steps alone, the premium was spread over the per-token cost and the controller
kept speculating where it lost (non-repetitive text: 1.2-1.5x slower than off); two separate
models split the forward's cost between context and tokens each their own way and, extrapolated
to batches far beyond their data, disagreed by an order of magnitude (copy-heavy overload: k
fell to 0 and requests got 3x slower).

A refit (a small non-negative least squares in numpy) costs ~0.35 ms; every 8 steps that was 3 %
of the CPU engine's one-request decode loop, so it refits every 64 observed steps.

Residuals by batch size (`correction`): a line through every batch size misses each one its own
way, and the misses do not cancel in the controller's decision, which compares a verification
step with a plain step at the same batch. Measured on the CPU engine (small-llama, plain text,
adaptive): at a batch of 1 plain steps ran 0.885x the fit and verification steps 1.07x it, so the
controller priced a speculative step ~20 % cheaper relative to a plain one than it was and kept
speculating at an acceptance of 0.11-0.3 where it lost (bench/speculation.py, 6 % more engine CPU
than speculation off at low load); at batches of 2-4 verification steps were predicted 8-15 % low.
So every prediction is scaled by the recent ratio of measured to fitted time of steps of its kind
(plain or verification) and batch size, a decaying mean of log ratios pulled towards 1 by one
step's worth, recomputed over the window at each refit (ratios to the previous fit mean nothing to
the new one) and updated step by step between refits.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepCoefficients:
    a: float  # seconds per step
    b: float  # seconds per context token (attention reads)
    c: float  # seconds per batched token (linear layers)
    o: float = 0.0  # seconds more per verification step than per plain step
    p: float = 0.0  # seconds more per sequence in a verification step

    def time(self, context_tokens: float, batched_tokens: float, verified: float = 0) -> float:
        """One step's seconds; `verified`: the sequences of a verification step (0: a plain step)."""
        premium = self.o + self.p * verified if verified else 0.0
        return self.a + self.b * context_tokens + self.c * batched_tokens + premium


RESIDUAL_DECAY = 0.95  # per step of the same kind and batch size: about the last 20 such steps
RESIDUAL_PRIOR = 1.0  # steps' worth of "the fit is right" every correction starts from


def residual_key(batched_tokens: float, verified: float) -> tuple[bool, int]:
    """Steps share a correction when they are of one kind and of one batch size (exact up to 8
    sequences, then by power of two: large batches are rarer and the fit's miss varies slowly)."""
    batch = int(verified) if verified else int(batched_tokens)
    return bool(verified), batch if batch <= 8 else 1 << (batch - 1).bit_length()


class StepTimeModel:
    def __init__(self, seed: StepCoefficients, window: int = 256, prior_weight: float = 4.0,
                 refit_every: int = 64):
        self.seed = seed
        self.coefficients = seed
        self.prior_weight = prior_weight
        self.refit_every = refit_every
        self._rows: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._since_fit = 0
        # (decayed sum of log(measured / fitted), decayed count) by `residual_key`.
        self.residuals: dict[tuple[bool, int], tuple[float, float]] = {}
        self._shapes: dict[tuple[bool, int], tuple[float, float, float]] = {}  # each key's last step

    def adopt_residuals(self, other: StepTimeModel) -> None:
        """Start from `other`'s corrections (a calibration fit with the same coefficients)."""
        self.residuals, self._shapes = dict(other.residuals), dict(other._shapes)

    @property
    def samples(self) -> int:
        return len(self._rows)

    @property
    def plain_samples(self) -> int:
        """Observed steps that were plain (not verification) steps."""
        return sum(1 for row in self._rows if not row[2])

    def observe(self, seconds: float, context_tokens: int, batched_tokens: int, verified: int = 0) -> None:
        if not seconds > 0:
            return  # a clock glitch must not drag the fit
        self._rows.append((float(context_tokens), float(batched_tokens), float(verified), seconds))
        self._residual(seconds, context_tokens, batched_tokens, verified)
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.refit()

    def _residual(self, seconds: float, context_tokens: float, batched_tokens: float, verified: float) -> None:
        fitted = self.coefficients.time(context_tokens, batched_tokens, verified)
        if fitted <= 0:
            return
        key = residual_key(batched_tokens, verified)
        self._shapes[key] = (context_tokens, batched_tokens, verified)
        total, weight = self.residuals.get(key, (0.0, 0.0))
        self.residuals[key] = (RESIDUAL_DECAY * total + math.log(seconds / fitted), RESIDUAL_DECAY * weight + 1.0)

    def correction(self, batched_tokens: float, verified: float = 0) -> float:
        """Measured over fitted time of recent steps of this kind and batch size (1.0 before any)."""
        total, weight = self.residuals.get(residual_key(batched_tokens, verified), (0.0, 0.0))
        return math.exp(total / (weight + RESIDUAL_PRIOR))

    def refit(self) -> None:
        """Relative-error ridge fit: each step weighs by 1/T so short steps count as much as long ones."""
        self._since_fit = 0
        if not self._rows:
            return
        data = np.asarray(self._rows)
        verified = data[:, 2]
        x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1], verified > 0, verified])
        y = data[:, 3]
        w = 1.0 / y
        xw, yw = x * w[:, None], y * w
        seed = self.seed
        s = np.array([seed.a, seed.b, seed.c, seed.o, seed.p])
        # Scale the prior per coefficient so the pull is "prior_weight steps' worth" in every unit
        # (a coefficient no step informs, e.g. the premium before any verification, stays the seed's).
        scale = np.maximum(np.abs(xw).mean(axis=0), 1e-12) * np.sqrt(self.prior_weight)
        design = np.vstack([xw, np.diag(scale)])
        target = np.concatenate([yw, scale * s])
        # Non-negative least squares by elimination: a negative coefficient is fixed at 0 and the
        # rest refitted (clipping alone would leave the others fitted to a wrong model).
        free = list(range(len(s)))
        coef = np.zeros(len(s))
        while free:
            sol, *_ = np.linalg.lstsq(design[:, free], target, rcond=None)
            if (sol >= 0).all():
                coef[free] = sol
                break
            free.pop(int(np.argmin(sol)))
        a, b, c, o, p = (float(v) for v in coef)
        before, old = self.coefficients, self.residuals
        self.coefficients = StepCoefficients(a=max(a, 1e-6), b=b, c=c, o=o, p=p)
        self.residuals = {}
        for ctx, tokens, verified_, seconds in self._rows:
            self._residual(seconds, ctx, tokens, verified_)
        # A kind and size no step in the window had (verification steps at a batch size the controller
        # stopped speculating at) keeps its corrected prediction at the last such step's shape:
        # dropped, it would fall back to the bare fit and the mistake it corrected would return.
        for key, (total, weight) in old.items():
            if key in self.residuals or key not in self._shapes:
                continue
            shape = self._shapes[key]
            now = self.coefficients.time(*shape)
            if now > 0 and (then := before.time(*shape)) > 0:
                shift = math.log(then / now) * (weight + RESIDUAL_PRIOR)
                self.residuals[key] = (total + shift, weight)

    def time(self, context_tokens: float, batched_tokens: float, verified: float = 0) -> float:
        """Predicted seconds of a step: the fit, scaled by its recent miss at this kind and batch size."""
        return (self.coefficients.time(context_tokens, batched_tokens, verified)
                * self.correction(batched_tokens, verified))
