"""Sampling parameters (the `sampling` object of the internal protocol) and the sampler.

Each request samples with its own `torch.Generator` on the CPU, so a seeded request gives
the same tokens whatever else is in its batch and whichever device ran the model.
"""

from __future__ import annotations

import random

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    """OpenAI-style knobs; temperature 0 means greedy."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(16, ge=1, le=1_048_576)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: no top-k cut.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: object) -> object:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    def generator(self) -> torch.Generator:
        # Unseeded requests draw from `random`, which `--seed` seeds for reproducible runs.
        seed = self.seed if self.seed is not None else random.randrange(2**63)
        return torch.Generator().manual_seed(seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of fp32 logits; removed entries are -inf."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens strictly more likely already cover top_p (keeps >= 1).
        remove_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row of logits (any device)."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(filter_logits(logits.float().cpu(), params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> list[int]:
    """One token per row with one device sync: argmax for all rows on the device, then only
    the rows that really sample move to the CPU (a full-vocabulary copy per row is costly)."""
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0.0]
    if sampled:
        rows = logits[sampled].float().cpu()
        for j, i in enumerate(sampled):
            tokens[i] = sample(rows[j], params[i], generators[i])
    return tokens
