"""Sequence packing for training: examples concatenated with no padding and exact boundaries.

Why: RL responses have a long-tailed length mix, so padding every micro-batch to its longest
sequence wastes most of the compute. Instead, examples are bin-packed by token count into
micro-batches, and each micro-batch is one flat token stream plus `cu_seqlens` that a varlen
attention backend uses to keep attention inside each example. Position ids restart at 0 per
example, and next-token targets never roll across a boundary (DESIGN.md invariant 1).

How to use:

    bins = plan_micro_batches([len(s) for s in seqs], max_tokens=8192, num_bins_multiple_of=dp_size)
    mine = bins[dp_rank::dp_size]
    for idx in mine:
        pb = pack_sequences([seqs[i] for i in idx], ids=idx, train_masks=[masks[i] for i in idx])
        logits = model(pb.tokens, pb.position_ids, pb.cu_seqlens, pb.max_seqlen)   # [T, V]
        per_token = cross_entropy(logits, pb.targets, reduction="none") * pb.loss_mask
        per_example = unpack(per_token, pb.cu_seqlens)                              # list of [L_i]
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

TokenSeq = Union[Sequence[int], torch.Tensor]
MaskSeq = Union[Sequence[bool], torch.Tensor]


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [T] int64, examples concatenated
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for every example
    cu_seqlens: torch.Tensor  # [N+1] int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen: int  # longest example
    targets: torch.Tensor  # [T] int64, next token of the same example; 0 where there is none
    loss_mask: torch.Tensor  # [T] bool, targets[t] is a real next token that is to be trained on
    example_ids: list  # the caller's ids of the examples in this pack, in order


def _as_1d(x: Union[TokenSeq, MaskSeq], dtype: torch.dtype, what: str, i: int) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype)
    if t.dim() != 1:
        raise ValueError(f"{what} {i} must be 1-D, got shape {tuple(t.shape)}")
    return t


def pack_sequences(
    seqs: Sequence[TokenSeq],
    ids: Optional[Sequence] = None,
    train_masks: Optional[Sequence[MaskSeq]] = None,
) -> PackedBatch:
    """Concatenate `seqs` into one packed stream; `ids` default to 0..N-1.

    `train_masks[i][j]` says whether token j of example i is a training target, so the prediction
    made at position j-1 is trained on only where it is True (e.g. response tokens only).
    """
    if len(seqs) == 0:
        raise ValueError("pack_sequences needs at least one sequence")
    if ids is not None and len(ids) != len(seqs):
        raise ValueError(f"got {len(ids)} ids for {len(seqs)} sequences")
    if train_masks is not None and len(train_masks) != len(seqs):
        raise ValueError(f"got {len(train_masks)} train_masks for {len(seqs)} sequences")

    parts = [_as_1d(s, torch.int64, "sequence", i) for i, s in enumerate(seqs)]
    for i, p in enumerate(parts):
        if p.numel() == 0:
            raise ValueError(f"sequence {i} is empty")
    device = parts[0].device
    tokens = torch.cat(parts)  # [T]
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64, device=device)  # [N]
    starts = torch.cumsum(lengths, 0) - lengths  # [N]
    ends = starts + lengths - 1  # [N], last position of each example

    position_ids = torch.arange(tokens.numel(), device=device) - torch.repeat_interleave(starts, lengths)
    has_next = torch.ones_like(tokens, dtype=torch.bool)  # [T]
    has_next[ends] = False
    targets = torch.roll(tokens, -1).masked_fill(~has_next, 0)  # [T]

    loss_mask = has_next
    if train_masks is not None:
        masks = [_as_1d(m, torch.bool, "train_mask", i).to(device) for i, m in enumerate(train_masks)]
        for i, (m, p) in enumerate(zip(masks, parts)):
            if m.numel() != p.numel():
                raise ValueError(f"train_mask {i} has length {m.numel()}, sequence {i} has {p.numel()}")
        loss_mask = has_next & torch.roll(torch.cat(masks), -1)  # [T]

    cu_seqlens = torch.zeros(len(parts) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return PackedBatch(
        tokens=tokens,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()),
        targets=targets,
        loss_mask=loss_mask,
        example_ids=list(range(len(parts))) if ids is None else list(ids),
    )


def _check_lengths(lengths: Sequence[int]) -> None:
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"example {i} has length {n}; lengths must be >= 1")


def _longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length, ties by increasing index (deterministic)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _split_in_two(bin_: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split a bin of >= 2 examples into two non-empty halves with near-equal token sums."""
    halves = balance_across_ranks([lengths[i] for i in bin_], 2)
    return [bin_[j] for j in halves[0]], [bin_[j] for j in halves[1]]


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, num_bins_multiple_of: int = 1) -> list[list[int]]:
    """Bin-pack example indices into micro-batches of at most `max_tokens` tokens (first-fit decreasing).

    An example longer than `max_tokens` gets a bin of its own. The number of bins is then raised to
    a multiple of `num_bins_multiple_of` by splitting the heaviest multi-example bins in two; empty
    bins are added only when every bin already holds a single example. Indices in a bin are sorted.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if num_bins_multiple_of < 1:
        raise ValueError(f"num_bins_multiple_of must be >= 1, got {num_bins_multiple_of}")
    _check_lengths(lengths)

    bins: list[list[int]] = []
    loads: list[int] = []
    num_oversize = 0
    for i in _longest_first(lengths):
        n = lengths[i]
        if n > max_tokens:
            num_oversize += 1
        else:
            b = next((b for b, load in enumerate(loads) if load + n <= max_tokens), None)
            if b is not None:
                bins[b].append(i)
                loads[b] += n
                continue
        bins.append([i])
        loads.append(n)
    if num_oversize:
        log.warning("%d example(s) longer than max_tokens=%d were given a micro-batch each", num_oversize, max_tokens)

    target = -(-len(bins) // num_bins_multiple_of) * num_bins_multiple_of
    while len(bins) < target:
        splittable = [b for b in range(len(bins)) if len(bins[b]) >= 2]
        if not splittable:
            bins.extend([] for _ in range(target - len(bins)))
            break
        b = max(splittable, key=lambda b: (loads[b], -b))
        first, second = _split_in_two(bins[b], lengths)
        bins[b:b + 1] = [first, second]
        loads[b:b + 1] = [sum(lengths[i] for i in first), sum(lengths[i] for i in second)]
    return [sorted(b) for b in bins]


def balance_across_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Split example indices into `num_ranks` groups with near-equal token sums.

    Greedy: longest example first, each onto the currently lightest rank (ties: lowest rank).
    Indices in a group are sorted.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    _check_lengths(lengths)
    groups: list[list[int]] = [[] for _ in range(num_ranks)]
    heap = [(0, r) for r in range(num_ranks)]  # (load, rank)
    for i in _longest_first(lengths):
        load, r = heapq.heappop(heap)
        groups[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return [sorted(g) for g in groups]


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """[T, ...] -> list of per-example [L_i, ...] views, split at `cu_seqlens` ([N+1])."""
    total = int(cu_seqlens[-1])
    if values.shape[0] != total:
        raise ValueError(f"values has {values.shape[0]} rows, cu_seqlens covers {total}")
    return list(torch.split(values, torch.diff(cu_seqlens).tolist()))
