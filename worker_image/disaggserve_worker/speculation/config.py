"""The worker's speculation settings, validated once at the edge (the CLI flags the operator renders)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from disaggserve_worker.contract import MAX_SPECULATIVE_TOKENS


class SpeculationConfig(BaseModel):
    """Mirror of `spec.speculation` (operator side) as the worker receives it.

    `mode` fixed proposes `num_speculative_tokens` tokens whenever it can; adaptive lets the
    goodput controller pick 0..num_speculative_tokens per step and request (vLLM's
    `--speculative-config` name for the same bound).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "fixed", "adaptive"] = "off"
    proposer: Literal["ngram", "draft"] = "ngram"
    num_speculative_tokens: int = Field(4, ge=1, le=MAX_SPECULATIVE_TOKENS)
    ngram_min: int = Field(1, ge=1, le=16)
    ngram_max: int = Field(3, ge=1, le=16)
    draft_model: str | None = None
    # Controller knobs (not exposed by the operator; defaults chosen for robustness).
    bias: float = Field(0.05, ge=0.0, le=1.0, description="speculate only if goodput beats k=0 by this share")
    probe_every: int = Field(16, ge=1, description="steps of k=0 between acceptance probes")

    @model_validator(mode="after")
    def _consistent(self) -> SpeculationConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        if self.mode != "off" and self.proposer == "draft" and not self.draft_model:
            raise ValueError("the draft proposer needs a draft model (builtin:tiny-llama-draft or a "
                             "checkpoint folder)")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "off"
