"""Verification of proposed tokens against the target's distributions.

Greedy: the accepted prefix is where the proposal equals the target's argmax, then the
target's own token — exactly what the target alone would emit.
Sampled (Leviathan et al. / Chen et al.): accept proposal x with probability min(1, p(x)/q(x)),
on rejection draw from norm(max(0, p − q)), and after a fully accepted proposal draw a bonus
token from p. The emitted tokens are then distributed exactly as sampling from p step by step.
A deterministic proposer (n-gram) is the special case q = one-hot(x).
"""

from __future__ import annotations

import torch


def verify_greedy(target_argmax: list[int], proposal: list[int]) -> list[int]:
    """`target_argmax[j]` is the target's choice after the j-th proposal prefix (len(proposal)+1 rows)."""
    out: list[int] = []
    for j, token in enumerate(proposal):
        if target_argmax[j] != token:
            break
        out.append(token)
    out.append(target_argmax[len(out)])
    return out


def verify_sampled(target_probs: torch.Tensor, proposal: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator) -> list[int]:
    """target_probs: (len(proposal)+1, V) CPU fp32; draft_probs: (len(proposal), V) or None (point mass)."""
    out: list[int] = []
    for j, token in enumerate(proposal):
        p = target_probs[j]
        q_x = 1.0 if draft_probs is None else float(draft_probs[j, token])
        u = float(torch.rand(1, generator=generator))
        if q_x > 0 and u * q_x < float(p[token]):
            out.append(token)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[j]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere only when p == q up to rounding
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[len(proposal)], 1, generator=generator)))
    return out
