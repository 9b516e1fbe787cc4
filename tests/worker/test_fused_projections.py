"""Fused Q/K/V and gate/up matmuls: same results, same checkpoint names, no stale copies."""

from __future__ import annotations

import torch
from torch import nn

from disaggserve_worker.model.layers import FusedLinear


def _linears(bias: bool) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(16, n, bias=bias) for n in (8, 4, 4)]


def test_fused_equals_separate_and_shares_storage() -> None:
    for bias in (False, True):
        linears = _linears(bias)
        x = torch.randn(5, 16)
        expected = [lin(x) for lin in linears]
        fused = FusedLinear(*linears)
        got = fused(x)
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected, strict=True))
        # The named parameters are now views of one tensor: no weight is stored twice.
        base = linears[0].weight.untyped_storage().data_ptr()
        assert all(lin.weight.untyped_storage().data_ptr() == base for lin in linears)


def test_loading_new_weights_after_fusion_is_seen() -> None:
    linears = _linears(bias=True)
    fused = FusedLinear(*linears)
    x = torch.randn(3, 16)
    fused(x)
    holder = nn.ModuleList(linears)
    fresh = {k: torch.randn_like(v) for k, v in holder.state_dict().items()}
    holder.load_state_dict(fresh)  # in place, into the views
    assert torch.allclose(fused(x)[1], x @ fresh["1.weight"].T + fresh["1.bias"], atol=1e-5)
    linears[2].weight = nn.Parameter(torch.zeros(4, 16))  # replaced outright: re-fused
    assert torch.count_nonzero(fused(x)[2] - linears[2].bias) == 0
