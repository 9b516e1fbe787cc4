"""The CPU kernels (`model/cpu_kernels.c`) compute what the torch paths compute (decode and prompt
attention over the pool in place, RMSNorm, rotary, SiLU-and-multiply), and the engine falls back
cleanly when they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from disaggserve_worker.model import cpu_kernels, layers, packed_linear
from disaggserve_worker.model.batch import BatchLayout
from disaggserve_worker.model.builtin import builtin_model
from disaggserve_worker.model.builtin_configs import builtin_config
from disaggserve_worker.model.layers import RMSNorm
from disaggserve_worker.model.rope import apply_rotary

CPU = torch.device("cpu")


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The real kernel, built (or taken from the cache) on this host; CI has gcc, so it must build."""
    monkeypatch.setenv(cpu_kernels.ENV_MODE, "require")
    cpu_kernels.reset()
    yield cpu_kernels.kernel()
    cpu_kernels.reset()


def _reference(q: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
               ends: torch.Tensor) -> torch.Tensor:
    """Gather + masked SDPA in float32: what the torch path computes."""
    batch, heads, dim = q.shape
    kv_heads, width = int(cache.shape[2]), int(slots.shape[1])
    kv = cache.float().index_select(1, slots.reshape(-1)).view(2, batch, width, kv_heads, dim)
    pos = torch.arange(width)[None]
    mask = (pos >= starts[:, None]) & (pos < ends[:, None])
    out = F.scaled_dot_product_attention(q.float().reshape(batch, kv_heads, heads // kv_heads, dim),
                                         kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=mask[:, None, None])
    return out.reshape(batch, heads, dim)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 4, 32), (4, 4, 64), (8, 1, 128), (6, 2, 80),
                                                    (4, 2, 40), (32, 1, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_gathered_attention(kernel, heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    """GQA groups of 1-32, head sizes with a specialised vector loop (32/64/128), a generic one
    (80: a multiple of 16) and the scalar one (40), scattered slots, ragged contexts (full and
    partial 16-key blocks), a windowed row and a one-token row."""
    gen = torch.Generator().manual_seed(heads * dim)
    pool_slots, batch, width = 4096, 6, 300
    cache = torch.randn(2, pool_slots, kv_heads, dim, generator=gen).to(dtype)
    slots = torch.stack([torch.randperm(pool_slots, generator=gen)[:width] for _ in range(batch)])
    ends = torch.tensor([300, 1, 17, 256, 299, 150])
    starts = torch.tensor([0, 0, 0, 200, 0, 149])  # row 3: a 56-token window; row 5: its last token only
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    got = cpu_kernels.decode(kernel, q, cache, slots, starts, ends)  # type: ignore[arg-type]
    assert got.dtype == dtype and got.shape == q.shape
    want = _reference(q, cache, slots, starts, ends)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=tolerance, rtol=tolerance), (got.float() - want).abs().max()


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 4, 32), (4, 4, 64), (8, 1, 128), (6, 2, 80),
                                                    (16, 8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 50])
def test_prompt_kernel_matches_masked_attention(kernel, heads: int, kv_heads: int, dim: int, dtype: torch.dtype,
                                                window: int | None) -> None:
    """Ragged prompts and chunks (nothing cached, some cached, a one-query row, lengths that are
    not whole 16-query tiles, 64-query work items or, on AMX, 512-query ones) over scattered,
    disjoint slots, against masked SDPA of each sequence over its gathered context."""
    gen = torch.Generator().manual_seed(heads * dim + (window or 0))
    new, past = [130, 1, 17, 64, 200, 600], [0, 40, 300, 0, 77, 30]
    totals = [n + p for n, p in zip(new, past, strict=True)]
    cache = torch.randn(2, 4096, kv_heads, dim, generator=gen).to(dtype)
    tables = list(torch.randperm(4096, generator=gen)[:sum(totals)].split(totals))
    layout = BatchLayout.build(new, past, tables, CPU, window)
    q = torch.randn(sum(new), heads, dim, generator=gen).to(dtype)
    got = cpu_kernels.prompt(kernel, q, cache, layout.context_slots, layout.spans, window)  # type: ignore[arg-type]
    assert got.dtype == dtype and got.shape == q.shape
    want = []
    for b, (n, total) in enumerate(zip(new, totals, strict=True)):
        kv = cache.float().index_select(1, tables[b])
        rows = q[int(layout.spans[0, b]):int(layout.spans[0, b]) + n].float()
        mask = layout.attn_mask[b, 0, :n, :total]
        out = F.scaled_dot_product_attention(rows.transpose(0, 1), kv[0].transpose(0, 1), kv[1].transpose(0, 1),
                                             attn_mask=mask, enable_gqa=True)
        want.append(out.transpose(0, 1))
    want_all = torch.cat(want)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want_all, atol=tolerance, rtol=tolerance), (got.float() - want_all).abs().max()


@pytest.mark.parametrize("window", [None, 12])
def test_model_chunked_and_mixed_steps_equal_the_torch_path(kernel, monkeypatch: pytest.MonkeyPatch,
                                                            window: int | None) -> None:
    """Prompts prefilled in two chunks (the second attends the first from the pool), then a mixed
    step: decode rows beside a third chunk, as a colocated worker runs them."""
    model = builtin_model("tiny-llama")
    gen = torch.Generator().manual_seed(8)
    first, second = [33, 70, 5], [40, 1, 90]
    totals = [a + b + 1 for a, b in zip(first, second, strict=True)]
    tables = list(torch.randperm(1024, generator=gen)[:sum(totals) + 60].split([*totals, 60]))
    ids = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in totals]
    extra = torch.randint(0, model.config.vocab_size, (60,), generator=gen)

    def logits() -> list[torch.Tensor]:
        pool = model.new_kv_pool(1024)
        got = []
        for news, pasts in ((first, [0, 0, 0]), (second, first)):
            layout = BatchLayout.build(news, pasts, tables[:3], CPU, window)
            tokens = torch.cat([i[p:p + n] for i, n, p in zip(ids, news, pasts, strict=True)])
            got.append(model.forward_step(tokens, layout, pool))
        pasts = [a + b for a, b in zip(first, second, strict=True)]
        mixed = BatchLayout.build([1, 1, 1, 60], [*pasts, 0], tables, CPU, window)
        tokens = torch.cat([torch.stack([i[p] for i, p in zip(ids, pasts, strict=True)]), extra])
        got.append(model.forward_step(tokens, mixed, pool))
        return got

    with_kernel = logits()
    monkeypatch.setattr(cpu_kernels, "kernel", lambda: None)
    torch_path = logits()
    for a, b in zip(with_kernel, torch_path, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (37, 48), (16, 256)])
def test_small_linear_matches_f_linear(kernel, dtype: torch.dtype, rows: int, out_features: int,
                                       in_features: int) -> None:
    """Few-row projections in vector tiles against F.linear: tiles of 1, 2 and 4 rows with ragged
    edges (3 and 5 rows, 37 outputs), K a multiple of 32 (bfloat16 pairs where the CPU has them)
    and of 16 only (48), with and without a bias; within float summation order, one bfloat16
    rounding."""
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    bias = torch.randn(out_features, generator=gen).to(dtype)
    tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 1e-2}
    for b in (None, bias):
        got = cpu_kernels.small_linear(kernel, x, weight, b)  # type: ignore[arg-type]
        want = F.linear(x.float(), weight.float(), None if b is None else b.float())
        assert got.dtype == dtype and got.shape == (rows, out_features)
        assert torch.allclose(got.float(), want, **tolerance), (got.float() - want).abs().max()


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (37, 256), (16, 32)])
def test_amx_linear_matches_f_linear(kernel, rows: int, out_features: int, in_features: int) -> None:
    """bfloat16 projections on AMX tiles against F.linear: row blocks of 16 with a ragged last one
    (3, 17, 40 rows), output groups of 64 with ragged tiles (37, 96), one and several K slabs,
    with and without a bias."""
    if not kernel.amx_available():  # type: ignore[attr-defined]
        pytest.skip("no AMX on this CPU (or the kernel refuses the tile state)")
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16)
    packed = cpu_kernels.pack_amx(weight)
    for b in (None, bias):
        got = cpu_kernels.amx_linear(kernel, x, packed, out_features, b)  # type: ignore[arg-type]
        want = F.linear(x.float(), weight.float(), None if b is None else b.float())
        assert got is not None and got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        assert torch.allclose(got.float(), want, atol=0.1, rtol=1e-2), (got.float() - want).abs().max()


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 32, 40, 64])
@pytest.mark.parametrize(("out_features", "in_features"), [(96, 64), (48, 256), (16, 32), (4096, 2048)])
def test_amx_linear_plain_matches_f_linear(kernel, rows: int, out_features: int, in_features: int) -> None:
    """bfloat16 projections on AMX with the weight in its own layout against F.linear: one to four
    16-row token blocks with ragged last ones, 32-output passes with a lone last 16 (48, 16), one
    and several K slabs, a large weight's shape, with and without a bias; shapes it does not take
    (N not a multiple of 16, more than 64 rows) are refused, not computed."""
    if not kernel.amx_available():  # type: ignore[attr-defined]
        pytest.skip("no AMX on this CPU (or the kernel refuses the tile state)")
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16)
    for b in (None, bias):
        got = cpu_kernels.amx_linear_plain(kernel, x, weight, b)  # type: ignore[arg-type]
        want = F.linear(x.float(), weight.float(), None if b is None else b.float())
        assert got is not None and got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
        assert torch.allclose(got.float(), want, atol=2e-2, rtol=1e-2), (got.float() - want).abs().max()
    with pytest.raises(RuntimeError, match="status -3"):
        cpu_kernels.amx_linear_plain(kernel, x, weight[:out_features - 1], None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="status -3"):
        cpu_kernels.amx_linear_plain(kernel, torch.randn(65, in_features).to(torch.bfloat16), weight,  # type: ignore[arg-type]
                                     None)


def test_projections_take_the_kernel_only_where_it_applies(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """`packed_linear.linear`: bfloat16 decode-sized row counts go to the C kernel (AMX tiles where
    the CPU has them, else vector tiles for one or two rows; a large weight's AMX rows on its own
    layout), prefill-sized ones to oneDNN, and
    float32, strided inputs and autograd to torch; the values agree whichever path."""
    paths: list[str] = []
    for name in ("amx_linear", "small_linear", "amx_linear_plain"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, real=real, name=name: paths.append(name) or real(*a))
    amx = bool(kernel.amx_available())  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(3)
    weights = {dtype: torch.randn(64, 64, generator=gen).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    cases = [(1, torch.bfloat16, "amx_linear" if amx else "small_linear"),
             (2, torch.bfloat16, "amx_linear" if amx else "small_linear"),
             (packed_linear.AMX_ROWS, torch.bfloat16, "amx_linear" if amx else None),
             (packed_linear.AMX_ROWS + 1, torch.bfloat16, None), (1, torch.float32, None)]
    for rows, dtype, path in cases:
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        want = F.linear(x.float(), weights[dtype].float())
        for grad in (False, True):
            paths.clear()
            with torch.set_grad_enabled(grad):
                got = packed_linear.linear(x, weights[dtype])
            assert paths == ([path] if path and not grad else []), (rows, dtype, grad)
            assert torch.allclose(got.float(), want, atol=0.1, rtol=1e-2)
    # A weight too large to stay in cache never takes the packed AMX kernel (one packed copy at
    # most): the vector tiles for one or two rows, AMX on the weight as it lies up to AMX_ROWS
    # (where the CPU has it), oneDNN beyond.
    large = torch.randn(packed_linear.AMX_CACHED_BYTES // 2 // 64 + 16, 64, generator=gen).to(torch.bfloat16)
    plain = "amx_linear_plain" if amx else None
    for rows, path in ((1, "small_linear"), (packed_linear.SMALL_ROWS + 1, plain), (packed_linear.AMX_ROWS, plain),
                       (packed_linear.AMX_ROWS + 1, None)):
        paths.clear()
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            got = packed_linear.linear(x, large)
        assert paths == ([path] if path else []), rows
        assert torch.allclose(got.float(), F.linear(x.float(), large.float()), atol=0.1, rtol=1e-2)
    paths.clear()
    wide = torch.randn(1, 128, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        packed_linear.linear(wide[:, ::2], weights[torch.bfloat16])  # strided rows: oneDNN/torch
    assert paths == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_mlp_runs_long_steps_in_row_chunks_with_the_same_result(kernel, monkeypatch: pytest.MonkeyPatch,
                                                                    dtype: torch.dtype) -> None:
    """A CPU MLP whose gate/up output would pass CPU_MLP_CHUNK_BYTES runs its rows in chunks of
    whole 64-row blocks (the last one ragged) and returns what one pass over all rows returns."""
    mlp = layers.MLP(builtin_config("small-llama")).to(dtype)  # gate/up: 1024 outputs a row
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 256, generator=gen).to(dtype)
    chunks: list[int] = []
    real = layers.MLP._rows
    monkeypatch.setattr(layers.MLP, "_rows", lambda self, rows: chunks.append(int(rows.shape[0])) or real(self, rows))
    with torch.no_grad():
        whole = mlp(x)
        assert chunks == [300]
        monkeypatch.setattr(layers, "CPU_MLP_CHUNK_BYTES", 100 * 1024 * x.element_size())  # 100 rows: 64
        chunks.clear()
        got = mlp(x)
    assert chunks == [64, 64, 64, 64, 44]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), whole.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("width", "dim"), [(256, 64), (264, 80)])
def test_row_kernels_match_the_torch_ops(kernel, dtype: torch.dtype, width: int, dim: int) -> None:
    """RMSNorm, rotary (in place on the Q/K heads of a fused QKV row, V untouched) and
    SiLU-and-multiply against the torch formulas they replace; within one bfloat16 rounding.
    264 and 80 (a half of 40) leave a scalar tail after the 16-column vectors."""
    gen = torch.Generator().manual_seed(11)
    tokens, heads, kv_heads = 37, 6, 2
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    x = (3 * torch.randn(tokens, width, generator=gen)).to(dtype)
    norm = RMSNorm(width, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=gen) + 0.5)
        norm = norm.to(dtype)
        want = F.rms_norm(x.float(), (width,), norm.weight.float(), 1e-5) if dtype == torch.float32 else \
            norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        got = cpu_kernels.rms_norm(kernel, x, norm.weight, 1e-5)  # type: ignore[arg-type]
    assert torch.allclose(got.float(), want.float(), **tolerance), (got.float() - want.float()).abs().max()

    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    angles = torch.rand(tokens, dim // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    qk = (heads + kv_heads) * dim
    want_qk = apply_rotary(qkv[:, :qk].view(tokens, heads + kv_heads, dim), cos, sin).reshape(tokens, -1)
    rotated = qkv.clone()
    cpu_kernels.rotary_(kernel, rotated, heads + kv_heads, dim, cos, sin)  # type: ignore[arg-type]
    assert torch.allclose(rotated[:, :qk].float(), want_qk.float(), **tolerance)
    assert torch.equal(rotated[:, qk:], qkv[:, qk:])  # V is not rotated

    gate_up = torch.randn(tokens, 2 * 96, generator=gen).to(dtype)
    gate, up = gate_up.split(96, dim=-1)
    got = cpu_kernels.silu_mul(kernel, gate_up)  # type: ignore[arg-type]
    assert torch.allclose(got.float(), (F.silu(gate) * up).float(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "width"), [(1, 256), (5, 264), (300, 256)])
def test_the_residual_add_and_norm_in_one_pass_equal_the_add_then_the_norm(
        kernel, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rows: int, width: int) -> None:
    """`RMSNorm.add_forward`: the kernel's sum and norm are torch's add and the norm kernel, bit for
    bit, and the torch fallback gives the same; both leave the sum in x (the residual stream).
    264 leaves a scalar tail; 300 x 256 rows run on the thread team."""
    gen = torch.Generator().manual_seed(rows + width)
    x = (3 * torch.randn(rows, width, generator=gen)).to(dtype)
    delta = torch.randn(rows, width, generator=gen).to(dtype)
    norm = RMSNorm(width, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=gen) + 0.5)
        norm = norm.to(dtype)
        want_sum = x + delta
        want = cpu_kernels.rms_norm(kernel, want_sum, norm.weight, 1e-5)  # type: ignore[arg-type]
        fused_x = x.clone()
        fused = norm.add_forward(fused_x, delta)
        monkeypatch.setattr(cpu_kernels, "kernel", lambda: None)
        plain_x = x.clone()
        plain = norm.add_forward(plain_x, delta)
        untouched = x.clone()
        assert torch.equal(norm.add_forward(untouched, None), norm(x)) and torch.equal(untouched, x)
    assert torch.equal(fused_x, want_sum) and torch.equal(plain_x, want_sum)
    assert torch.equal(fused, want)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(plain.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim"), [(1, 32), (7, 64), (37, 80)])
def test_rotary_cache_equals_rotary_and_index_copy(kernel, dtype: torch.dtype, rows: int, dim: int) -> None:
    """The fused call is the rotary kernel, a copy of the queries and two index_copy_ into the
    pool, bit for bit, at scattered slots; the pool's other slots stay as they were."""
    gen = torch.Generator().manual_seed(rows)
    heads, kv_heads, pool_slots = 6, 2, 96
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    angles = torch.rand(rows, dim // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.randperm(pool_slots, generator=gen)[:rows]
    cache = torch.randn(2, pool_slots, kv_heads, dim, generator=gen).to(dtype)

    want_qkv, want_cache = qkv.clone(), cache.clone()
    cpu_kernels.rotary_(kernel, want_qkv, heads + kv_heads, dim, cos, sin)  # type: ignore[arg-type]
    q_end, k_end = heads * dim, (heads + kv_heads) * dim
    want_cache[0].index_copy_(0, slots, want_qkv[:, q_end:k_end].reshape(rows, kv_heads, dim))
    want_cache[1].index_copy_(0, slots, want_qkv[:, k_end:].reshape(rows, kv_heads, dim))

    got_qkv, got_cache = qkv.clone(), cache.clone()
    q = cpu_kernels.rotary_cache(kernel, got_qkv, heads, kv_heads, dim, cos, sin, got_cache, slots)  # type: ignore[arg-type]
    assert q.shape == (rows, heads, dim) and q.is_contiguous()
    assert torch.equal(q.reshape(rows, -1), want_qkv[:, :q_end])
    assert torch.equal(got_qkv, want_qkv)  # Q and K rotated in place, V untouched
    assert torch.equal(got_cache, want_cache)


@pytest.mark.parametrize("window", [None, 12])
def test_model_decode_step_equals_the_torch_path(kernel, monkeypatch: pytest.MonkeyPatch, window: int | None) -> None:
    model = builtin_model("tiny-llama")
    contexts = [5, 40, 17, 63, 9]
    gen = torch.Generator().manual_seed(5)
    # Scattered and disjoint: sequences sharing slots would overwrite each other's cache.
    tables = list(torch.randperm(1024, generator=gen)[: sum(n + 1 for n in contexts)].split([n + 1 for n in contexts]))
    ids = [torch.randint(0, model.config.vocab_size, (n + 1,), generator=gen) for n in contexts]

    def decode_logits() -> torch.Tensor:
        pool = model.new_kv_pool(1024)
        prefill = BatchLayout.build(contexts, [0] * len(contexts), tables, CPU, window)
        model.forward_step(torch.cat([i[:-1] for i in ids]), prefill, pool)
        step = BatchLayout.build([1] * len(contexts), contexts, tables, CPU, window)
        return model.forward_step(torch.stack([i[-1] for i in ids]), step, pool)

    with_kernel = decode_logits()
    monkeypatch.setattr(cpu_kernels, "kernel", lambda: None)
    torch_path = decode_logits()
    assert torch.allclose(with_kernel, torch_path, atol=1e-4, rtol=1e-4), (with_kernel - torch_path).abs().max()
    assert torch.equal(with_kernel.argmax(-1), torch_path.argmax(-1))


def test_off_and_a_missing_compiler_fall_back_to_torch_and_require_says_why(
        monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path))  # nothing cached: it must build
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    try:
        monkeypatch.setenv(cpu_kernels.ENV_MODE, "off")
        cpu_kernels.reset()
        assert cpu_kernels.kernel() is None
        monkeypatch.setenv(cpu_kernels.ENV_MODE, "auto")
        cpu_kernels.reset()
        assert cpu_kernels.kernel() is None
        assert "run in torch" in caplog.text and "C compiler" in caplog.text
        monkeypatch.setenv(cpu_kernels.ENV_MODE, "require")
        cpu_kernels.reset()
        with pytest.raises(cpu_kernels.KernelUnavailable, match="no-such-cc"):
            cpu_kernels.kernel()
        monkeypatch.setenv(cpu_kernels.ENV_MODE, "fast")
        cpu_kernels.reset()
        with pytest.raises(ValueError, match="DISAGGSERVE_CPU_KERNELS='fast': use one of auto, off, require"):
            cpu_kernels.kernel()
    finally:
        cpu_kernels.reset()


def test_a_broken_compiler_is_reported_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake cc 1.0'\n[ \"$1\" = --version ] && exit 0\n"
                    "echo 'cc1: internal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv(cpu_kernels.ENV_MODE, "require")
    cpu_kernels.reset()
    try:
        with pytest.raises(cpu_kernels.KernelUnavailable, match="internal error"):
            cpu_kernels.kernel()
        assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left behind
    finally:
        cpu_kernels.reset()


def test_an_unusable_cache_folder_falls_back_to_the_temp_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(cpu_kernels.ENV_CACHE, str(blocker / "kernels"))  # cannot be made, even as root
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(cpu_kernels.tempfile, "tempdir", None)  # re-read TMPDIR
    # Where the build goes, not a build: compiling into an empty folder costs 45 s of a core on a
    # slow host, and the build itself is covered wherever the kernels load.
    fallback = tmp_path / "tmp" / "disaggserve-kernels"
    assert cpu_kernels._cache_dir() == fallback and fallback.is_dir()


def test_loading_the_kernels_leaves_the_process_floating_point_state_alone() -> None:
    """Built with fast-math, the library must not carry gcc's crtfastmath.o: its constructor would
    turn on flush-to-zero for the whole process at load, and every float op in the worker (numpy,
    Python's own arithmetic) would lose subnormals. In a fresh process, so nothing loaded before
    hides or fakes it."""
    script = (
        "from disaggserve_worker.model import cpu_kernels\n"
        "tiny = 5e-324\n"
        "assert tiny * 2 > 0, 'subnormals flushed before the load?'\n"
        "assert cpu_kernels.kernel() is not None\n"
        "assert tiny * 2 > 0, 'loading the kernels turned on flush-to-zero'\n"
    )
    # The machine's cache: the library it holds is the one every worker loads (a fresh folder
    # only added a 45 s build on a slow host).
    env = {**os.environ, cpu_kernels.ENV_MODE: "require"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
