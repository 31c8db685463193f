"""The packed forward: a micro-batch of concatenated examples -> per-token logprobs, entropy, hidden states.

One implementation for every training-side pass over packed sequences: the policy update, the supervised
warm-up, the drafter's data path (hidden states only) and the packing benchmark. A packed micro-batch is
anything with `tokens` [T], `position_ids` [T] (restarting per example), `cu_seqlens` [N+1], `max_seqlen`
and `targets` [T] (`data.packing.PackedBatch`); attention never crosses an example boundary.

It is written as two halves so that a pipeline schedule can drive it one model chunk at a time:

    h = chunk_forward(chunk, batch, hidden_in)              # any stage: its layers ([T, H] in and out)
    lp, ent = token_logprobs(chunk, h, batch.targets, ...)  # the last stage: chunked vocab-parallel head

    out = packed_forward(model, batch, temperature=1.0, compute_entropy=True)   # the whole model on one rank
    out.logprobs [T], out.entropy [T] or None, out.hidden [T, H]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_tlt.models.transformer import Policy
from megatron_tlt.ops.logprob import vocab_parallel_logprobs


@dataclass
class PackedOutput:
    logprobs: torch.Tensor  # [T] fp32 log p(targets[t] | tokens[:t+1]) at the given temperature
    entropy: Optional[torch.Tensor]  # [T] fp32 entropy of the next-token distribution (compute_entropy)
    hidden: torch.Tensor  # [T, H] final normed hidden states (the LM head's input)


def chunk_forward(chunk: Policy, batch, hidden_in: Optional[torch.Tensor] = None, feature_layers: Optional[Sequence[int]] = None):
    """One model chunk over a packed micro-batch: the first stage reads `batch.tokens`, a later stage takes
    the previous stage's output hidden_in [T, H]. Returns [T, H] (final normed on the last stage); with
    `feature_layers` (the whole model) ([T, H], [T, 3H] those layers' outputs: `Policy.hidden_states`)."""
    device = next(chunk.parameters()).device
    out = chunk.hidden_states(
        batch.tokens[None].to(device) if chunk.pre_process else None,
        hidden=None if hidden_in is None else hidden_in[None],
        position_ids=batch.position_ids[None].to(device),
        cu_seqlens=batch.cu_seqlens.to(device),
        max_seqlen=batch.max_seqlen,
        feature_layers=feature_layers,
    )  # [1, T, H] (, [1, T, 3H])
    return (out[0][0], out[1][0]) if feature_layers is not None else out[0]


def token_logprobs(
    chunk: Policy, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, compute_entropy: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The last stage's head: hidden [T, H] -> (logprobs of targets [T], entropy [T] or None), chunked over
    the vocabulary shards (no [T, V] logits tensor is kept)."""
    return vocab_parallel_logprobs(
        hidden, chunk.output_weight(), targets.to(hidden.device), tp_group=chunk.tp_group,
        vocab_size=chunk.cfg.vocab_size, temperature=temperature, compute_entropy=compute_entropy,
    )


def packed_forward(model: Policy, batch, *, temperature: float = 1.0, compute_entropy: bool = False) -> PackedOutput:
    """The whole model (one stage holding every layer) over a packed micro-batch."""
    hidden = chunk_forward(model, batch)
    lp, ent = token_logprobs(model, hidden, batch.targets, temperature, compute_entropy)
    return PackedOutput(lp, ent, hidden)
