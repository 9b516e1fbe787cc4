"""Fitting instances into the GPUs a cluster has free: one instance is one pod on one node."""

from __future__ import annotations


def fit_instances(free: list[int] | None, sizes: list[tuple[int, int]], max_gpus: int | None) -> list[int]:
    """Place `sizes` = [(gpus per instance, count wanted), ...] best-fit, interleaving the kinds
    in proportion to what each still lacks (so a short cluster keeps the prefill:decode ratio).
    `free` None means no cluster view (unbounded). Returns how many of each kind were placed."""
    nodes = None if free is None else list(free)
    placed = [0] * len(sizes)
    used = 0
    blocked = [False] * len(sizes)
    while True:
        open_kinds = [i for i, (_, want) in enumerate(sizes) if placed[i] < want and not blocked[i]]
        if not open_kinds:
            return placed
        i = min(open_kinds, key=lambda k: placed[k] / sizes[k][1])
        gpus = sizes[i][0]
        if max_gpus is not None and used + gpus > max_gpus:
            blocked[i] = True
            continue
        if nodes is not None:
            fits = [n for n, f in enumerate(nodes) if f >= gpus]
            if not fits:
                blocked[i] = True
                continue
            best = min(fits, key=lambda n: nodes[n])
            nodes[best] -= gpus
        placed[i] += 1
        used += gpus


def fit_units(free: list[int] | None, unit_gpus: int, wanted: int, max_gpus: int | None) -> int:
    """Units (all instances of a unit on one node) that fit, at most `wanted`."""
    n = wanted
    if free is not None:
        n = min(n, sum(f // unit_gpus for f in free))
    if max_gpus is not None:
        n = min(n, max_gpus // unit_gpus)
    return max(n, 0)
