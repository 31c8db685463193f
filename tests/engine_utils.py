"""Helpers shared by the rollout-engine tests: an engine with a given number of KV slots, a forward-call
recorder, and token extraction."""
from __future__ import annotations

import torch

from megatron_tlt.models.kv_cache import KVCache
from megatron_tlt.rollout import RolloutEngine


def make_engine(model, num_slots: int, max_seq_len: int, **kw) -> RolloutEngine:
    per_slot = KVCache.bytes_per_slot(model.cfg, 1, max_seq_len, torch.float32)
    return RolloutEngine(model, max_seq_len=max_seq_len, cache_budget_bytes=num_slots * per_slot + 1, **kw)


def record_forward_shapes(model, monkeypatch) -> list[tuple[int, int]]:
    """Wrap model.hidden_states (every model call of the engine); returns the list it appends each call's
    tokens shape [B, S] to."""
    shapes, hidden_states = [], model.hidden_states

    def wrapped(tokens=None, **kw):
        shapes.append(tuple(tokens.shape))
        return hidden_states(tokens, **kw)

    monkeypatch.setattr(model, "hidden_states", wrapped)
    return shapes


def tokens_of(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in samples] for samples in results]
