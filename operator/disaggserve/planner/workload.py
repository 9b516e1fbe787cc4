"""The traffic a plan must carry: Poisson arrivals and prompt/completion length distributions.

Sampling is seeded and done once per planning run: every configuration and every rate of the
goodput bisection sees the same requests (arrival gaps are drawn at rate 1 and scaled), so
differences between configurations are the configurations', not the dice's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Shortest run per simulation, and the most requests ever drawn: high rates need longer runs
# (in requests) for queues to reach steady state, see Searcher.requests_for.
DEFAULT_REQUESTS = 600
MAX_REQUESTS = 6000
DEFAULT_SEED = 20240116  # DistServe's arXiv date; any fixed number keeps plans reproducible


class WorkloadError(ValueError):
    """A workload description or trace that cannot be used."""


class LengthDistribution(BaseModel):
    """Token lengths: `fixed` (always `mean`), `lognormal` (mean `mean`, log-space spread `sigma`),
    or `empirical` (resampled from `values`, e.g. a trace's lengths)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["fixed", "lognormal", "empirical"] = "fixed"
    mean: float = Field(gt=0)
    sigma: float = Field(0.5, gt=0, le=4)
    values: tuple[int, ...] = ()
    minimum: int = Field(1, ge=1)
    maximum: int | None = Field(None, ge=1)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            out = np.full(n, round(self.mean), dtype=np.int64)
        elif self.kind == "lognormal":
            # Choose mu so that E[X] = mean: E = exp(mu + sigma²/2).
            mu = np.log(self.mean) - self.sigma**2 / 2
            out = np.rint(rng.lognormal(mu, self.sigma, n)).astype(np.int64)
        else:
            if not self.values:
                raise WorkloadError("an empirical length distribution needs values (a trace)")
            out = rng.choice(np.asarray(self.values, dtype=np.int64), size=n, replace=True)
        hi = self.maximum if self.maximum is not None else np.iinfo(np.int64).max
        return np.clip(out, self.minimum, hi)


class WorkloadModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(gt=0, description="Requests per second.")
    input: LengthDistribution
    output: LengthDistribution


@dataclass(frozen=True)
class RequestSample:
    """Requests at rate 1 (arrival times in seconds); `at_rate` rescales the clock."""

    unit_arrivals_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.input_tokens)

    def head(self, n: int) -> RequestSample:
        """The first `n` requests (a shorter run of the same traffic)."""
        if n >= len(self):
            return self
        return RequestSample(self.unit_arrivals_s[:n], self.input_tokens[:n], self.output_tokens[:n])

    def arrivals_ms(self, rate: float) -> np.ndarray:
        return self.unit_arrivals_s * (1000.0 / rate)

    @property
    def mean_output_tokens(self) -> float:
        return float(np.mean(self.output_tokens)) if len(self) else 0.0


def sample_requests(workload: WorkloadModel, n: int = DEFAULT_REQUESTS, seed: int = DEFAULT_SEED) -> RequestSample:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, n)
    return RequestSample(
        unit_arrivals_s=np.cumsum(gaps),
        input_tokens=workload.input.sample(rng, n),
        output_tokens=workload.output.sample(rng, n),
    )


class TraceRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1)


def load_trace(path: str | Path) -> tuple[LengthDistribution, LengthDistribution]:
    """Empirical input/output distributions from a JSONL trace of {input_tokens, output_tokens}.

    Both lengths are resampled independently: the planner uses marginals, as DistServe does.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise WorkloadError(f"trace {p}: cannot read ({e.strerror})") from None
    inputs: list[int] = []
    outputs: list[int] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = TraceRecord.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValidationError) as e:
            raise WorkloadError(
                f'trace {p} line {number}: expected {{"input_tokens": N, '
                f'"output_tokens": M}} with N, M ≥ 1 ({str(e).splitlines()[0]})'
            ) from None
        inputs.append(rec.input_tokens)
        outputs.append(rec.output_tokens)
    if not inputs:
        raise WorkloadError(f"trace {p}: no records; expected JSON lines of input_tokens/output_tokens")
    return (
        LengthDistribution(kind="empirical", mean=float(np.mean(inputs)), values=tuple(inputs)),
        LengthDistribution(kind="empirical", mean=float(np.mean(outputs)), values=tuple(outputs)),
    )
