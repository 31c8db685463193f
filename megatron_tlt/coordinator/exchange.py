"""Samples across DP ranks for the policy update: lengths to everyone, tokens only where the balance needs them.

Why: a prompt's group never leaves the DP rank that rolled it out (rewards and group-relative advantages
are computed there), but the packed update balances its micro-batches by tokens over all DP ranks. So the
update needs, on every rank, the global list of lengths (to plan the same micro-batches everywhere), and
then only the tokens of the samples that the balance moves to another rank. Gathering every rank's full
samples on every rank (a pickled all_gather) moves (dp - 1) x the batch to each rank.

How, for one step (every DP rank calls it with its own scored samples):

    batch = exchange_for_update(local_samples, micro_batch_tokens, ps)
    trainer.step(batch.samples, batch.micro_batches, ...)   # this rank's share; micro-batches index batch.samples
    batch.response_lengths, batch.reward_mean                # of the whole step's batch, for metrics

1. all_gather of [2] float64 (sample count, reward sum) and of [N_max, 2] int32 (prompt, response length):
   the global batch's lengths in DP-rank order, identical on every rank;
2. `plan_update`, the same on every rank: each rank bin-packs its own samples (`plan_micro_batches`), then
   whole micro-batches move from the most to the least loaded rank while a move lowers the larger of the
   two loads (the micro-batch closest to half the gap moves first). A batch already balanced moves nothing;
3. one `all_to_all_single` of bytes: each moved sample as int32 [prompt len, response len, group, trained,
   policy version, finish reason], float64 [reward, advantage], int32 tokens, float32 rollout logprobs (the
   engine computes them in fp32 and the trainer reads them in fp32). Sizes follow from step 1's lengths, so
   no size exchange is needed. A rank's samples come in global order.

`bytes_received` counts what this rank received from other ranks in steps 1 and 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_tlt.data.packing import plan_micro_batches
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rl.sample import FINISH_REASONS, Sample

_HEADER = 6  # int32 per sample before the floats: prompt len, response len, group, trained, policy version, finish


@dataclass
class UpdateBatch:
    samples: list[Sample]  # the samples this rank trains on, in global order
    micro_batches: list[list[int]]  # this rank's micro-batches: indices into `samples`
    response_lengths: list[int]  # every sample of the step's batch (all DP ranks, in DP-rank order)
    reward_mean: float  # over the step's batch (0 when it is empty)
    bytes_received: int  # from other DP ranks, by this rank


def plan_update(lengths: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Micro-batches of every rank, as lists of global sample indices (rank r's samples are numbered after
    those of ranks < r): each rank packs its own, then whole micro-batches move from the most to the least
    loaded rank while that lowers the larger load (see the module docstring). Deterministic."""
    first = np.cumsum([0] + [len(x) for x in lengths]).tolist()
    plan = [[[first[r] + i for i in b] for b in plan_micro_batches(x, max_tokens)] if x else [] for r, x in enumerate(lengths)]
    size = {first[r] + i: n for r, x in enumerate(lengths) for i, n in enumerate(x)}
    tokens = [[sum(size[i] for i in b) for b in bins] for bins in plan]
    load = [sum(t) for t in tokens]
    while True:
        heavy = max(range(len(plan)), key=lambda r: (load[r], -r))
        light = min(range(len(plan)), key=lambda r: (load[r], r))
        gap = load[heavy] - load[light]
        movable = [k for k, t in enumerate(tokens[heavy]) if t < gap]
        if not movable:
            return plan
        k = min(movable, key=lambda k: (abs(gap - 2 * tokens[heavy][k]), k))
        t = tokens[heavy].pop(k)
        plan[light].append(plan[heavy].pop(k))
        tokens[light].append(t)
        load[heavy] -= t
        load[light] += t


def _encode(s: Sample) -> bytes:
    header = [len(s.prompt_ids), len(s.response_ids), s.group, int(s.trained), s.policy_version,
              FINISH_REASONS.index(s.finish_reason)]
    return b"".join([
        np.asarray(header, dtype=np.int32).tobytes(), np.asarray([s.reward, s.advantage], dtype=np.float64).tobytes(),
        np.asarray(s.prompt_ids + s.response_ids, dtype=np.int32).tobytes(),
        np.asarray(s.rollout_logprobs, dtype=np.float32).tobytes(),
    ])


def _encoded_size(num_prompt: int, num_response: int) -> int:
    return 4 * _HEADER + 16 + 4 * (num_prompt + num_response) + 4 * num_response


def _decode(buf: bytes) -> Sample:
    num_prompt, num_response, group, trained, version, finish = np.frombuffer(buf, np.int32, _HEADER).tolist()
    reward, advantage = np.frombuffer(buf, np.float64, 2, offset=4 * _HEADER).tolist()
    at = 4 * _HEADER + 16
    tokens = np.frombuffer(buf, np.int32, num_prompt + num_response, offset=at).tolist()
    logprobs = np.frombuffer(buf, np.float32, num_response, offset=at + 4 * (num_prompt + num_response)).tolist()
    return Sample(
        tokens[:num_prompt], tokens[num_prompt:], logprobs, reward=reward, advantage=advantage, group=group,
        finish_reason=FINISH_REASONS[finish], trained=bool(trained), policy_version=version,
    )


def _gather(samples: list[Sample], ps: ParallelState) -> tuple[list[list[int]], list[list[int]], float, float]:
    """(prompt lengths per rank, response lengths per rank, sample count, reward sum) of the global batch."""
    mine = torch.tensor([[len(s.prompt_ids), len(s.response_ids)] for s in samples], dtype=torch.int32).reshape(-1, 2)
    head = torch.tensor([len(samples), sum(s.reward for s in samples)], dtype=torch.float64)
    if ps.dp_size == 1:
        parts, heads = [mine], [head]
    else:
        heads = [torch.empty(2, dtype=torch.float64, device=ps.device) for _ in range(ps.dp_size)]
        dist.all_gather(heads, head.to(ps.device), group=ps.dp_group)
        counts = [int(h[0]) for h in heads]
        padded = torch.zeros(max(counts), 2, dtype=torch.int32, device=ps.device)
        padded[: len(samples)] = mine.to(ps.device)
        parts = [torch.empty_like(padded) for _ in range(ps.dp_size)]
        dist.all_gather(parts, padded, group=ps.dp_group)
        parts = [p[:n].cpu() for p, n in zip(parts, counts)]
    total, reward_sum = torch.stack([h.cpu() for h in heads]).sum(0).tolist()
    return [p[:, 0].tolist() for p in parts], [p[:, 1].tolist() for p in parts], total, reward_sum


def exchange_for_update(samples: list[Sample], micro_batch_tokens: int, ps: ParallelState) -> UpdateBatch:
    """This rank's share of the step's packed update (see the module docstring). Every DP rank must call it."""
    prompt_lens, response_lens, total, reward_sum = _gather(samples, ps)
    plan = plan_update([[p + r for p, r in zip(ps_, rs)] for ps_, rs in zip(prompt_lens, response_lens)], micro_batch_tokens)
    first = np.cumsum([0] + [len(x) for x in prompt_lens]).tolist()
    origin = [r for r, x in enumerate(prompt_lens) for _ in x]  # global index -> the rank that holds it
    owner = {i: r for r, bins in enumerate(plan) for b in bins for i in b}  # global index -> the rank that trains it
    mine = sorted(i for b in plan[ps.dp_rank] for i in b)
    position = {i: k for k, i in enumerate(mine)}
    micro_batches = [sorted(position[i] for i in b) for b in plan[ps.dp_rank]]
    kept = {first[ps.dp_rank] + k: s for k, s in enumerate(samples) if owner[first[ps.dp_rank] + k] == ps.dp_rank}
    received, bytes_received = {}, 0
    if ps.dp_size > 1:
        send = [[] for _ in range(ps.dp_size)]
        for k, s in enumerate(samples):
            dest = owner[first[ps.dp_rank] + k]
            if dest != ps.dp_rank:
                send[dest].append(_encode(s))
        incoming = [i for i in mine if origin[i] != ps.dp_rank]
        sizes = {i: _encoded_size(prompt_lens[origin[i]][i - first[origin[i]]], response_lens[origin[i]][i - first[origin[i]]])
                 for i in incoming}
        recv_sizes = [sum(sizes[i] for i in incoming if origin[i] == r) for r in range(ps.dp_size)]
        payload = [b"".join(parts) for parts in send]
        buf = torch.frombuffer(bytearray(b"".join(payload)), dtype=torch.uint8) if any(payload) else torch.empty(0, dtype=torch.uint8)
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=ps.device)
        dist.all_to_all_single(out, buf.to(ps.device), recv_sizes, [len(p) for p in payload], group=ps.dp_group)
        data, at = out.cpu().numpy().tobytes(), 0
        for i in incoming:  # grouped by source rank, each in global order: the order they were sent in
            received[i] = _decode(data[at : at + sizes[i]])
            at += sizes[i]
        others = ps.dp_size - 1
        bytes_received = 16 * others + 8 * max(len(x) for x in prompt_lens) * others + len(data)
    by_index = {**kept, **received}
    return UpdateBatch([by_index[i] for i in mine], micro_batches, [r for rs in response_lens for r in rs],
                       reward_sum / total if total else 0.0, bytes_received)
