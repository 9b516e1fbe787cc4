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
        if f.name in ("_groups", "span_starts", "span_ends", "spans"):  # one path's only: checked below
            continue
        name = "attn_mask" if f.name == "_mask" else f.name  # the decode layout builds it when asked
        a, b = getattr(fast, name), getattr(general, name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
        else:
            assert a == b, name
    # The spans the CPU kernel reads are the mask written as ranges.
    assert fast.span_starts is not None and fast.span_ends is not None and general.span_starts is None
    pos = torch.arange(fast.attn_mask.shape[-1])[None]
    spans = (pos >= fast.span_starts[:, None]) & (pos < fast.span_ends[:, None])
    assert torch.equal(spans, fast.attn_mask[:, 0, 0])
    # The general path's prompt spans: first row, new tokens, context length of each sequence.
    assert fast.spans is None and general.spans is not None
    assert general.spans.tolist() == [list(range(len(past))), [1] * len(past), [p + 1 for p in past]]


def test_a_decode_step_past_its_slot_table_is_refused() -> None:
    with pytest.raises(ValueError, match="sequence 1: slot table holds 4 slots, needs 5"):
        BatchLayout.build([1, 1], [2, 4], [torch.arange(8), torch.arange(8, 12)], CPU)


@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("kernel", [True, False])
def test_a_mixed_step_attends_its_parts_apart_with_the_logits_of_one_padded_batch(
        monkeypatch: pytest.MonkeyPatch, window: int | None, kernel: bool) -> None:
    """Decode rows beside prompt chunks (a colocated iteration): attention per part equals the one
    padded attention over the whole step, with and without the CPU decode kernel."""
    from disaggserve_worker.model import cpu_kernels
    from disaggserve_worker.model.builtin import builtin_model

    if not kernel:
        monkeypatch.setattr(cpu_kernels, "kernel", lambda: None)
    model = builtin_model("tiny-llama")
    gen = torch.Generator().manual_seed(9)
    past = [30, 7, 55, 0, 20]  # three decode rows, a fresh prompt chunk, a later chunk of a prompt
    new = [1, 1, 1, 16, 9]
    sizes = [p + n for p, n in zip(past, new, strict=True)]
    tables = list(torch.randperm(2048, generator=gen)[: sum(sizes)].split(sizes))  # scattered, disjoint
    ids = [torch.randint(0, model.config.vocab_size, (p + n,), generator=gen) for p, n in zip(past, new, strict=True)]

    def step_logits(split: bool) -> torch.Tensor:
        pool = model.new_kv_pool(2048)
        cached = [(t[:p], i[:p], p) for t, i, p in zip(tables, ids, past, strict=True) if p]
        warm = BatchLayout.build([p for *_, p in cached], [0] * len(cached), [t for t, _, _ in cached], CPU, window)
        model.forward_step(torch.cat([i for _, i, _ in cached]), warm, pool)
        step = BatchLayout.build(new, past, tables, CPU, window)
        assert step.parts is not None and step.parts[0].num_seqs == 3 and step.parts[1].num_seqs == 2
        if not split:
            step.parts = None
        return model.forward_step(torch.cat([i[p:] for i, p in zip(ids, past, strict=True)]), step, pool,
                                  all_logits=True)

    apart, together = step_logits(True), step_logits(False)
    assert torch.allclose(apart, together, atol=1e-4, rtol=1e-4), (apart - together).abs().max()


def test_a_step_that_starts_with_a_prompt_chunk_is_not_split() -> None:
    layout = BatchLayout.build([4, 1], [0, 3], [torch.arange(8), torch.arange(8, 16)], CPU)
    assert layout.parts is None
