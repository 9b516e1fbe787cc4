"""Prompts with nothing cached attend causally to their own tokens (no gather, no explicit mask):
the same logits and the same cache as the general paged path, for one prompt and a padded batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.builtin import builtin_model

CPU = torch.device("cpu")


def _prefill(model, lens: list[int], window: int | None, fresh: bool | None) -> tuple[torch.Tensor, object]:
    gen = torch.Generator().manual_seed(5)
    pool = model.new_kv_pool(1024)
    slots = torch.randperm(1024, generator=gen)  # scattered, and disjoint between prompts
    tables = list(torch.split(slots[: sum(lens)], lens))
    ids = torch.cat([torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lens])
    layout = BatchLayout.build(lens, [0] * len(lens), tables, CPU, window)
    if fresh is not None:
        layout = replace(layout, fresh=fresh)
    with torch.no_grad():
        return model.forward_step(ids, layout, pool), pool


@pytest.mark.parametrize("lens", [[37], [5, 40, 17, 63, 1, 33]])
def test_fresh_prompts_give_the_logits_and_cache_of_the_paged_path(lens: list[int]) -> None:
    model = builtin_model("tiny-llama")
    fresh, fresh_pool = _prefill(model, lens, None, True)
    paged, paged_pool = _prefill(model, lens, None, False)
    assert torch.allclose(fresh, paged, atol=1e-5, rtol=1e-5), (fresh - paged).abs().max()
    for a, b in zip(fresh_pool.layers, paged_pool.layers, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # decode reads the same cache


def test_only_prompts_with_nothing_cached_and_no_cutting_window_take_the_fresh_path() -> None:
    tables = [torch.arange(64), torch.arange(64, 128)]
    assert BatchLayout.build([10, 20], [0, 0], tables, CPU).fresh
    assert BatchLayout.build([10, 20], [0, 0], tables, CPU, sliding_window=20).fresh
    assert not BatchLayout.build([10, 20], [0, 0], tables, CPU, sliding_window=12).fresh  # the window cuts in
    assert not BatchLayout.build([10, 20], [0, 5], tables, CPU).fresh  # a chunk after a cached prefix
    assert not BatchLayout.build([1, 1], [10, 20], tables, CPU).fresh  # decode
