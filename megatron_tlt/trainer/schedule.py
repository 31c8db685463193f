"""Micro-batches through the model, one pipeline schedule for the update, the forward-only passes and the SFT.

    run_micro_batches(model, packs, head, ps, backward=True)

runs every packed micro-batch (`data.packing.PackedBatch`) through the model and calls `head(k, hidden)` on
the rank that holds the last stage with pack k's final normed hidden states [T_k, H]; with `backward`,
`head` returns pack k's loss and gradients accumulate in the parameters' `.grad` (summed over the
micro-batches, unscaled: the loss is normalised by the caller, `rl.algorithms.policy_loss`). With
`feature_layers` (an EAGLE-3 drafter's target features) `head(k, hidden, features)` also gets those
layers' outputs [T_k, 3H] (detached) from the same forward (`Policy.hidden_states`).

- PP = 1: a plain loop, forward then backward per micro-batch.
- PP > 1: torch.distributed.pipelining's `Schedule1F1B` (vpp = 1) or `ScheduleInterleaved1F1B` (vpp > 1)
  over the rank's chunks (`models.pipeline.PolicyStage`), forward-only passes through the same schedule's
  `eval()`. Activations between stages have one static shape per call: every pack is padded at its end to
  the longest pack's token count (the padding is one extra example of its own, so attention never crosses
  into it, and `head` sees only the real tokens); the number of micro-batches is padded to a multiple of
  the pipeline size with all-padding micro-batches whose loss is 0. With `feature_layers` the activations
  are [1, T, H + 3H]: the residual stream, then the three feature slots, each filled by the stage that holds
  its layer (zero before it), so the last stage hands `head` the features of layers on every stage. The stages are built with these static
shapes, so the schedule runs no metadata-inference pass. Each stage reads its micro-batch's
  position ids and cu_seqlens by index (the `mb` keyword reaches every stage), never from the activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from megatron_tlt.models.packed import chunk_forward
from megatron_tlt.models.pipeline import PolicyStage
from megatron_tlt.parallel.state import ParallelState

Head = Callable[..., torch.Tensor]  # head(k, hidden[, features]) -> pack k's loss
_EMPTY_TOKENS = 8  # token count of the padding micro-batches when this pipeline has no pack at all


@dataclass
class _Padded:
    tokens: torch.Tensor  # [T] long
    position_ids: torch.Tensor  # [T]
    cu_seqlens: torch.Tensor  # [N + 1 (+1 with padding)] int32
    max_seqlen: int
    num_real: int  # tokens of the pack itself (the rest is padding)


def _pad(pb, length: int) -> _Padded:
    n = 0 if pb is None else len(pb.tokens)
    pad = length - n
    if pb is None:
        return _Padded(torch.zeros(length, dtype=torch.long), torch.arange(length), torch.tensor([0, length], dtype=torch.int32),
                       length, 0)
    tokens = torch.cat([pb.tokens.long(), torch.zeros(pad, dtype=torch.long)])
    pos = torch.cat([pb.position_ids.long(), torch.arange(pad)])
    cu = pb.cu_seqlens.to(torch.int32)
    if pad:
        cu = torch.cat([cu, torch.tensor([length], dtype=torch.int32)])
    return _Padded(tokens, pos, cu, max(pb.max_seqlen, pad), n)


class _Chunk(nn.Module):
    """One model chunk as a pipelining stage module: forward(tokens or hidden [1, T(, W)], mb [1]) -> [1, T, W], W = H,
    or H + 3H with feature slots (the slots of this chunk's feature layers filled in, the others passed on)."""

    def __init__(self, chunk: nn.Module, padded: list[_Padded], feature_layers: Optional[Sequence[int]]):
        super().__init__()
        self.chunk, self.padded, self.feature_layers = chunk, padded, feature_layers

    def forward(self, x: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        p = self.padded[int(mb)]
        dev = x.device
        first = self.chunk.pre_process
        H = self.chunk.cfg.hidden_size
        hidden = None if first else x if self.feature_layers is None else x[..., :H]
        out = self.chunk.hidden_states(x if first else None, hidden=hidden, position_ids=p.position_ids[None].to(dev),
                                       cu_seqlens=p.cu_seqlens.to(dev), max_seqlen=p.max_seqlen, feature_layers=self.feature_layers)
        if self.feature_layers is None:
            return out
        out, own = out
        return torch.cat([out, own.to(out.dtype) if first else x[..., H:] + own.to(out.dtype)], dim=-1)


def head_chunk(model: nn.Module) -> nn.Module:
    """The chunk `head` computes with (it holds the final norm and the LM head): the last of a pipeline stage's
    chunks, or the whole model at PP = 1."""
    return model.chunks[-1] if isinstance(model, PolicyStage) else model


def run_micro_batches(
    model: nn.Module, packs: list, head: Head, ps: ParallelState, *, backward: bool, feature_layers: Optional[Sequence[int]] = None
) -> None:
    """See the module docstring. Every rank of the pipeline calls it with the same packs."""
    if ps.pp_size == 1:
        for k, pb in enumerate(packs):
            if feature_layers is not None:
                out = head(k, *chunk_forward(model, pb, feature_layers=feature_layers))
            else:
                out = head(k, chunk_forward(model, pb))
            if backward:
                out.backward()
        return
    _pipelined(model, packs, head, ps, backward, feature_layers)


def _pipelined(stage, packs: list, head: Head, ps: ParallelState, backward: bool, feature_layers: Optional[Sequence[int]]) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    length = max((len(pb.tokens) for pb in packs), default=_EMPTY_TOKENS)
    m = -(-max(len(packs), 1) // ps.pp_size) * ps.pp_size
    padded = [_pad(packs[k] if k < len(packs) else None, length) for k in range(m)]

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = int(target)
        if k >= len(packs):
            return output.sum() * 0.0
        out = output[0, : padded[k].num_real]
        if feature_layers is None:
            return head(k, out)
        return head(k, out[:, :H], out[:, H:].detach())

    # static shapes (no metadata inference, which would run a forward and `head` on a made-up micro-batch)
    dtype = next(stage.parameters()).dtype
    H = stage.cfg.hidden_size
    width = H * (1 if feature_layers is None else 1 + len(feature_layers))
    hidden = torch.empty(1, length, width, dtype=dtype, device="meta", requires_grad=backward)
    tokens = torch.empty(1, length, dtype=torch.long, device="meta")
    stages = [PipelineStage(_Chunk(c, padded, feature_layers), sid, stage.num_stages, ps.device, group=ps.pp_group,
                            input_args=tokens if c.pre_process else hidden, output_args=hidden)
              for c, sid in zip(stage.chunks, stage.stage_ids)]
    if len(stages) == 1:
        schedule = Schedule1F1B(stages[0], m, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn, scale_grads=False)
    index = torch.arange(m, device=ps.device)
    args = (torch.stack([p.tokens for p in padded]).to(ps.device),) if stage.pre_process else ()
    run = schedule.step if backward else schedule.eval
    run(*args, mb=index, target=index, return_outputs=False)
