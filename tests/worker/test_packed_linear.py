"""bfloat16 projections on the CPU through oneDNN-packed weights (`model.packed_linear`) give the
same bits as `F.linear`, float32 ones of two rows or more agree with it within rounding, both
follow a weight that is replaced or changed in place, and a model's greedy steps are the same
with packing on and off, in either dtype."""

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

bf16_packing = pytest.mark.skipif(not packed_linear.usable(), reason="no oneDNN bfloat16 support on this CPU")
fp32_packing = pytest.mark.skipif(not packed_linear.onednn_usable(), reason="no oneDNN in this torch build")
DTYPES = [pytest.param(torch.bfloat16, marks=bf16_packing), pytest.param(torch.float32, marks=fp32_packing)]


@bf16_packing
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_projection_is_f_linear_bit_for_bit(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(96, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(packed_linear.linear(x, weight, bias), F.linear(x, weight, bias))
    assert torch.equal(packed_linear.linear(x[None], weight), F.linear(x[None], weight))  # any leading dims


@fp32_packing
@pytest.mark.parametrize("rows", [1, 2, 48, 700])
def test_a_float32_projection_of_two_rows_or_more_is_onednn_packed_and_f_linear_within_rounding(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(1024, 512, generator=gen) * 0.05
    bias = torch.randn(1024, generator=gen)
    x = torch.randn(rows, 512, generator=gen)
    packed_linear._packed.clear()
    with torch.inference_mode():
        out = packed_linear.linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    went_packed = any(ref() is weight for ref, *_ in packed_linear._packed.values())
    assert went_packed == (rows >= packed_linear.FP32_MIN_ROWS), "one row stays on F.linear, more take oneDNN"
    if not went_packed:
        assert torch.equal(out, F.linear(x, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_weight_changed_in_place_or_replaced_is_packed_again(dtype: torch.dtype) -> None:
    weight = torch.ones(16, 8, dtype=dtype)
    x = torch.ones(2, 8, dtype=dtype)
    assert packed_linear.linear(x, weight)[0, 0].item() == 8
    weight.mul_(2)
    assert packed_linear.linear(x, weight)[0, 0].item() == 16
    other = torch.full((16, 8), 3.0, dtype=dtype)
    assert packed_linear.linear(x, other)[0, 0].item() == 24


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_model_generates_the_same_tokens_packed_or_not(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model("builtin:small-llama", device="cpu", dtype=str(dtype).removeprefix("torch."))
    prompts = [[(7 * i + j) % 500 + 1 for j in range(40 + 9 * i)] for i in range(3)]

    def generate() -> list[list[int]]:
        engine = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(role="colocated", kv_cache_tokens=1024))
        engine.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
            return asyncio.run(run_requests(engine, [(p, params) for p in prompts]))
        finally:
            engine.stop()

    packed_linear._packed.clear()
    packed = generate()
    assert packed_linear._packed, "no projection took a packed weight"
    monkeypatch.setattr(packed_linear, "_usable", False)
    monkeypatch.setattr(packed_linear, "_onednn", False)
    packed_linear._packed.clear()
    assert generate() == packed
    if dtype is torch.float32:  # (bfloat16 on a CPU with AMX still packs for the C kernel's tiles)
        assert not packed_linear._packed


def test_warming_runs_each_projection_shape_once_at_every_decode_row_count() -> None:
    """`warm` covers every projection a step runs (the fused QKV and gate/up as fused, the rest
    alone), each distinct shape once, at every row count from 2 to WARM_ROWS; the projections'
    results are untouched by it."""
    model = load_model("builtin:tiny-llama", device="cpu").model
    projections = model.projections()
    layers = model.config.num_hidden_layers
    assert len(projections) == 4 * layers + 1  # qkv, o, gate/up, down per layer; the LM head
    c = model.config
    head = c.hidden_size // c.num_attention_heads
    qkv = (c.hidden_size + 2 * c.num_key_value_heads * head, c.hidden_size)
    assert qkv in {tuple(w.shape) for _, w in projections}
    assert (2 * c.intermediate_size, c.hidden_size) in {tuple(w.shape) for _, w in projections}
    seen: dict[int, list[int]] = {}

    def recording(call, weight):  # type: ignore[no-untyped-def]
        def run(x: torch.Tensor) -> torch.Tensor:
            seen.setdefault(id(weight), []).append(int(x.shape[0]))
            return call(x)
        return run, weight

    x = torch.randn(5, c.hidden_size)
    before = projections[0][0](x)
    shapes = packed_linear.warm([recording(call, w) for call, w in projections], rows=9)
    assert shapes == len({(tuple(w.shape), w.dtype) for _, w in projections})
    assert len(seen) == shapes and all(rows == list(range(2, 10)) for rows in seen.values())
    assert torch.equal(projections[0][0](x), before)
