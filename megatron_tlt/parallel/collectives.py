"""Small reductions over a process group (metrics, counts, loss normalisers), one collective each, returned on
the host. The values travel as a float64 tensor on `device`: the ranks' device (`ParallelState.device`), since
an NCCL group reduces CUDA tensors only.

    total_correct, total = sum_over(group, [correct, count], ps.device)      # -> list of floats
    slowest = max_over(group, [rollout_s], ps.device)[0]
    norms = sum_over(group, norms_tensor, ps.device)                          # a CPU tensor in -> a CPU tensor out
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist


def _reduce(group, values: Union[Sequence[float], torch.Tensor], device, op):
    is_tensor = torch.is_tensor(values)
    t = values.to(device=device, dtype=torch.float64) if is_tensor else torch.tensor(list(values), dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t.cpu() if is_tensor else t.tolist()


def sum_over(group, values: Union[Sequence[float], torch.Tensor], device):
    """Elementwise sums of `values` over the ranks of `group` (float64; a list for a list, a CPU tensor for a tensor)."""
    return _reduce(group, values, device, dist.ReduceOp.SUM)


def max_over(group, values: Union[Sequence[float], torch.Tensor], device):
    """Elementwise maxima of `values` over the ranks of `group` (float64; a list for a list, a CPU tensor for a tensor)."""
    return _reduce(group, values, device, dist.ReduceOp.MAX)
