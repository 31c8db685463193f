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

Across layouts (training PP > 1 or another rollout TP, `ps.same_layouts` false) the samples live on the
rollout-DP ranks (rollout TP peers hold the same ones: the rollout-TP rank 0 of each replica speaks for it)
and every rank of a training replica (all its stages and TP ranks) needs its micro-batches: the lengths are
gathered over the world, the whole batch is bin-packed and the micro-batches balanced by tokens over the
training DP replicas (the same plan everywhere), and one all_to_all over the world brings each sample from
its rollout rank to every rank of the replica that trains it. `return_hidden` sends the update's hidden
states (the last stage's) back to the rollout replica that rolled each sample out, whose ranks train the
drafter on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tlt.data.packing import balance_across_ranks, plan_micro_batches
from megatron_tlt.parallel.state import ParallelState
from megatron_tlt.rl.sample import FINISH_REASONS, Sample

_HEADER = 6  # int32 per sample before the floats: prompt len, response len, group, trained, policy version, finish


@dataclass
class _Route:
    """Across layouts: where every sample of the step came from and who trains it (the same on every rank)."""
    origin: list[int]  # global index -> the world rank (rollout-TP rank 0) that rolled it out
    local: list[int]  # global index -> its index in that rank's samples
    response_lens: list[int]  # global index -> response length
    replica_ids: list[list[int]]  # training DP replica -> its samples' global indices, in global order


@dataclass
class UpdateBatch:
    samples: list[Sample]  # the samples this rank trains on, in global order
    micro_batches: list[list[int]]  # this rank's micro-batches: indices into `samples`
    response_lengths: list[int]  # every sample of the step's batch (all DP ranks, in DP-rank order)
    reward_mean: float  # over the step's batch (0 when it is empty)
    bytes_received: int  # from other DP ranks, by this rank
    route: Optional[_Route] = None  # across layouts only (for return_hidden)


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


def _gather(samples: list[Sample], group, size: int, device) -> tuple[list[list[int]], list[list[int]], float, float]:
    """(prompt lengths per rank, response lengths per rank, sample count, reward sum) of the global batch, over
    the `size` ranks of `group`."""
    mine = torch.tensor([[len(s.prompt_ids), len(s.response_ids)] for s in samples], dtype=torch.int32).reshape(-1, 2)
    head = torch.tensor([len(samples), sum(s.reward for s in samples)], dtype=torch.float64)
    if size == 1:
        parts, heads = [mine], [head]
    else:
        heads = [torch.empty(2, dtype=torch.float64, device=device) for _ in range(size)]
        dist.all_gather(heads, head.to(device), group=group)
        counts = [int(h[0]) for h in heads]
        padded = torch.zeros(max(max(counts), 1), 2, dtype=torch.int32, device=device)
        padded[: len(samples)] = mine.to(device)
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
        parts = [p[:n].cpu() for p, n in zip(parts, counts)]
    total, reward_sum = torch.stack([h.cpu() for h in heads]).sum(0).tolist()
    return [p[:, 0].tolist() for p in parts], [p[:, 1].tolist() for p in parts], total, reward_sum


def _all_to_all_bytes(payload: list[bytes], recv_sizes: list[int], device, group=None) -> bytes:
    """One all_to_all_single over `group` (default: the world): payload[r] to rank r, recv_sizes[r] bytes from rank r."""
    buf = torch.frombuffer(bytearray(b"".join(payload)), dtype=torch.uint8) if any(payload) else torch.empty(0, dtype=torch.uint8)
    out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(out, buf.to(device), recv_sizes, [len(p) for p in payload], group=group)
    return out.cpu().numpy().tobytes()


def exchange_for_update(samples: list[Sample], micro_batch_tokens: int, ps: ParallelState) -> UpdateBatch:
    """This rank's share of the step's packed update (see the module docstring). Every rank must call it."""
    if not ps.same_layouts:
        return _exchange_across_layouts(samples, micro_batch_tokens, ps)
    prompt_lens, response_lens, total, reward_sum = _gather(samples, ps.dp_group, ps.dp_size, ps.device)
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
        data, at = _all_to_all_bytes([b"".join(parts) for parts in send], recv_sizes, ps.device, ps.dp_group), 0
        for i in incoming:  # grouped by source rank, each in global order: the order they were sent in
            received[i] = _decode(data[at : at + sizes[i]])
            at += sizes[i]
        others = ps.dp_size - 1
        bytes_received = 16 * others + 8 * max(len(x) for x in prompt_lens) * others + len(data)
    by_index = {**kept, **received}
    return UpdateBatch([by_index[i] for i in mine], micro_batches, [r for rs in response_lens for r in rs],
                       reward_sum / total if total else 0.0, bytes_received)




def _exchange_across_layouts(samples: list[Sample], micro_batch_tokens: int, ps: ParallelState) -> UpdateBatch:
    world, table, me = ps.world_size, ps.rank_table, ps.rank
    speaks = table[me].rollout_tp == 0
    prompt_lens, response_lens, total, reward_sum = _gather(samples if speaks else [], None, world, ps.device)
    origin = [r for r, x in enumerate(prompt_lens) for _ in x]
    local = [k for x in prompt_lens for k in range(len(x))]
    lengths = [p + r for ps_, rs in zip(prompt_lens, response_lens) for p, r in zip(ps_, rs)]
    flat_response = [r for rs in response_lens for r in rs]
    bins = plan_micro_batches(lengths, micro_batch_tokens, num_bins_multiple_of=ps.dp_size) if lengths else []  # a bin per replica
    replica_bins = [[bins[b] for b in group] for group in balance_across_ranks([sum(lengths[i] for i in b) for b in bins], ps.dp_size)]
    replica_ids = [sorted(i for b in rb for i in b) for rb in replica_bins]
    replica_of = {i: d for d, ids in enumerate(replica_ids) for i in ids}
    mine = replica_ids[ps.dp_rank]
    position = {i: k for k, i in enumerate(mine)}
    micro_batches = [sorted(position[i] for i in b) for b in replica_bins[ps.dp_rank]]
    first = np.cumsum([0] + [len(x) for x in prompt_lens]).tolist()  # rank r's samples are numbered from first[r]
    size = [_encoded_size(p, r) for ps_, rs in zip(prompt_lens, response_lens) for p, r in zip(ps_, rs)]
    send: list[list[bytes]] = [[] for _ in range(world)]
    if speaks:
        for k, s in enumerate(samples):
            i = first[me] + k
            enc = None
            for r in range(world):
                if r != me and table[r].dp == replica_of[i]:
                    enc = enc or _encode(s)
                    send[r].append(enc)
    incoming = [i for i in mine if origin[i] != me]
    recv_sizes = [sum(size[i] for i in incoming if origin[i] == r) for r in range(world)]
    data = _all_to_all_bytes([b"".join(p) for p in send], recv_sizes, ps.device)
    by_index, at = {first[me] + k: s for k, s in enumerate(samples) if speaks and first[me] + k in position}, 0
    for r in range(world):  # grouped by source rank, each in global order: the order they were sent in
        for i in (i for i in incoming if origin[i] == r):
            by_index[i] = _decode(data[at : at + size[i]])
            at += size[i]
    bytes_received = 16 * (world - 1) + 8 * max(max((len(x) for x in prompt_lens), default=0), 1) * (world - 1) + len(data)
    route = _Route(origin, local, flat_response, replica_ids)
    return UpdateBatch([by_index[i] for i in mine], micro_batches, flat_response, reward_sum / total if total else 0.0,
                       bytes_received, route)


def return_hidden(batch: UpdateBatch, hidden: dict[int, torch.Tensor], hidden_size: int, ps: ParallelState) -> dict[int, torch.Tensor]:
    """Across layouts: the update's hidden states ({index into batch.samples: [R + 1, H]}, held by the last stage's
    TP rank 0 of each training replica) sent to every rank of the rollout replica that rolled the sample out.
    Returns {index into this rank's rollout samples: [R + 1, H] fp32}. Every rank must call it."""
    route, table, me, world = batch.route, ps.rank_table, ps.rank, ps.world_size
    sender = {d: next(r for r, c in enumerate(table) if c.dp == d and c.pp == ps.pp_size - 1 and c.tp == 0)
              for d in range(ps.dp_size)}
    send: list[list[bytes]] = [[] for _ in range(world)]
    kept: dict[int, torch.Tensor] = {}
    my_rollout = table[me].rollout_dp
    if me == sender[ps.dp_rank]:
        for k, i in enumerate(route.replica_ids[ps.dp_rank]):
            h = hidden[k].float().cpu().contiguous()
            for r in range(world):
                if table[r].rollout_dp == table[route.origin[i]].rollout_dp:
                    if r == me:
                        kept[route.local[i]] = h
                    else:
                        send[r].append(h.numpy().tobytes())
    nbytes = {i: 4 * (route.response_lens[i] + 1) * hidden_size for i in range(len(route.origin))}
    incoming = [(d, i) for d in range(ps.dp_size) for i in route.replica_ids[d]
                if table[route.origin[i]].rollout_dp == my_rollout and sender[d] != me]
    recv_sizes = [sum(nbytes[i] for d, i in incoming if sender[d] == r) for r in range(world)]
    data = _all_to_all_bytes([b"".join(p) for p in send], recv_sizes, ps.device)
    at = 0
    for r in range(world):
        for d, i in incoming:
            if sender[d] == r:
                kept[route.local[i]] = torch.frombuffer(bytearray(data[at : at + nbytes[i]]), dtype=torch.float32).view(-1, hidden_size)
                at += nbytes[i]
    return kept
