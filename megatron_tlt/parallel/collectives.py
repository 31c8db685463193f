"""Small host-value reductions over a process group (metrics, counts), one collective each.

    total_correct, total = sum_over(group, [correct, count], device)
    slowest = max_over(group, [rollout_s], device)[0]
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def _reduce(group, values: Sequence[float], device, op) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def sum_over(group, values: Sequence[float], device="cpu") -> list[float]:
    """Elementwise sums of `values` over the ranks of `group` (float64)."""
    return _reduce(group, values, device, dist.ReduceOp.SUM)


def max_over(group, values: Sequence[float], device="cpu") -> list[float]:
    """Elementwise maxima of `values` over the ranks of `group` (float64)."""
    return _reduce(group, values, device, dist.ReduceOp.MAX)
