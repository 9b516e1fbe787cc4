"""bfloat16 projections on the CPU through oneDNN-packed weights (`model.packed_linear`) give the
same bits as `F.linear`, follow a weight that is replaced or changed in place, and a bfloat16
model's greedy steps are the same with packing on and off."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.model import packed_linear
from disaggserve_worker.model.loader import load_model
from engine_harness import run_requests

pytestmark = pytest.mark.skipif(not packed_linear.usable(), reason="no oneDNN bfloat16 support on this CPU")


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_projection_is_f_linear_bit_for_bit(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(96, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(packed_linear.linear(x, weight, bias), F.linear(x, weight, bias))
    assert torch.equal(packed_linear.linear(x[None], weight), F.linear(x[None], weight))  # any leading dims
    # float32 stays on F.linear, whatever the switch says.
    assert torch.equal(packed_linear.linear(x.float(), weight.float()), F.linear(x.float(), weight.float()))


def test_a_weight_changed_in_place_or_replaced_is_packed_again() -> None:
    weight = torch.ones(16, 8, dtype=torch.bfloat16)
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    assert packed_linear.linear(x, weight)[0, 0].item() == 8
    weight.mul_(2)
    assert packed_linear.linear(x, weight)[0, 0].item() == 16
    other = torch.full((16, 8), 3.0, dtype=torch.bfloat16)
    assert packed_linear.linear(x, other)[0, 0].item() == 24


def test_a_bfloat16_model_generates_the_same_tokens_packed_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model("builtin:small-llama", device="cpu", dtype="bfloat16")
    prompts = [[(7 * i + j) % 500 + 1 for j in range(40 + 9 * i)] for i in range(3)]

    def generate() -> list[list[int]]:
        engine = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(role="colocated", kv_cache_tokens=1024))
        engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            return asyncio.run(run_requests(engine, [(p, params) for p in prompts]))
        finally:
            engine.stop()

    packed = generate()
    monkeypatch.setattr(packed_linear, "_usable", False)
    assert generate() == packed
