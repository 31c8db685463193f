"""The matmul of every TP linear layer's inference forward (rollouts, logprob passes without autograd).

One function on purpose: FP8 rollouts (`rollout.precision=fp8`) enter here and nothing else changes. A layer
whose `fp8` attribute holds an `ops.fp8.Fp8Weight` (set only while the rollout engine runs, see
`rollout.fp8.Fp8Weights`) multiplies by it through its GEMM path; otherwise the layer's own weight is used.
Training forwards keep megatron-core's autograd path (gradient accumulation, async all-reduce of input
grads) in high precision.

Inside `batch_invariant()` (the rollout engine's `batch_invariant=True`) a linear multiplies in float64 and
rounds to its input's dtype: a GEMM kernel picks its blocking by the call's shape, so a row's result can change
in the last bit with the rows beside it (seen in bf16 on an AMX Xeon: a decode row differed between 16 live
rows and 1); in float64 the sum of a row's products is exact or off by far less than a bf16 / fp32 rounding
step, so the rounded result no longer depends on the call's shape.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from megatron_tlt.ops.fp8 import Fp8Weight, fp8_linear


_batch_invariant = False  # set by `batch_invariant()`


@contextlib.contextmanager
def batch_invariant() -> Iterator[None]:
    """Within: every `linear` (not an FP8 one) computes in float64, so its rows do not depend on the call's shape."""
    global _batch_invariant
    before, _batch_invariant = _batch_invariant, True
    try:
        yield
    finally:
        _batch_invariant = before


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, fp8: Optional[Fp8Weight] = None) -> torch.Tensor:
    """x [..., in] @ weight[out, in].T + bias -> [..., out]; with `fp8`, its FP8 weight instead of `weight`."""
    if fp8 is not None:
        return fp8_linear(x, fp8, bias)
    if _batch_invariant:
        return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).to(x.dtype)
    return F.linear(x, weight, bias)
