"""Preallocated KV cache for the rollout engine, and the operations on it.

Per layer, K and V are `[num_slots, max_seq_len, kv_heads_local, head_dim]` tensors allocated once
(shapes never change, so decode steps can be captured in CUDA graphs). A request owns a slot; the
engine tracks how many tokens each slot holds (`start`) and passes a `CacheBatch` to the model, which
writes the new keys/values at `start[b] + i` and attends over the first `kv_len` positions.

    cache = KVCache.for_model(cfg, tp_size=1, num_slots=8, max_seq_len=512, dtype=torch.float32, device="cpu")
    logits = model(tokens, cache=CacheBatch(cache, slots, start, kv_len=int((start + S).max())))

Besides the model's own writes, two in-place operations move cached entries between positions, every
layer at once and without a host sync: `copy_prefix` (the samples of a prompt share one prefill) and
`compact` (speculative decoding keeps the accepted entries of a verify forward, see
`rollout/spec/tree.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tlt.config.schema import ModelConfig


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        shape = (num_slots, max_seq_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.max_seq_len = num_slots, max_seq_len

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, tp_size: int, max_seq_len: int, dtype: torch.dtype, num_layers: Optional[int] = None) -> int:
        layers = cfg.num_layers if num_layers is None else num_layers
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * layers * max_seq_len * (cfg.num_kv_heads // tp_size) * cfg.head_dim * elem

    @classmethod
    def for_model(cls, cfg: ModelConfig, tp_size: int, num_slots: int, max_seq_len: int, dtype: torch.dtype, device, num_layers: Optional[int] = None) -> "KVCache":
        layers = cfg.num_layers if num_layers is None else num_layers
        return cls(layers, num_slots, max_seq_len, cfg.num_kv_heads // tp_size, cfg.head_dim, dtype, device)

    @classmethod
    def from_memory_budget(cls, cfg: ModelConfig, tp_size: int, budget_bytes: int, max_seq_len: int, dtype: torch.dtype, device, num_layers: Optional[int] = None, extra_slots: int = 0) -> "KVCache":
        """As many slots of `max_seq_len` tokens as fit in `budget_bytes` (at least one, else an error), plus
        `extra_slots` outside the budget (the rollout engine's padding slot for CUDA graphs)."""
        per_slot = cls.bytes_per_slot(cfg, tp_size, max_seq_len, dtype, num_layers)
        slots = budget_bytes // per_slot
        if slots < 1:
            raise ValueError(f"KV cache budget {budget_bytes} B is below one slot of {max_seq_len} tokens ({per_slot} B)")
        return cls.for_model(cfg, tp_size, slots + extra_slots, max_seq_len, dtype, device, num_layers)

    def copy_prefix(self, src: torch.Tensor, dst: torch.Tensor, num_tokens: int) -> None:
        """Copy the first `num_tokens` cached positions of slots src [M] into slots dst [M], every layer."""
        for k, v in zip(self.k, self.v):  # each [num_slots, max_seq_len, Hkv, D]
            k[dst, :num_tokens] = k[src, :num_tokens]
            v[dst, :num_tokens] = v[src, :num_tokens]

    def compact(self, slots: torch.Tensor, start: torch.Tensor, keep_index: torch.Tensor) -> None:
        """Move kept entries written after `start` to contiguous positions, every layer, in place.

        slots, start: [B] as in the CacheBatch of the forward that wrote them; keep_index: [B, K] offsets
        after start to keep, in order (a verify forward's root and accepted path: `kv_keep_index`).
        Entry start + j <- entry start + keep_index[:, j]. Sources are gathered before anything is
        written, so overlaps are safe.
        """
        offsets = torch.arange(keep_index.shape[1], device=start.device)  # [K]
        dst = start.unsqueeze(1) + offsets  # [B, K]
        src = start.unsqueeze(1) + keep_index  # [B, K]
        row = slots.unsqueeze(1).expand_as(dst)  # [B, K]
        for buf in (*self.k, *self.v):  # each [num_slots, max_seq_len, Hkv, D]
            buf[row, dst] = buf[row, src]


@dataclass
class CacheBatch:
    """What one forward over the cache needs: which slots, where new tokens go, what they may see."""

    cache: KVCache
    slots: torch.Tensor  # [B] int64 slot of each row
    start: torch.Tensor  # [B] int64 tokens already committed in each slot (write offset of the new tokens)
    kv_len: int  # host int >= max(start + S): how much of the cache to read
    # [B, S, E+S] bool: among the E entries before start (E = 0 usually) and the new tokens; None = causal.
    # See `ops.attention.cache_attention_mask`.
    new_mask: Optional[torch.Tensor] = None
    invariant: bool = False  # attention per query (`ops.attention.cached_attention`): logits independent of the call's shapes

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new/v_new: [B, S, Hkv, D] -> cached rows [B, kv_len, Hkv, D] including them."""
        num_new = k_new.shape[1]
        pos = self.start.unsqueeze(1) + torch.arange(num_new, device=self.start.device)  # [B, S]
        rows = self.slots.unsqueeze(1).expand_as(pos)
        self.cache.k[layer][rows, pos] = k_new.to(self.cache.k[layer].dtype)
        self.cache.v[layer][rows, pos] = v_new.to(self.cache.v[layer].dtype)
        return self.cache.k[layer][self.slots, : self.kv_len], self.cache.v[layer][self.slots, : self.kv_len]
