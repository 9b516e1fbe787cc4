"""Rotary position embeddings, including the scaling variants found in released configs.

The formulas follow the published methods (and match `transformers`' implementations so
logits agree): linear interpolation, dynamic NTK, Llama 3's wavelength-banded scaling and
YaRN. Cos/sin rows are looked up for exactly the positions in a batch, so ragged batches and
cached decoding share one code path.
"""

from __future__ import annotations

import math

import torch

from disaggserve_worker.model.config import ModelConfig, RopeScaling


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, s: RopeScaling, max_pos: int) -> torch.Tensor:
    old_len = s.original_max_position_embeddings or max_pos
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, s: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    original = s.original_max_position_embeddings or max_pos
    factor = s.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


class Rotary:
    """Cos/sin tables for arbitrary position tensors, cached per device."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.dim = config.dim_per_head
        self.scaling = config.rope_scaling or RopeScaling()
        base, s = config.rope_theta, self.scaling
        self.attention_factor = 1.0
        if s.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn(base, self.dim, s, config.max_position_embeddings)
        else:
            inv_freq = _base_inv_freq(base, self.dim)
            if s.rope_type == "linear":
                inv_freq = inv_freq / s.factor
            elif s.rope_type == "llama3":
                inv_freq = _llama3(inv_freq, s, config.max_position_embeddings)
        self.inv_freq = inv_freq
        self._device_cache: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        if self.scaling.rope_type == "dynamic":
            # Dynamic NTK grows the base once a sequence passes the trained length.
            seq_len = max(int(positions.max().item()) + 1, self.config.max_position_embeddings)
            factor, max_pos = self.scaling.factor, self.config.max_position_embeddings
            base = self.config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (
                self.dim / (self.dim - 2))
            return _base_inv_freq(base, self.dim).to(positions.device)
        cached = self._device_cache.get(positions.device)
        if cached is None:
            cached = self._device_cache[positions.device] = self.inv_freq.to(positions.device)
        return cached

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables shaped like `positions` + (head_dim,), computed in fp32 then cast. `limit`: a
        bound on the positions (max + 1) where the caller knows it, which saves a read-back.

        Rows come from a per-device table of positions 0..n-1, grown by doubling: computing them
        per step took nine ops, ~55 us of a 2.2 ms decode step of small-llama at batch 1 (vLLM
        keeps such a table too). Dynamic NTK's frequencies depend on the longest position in the
        batch, so that variant still computes its rows per step."""
        if self.scaling.rope_type == "dynamic":
            return self._compute(positions, self._inv_freq_for(positions), dtype)
        if limit is None:
            limit = int(positions.max().item()) + 1 if positions.numel() else 0
        key = (positions.device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < limit:
            size = max(256, 1 << max(limit - 1, 1).bit_length())
            table = self._tables[key] = self._compute(
                torch.arange(size, device=positions.device), self._inv_freq_for(positions), dtype)
        if positions.dim() == 1:
            return table[0].index_select(0, positions), table[1].index_select(0, positions)
        flat = positions.reshape(-1)
        return (table[0].index_select(0, flat).view(*positions.shape, -1),
                table[1].index_select(0, flat).view(*positions.shape, -1))

    def _compute(self, positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
