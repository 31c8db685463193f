"""The matmul of every TP linear layer's inference forward (rollouts, logprob passes without autograd).

One function on purpose: FP8 rollouts on Hopper (quantised weights, scaled matmuls) replace this and
nothing else. Training forwards keep megatron-core's autograd path (gradient accumulation, async
all-reduce of input grads).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T + bias -> [..., out]."""
    return F.linear(x, weight, bias)
