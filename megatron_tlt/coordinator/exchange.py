"""Samples across DP ranks for the policy update: lengths to everyone, tokens only to the rank that trains them.

Why: a prompt's group never leaves the DP rank that rolled it out (rewards and group-relative advantages
are computed there), but the packed update balances micro-batches by tokens over all DP ranks. So the
update needs, on every rank, only the global list of lengths (to plan the same micro-batches everywhere)
and then, on each rank, the tokens of the samples it trains on. Gathering every rank's full samples on
every rank (what a pickled all_gather does) moves dp - 1 times more.

How, for one step (every DP rank calls it with its own scored samples):

    batch = exchange_for_update(local_samples, micro_batch_tokens, ps)
    trainer.step(batch.samples, batch.micro_batches, ...)      # this rank's share, index lists into samples
    batch.response_lengths, batch.rewards                        # of the whole step's batch, for metrics

1. all_gather of [N_r] counts, then of [N_max, 3] float64 rows (prompt length, response length, reward):
   the global batch in DP-rank order, identical on every rank;
2. the same plan on every rank: `plan_micro_batches` over the global lengths (a multiple of dp bins) and
   `balance_across_ranks` of the bins' tokens, as the trainer did before;
3. one `all_to_all_single` of int64 (header + tokens) and one of float64 (reward, advantage, rollout
   logprobs) per sample, each sample to the rank that trains it. Sizes follow from step 1's lengths, so
   no size exchange is needed. A rank's received samples come in global order.

`bytes_received` counts what this rank received from other ranks (its own share is not sent).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tlt.data.packing import balance_across_ranks, plan_micro_batches
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rl.sample import FINISH_REASONS, Sample

_HEADER = 6  # ints per sample before its tokens: prompt len, response len, group, trained, policy version, finish
_FLOATS = 2  # floats per sample before its logprobs: reward, advantage


@dataclass
class UpdateBatch:
    samples: list[Sample]  # the samples this rank trains on, in global order
    micro_batches: list[list[int]]  # this rank's micro-batches: indices into `samples`
    response_lengths: list[int]  # every sample of the step's batch (all DP ranks, in DP-rank order)
    rewards: list[float]  # the same samples' rewards
    bytes_received: int  # from other DP ranks, by this rank


def _encode(s: Sample) -> tuple[list[int], list[float]]:
    header = [len(s.prompt_ids), len(s.response_ids), s.group, int(s.trained), s.policy_version,
              FINISH_REASONS.index(s.finish_reason)]
    return header + s.prompt_ids + s.response_ids, [s.reward, s.advantage, *s.rollout_logprobs]


def _decode(ints: list[int], floats: list[float]) -> Sample:
    num_prompt, num_response, group, trained, version, finish = ints[:_HEADER]
    tokens = ints[_HEADER:]
    return Sample(
        tokens[:num_prompt], tokens[num_prompt:], floats[_FLOATS:], reward=floats[0], advantage=floats[1], group=group,
        finish_reason=FINISH_REASONS[finish], trained=bool(trained), policy_version=version,
    )


def _gather_rows(samples: list[Sample], ps: ParallelState) -> tuple[list[int], torch.Tensor]:
    """([dp] samples per rank, [N, 3] float64 (prompt len, response len, reward) of the global batch)."""
    rows = torch.tensor([[len(s.prompt_ids), len(s.response_ids), s.reward] for s in samples], dtype=torch.float64)
    rows = rows.reshape(len(samples), 3)
    if ps.dp_size == 1:
        return [len(samples)], rows
    counts = [torch.zeros(1, dtype=torch.int64, device=ps.device) for _ in range(ps.dp_size)]
    dist.all_gather(counts, torch.tensor([len(samples)], device=ps.device), group=ps.dp_group)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), 3, dtype=torch.float64, device=ps.device)
    padded[: len(samples)] = rows.to(ps.device)
    parts = [torch.empty_like(padded) for _ in range(ps.dp_size)]
    dist.all_gather(parts, padded, group=ps.dp_group)
    return counts, torch.cat([p[:n].cpu() for p, n in zip(parts, counts)])


def _all_to_all(chunks: list[list], recv_sizes: list[int], dtype: torch.dtype, ps: ParallelState) -> list[list]:
    """chunks[r] to rank r; returns what each rank sent to this one (recv_sizes[r] elements from rank r)."""
    send = torch.tensor([x for chunk in chunks for x in chunk], dtype=dtype, device=ps.device)
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=ps.device)
    dist.all_to_all_single(recv, send, recv_sizes, [len(c) for c in chunks], group=ps.dp_group)
    out = recv.cpu().tolist()
    offsets = [sum(recv_sizes[:r]) for r in range(ps.dp_size)]
    return [out[o : o + n] for o, n in zip(offsets, recv_sizes)]


def exchange_for_update(samples: list[Sample], micro_batch_tokens: int, ps: ParallelState) -> UpdateBatch:
    """This rank's share of the step's packed update (see the module docstring). Every DP rank must call it."""
    counts, rows = _gather_rows(samples, ps)
    prompt_lens, response_lens = rows[:, 0].long().tolist(), rows[:, 1].long().tolist()
    lengths = [p + r for p, r in zip(prompt_lens, response_lens)]
    bins = plan_micro_batches(lengths, micro_batch_tokens, num_bins_multiple_of=ps.dp_size) if lengths else []
    share = balance_across_ranks([max(sum(lengths[i] for i in b), 1) for b in bins], ps.dp_size) if bins else [[]] * ps.dp_size
    owner = {i: r for r in range(ps.dp_size) for k in share[r] for i in bins[k]}  # global index -> training rank
    first = [sum(counts[:r]) for r in range(ps.dp_size)]  # global index of each rank's first sample
    mine = sorted(i for i, r in owner.items() if r == ps.dp_rank)
    position = {i: k for k, i in enumerate(mine)}
    micro_batches = [[position[i] for i in bins[k]] for k in sorted(share[ps.dp_rank]) if bins[k]]

    if ps.dp_size == 1:
        received, bytes_received = [samples[i] for i in mine], 0
    else:
        send_ints, send_floats = [[] for _ in range(ps.dp_size)], [[] for _ in range(ps.dp_size)]
        for local, s in enumerate(samples):
            ints, floats = _encode(s)
            dest = owner[first[ps.dp_rank] + local]
            send_ints[dest] += ints
            send_floats[dest] += floats
        sources = [[i for i in mine if first[r] <= i < first[r] + counts[r]] for r in range(ps.dp_size)]
        recv_ints = [sum(_HEADER + lengths[i] for i in src) for src in sources]
        recv_floats = [sum(_FLOATS + response_lens[i] for i in src) for src in sources]
        ints_from = _all_to_all(send_ints, recv_ints, torch.int64, ps)
        floats_from = _all_to_all(send_floats, recv_floats, torch.float64, ps)
        received = []
        for r, src in enumerate(sources):
            ints, floats = ints_from[r], floats_from[r]
            for i in src:
                n_int, n_float = _HEADER + lengths[i], _FLOATS + response_lens[i]
                received.append(_decode(ints[:n_int], floats[:n_float]))
                ints, floats = ints[n_int:], floats[n_float:]
        others = [r for r in range(ps.dp_size) if r != ps.dp_rank]
        bytes_received = 8 * (ps.dp_size - 1 + 3 * max(counts) * (ps.dp_size - 1)  # the two gathers
                              + sum(recv_ints[r] + recv_floats[r] for r in others))
    return UpdateBatch(received, micro_batches, response_lens, rows[:, 2].tolist(), bytes_received)
