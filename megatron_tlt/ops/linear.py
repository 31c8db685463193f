"""The matmul of every TP linear layer's inference forward (rollouts, logprob passes without autograd).

One function on purpose: FP8 rollouts (`rollout.precision=fp8`) enter here and nothing else changes. A layer
whose `fp8` attribute holds an `ops.fp8.Fp8Weight` (set only while the rollout engine runs, see
`rollout.fp8.Fp8Weights`) multiplies by it through its GEMM path; otherwise the layer's own weight is used.
Training forwards keep megatron-core's autograd path (gradient accumulation, async all-reduce of input
grads) in high precision.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tlt.ops.fp8 import Fp8Weight, fp8_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, fp8: Optional[Fp8Weight] = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T + bias -> [..., out]; with `fp8`, its FP8 weight instead of `weight`."""
    if fp8 is not None:
        return fp8_linear(x, fp8, bias)
    return F.linear(x, weight, bias)
