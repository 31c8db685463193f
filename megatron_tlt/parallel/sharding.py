"""Full (unsharded) tensors <-> this rank's TP shards, read off megatron-core's parameter attributes.

megatron-core marks every TP-sharded parameter with `tensor_model_parallel=True` and `partition_dim`;
everything else is replicated. Vocab rows are padded to `cfg.padded_vocab_size` (a TP-independent
multiple), so a full tensor has the same shape at every TP degree and resharding is a plain split.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn


def partition_dim(param: torch.Tensor) -> Optional[int]:
    """The dimension a parameter is split along across TP ranks, or None if replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _tp_rank_size(group) -> tuple[int, int]:
    if group is None or dist.get_world_size(group) == 1:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    d = partition_dim(param)
    if d is not None:
        shape[d] *= tp_size
    return tuple(shape)


def shard_of(full: torch.Tensor, param: torch.Tensor, tp_group) -> torch.Tensor:
    """This rank's slice of `full` for `param` (a view; no copy)."""
    rank, size = _tp_rank_size(tp_group)
    d = partition_dim(param)
    if d is None or size == 1:
        return full
    return full.chunk(size, dim=d)[rank]


def named_shard_specs(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, Optional[int]]]:
    """(name, local parameter, partition dim or None) for every parameter."""
    for name, p in model.named_parameters():
        yield name, p, partition_dim(p)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], tp_group=None, strict: bool = True) -> None:
    """Copy full tensors into a (possibly TP-sharded) model; shape mismatches name the tensor."""
    _, size = _tp_rank_size(tp_group)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in full]
    unexpected = [n for n in full if n not in params]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, p in params.items():
        if name not in full:
            continue
        t = full[name]
        want = full_shape(p, size)
        if tuple(t.shape) != want:
            raise ValueError(f"tensor '{name}' has shape {tuple(t.shape)}, but the model config expects {want}")
        p.copy_(shard_of(t, p, tp_group))


@torch.no_grad()
def gather_full(p: torch.Tensor, tp_group=None) -> torch.Tensor:
    """The full tensor of parameter `p` on every TP rank (an all-gather if it is sharded; `p` itself otherwise)."""
    _, size = _tp_rank_size(tp_group)
    d = partition_dim(p)
    if d is None or size == 1:
        return p.detach()
    parts = [torch.empty_like(p) for _ in range(size)]
    dist.all_gather(parts, p.detach().contiguous(), group=tp_group)
    return torch.cat(parts, dim=d)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, tp_group=None) -> dict[str, torch.Tensor]:
    """Full tensors on every TP rank (all-gather of the sharded ones); for tests and small exports."""
    return {name: gather_full(p, tp_group).clone() for name, p in model.named_parameters()}
