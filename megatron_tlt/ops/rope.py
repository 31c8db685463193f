"""Rotary position embeddings (half-split layout, as in Llama/Qwen), with Llama-3 frequency scaling.

Positions are explicit tensors (packed input restarts them per example; the KV-cache path and tree
drafts pass their own), so cos/sin are computed from `position_ids` on the fly from cached inverse
frequencies: no table sized by the context window.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_tlt.config.schema import RopeScalingConfig


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScalingConfig] = None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, Llama-3-scaled when `scaling` is given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        mid = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, torch.where(wavelen < high_wavelen, inv_freq, mid))
    return inv_freq.float()


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: [...] -> cos, sin: [..., head_dim] in `dtype` (computed in fp32)."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)  # [..., D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [..., D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., S, heads, D]; cos/sin: [..., S, D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
