"""Draft-model proposals: a smaller model of the same tokenizer runs k autoregressive steps.

The draft keeps its own paged KV cache (its own pool and allocator, sized like the
target's) so it never competes with the target for slots. Its cache follows the accepted
history lazily: each proposal starts with one ragged catch-up step over whatever the draft
has not seen (the whole prompt on a decode worker, whose prompt KV came from prefill; the
accepted tokens plus the target's own token afterwards). Rolling back rejected positions
is only lowering `cached`: their slots are overwritten by the next catch-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from disaggserve_worker.engine.kv_cache import BlockAllocator
from disaggserve_worker.engine.sampling import SamplingParams, filter_logits
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.llama import LlamaForCausalLM


@dataclass
class DraftState:
    blocks: list[int]
    slot_table: torch.Tensor
    cached: int = 0  # history positions whose draft KV is valid


@dataclass
class DraftRequest:
    key: int  # stable identity of the sequence (engine side)
    history: list[int]  # prompt + generated tokens so far
    k: int
    reserve_tokens: int  # prompt + max_tokens: the most positions this sequence ever needs
    params: SamplingParams
    generator: torch.Generator


@dataclass
class DraftProposal:
    tokens: list[int]
    probs: torch.Tensor | None  # (len(tokens), V) CPU fp32 draft distributions; None when greedy


StepObserver = Callable[[float, int, int], None]  # seconds, context tokens, batched tokens


def check_compatible(target_vocab: int, draft: LlamaForCausalLM, same_tokenizer: bool) -> None:
    """A draft must speak the target's token ids, or every proposal is noise (or out of range)."""
    if draft.config.vocab_size != target_vocab:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size} ids) differs from the "
                         f"target's ({target_vocab}); use a draft trained with the target's tokenizer")
    if not same_tokenizer:
        raise ValueError("the draft model's tokenizer differs from the target's; use a draft trained with "
                         "the target's tokenizer")


class DraftProposer:
    def __init__(self, model: LlamaForCausalLM, kv_cache_tokens: int, block_size: int,
                 sync: Callable[[], None] = lambda: None):
        self.model = model
        self.device = model.device
        self.allocator = BlockAllocator(-(-kv_cache_tokens // block_size), block_size)
        self.pool = model.new_kv_pool(self.allocator.capacity_tokens)
        self.sync = sync
        self._states: dict[int, DraftState] = {}

    def release(self, key: int) -> None:
        state = self._states.pop(key, None)
        if state is not None:
            self.allocator.free(state.blocks)

    @property
    def tracked(self) -> int:
        return len(self._states)

    def _state(self, request: DraftRequest) -> DraftState | None:
        state = self._states.get(request.key)
        if state is None:
            blocks = self.allocator.try_allocate(request.reserve_tokens)
            if blocks is None:
                return None  # no draft room now: this request does not speculate this step
            state = DraftState(blocks, self.allocator.slot_table(blocks, self.device))
            self._states[request.key] = state
        return state

    def _pick(self, logits: torch.Tensor, requests: list[DraftRequest]
              ) -> tuple[list[int], list[torch.Tensor | None]]:
        tokens: list[int] = logits.argmax(dim=-1).tolist()
        probs: list[torch.Tensor | None] = [None] * len(requests)
        sampled = [i for i, r in enumerate(requests) if r.params.temperature > 0.0]
        if sampled:
            rows = logits[sampled].float().cpu()
            for j, i in enumerate(sampled):
                p = torch.softmax(filter_logits(rows[j], requests[i].params), dim=-1)
                probs[i] = p
                tokens[i] = int(torch.multinomial(p, 1, generator=requests[i].generator))
        return tokens, probs

    def _forward(self, new: list[list[int]], states: list[DraftState],
                 observe: StepObserver | None) -> torch.Tensor:
        ids = torch.tensor([t for seq in new for t in seq], dtype=torch.long, device=self.device)
        past = [s.cached for s in states]
        layout = BatchLayout.build([len(n) for n in new], past, [s.slot_table for s in states], self.device,
                                   self.model.sliding_window)
        start = time.perf_counter()
        logits = self.model.forward_step(ids, layout, self.pool)
        self.sync()
        if observe is not None:
            observe(time.perf_counter() - start, sum(past) + int(ids.numel()), int(ids.numel()))
        for state, n in zip(states, new, strict=True):
            state.cached += len(n)
        return logits

    def propose(self, requests: list[DraftRequest], observe: StepObserver | None = None
                ) -> list[DraftProposal]:
        """Proposals for every request (empty where k is 0 or the draft has no room)."""
        out = [DraftProposal([], None) for _ in requests]
        live = [(i, r, s) for i, r in enumerate(requests) if r.k > 0 and (s := self._state(r)) is not None]
        if not live:
            return out
        drafted: dict[int, list[int]] = {i: [] for i, _, _ in live}
        dists: dict[int, list[torch.Tensor | None]] = {i: [] for i, _, _ in live}
        # Catch-up: every history token the draft has not cached; the last one yields proposal 1.
        for _, r, s in live:
            s.cached = min(s.cached, len(r.history) - 1)
        new = [r.history[s.cached:] for _, r, s in live]
        step = 1
        while live:
            logits = self._forward(new, [s for _, _, s in live], observe)
            tokens, probs = self._pick(logits, [r for _, r, _ in live])
            for (i, _, _), token, prob in zip(live, tokens, probs, strict=True):
                drafted[i].append(token)
                dists[i].append(prob)
            step += 1
            keep = [(n, item) for n, item in enumerate(live) if item[1].k >= step]
            new = [[tokens[n]] for n, _ in keep]
            live = [item for _, item in keep]
        for i, tokens_i in drafted.items():
            rows = dists[i]
            probs_i = torch.stack(rows) if rows and rows[0] is not None else None  # type: ignore[arg-type]
            out[i] = DraftProposal(tokens_i, probs_i)
        return out

    def rollback(self, key: int, valid_positions: int) -> None:
        """After verification: positions ≥ valid_positions hold rejected drafts."""
        state = self._states.get(key)
        if state is not None:
            state.cached = min(state.cached, valid_positions)
