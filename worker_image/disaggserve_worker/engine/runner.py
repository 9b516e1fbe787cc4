"""Tensors and the forward pass of one planned iteration (the engine loop never touches them).

The runner turns a `StepPlan` into one packed, ragged batch — decode sequences first (one
token each), then prompt chunks — runs a single forward over the paged KV pool, and returns
the logits of each sequence's last new token in plan order. A multi-process GPU runner
implements the same `execute`.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from disaggserve_worker.engine.scheduler import StepPlan
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.kv_pool import KVPool
from disaggserve_worker.model.llama import LlamaForCausalLM


class RunnableSequence(Protocol):
    prompt_ids: list[int]
    tokens: list[int]
    num_cached: int
    slot_table: torch.Tensor | None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_pool: KVPool):
        self.model = model
        self.kv_pool = kv_pool
        self.device = model.device

    def execute(self, plan: StepPlan[RunnableSequence]) -> tuple[torch.Tensor, float]:
        """(logits of each planned sequence's last new token, in plan order; forward seconds)."""
        ids: list[int] = [s.tokens[-1] for s in plan.decode]
        new = [1] * len(plan.decode)
        for seq, n in plan.prefill:
            ids.extend(seq.prompt_ids[seq.num_cached:seq.num_cached + n])
            new.append(n)
        seqs = [*plan.decode, *(s for s, _ in plan.prefill)]
        layout = BatchLayout.build(new, [s.num_cached for s in seqs], [s.slot_table for s in seqs],  # type: ignore[misc]
                                   self.device, self.model.sliding_window)
        start = time.perf_counter()
        logits = self.model.forward_step(torch.tensor(ids, dtype=torch.long, device=self.device), layout,
                                         self.kv_pool)
        self.model.synchronize()
        return logits, time.perf_counter() - start
