"""Grouped decode attention (large CPU decode steps) gives the logits of one padded batch."""

from __future__ import annotations

import pytest
import torch

from disaggserve_worker.model import cpu_kernels, layers
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.builtin import builtin_model

CPU = torch.device("cpu")
CONTEXTS = [5, 40, 17, 63, 9, 33, 2, 50]  # mixed, unsorted: groups must put rows back in place


def _decode_logits(model, monkeypatch: pytest.MonkeyPatch, group_bytes: int, window: int | None) -> torch.Tensor:
    monkeypatch.setattr(layers, "CPU_DECODE_GROUP_BYTES", group_bytes)
    monkeypatch.setattr(cpu_kernels, "kernel", lambda: None)  # the torch path, which groups
    gen = torch.Generator().manual_seed(3)
    pool = model.new_kv_pool(1024)
    # Scattered and disjoint (sequences sharing slots would overwrite each other's cache).
    tables = list(torch.randperm(1024, generator=gen)[: sum(n + 1 for n in CONTEXTS)].split([n + 1 for n in CONTEXTS]))
    ids = [torch.randint(0, model.config.vocab_size, (n + 1,), generator=gen) for n in CONTEXTS]
    with torch.no_grad():
        prefill = BatchLayout.build(CONTEXTS, [0] * len(CONTEXTS), tables, CPU, window)
        model.forward_step(torch.cat([i[:-1] for i in ids]), prefill, pool)
        step = BatchLayout.build([1] * len(CONTEXTS), CONTEXTS, tables, CPU, window)
        return model.forward_step(torch.stack([i[-1] for i in ids]), step, pool)


@pytest.mark.parametrize("window", [None, 12])
def test_grouped_decode_equals_one_padded_batch(monkeypatch: pytest.MonkeyPatch, window: int | None) -> None:
    model = builtin_model("tiny-llama")
    token_bytes = 2 * model.config.kv_heads * model.config.dim_per_head * 4
    whole = _decode_logits(model, monkeypatch, 1 << 40, window)
    grouped = _decode_logits(model, monkeypatch, 70 * token_bytes, window)  # several groups
    assert torch.allclose(grouped, whole, atol=1e-5, rtol=1e-5), (grouped - whole).abs().max()


def test_groups_cover_every_row_once_and_stay_within_the_budget() -> None:
    tables = [torch.arange(n + 1) for n in CONTEXTS]
    layout = BatchLayout.build([1] * len(CONTEXTS), CONTEXTS, tables, CPU)
    budget = 70
    groups = layout.decode_groups(budget)
    assert groups is not None and len(groups.groups) > 1
    rows = torch.cat([g.rows for g in groups.groups])
    assert sorted(rows.tolist()) == list(range(len(CONTEXTS)))
    for g in groups.groups:
        lens = [CONTEXTS[r] + 1 for r in g.rows.tolist()]
        assert g.context == max(lens)
        assert len(lens) == 1 or len(lens) * g.context <= budget
        assert g.attn_mask.shape == (len(lens), 1, 1, g.context)
    # the inverse permutation puts the concatenated group outputs back in row order
    assert torch.equal(rows[groups.inverse], torch.arange(len(CONTEXTS)))
    assert layout.decode_groups(budget) is groups  # computed once per layout


def test_small_steps_and_prefill_are_one_group() -> None:
    tables = [torch.arange(n + 1) for n in CONTEXTS]
    decode = BatchLayout.build([1] * len(CONTEXTS), CONTEXTS, tables, CPU)
    assert decode.decode_groups(10_000) is None
    prefill = BatchLayout.build(CONTEXTS, [0] * len(CONTEXTS), tables, CPU)
    assert prefill.decode_groups(1) is None
