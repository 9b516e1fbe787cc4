"""A pure-decode step builds its layout on a shorter path (`BatchLayout._decode`); every tensor
must equal what the general ragged path builds for the same step, or decode reads and writes the
wrong slots."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from disaggserve_worker.model.batch import BatchLayout

CPU = torch.device("cpu")


@pytest.mark.parametrize("window", [None, 7, 100])
@pytest.mark.parametrize("past", [[0], [12], [3, 40, 0, 17, 17]])
def test_the_decode_layout_equals_the_general_one(past: list[int], window: int | None) -> None:
    gen = torch.Generator().manual_seed(len(past) + (window or 0))
    slots = torch.randperm(512, generator=gen)
    tables = [slots[i * 64:(i + 1) * 64 - 3] for i in range(len(past))]  # scattered, spare room
    fast = BatchLayout.build([1] * len(past), past, tables, CPU, window)
    general = BatchLayout._general([1] * len(past), past, tables, CPU, window)
    for f in dataclasses.fields(BatchLayout):
        if f.name in ("_groups", "span_starts", "span_ends"):  # decode-only: checked against the mask below
            continue
        a, b = getattr(fast, f.name), getattr(general, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
        else:
            assert a == b, f.name
    # The spans the CPU kernel reads are the mask written as ranges.
    assert fast.span_starts is not None and fast.span_ends is not None and general.span_starts is None
    pos = torch.arange(fast.attn_mask.shape[-1])[None]
    spans = (pos >= fast.span_starts[:, None]) & (pos < fast.span_ends[:, None])
    assert torch.equal(spans, fast.attn_mask[:, 0, 0])


def test_a_decode_step_past_its_slot_table_is_refused() -> None:
    with pytest.raises(ValueError, match="sequence 1: slot table holds 4 slots, needs 5"):
        BatchLayout.build([1, 1], [2, 4], [torch.arange(8), torch.arange(8, 12)], CPU)
