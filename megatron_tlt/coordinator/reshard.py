"""The rollout's copy of the policy: training layout (TP x PP) -> rollout layout (the whole model at rollout TP).

Peers train with pipeline parallelism but do not decode with it (a bubble at every decode step); like them,
before each rollout the weights move into a layout where every rollout replica holds the whole model at
`rollout.tensor_parallel_size` (`parallel.state`: `ps.rollout`). Per pipeline stage, in one flat buffer per
stage, broadcast over the PP group from that stage:

- rollout TP == training TP: each rank's TP shards as they are (the rollout TP group of a rank is its
  training TP group: both are `tp` consecutive ranks), so a rank receives (pp - 1) / pp of a model shard;
- otherwise: the stage's tensors gathered whole over the training TP group first, then each rank keeps its
  rollout-TP slice.

With `rollout.precision=fp8` the engine's FP8 weights (`rollout.fp8`) are re-quantized here from the rollout
layout's weights whenever the version moved (the copy's high-precision linears are then freed: only their FP8
form is used), and their bytes and quantization time join `last`.

After the rollout the copy is freed (storage resized to 0; CUDA graphs captured over it dropped) unless
`rollout.keep_weights`; the next `acquire` re-allocates it. A copy already at the policy's version is not
moved again. With the same layout for both (PP = 1, same TP) the engine runs on the training weights and
none of this happens.

    weights = RolloutWeights(train_model, rollout_model, ps, keep=cfg.rollout.keep_weights)
    with weights.acquired(trainer.version):      # reshard (time and bytes in weights.last)
        engine.generate(...)
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_tlt.parallel.layout import stage_layer_ranges
from megatron_tlt.parallel.sharding import full_shape, gather_full, partition_dim, shard_of
from megatron_tlt.parallel.state import ParallelState


def _owner_stage(name: str, ranges: list[tuple[int, int]], pp: int) -> int:
    """The pipeline rank holding parameter `name` in the training layout."""
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        return next(s for s, (a, b) in enumerate(ranges) if a <= layer < b) % pp
    return 0 if name.startswith("embed_tokens.") else pp - 1


class RolloutWeights:
    def __init__(self, train_model: nn.Module, rollout_model: nn.Module, ps: ParallelState, *, keep: bool,
                 layout: Optional[list[int]] = None, vpp: int = 1, engine=None):
        self.train, self.model, self.ps, self.keep, self.engine = train_model, rollout_model, ps, keep, engine
        cfg = rollout_model.cfg
        ranges = stage_layer_ranges(cfg.num_layers, ps.pp_size, vpp, layout)
        params = dict(rollout_model.named_parameters())
        self.by_stage = [[n for n in params if _owner_stage(n, ranges, ps.pp_size) == s] for s in range(ps.pp_size)]
        self.same_tp = ps.rollout.tp_size == ps.tp_size
        self.version: Optional[int] = None  # the policy version the copy holds (None: none / freed; unused when layouts agree)
        self.last = {"reshard_time_s": 0.0, "reshard_bytes": 0.0}

    @contextlib.contextmanager
    def acquired(self, version: int):
        """The rollout copy at `version` for the duration of the block (every rank must enter it)."""
        if not self.ps.same_layouts and self.version != version:
            self._load()
            self.version = version
        fp8 = self.engine.model_calls.fp8 if self.engine is not None else None
        if fp8 is not None:  # rollout.precision=fp8: re-quantized whenever the version moved
            fp8.load(version)
            self.last.update(fp8.last)
            if not self.ps.same_layouts:  # the copy's linears live on in FP8 only (re-filled by the next _load)
                for m in fp8.linears.values():
                    m.weight.untyped_storage().resize_(0)
        try:
            yield self.model
        finally:
            if not (self.ps.same_layouts or self.keep):
                self._free()

    @torch.no_grad()
    def _load(self) -> None:
        t0 = time.perf_counter()
        ps, received = self.ps, 0
        mine = dict(self.train.named_parameters())
        dest = dict(self.model.named_parameters())
        for p in dest.values():  # re-allocate a freed copy
            if p.untyped_storage().size() == 0:
                p.untyped_storage().resize_(p.numel() * p.element_size())
        for stage, names in enumerate(self.by_stage):
            tensors = [self._payload(mine[n]) if ps.pp_rank == stage else None for n in names]
            shapes = [tuple(dest[n].shape) if self.same_tp else full_shape(dest[n], ps.rollout.tp_size) for n in names]
            if ps.pp_size > 1:
                dtype = next(iter(dest.values())).dtype
                if ps.pp_rank == stage:
                    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
                else:
                    flat = torch.empty(sum(int(torch.Size(s).numel()) for s in shapes), dtype=dtype, device=ps.device)
                    received += flat.numel() * flat.element_size()
                dist.broadcast(flat, src=dist.get_global_rank(ps.pp_group, stage), group=ps.pp_group)
                tensors, at = [], 0
                for s in shapes:
                    k = int(torch.Size(s).numel())
                    tensors.append(flat[at : at + k].view(s))
                    at += k
            for n, t in zip(names, tensors):
                dest[n].copy_(t if self.same_tp else shard_of(t, dest[n], ps.rollout.tp_group))
        if not self.same_tp:  # the TP gathers: the other ranks' shards of this stage's sharded tensors
            received += sum((ps.tp_size - 1) * p.numel() * p.element_size()
                            for n, p in mine.items() if partition_dim(p) is not None and n in self.by_stage[ps.pp_rank])
        if ps.device.type == "cuda":
            torch.cuda.synchronize()
        self.last = {"reshard_time_s": time.perf_counter() - t0, "reshard_bytes": float(received)}

    def _payload(self, p: torch.Tensor) -> torch.Tensor:
        """What this rank contributes for a training parameter: its shard (same TP) or the whole tensor."""
        return p.detach() if self.same_tp else gather_full(p, self.ps.tp_group)

    def _free(self) -> None:
        for p in self.model.parameters():
            p.untyped_storage().resize_(0)
        self.version = None
        if self.engine is not None:
            self.engine.model_calls.static_calls.graphs.clear()  # captured over the freed storage
