"""Gradient collectives shared by the policy trainer, the warm-up and the drafter trainer.

Norms are of the full (unsharded) model: TP-sharded gradients are summed over the TP group, replicated
ones (identical on every TP rank) counted once, pipeline stages summed over the PP group (a tied model's
LM-head copy on the last stage counted once, on the first). Everything stays on the gradients' device.

    reduce_grads_(model, ps)                            # sum over DP replicas; tied embedding over its two stages
    norm = global_grad_norm(params, tp_group, pp_group) # 0-dim fp32 tensor
    clip_grads_(params, max_norm=1.0, grad_norm=norm)
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_tlt.parallel.sharding import partition_dim


def global_grad_norm(params: Iterable[torch.nn.Parameter], tp_group, pp_group=None) -> torch.Tensor:
    """L2 norm of the gradients of the full model (0-dim fp32 on the gradients' device). With `pp_group` (a group
    of more than one stage) every stage must call it."""
    params = [p for p in params if p.grad is not None and not getattr(p, "shared_embedding_copy", False)]
    device = params[0].grad.device if params else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros_like(sharded)
    for p in params:
        sq = p.grad.float().pow(2).sum()
        if partition_dim(p) is None:
            replicated += sq
        else:
            sharded += sq
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    total = sharded + replicated
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def reduce_grads_(model: torch.nn.Module, ps) -> None:
    """Gradients summed over the DP replicas, and a tied embedding's over its first- and last-stage copies
    (megatron-core's embedding group), so the copies take identical steps."""
    all_reduce_grads_(model.parameters(), ps.dp_group)
    embed = getattr(model, "embed_tokens", None)
    if ps.pp_size > 1 and model.cfg.tie_word_embeddings and embed is not None and embed.weight.grad is not None:
        dist.all_reduce(embed.weight.grad, group=ps.embedding_group)


def clip_grads_(params: Iterable[torch.nn.Parameter], max_norm: float, grad_norm: torch.Tensor) -> None:
    """Scale the gradients so that their global norm is at most max_norm (max_norm <= 0: no clipping)."""
    if max_norm <= 0:
        return
    factor = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor.to(p.grad.device))


def all_reduce_grads_(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup]) -> None:
    """Sum gradients over `group` in one flat buffer per dtype (no-op for None or a group of one). A trainable
    parameter without a gradient here takes part as zeros."""
    if group is None or dist.get_world_size(group) == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None and p.requires_grad:  # unused on this rank (e.g. a replica with no micro-batch): zeros,
            p.grad = torch.zeros_like(p)        # so every rank reduces the same buffer
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
