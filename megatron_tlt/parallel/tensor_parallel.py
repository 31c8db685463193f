"""Tensor-parallel layers: megatron-core's column / row linears and vocab embedding, built through one factory.

`TPLayers(cfg, tp_group, init_weights)` is what a model asks for its layers; it knows the TP group (always
passed in, never taken from a global), the megatron-core `ModelParallelConfig`, the init methods and the
dtype. Every linear is built by `TPLayers.linear`, the one seam where an FP8 / Transformer Engine path can
replace the layers. Without autograd (rollouts, no-grad logprob passes) `ColumnLinear` / `RowLinear` are one
`ops.linear.linear` on the local shard (+ the all-reduce of a row-parallel layer), skipping megatron's
per-call autograd Function (about a fifth of a small model's decode step on CPU); with an FP8 rollout weight
attached (`fp8`, by `rollout.fp8.Fp8Weights` while the engine runs) that matmul is the FP8 one.

Sequence parallelism (`TPLayers(..., sequence_parallel=True)`, TP > 1): megatron-core's linears built with
`ModelParallelConfig(sequence_parallel=True)` take input sharded along dim 0 (the sequence) over the TP group,
all-gather it before a column-parallel matmul and reduce-scatter after a row-parallel one; every autograd-on
call takes that path (the model shards the sequence whenever autograd is on), calls without autograd keep the
fast path above on the full sequence. `scatter_to_sp_region` / `gather_from_sp_region` enter and leave the
sharded region. megatron-core allocates these collectives' buffers on CUDA (`torch.cuda.current_device()`), so
off CUDA the same collectives run through the small autograd Functions below, on the tensor's own device
(`all_gather_single` / `reduce_scatter_single`, torch's current names for all_gather_into_tensor /
reduce_scatter_tensor, which gloo implements).

    tp = TPLayers(cfg, tp_group, init_weights=True)
    q_proj = tp.linear(H, heads * D, parallel="column", bias=cfg.qkv_bias)   # output sharded over TP
    o_proj = tp.linear(heads * D, H, parallel="row")                         # input sharded, output all-reduced
    y = q_proj(x)[0]                                                          # megatron's (output, bias) pair
    logits = gather_last_dim(local_logits, tp_group)                          # [..., V_local] -> [..., V]
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron_tlt.config.dtypes import TORCH_DTYPES
from megatron_tlt.config.schema import ModelConfig
from megatron_tlt.ops.fp8 import Fp8Weight
from megatron_tlt.ops.linear import linear

copy_to_tp_region = tensor_parallel.copy_to_tensor_model_parallel_region  # identity forward, all-reduce backward
scatter_to_tp_region = tensor_parallel.scatter_to_tensor_model_parallel_region  # keep this rank's last-dim slice


class _GatherLastDim(torch.autograd.Function):
    """All-gather TP shards along the last dim on any device (megatron-core's gather allocates on CUDA).
    Backward keeps this rank's slice, as megatron-core's does: what consumes the output is replicated."""

    @staticmethod
    def forward(ctx, x, group):
        # x: [..., V_local] -> [..., V_local * tp_size]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        # grad: [..., V_local * tp_size] -> [..., V_local]
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=-1)[rank].contiguous(), None


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """x [..., V_local] on each TP rank -> [..., V_local * tp_size] on every rank (differentiable)."""
    return _GatherLastDim.apply(x, group) if dist.get_world_size(group) > 1 else x


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _slice_dim0(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group))[dist.get_rank(group)].contiguous()


class _SequenceGather(torch.autograd.Function):
    """[S / tp, ...] -> [S, ...] (all-gather along dim 0). Backward: the reduce-scatter of the gradient when
    what consumes the output is TP-sharded (a column-parallel matmul), this rank's slice when it is replicated;
    megatron-core's `gather_from_sequence_parallel_region` off CUDA."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_reduce_scatter_dim0 if ctx.reduce_grad else _slice_dim0)(grad, ctx.group), None, None


class _SequenceReduceScatter(torch.autograd.Function):
    """[S, ...] partial sums -> [S / tp, ...] summed over TP; backward all-gathers (megatron-core's
    `reduce_scatter_to_sequence_parallel_region` off CUDA)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


class _SequenceScatter(torch.autograd.Function):
    """[S, ...] the same on every TP rank -> this rank's [S / tp, ...]; backward all-gathers (megatron-core's
    `scatter_to_sequence_parallel_region` off CUDA)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


def scatter_to_sp_region(x: torch.Tensor, group) -> torch.Tensor:
    """x [S, ...] (the same on every TP rank, S divisible by tp) -> this rank's [S / tp, ...] (differentiable)."""
    if x.is_cuda:
        return tensor_parallel.scatter_to_sequence_parallel_region(x, group=group)
    return _SequenceScatter.apply(x, group)


def gather_from_sp_region(x: torch.Tensor, group) -> torch.Tensor:
    """x [S / tp, ...] on each TP rank -> [S, ...] on every rank (differentiable; what consumes the output is
    replicated over TP, so backward keeps this rank's slice of its gradient)."""
    if x.is_cuda:
        return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
    return _SequenceGather.apply(x, group, False)


def _needs_autograd(module: nn.Module, x: torch.Tensor) -> bool:
    """megatron-core's autograd path, not the fast path; always with autograd on under sequence parallelism,
    where the model's input is then sharded along the sequence (frozen weights included)."""
    return torch.is_grad_enabled() and (module.sequence_parallel or x.requires_grad or module.weight.requires_grad)


class ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear (output sharded over TP), with the inference fast path."""

    fp8: Optional[Fp8Weight] = None  # the FP8 rollout weight of this shard while the rollout engine runs (rollout.fp8)

    def forward(self, x: torch.Tensor):
        if not _needs_autograd(self, x):
            return linear(x, self.weight, self.bias, self.fp8), None
        if self.sequence_parallel and not x.is_cuda:
            return F.linear(_SequenceGather.apply(x, self.tp_group, True), self.weight, self.bias), None
        return super().forward(x)


class RowLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear (input sharded, output all-reduced over TP, or reduce-scattered
    along the sequence under sequence parallelism), with the inference fast path."""

    fp8: Optional[Fp8Weight] = None  # as ColumnLinear.fp8

    def forward(self, x: torch.Tensor):
        if _needs_autograd(self, x):
            if self.sequence_parallel and not x.is_cuda:
                return _SequenceReduceScatter.apply(F.linear(x, self.weight), self.tp_group), None  # no bias: see TPLayers.linear
            return super().forward(x)
        y = linear(x, self.weight, fp8=self.fp8)
        if dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(y, group=self.tp_group)
        return (y if self.bias is None else y + self.bias), None


class TPLayers:
    """Builds a model's TP layers: megatron config, init methods, dtype and the (explicit) TP group."""

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup, init_weights: bool, sequence_parallel: bool = False):
        if tp_group is None:
            raise ValueError("a TP group is required (e.g. init_parallel(...).tp_group)")
        self.cfg = cfg
        self.tp_group = tp_group
        self.tp_size = dist.get_world_size(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.dtype = TORCH_DTYPES[cfg.params_dtype]
        self.mp_config = ModelParallelConfig(
            tensor_model_parallel_size=self.tp_size,
            sequence_parallel=self.sequence_parallel,
            use_cpu_initialization=True,  # the full weight is initialised then split: same weights at any TP
            perform_initialization=init_weights,
            params_dtype=self.dtype,
        )
        self.std = cfg.init_std
        self.init_method = lambda w: nn.init.normal_(w, mean=0.0, std=self.std)
        # Megatron's scaled init for output projections of residual branches (the row-parallel linears).
        self.out_std = self.std / math.sqrt(2.0 * cfg.num_layers)
        self.out_init_method = lambda w: nn.init.normal_(w, mean=0.0, std=self.out_std)

    def linear(self, in_features: int, out_features: int, *, parallel: str, bias: bool = False) -> nn.Module:
        """The one place linears are built. parallel: 'column' (output sharded) or 'row' (input sharded)."""
        if parallel == "column":
            return self._mark_sharded(ColumnLinear(
                in_features, out_features, config=self.mp_config, init_method=self.init_method,
                bias=bias, gather_output=False, tp_group=self.tp_group,
            ), dim=0)
        if parallel != "row":
            raise ValueError(f"parallel={parallel!r}; expected 'column' or 'row'")
        if bias and self.sequence_parallel:  # added to a sequence shard: its gradient would need a TP all-reduce
            raise NotImplementedError("a row-parallel bias under sequence parallelism is not implemented")
        return self._mark_sharded(RowLinear(
            in_features, out_features, config=self.mp_config, init_method=self.out_init_method,
            bias=bias, input_is_parallel=True, skip_bias_add=False, tp_group=self.tp_group,
        ), dim=1)

    def embedding(self, num_embeddings: int, dim: int) -> nn.Module:
        """megatron-core's vocab-parallel embedding (rows sharded over TP)."""
        return self._mark_sharded(tensor_parallel.VocabParallelEmbedding(
            num_embeddings, dim, init_method=self.init_method, config=self.mp_config, tp_group=self.tp_group,
        ), dim=0)

    @staticmethod
    def _mark_sharded(module: nn.Module, dim: int) -> nn.Module:
        """megatron-core tags a weight as TP-sharded (`partition_dim`) only when it initialises it; tag it
        when it does not (init_weights=False), or sharding code would take the shard for the full tensor."""
        if not hasattr(module.weight, "partition_dim"):
            tensor_parallel.set_tensor_model_parallel_attributes(module.weight, True, dim, 1)
        return module
