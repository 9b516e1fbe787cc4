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
"""

from __future__ import annotations

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


class StepTimeModel:
    def __init__(self, seed: StepCoefficients, window: int = 256, prior_weight: float = 4.0,
                 refit_every: int = 64):
        self.seed = seed
        self.coefficients = seed
        self.prior_weight = prior_weight
        self.refit_every = refit_every
        self._rows: deque[tuple[float, float, float, float]] = deque(maxlen=window)
        self._since_fit = 0

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
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.refit()

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
        self.coefficients = StepCoefficients(a=max(a, 1e-6), b=b, c=c, o=o, p=p)

    def time(self, context_tokens: float, batched_tokens: float, verified: float = 0) -> float:
        return self.coefficients.time(context_tokens, batched_tokens, verified)
