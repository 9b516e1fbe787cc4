"""Online model of a forward step's time: T = a + b·Σctx + c·(batched tokens).

The same form as the planner's decode profile (DistServe), so a measured profile can seed
it; measured steps then refit it (ridge regression pulled towards the seed). The pull
matters: the adaptive controller mostly runs few k values, so the data alone rarely
separates the per-token cost from the fixed cost; the prior keeps the fit sane until
they vary enough.

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

    def time(self, context_tokens: float, batched_tokens: float) -> float:
        return self.a + self.b * context_tokens + self.c * batched_tokens


class StepTimeModel:
    def __init__(self, seed: StepCoefficients, window: int = 256, prior_weight: float = 4.0,
                 refit_every: int = 64):
        self.seed = seed
        self.coefficients = seed
        self.prior_weight = prior_weight
        self.refit_every = refit_every
        self._rows: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._since_fit = 0

    @property
    def samples(self) -> int:
        return len(self._rows)

    def observe(self, seconds: float, context_tokens: int, batched_tokens: int) -> None:
        if not seconds > 0:
            return  # a clock glitch must not drag the fit
        self._rows.append((float(context_tokens), float(batched_tokens), seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.refit()

    def refit(self) -> None:
        """Relative-error ridge fit: each step weighs by 1/T so short steps count as much as long ones."""
        self._since_fit = 0
        if not self._rows:
            return
        data = np.asarray(self._rows)
        x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
        y = data[:, 2]
        w = 1.0 / y
        xw, yw = x * w[:, None], y * w
        s = np.array([self.seed.a, self.seed.b, self.seed.c])
        # Scale the prior per coefficient so the pull is "prior_weight steps' worth" in every unit.
        scale = np.maximum(np.abs(xw).mean(axis=0), 1e-12) * np.sqrt(self.prior_weight)
        design = np.vstack([xw, np.diag(scale)])
        target = np.concatenate([yw, scale * s])
        # Non-negative least squares by elimination: a negative coefficient is fixed at 0 and the
        # rest refitted (clipping alone would leave the others fitted to a wrong model).
        free = [0, 1, 2]
        coef = np.zeros(3)
        while free:
            sol, *_ = np.linalg.lstsq(design[:, free], target, rcond=None)
            if (sol >= 0).all():
                coef[free] = sol
                break
            free.pop(int(np.argmin(sol)))
        a, b, c = (float(v) for v in coef)
        self.coefficients = StepCoefficients(a=max(a, 1e-6), b=b, c=c)

    def time(self, context_tokens: float, batched_tokens: float) -> float:
        return self.coefficients.time(context_tokens, batched_tokens)
