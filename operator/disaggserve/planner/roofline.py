"""An analytical (roofline) latency profile: any model on any GPU in the table, before profiling.

Why: the planner needs a latency profile to plan at all, and a measured one exists only for
the models and GPUs someone profiled. A transformer step's time is mostly set by two
roofs — bytes read from GPU memory (weights, KV cache) over the memory bandwidth, and FLOPs
over the tensor-core peak — plus per-layer launch cost and tensor-parallel all-reduces over
the node's GPU link. Each term below is that physics for one (model, GPU, tensor size); the
factors that turn data-sheet peaks into achieved speed (`Calibration`) are fitted once, by
least squares on relative error, to the measured A100 profiles shipped with the operator
(DistServe's OPT-13B and OPT-66B tables), so the estimate is anchored to a real engine.

The result is a `LatencyProfile` in the same form as a measured one (DistServe's prefill
`a + b·Σl + c·Σl²`, decode `a + b·Σctx + c·B` below/above a batch threshold) with
`source` starting with `ESTIMATED_SOURCE`, which is how a plan made from it is marked
"estimated". `bench/roofline.py` reports its error against the measured tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from disaggserve.planner.facts import Facts
from disaggserve.planner.gpus import GPU_PRODUCTS, GpuProduct
from disaggserve.planner.profile import Coefficients, LatencyProfile, ProfileEntry, ProfileFacts

ESTIMATED_SOURCE = "estimated (roofline)"
TENSOR_SIZES = (1, 2, 4, 8)
# Measured profiles the factors are fitted on: (built-in profile stem, GPU product).
CALIBRATION_PROFILES = (("opt-13b-a100", "A100-SXM4-80GB"), ("opt-66b-a100", "A100-SXM4-80GB"))
# Where the fit samples the measured tables: prompt lengths of one-prompt prefill batches, and
# decode batch sizes at a mean context; the same grid the bench reports errors on.
PREFILL_LENGTHS = (128, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
DECODE_CONTEXT = 512
MS = 1e3


@dataclass(frozen=True)
class Terms:
    """Physical seconds→ms of each roofline term for one (model, GPU, tensor size) at peak."""

    weights_read_ms: float  # one pass over this GPU's share of the weights
    flops_per_token_ms: float  # 2·params/t at peak
    attention_per_token_sq_ms: float  # causal attention score+value FLOPs per l², at peak
    kv_read_per_token_ms: float  # one context token's K and V, this GPU's share
    allreduce_per_token_ms: float  # all-reduce bytes of one token's activations, all layers
    allreduces: int  # all-reduces per forward (0 without tensor parallelism)
    layers: int


def terms(facts: Facts, gpu: GpuProduct, tensor: int) -> Terms:
    head_dim = facts.hidden_size // facts.attention_heads
    attn_flops = 2 * facts.layers * facts.attention_heads * head_dim  # 4·L·h·l² / 2 (causal)
    ring = 2 * (tensor - 1) / tensor
    return Terms(
        weights_read_ms=facts.weight_bytes / tensor / gpu.hbm_bytes_s * MS,
        flops_per_token_ms=2 * facts.parameters / tensor / gpu.peak_flops * MS,
        attention_per_token_sq_ms=attn_flops / tensor / gpu.peak_flops * MS,
        kv_read_per_token_ms=facts.kv_bytes_per_token / tensor / gpu.hbm_bytes_s * MS,
        allreduce_per_token_ms=2 * facts.layers * facts.hidden_size * facts.dtype_bytes * ring / gpu.link_bytes_s * MS,
        allreduces=2 * facts.layers if tensor > 1 else 0,
        layers=facts.layers,
    )


@dataclass(frozen=True)
class Calibration:
    """Multipliers on the peak-speed terms (1/efficiency) and fixed costs, in ms.

    prefill: a = weights·pw + layers·layer + allreduces·ar; b = flops·pf + allreduce·comm;
    c = attention·pa. decode (memory-bound, small batches): a = weights·dw + layers·layer +
    allreduces·ar; b = kv·dkv; c = flops·dcs. Large batches (compute-bound): c = flops·dcl and
    a without the weight read; the threshold is where the two lines cross.
    """

    pw: float
    pf: float
    pa: float
    p_layer: float
    p_ar: float
    p_comm: float
    dw: float
    dkv: float
    dcs: float
    dcl: float
    d_layer: float
    d_ar: float


def entry_for(facts: Facts, gpu: GpuProduct, tensor: int, cal: Calibration) -> ProfileEntry:
    t = terms(facts, gpu, tensor)
    fixed_p = t.layers * cal.p_layer + t.allreduces * cal.p_ar
    fixed_d = t.layers * cal.d_layer + t.allreduces * cal.d_ar
    small = Coefficients(
        a=t.weights_read_ms * cal.dw + fixed_d, b=t.kv_read_per_token_ms * cal.dkv, c=t.flops_per_token_ms * cal.dcs
    )
    large = Coefficients(a=fixed_d, b=small.b, c=t.flops_per_token_ms * cal.dcl)
    extra_per_seq = large.c - small.c
    threshold = int(min(max(small.a - large.a, 0) / extra_per_seq, 4096)) + 1 if extra_per_seq > 0 else 4096
    return ProfileEntry(
        tensor=tensor,
        pipeline=1,
        prefill=Coefficients(
            a=t.weights_read_ms * cal.pw + fixed_p,
            b=t.flops_per_token_ms * cal.pf + t.allreduce_per_token_ms * cal.p_comm,
            c=t.attention_per_token_sq_ms * cal.pa,
        ),
        decode_small=small,
        decode_large=large,
        decode_batch_threshold=max(1, threshold),
    )


def estimated_profile(
    model: str,
    facts: Facts,
    gpu_label: str,
    gpu: GpuProduct,
    *,
    tensor_sizes: tuple[int, ...] = TENSOR_SIZES,
    cal: Calibration | None = None,
) -> LatencyProfile:
    """A roofline profile for `model` on `gpu`, tensor sizes that divide the heads only."""
    cal = cal or calibration()
    sizes = [t for t in tensor_sizes if facts.attention_heads % t == 0 and facts.kv_heads % t == 0]
    return LatencyProfile(
        model=model,
        gpu=gpu_label,
        source=f"{ESTIMATED_SOURCE}: {gpu.name} data-sheet peaks x efficiency calibrated on the measured "
        "A100 OPT-13B/66B profiles; replace it with `disaggserve-worker profile` output",
        model_facts=ProfileFacts(
            layers=facts.layers,
            attention_heads=facts.attention_heads,
            kv_heads=facts.kv_heads,
            hidden_size=facts.hidden_size,
            parameters=facts.parameters,
            dtype_bytes=facts.dtype_bytes,
        ),
        entries=[entry_for(facts, gpu, t, cal) for t in sizes],
    )


def is_estimated(profile: LatencyProfile) -> bool:
    return profile.source.startswith(ESTIMATED_SOURCE)


# ---- calibration -----------------------------------------------------------------------------


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x ≥ 0 (active set: drop the most negative column until none is)."""
    active = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return x


def measured_samples(profile: LatencyProfile, tensor: int) -> tuple[list[float], list[tuple[int, float]]]:
    """A measured entry's prefill times on PREFILL_LENGTHS and decode (batch, time) on
    DECODE_BATCHES — the points the fit and the bench use."""
    from disaggserve.planner.profile import phase_latency

    lat = phase_latency(profile, tensor, 1)
    assert lat is not None
    prefill = [lat.prefill_ms(n, n * n) for n in PREFILL_LENGTHS]
    decode = [(b, lat.decode_step_ms(b, b * DECODE_CONTEXT)) for b in DECODE_BATCHES]
    return prefill, decode


def _calibration_rows(profiles: tuple[tuple[str, str], ...]) -> tuple[list, list, list, list, list, list]:
    from disaggserve.planner.profile import builtin_profiles

    pre_x, pre_y, small_x, small_y, large_x, large_y = [], [], [], [], [], []
    for stem, product in profiles:
        prof = builtin_profiles()[stem]
        assert prof.model_facts is not None
        facts = prof.model_facts.to_facts()
        gpu = GPU_PRODUCTS[product]
        for e in prof.entries:
            t = terms(facts, gpu, e.tensor)
            prefill, decode = measured_samples(prof, e.tensor)
            for n, ms in zip(PREFILL_LENGTHS, prefill, strict=True):
                pre_x.append(
                    [
                        t.weights_read_ms,
                        t.flops_per_token_ms * n,
                        t.attention_per_token_sq_ms * n * n,
                        t.layers,
                        t.allreduces,
                        t.allreduce_per_token_ms * n,
                    ]
                )
                pre_y.append(ms)
            for b, ms in decode:
                row_fixed = [t.layers, t.allreduces]
                if b < e.decode_batch_threshold:
                    small_x.append(
                        [
                            t.weights_read_ms,
                            t.kv_read_per_token_ms * b * DECODE_CONTEXT,
                            t.flops_per_token_ms * b,
                            *row_fixed,
                        ]
                    )
                    small_y.append(ms)
                else:
                    large_x.append([t.kv_read_per_token_ms * b * DECODE_CONTEXT, t.flops_per_token_ms * b, *row_fixed])
                    large_y.append(ms)
    return pre_x, pre_y, small_x, small_y, large_x, large_y


def _relative_fit(x: list, y: list) -> np.ndarray:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return _nnls(a / b[:, None], np.ones_like(b))


@lru_cache(maxsize=1)
def calibration() -> Calibration:
    """The factors fitted on all the measured A100 profiles (what estimates use)."""
    return fit_calibration(CALIBRATION_PROFILES)


def fit_calibration(profiles: tuple[tuple[str, str], ...]) -> Calibration:
    """Fit the efficiency factors to measured built-in profiles (relative error, x ≥ 0);
    `profiles` are (built-in stem, GPU product) pairs (the bench also fits leave-one-out).

    Decode's fixed costs come from the memory-bound fit (many more samples there); the
    compute-bound fit then only sets the per-sequence cost above the knee.
    """
    pre_x, pre_y, small_x, small_y, large_x, large_y = _calibration_rows(profiles)
    pw, pf, pa, p_layer, p_ar, p_comm = _relative_fit(pre_x, pre_y)
    dw, dkv, dcs, d_layer, d_ar = _relative_fit(small_x, small_y)
    # Large batches: subtract the already-fitted fixed and KV terms, fit the per-sequence factor.
    lx, ly = np.asarray(large_x, dtype=float), np.asarray(large_y, dtype=float)
    rest = ly - lx[:, 0] * dkv - lx[:, 2] * d_layer - lx[:, 3] * d_ar
    dcl = float(_nnls((lx[:, 1] / ly)[:, None], rest / ly)[0]) if len(ly) else dcs
    return Calibration(
        pw=float(pw),
        pf=float(pf),
        pa=float(pa),
        p_layer=float(p_layer),
        p_ar=float(p_ar),
        p_comm=float(p_comm),
        dw=float(dw),
        dkv=float(dkv),
        dcs=float(dcs),
        dcl=max(float(dcl), float(dcs)),
        d_layer=float(d_layer),
        d_ar=float(d_ar),
    )
