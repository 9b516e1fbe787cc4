"""Tensor parallelism: sharded layers compute the unsharded model, and KV moves between sizes.

On a CPU every shard "device" is `cpu`, so these tests check the sharded math (head and column
splits, partial sums, bias once, KV split by heads) and the bookkeeping, not GPU overlap.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from disaggserve_worker.engine.memory import auto_kv_cache_tokens
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.kv_pool import KVPool
from disaggserve_worker.model.loader import LoadedModel, ModelLoadError, load_model
from disaggserve_worker.model.tensor_parallel import ShardedAttention, ShardedMLP
from engine_harness import greedy_requests, run_disaggregated, run_requests, start_engine

CPU = torch.device("cpu")


def sharded(grid: list[list[torch.device]], name: str = "tiny-llama") -> LoadedModel:
    loaded = load_model(f"builtin:{name}", device="cpu")
    loaded.model.place(grid)
    return loaded


@pytest.fixture(scope="module")
def tp2() -> LoadedModel:
    return sharded([[CPU, CPU]])


@pytest.fixture(scope="module")
def tp2pp2() -> LoadedModel:
    return sharded([[CPU, CPU], [CPU, CPU]])


def _paged_logits(loaded: LoadedModel, ids: torch.Tensor, split: int) -> tuple[torch.Tensor, KVPool]:
    """Every position's logits through the paged path, in two chunks (prefill, then a continuation)."""
    pool = loaded.model.new_kv_pool(64)
    table = torch.arange(64)
    window = loaded.model.sliding_window
    first = loaded.model.forward_step(ids[:split], BatchLayout.build([split], [0], [table], CPU, window),
                                      pool, all_logits=True)
    rest = loaded.model.forward_step(ids[split:], BatchLayout.build([len(ids) - split], [split], [table],
                                                                    CPU, window), pool, all_logits=True)
    return torch.cat([first, rest]), pool


@pytest.mark.parametrize("which", ["tp2", "tp2pp2"])
def test_sharded_logits_match_the_unsharded_model(tiny: LoadedModel, which: str,
                                                  request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.self_attn, ShardedAttention) and isinstance(layer.mlp, ShardedMLP)
    assert [s.heads for s in layer.self_attn.shards] == [2, 2]
    assert [s.kv_heads for s in layer.self_attn.shards] == [1, 1]
    assert [s.gate_proj.out_features for s in layer.mlp.shards] == [172, 172]
    assert loaded.model.tensor_parallel == 2
    assert loaded.model.pipeline_parallel == (2 if which == "tp2pp2" else 1)
    ids = torch.tensor(tiny.tokenizer.encode("tensor parallel shards sum to the whole layer, head by head").ids)
    expected = tiny.model.reference_logits(ids)
    assert torch.allclose(loaded.model.reference_logits(ids), expected, atol=1e-4, rtol=1e-4)
    unsharded, full_pool = _paged_logits(tiny, ids, 9)
    paged, pool = _paged_logits(loaded, ids, 9)
    assert torch.allclose(paged, unsharded, atol=1e-4, rtol=1e-4)
    assert torch.allclose(paged, expected, atol=1e-4, rtol=1e-4)
    # Each shard caches only its KV heads; read() joins them into the unsharded layout.
    assert [tuple(t.shape) for t in pool.layer(0)] == [(2, 64, 1, 32), (2, 64, 1, 32)]
    slots = torch.arange(len(ids))
    for i in range(len(pool)):
        assert torch.allclose(pool.read(i, slots), full_pool.read(i, slots), atol=1e-5, rtol=1e-5)


def test_heads_that_do_not_divide_are_refused_with_the_sizes_that_work() -> None:
    for tensor, grid in [(3, [[CPU] * 3]), (4, [[CPU] * 4])]:  # 4 splits the heads but not the 2 KV heads
        model = load_model("builtin:tiny-llama", device="cpu").model
        with pytest.raises(ModelLoadError) as error:
            model.place(grid)
        message = str(error.value)
        assert f"tensor parallel size {tensor} does not divide" in message
        assert "4 attention heads, 2 KV heads, 344 intermediate size" in message
        assert "sizes that divide all three: 1, 2" in message
        assert model.tensor_parallel == 1 and model.layer_devices is None, "a refused place() changes nothing"
    with pytest.raises(ValueError, match="same number"):
        load_model("builtin:tiny-llama", device="cpu").model.place([[CPU, CPU], [CPU]])


def test_a_sharded_model_is_not_sharded_twice(tp2: LoadedModel) -> None:
    with pytest.raises(ValueError, match="already tensor-sharded"):
        tp2.model.place([[CPU, CPU]])


def test_kv_pool_write_splits_heads_over_shards_and_read_joins_them(tp2: LoadedModel) -> None:
    pool = tp2.model.new_kv_pool(32)
    values = torch.randn(2, 5, 2, 32)
    slots = torch.tensor([3, 17, 4, 30, 0])
    pool.write(1, slots, values)
    assert torch.equal(pool.layer(1)[0][:, slots], values[:, :, :1])
    assert torch.equal(pool.layer(1)[1][:, slots], values[:, :, 1:])
    assert torch.equal(pool.read(1, slots), values)
    assert (pool.kv_heads, pool.head_dim, pool.dtype) == (2, 32, torch.float32)


def test_kv_memory_is_split_over_shard_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shard device holds KV heads / T of its layers, and the tightest device decides."""
    one = load_model("builtin:tiny-llama", device="cpu").model
    full = one.kv_bytes_per_token()
    assert full == {CPU: one.config.kv_bytes_per_token(4)}
    meta = torch.device("meta")  # a second "device" whose placement costs no memory
    split = load_model("builtin:tiny-llama", device="cpu").model.place([[CPU, meta]])
    assert split.kv_bytes_per_token() == {CPU: full[CPU] // 2, meta: full[CPU] // 2}
    gpus = [torch.device("cuda", i) for i in range(2)]
    free = {0: 1 << 30, 1: 1 << 29}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[d.index], 80 << 30))
    per_device = {gpus[0]: 1024, gpus[1]: 1024}
    assert auto_kv_cache_tokens(per_device) == int((1 << 29) * 0.85) // 1024
    with pytest.raises(MemoryError, match="pass --kv-cache-tokens"):
        auto_kv_cache_tokens({gpus[0]: 1 << 30, gpus[1]: 1})


@pytest.mark.parametrize(("which", "budget"), [("tp2", 2048), ("tp2", 8), ("tp2pp2", 2048)])
async def test_sharded_engine_generates_the_unsharded_greedy_tokens(
        which: str, budget: int, request: pytest.FixtureRequest,
        reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    engine = start_engine(loaded, budget=budget)
    try:
        got = await run_requests(engine, greedy_requests(loaded), stagger_s=0.01)  # later ones join a running batch
    finally:
        engine.stop()
    assert got == [reference_greedy(p, s.max_tokens) for p, s in greedy_requests(loaded)]
    assert engine.allocator.free_tokens == engine.allocator.capacity_tokens


@pytest.mark.parametrize(("prefill_size", "decode_size"), [(2, 1), (1, 2), (2, 2)])
async def test_kv_handoff_between_tensor_sizes(
        tiny: LoadedModel, tp2: LoadedModel, prefill_size: int, decode_size: int,
        reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    """The wire carries full-head layers, so prefill and decode may shard differently."""
    models = {1: tiny, 2: tp2}
    prefill, decode = start_engine(models[prefill_size], "prefill"), start_engine(models[decode_size], "decode")
    try:
        got, pulls = await run_disaggregated(prefill, decode, greedy_requests(tiny), "127.0.0.141")
    finally:
        prefill.stop()
        decode.stop()
    for pull, (prompt, _) in zip(pulls, greedy_requests(tiny), strict=True):
        assert pull.bytes == tiny.config.kv_bytes_per_token(4) * len(prompt), "full heads on the wire"
    assert got == [reference_greedy(p, s.max_tokens) for p, s in greedy_requests(tiny)]
    assert prefill.held_count == 0
    assert decode.allocator.free_tokens == decode.allocator.capacity_tokens
