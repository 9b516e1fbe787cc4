"""Sampling parameters (the `sampling` object of the internal protocol) and the sampler.

Each request samples with its own `torch.Generator` on the CPU, so a seeded request gives
the same tokens whatever else is in its batch and whichever device ran the model.

vLLM's sampling extensions are pure functions over one row of logits and the request's own
history (`SampleContext`), applied in vLLM's order: logit bias and allowed tokens, `min_tokens`
(end-of-sequence and stop tokens masked until enough tokens exist), repetition / frequency /
presence penalties, then temperature, top-k, top-p and min-p. Logprobs are those of the raw model
output (vLLM's default `raw_logprobs`), so they do not change with the sampling knobs.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LOGPROBS = 20


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
    # vLLM's extensions and OpenAI's penalties (all neutral by default).
    min_tokens: int = Field(0, ge=0, le=1_048_576, description="EOS and stop tokens are masked until then.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] = Field(default_factory=dict, max_length=1024)
    allowed_token_ids: list[int] | None = Field(None, max_length=1_048_576)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Return the sampled token's logprob and this many top ones.")

    @property
    def shapes_logits(self) -> bool:
        """Whether anything beyond temperature/top-k/top-p touches the logits (needs the history)."""
        return bool(self.min_tokens or self.repetition_penalty != 1.0 or self.presence_penalty
                    or self.frequency_penalty or self.logit_bias or self.allowed_token_ids is not None)

    @property
    def needs_cpu_row(self) -> bool:
        return self.temperature > 0.0 or self.shapes_logits or self.logprobs is not None

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


@dataclass
class SampleContext:
    """What a request has seen: its prompt, what it generated so far, its end-of-sequence ids."""

    prompt_ids: list[int]
    output_ids: list[int]
    eos_ids: frozenset[int] = field(default_factory=frozenset)


def shape_logits(logits: torch.Tensor, params: SamplingParams, ctx: SampleContext) -> torch.Tensor:
    """vLLM's logits processors on one fp32 row (CPU): bias, allowed ids, min_tokens, penalties."""
    if not params.shapes_logits:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.logit_bias:
        ids = [i for i in params.logit_bias if 0 <= i < vocab]
        logits[ids] += torch.tensor([params.logit_bias[i] for i in ids], dtype=logits.dtype)
    if params.allowed_token_ids is not None:
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[[i for i in params.allowed_token_ids if 0 <= i < vocab]] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if len(ctx.output_ids) < params.min_tokens:
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(ctx.eos_ids))
        ids = [i for i in ends if 0 <= i < vocab]
        if ids:
            logits[ids] = float("-inf")
    if params.repetition_penalty != 1.0:
        # CTRL-style, over prompt and output (as vLLM): shrink positive logits, push negative ones down.
        seen = torch.tensor(sorted({i for i in ctx.prompt_ids + ctx.output_ids if 0 <= i < vocab}), dtype=torch.long)
        if seen.numel():
            row = logits[seen]
            logits[seen] = torch.where(row > 0, row / params.repetition_penalty, row * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and ctx.output_ids:
        counts = Counter(i for i in ctx.output_ids if 0 <= i < vocab)
        ids = torch.tensor(list(counts), dtype=torch.long)
        n = torch.tensor([counts[i] for i in counts], dtype=logits.dtype)
        logits[ids] -= params.frequency_penalty * n + params.presence_penalty
    return logits


def token_logprobs(raw: torch.Tensor, token: int, top: int) -> dict[str, object]:
    """{"logprob": of `token`, "top": [[id, logprob], ...] (`top` most likely)} of one raw row."""
    logp = torch.log_softmax(raw.float(), dim=-1)
    out: dict[str, object] = {"logprob": float(logp[token])}
    if top:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]))
        out["top"] = [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        out["top"] = []
    return out


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p applied to one row of fp32 logits; removed entries are -inf."""
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
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row of logits (any device)."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(filter_logits(logits.float().cpu(), params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator], contexts: list[SampleContext] | None = None,
                logprobs_out: list[dict[str, object] | None] | None = None) -> list[int]:
    """One token per row with one device sync: argmax for all rows on the device, then only
    the rows that really sample (or need processors or logprobs) move to the CPU (a
    full-vocabulary copy per row is costly). `logprobs_out`, when given, receives one entry per
    row (None where the request asked for none)."""
    tokens: list[int] = logits.argmax(dim=-1).tolist()
    if logprobs_out is not None:
        logprobs_out[:] = [None] * len(params)
    picked = [i for i, p in enumerate(params) if p.needs_cpu_row and (contexts is not None or p.temperature > 0.0)]
    if picked:
        rows = logits[picked].float().cpu()
        for j, i in enumerate(picked):
            p = params[i]
            row = shape_logits(rows[j], p, contexts[i]) if contexts is not None else rows[j]
            tokens[i] = int(torch.argmax(row).item()) if p.temperature == 0.0 else sample(row, p, generators[i])
            if logprobs_out is not None and p.logprobs is not None:
                logprobs_out[i] = token_logprobs(rows[j], tokens[i], p.logprobs)
    return tokens
