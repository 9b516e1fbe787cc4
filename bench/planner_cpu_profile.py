"""Measure the built-in CPU profile of the tiny Llama models (data/profiles/*-cpu.json).

Why this exists: the planner needs a latency profile for `builtin:` CPU models, and the
worker's own `disaggserve-worker profile` lives on another branch. This script times a plain
torch Llama block stack with the built-in models' dimensions (hidden, layers, heads, KV heads,
MLP width, 512-token vocabulary, fp32, one thread as a worker pod on a shared CPU gets) and fits
DistServe's iteration model by least squares on relative error. Replace its output with the
worker's `profile` output when that is merged: the engine's real overheads differ.

Run: `.venv/bin/python bench/planner_cpu_profile.py` (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parents[1] / "operator" / "disaggserve" / "data" / "profiles"
VOCAB = 512
MODELS = {
    # hidden, MLP width, layers, heads, KV heads: the worker's built-in configurations.
    "tiny-llama": (128, 344, 4, 4, 2),
    "small-llama": (256, 688, 6, 8, 4),
}


class Block(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, hidden // heads
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * self.dim, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.up = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.n1 = torch.nn.RMSNorm(hidden)
        self.n2 = torch.nn.RMSNorm(hidden)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split(
            [self.heads * self.dim, self.kv_heads * self.dim, self.kv_heads * self.dim], dim=-1
        )
        q = q.view(b, t, self.heads, self.dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.dim).transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Tiny(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, layers: int, heads: int, kv_heads: int):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.blocks = torch.nn.ModuleList(Block(hidden, inter, heads, kv_heads) for _ in range(layers))
        self.head = torch.nn.Linear(hidden, VOCAB, bias=False)
        self.kv_heads, self.dim = kv_heads, hidden // heads

    def step(self, tokens: torch.Tensor, ctx: int) -> torch.Tensor:
        x = self.embed(tokens)
        b = tokens.shape[0]
        for blk in self.blocks:
            past = None
            if ctx:
                past = (
                    torch.randn(b, self.kv_heads, ctx, self.dim),
                    torch.randn(b, self.kv_heads, ctx, self.dim),
                )
            x = blk(x, past)
        return self.head(x[:, -1])


def timed(fn, repeats: int = 5) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return float(np.median(samples))


def fit(features: np.ndarray, times: np.ndarray) -> dict[str, float]:
    """Least squares on relative error (rows divided by the measured time), coefficients ≥ 0."""
    w = 1 / times
    coef, *_ = np.linalg.lstsq(features * w[:, None], np.ones_like(times), rcond=None)
    coef = np.maximum(coef, 0.0)
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2])}


def measure(name: str) -> dict:
    hidden, inter, layers, heads, kv_heads = MODELS[name]
    torch.manual_seed(0)
    model = Tiny(hidden, inter, layers, heads, kv_heads).eval()
    with torch.inference_mode():
        pre_f, pre_t = [], []
        for batch, length in [
            (1, 16),
            (1, 64),
            (1, 128),
            (1, 256),
            (1, 512),
            (2, 256),
            (4, 128),
            (4, 256),
            (8, 64),
        ]:
            tokens = torch.randint(0, VOCAB, (batch, length))
            pre_f.append([1, batch * length, batch * length * length])
            pre_t.append(timed(lambda tokens=tokens, length=length: model.step(tokens, 0)))
        dec = {True: ([], []), False: ([], [])}
        threshold = 16
        for batch in (1, 2, 4, 8, 16, 32, 64):
            for ctx in (32, 256, 1024):
                tokens = torch.randint(0, VOCAB, (batch, 1))
                ms = timed(lambda tokens=tokens, ctx=ctx: model.step(tokens, ctx))
                f, t = dec[batch < threshold]
                f.append([1, batch * ctx, batch])
                t.append(ms)
    params = sum(p.numel() for p in model.parameters())
    pre = fit(np.array(pre_f, float), np.array(pre_t))
    return {
        "model": name,
        "gpu": "cpu",
        "dtype": "float32",
        "model_aliases": [f"builtin:{name}"],
        "source": "bench/planner_cpu_profile.py: plain-torch stand-in with the built-in model's dimensions, "
        f"one thread, fp32, measured {time.strftime('%Y-%m-%d')}; rough, replace with "
        "`disaggserve-worker profile` output",
        "model_facts": {
            "layers": layers,
            "attention_heads": heads,
            "kv_heads": kv_heads,
            "hidden_size": hidden,
            "parameters": int(params),
            "dtype_bytes": 4,
        },
        "stage_overhead_ms": 0.05,
        "entries": [
            {
                "tensor": 1,
                "pipeline": 1,
                "prefill": pre,
                "decode_small": fit(np.array(dec[True][0], float), np.array(dec[True][1])),
                "decode_large": fit(np.array(dec[False][0], float), np.array(dec[False][1])),
                "decode_batch_threshold": threshold,
            }
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT,
                        help=f"where the profiles go (default {OUT}: the shipped built-in profiles)")
    out_dir = parser.parse_args().out_dir
    torch.set_num_threads(1)
    for name in MODELS:
        prof = measure(name)
        (out_dir / f"{name}-cpu.json").write_text(json.dumps(prof, indent=1) + "\n")
        print(name, json.dumps(prof["entries"][0]))


if __name__ == "__main__":
    main()
